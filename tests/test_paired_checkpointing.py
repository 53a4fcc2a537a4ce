"""preftune.training.paired_checkpointing: the same gradients as per-layer checkpointing, with the
second layer of each pair keeping no input."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.training.paired_checkpointing import paired_checkpointing


def _model(layers: int, dropout: float):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(model, lora)
    model.train()
    return model


def _decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.get_base_model().model.layers)


def _grads(model, paired: bool, autocast: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, LoRA gradients and the number of pairs, for one forward and backward."""
    model.zero_grad(set_to_none=True)
    ids = torch.arange(40).remainder(97).view(2, 20)
    torch.manual_seed(123)  # the dropout masks
    with paired_checkpointing(_decoder_layers(model)) if paired else contextlib.nullcontext(0) as pairs:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, pairs


@pytest.mark.parametrize(
    "layers, dropout, autocast", [(4, 0.0, False), (5, 0.2, False), (4, 0.2, True), (3, 0.0, True)]
)
def test_same_gradients_as_per_layer_checkpointing(layers, dropout, autocast):
    model = _model(layers, dropout)
    loss_plain, plain, _ = _grads(model, paired=False, autocast=autocast)
    loss_paired, paired, pairs = _grads(model, paired=True, autocast=autocast)
    assert pairs == layers // 2
    assert loss_paired == loss_plain
    assert plain.keys() == paired.keys() and len(plain) == 7 * 2 * layers  # A and B of 7 linears
    for name in plain:
        assert torch.equal(plain[name], paired[name]), name  # the reruns give the same tensors


def test_the_second_layer_of_a_pair_keeps_no_input():
    model = _model(4, 0.0)
    layers = _decoder_layers(model)

    def inputs_alive_after_forward(paired: bool) -> list[bool]:
        refs: list[weakref.ref] = []
        hooks = [
            layer.register_forward_pre_hook(lambda module, args: refs.append(weakref.ref(args[0])))
            for layer in layers
        ]
        try:
            with paired_checkpointing(layers) if paired else contextlib.nullcontext(0):
                loss = model(input_ids=torch.arange(20).view(1, 20)).logits.sum()
                gc.collect()
                alive = [ref() is not None for ref in refs]
                loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        return alive

    assert inputs_alive_after_forward(paired=False) == [True, True, True, True]
    assert inputs_alive_after_forward(paired=True) == [True, False, True, False]


def test_the_layers_get_their_checkpoint_back():
    model = _model(4, 0.0)
    layers = _decoder_layers(model)
    before = [layer._gradient_checkpointing_func for layer in layers]
    with paired_checkpointing(layers) as pairs:
        assert pairs == 2
        assert all(layer._gradient_checkpointing_func is not f for layer, f in zip(layers, before))
    assert [layer._gradient_checkpointing_func for layer in layers] == before


def test_nothing_to_pair_without_gradient_checkpointing():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with paired_checkpointing(list(model.model.layers)) as pairs:
        assert pairs == 0
