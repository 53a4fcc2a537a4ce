"""QLoRA (bitsandbytes 4-bit NF4 base + LoRA) must train correctly on CPU, also after no-grad passes.

bitsandbytes >= 0.49 repacks 4-bit weights for CPU inference the first time a layer runs in eval mode without
grad, after which its matmul has no autograd: LoRA gradients silently go wrong or vanish. DPO runs exactly such
passes (reference log-probs with the adapter disabled, evaluation, generation). See
``preftune.models.quantization.keep_4bit_trainable_after_no_grad``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from preftune.models.quantization import bnb_config, keep_4bit_trainable_after_no_grad

try:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
except Exception:  # not installed, or no usable native library
    bnb = None

requires_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (or peft) is not importable")


def _cpu_repacks() -> bool:
    """Whether this bitsandbytes + CPU repacks 4-bit weights in eval/no-grad passes (needs AVX512-BF16)."""
    return (
        bnb is not None
        and hasattr(bnb.functional, "_convert_weight_packed_for_cpu")
        and bool(bnb.functional.has_avx512bf16())
    )


requires_repack = pytest.mark.skipif(
    not _cpu_repacks(), reason="this bitsandbytes/CPU never repacks 4-bit weights (no AVX512-BF16)"
)
# the un-fixed model backprops through bitsandbytes::gemv_4bit, which has no autograd kernel: expected here
no_autograd_warning = pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")

N_LINEAR = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _load(path: str, *, load_in_4bit=True, nested=False, fix=True, prepare=False):
    quantization = bnb_config(load_in_4bit=load_in_4bit, load_in_8bit=not load_in_4bit, nested=nested)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
    if fix:
        assert keep_4bit_trainable_after_no_grad(model) == (N_LINEAR if load_in_4bit else 0)
    if prepare:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _backward(model, batch) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in _trainable(model).items()}


def _without_grad(grads: dict[str, torch.Tensor | None]) -> list[str]:
    return [n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0) or not g.isfinite().all()]


def _train_step(model, optimizer, batch) -> tuple[list[str], list[str]]:
    """One optimizer step; returns (params with no/zero gradient, params the step did not change)."""
    grads = _backward(model, batch)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    optimizer.step()
    unchanged = [n for n, p in _trainable(model).items() if torch.equal(before[n], p.detach())]
    return _without_grad(grads), unchanged


def _log_probs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(**batch).logits.float(), dim=-1)


def _no_grad_passes(model, batch) -> torch.Tensor:
    """What DPO does between steps: eval log-probs, reference log-probs with the adapter off, generation."""
    model.eval()
    eval_log_probs = _log_probs(model, batch)
    with model.disable_adapter():
        _log_probs(model, batch)
    model.generate(
        input_ids=batch["input_ids"][:, :4],
        attention_mask=batch["attention_mask"][:, :4],
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
    )
    model.train()
    return eval_log_probs


def _repacked_layers(model) -> int:
    return sum(
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


# --- bnb_config -------------------------------------------------------------------------------------------


def test_bnb_config_none_without_quantization():
    assert bnb_config(load_in_4bit=False, load_in_8bit=False) is None


def test_bnb_config_4bit_and_8bit():
    config = bnb_config(
        True, False, quant_type="NF4", nested=True, compute_dtype="bf16", quant_storage="uint8"
    )
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_quant_storage == torch.uint8
    config = bnb_config(False, True)
    assert config.load_in_8bit and not config.load_in_4bit


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "--use_8bit_quantization"),
        ({"load_in_4bit": "yes", "load_in_8bit": False}, "--use_4bit_quantization"),
        ({"load_in_4bit": False, "load_in_8bit": 1}, "--use_8bit_quantization"),
        ({"load_in_4bit": True, "load_in_8bit": False, "quant_type": "int4"}, "--bnb_4bit_quant_type"),
        ({"load_in_4bit": True, "load_in_8bit": False, "nested": "true"}, "--use_nested_quant"),
        (
            {"load_in_4bit": True, "load_in_8bit": False, "compute_dtype": "float64"},
            "--bnb_4bit_compute_dtype",
        ),
        ({"load_in_4bit": True, "load_in_8bit": False, "quant_storage": "int4"}, "--bnb_4bit_quant_storage"),
        ({"load_in_4bit": False, "load_in_8bit": False, "quant_type": "nf3"}, "--bnb_4bit_quant_type"),
    ],
)
def test_bnb_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        bnb_config(**kwargs)


# --- the CPU repack fix -----------------------------------------------------------------------------------


@requires_bnb
@pytest.mark.parametrize(
    ("nested", "prepare"), [(False, False), (True, True)], ids=["nf4", "nf4-nested-prepare_kbit"]
)
def test_qlora_every_lora_weight_trains_after_no_grad_passes(tiny_llama, batch, nested, prepare):
    model = _load(tiny_llama, nested=nested, prepare=prepare)
    base_layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(base_layers) == N_LINEAR
    assert all(m.weight.dtype == torch.uint8 for m in base_layers)  # still stored in 4 bits
    optimizer = torch.optim.Adam(_trainable(model).values(), lr=1e-2)

    # step 1: lora_B starts at zero, so only lora_B can get a gradient; afterwards every LoRA weight can
    missing, _ = _train_step(model, optimizer, batch)
    assert missing and all("lora_A" in n for n in missing)

    train_log_probs = _log_probs(model.train(), batch)
    grads_before = _backward(model, batch)
    eval_log_probs = _no_grad_passes(model, batch)
    assert _repacked_layers(model) == 0
    # eval mode and train mode go through the same 4-bit matmul (dropout is 0): identical log-probs
    torch.testing.assert_close(eval_log_probs, train_log_probs, rtol=0, atol=1e-6)
    # same weights, same batch: the no-grad passes must not change the gradients (un-fixed, they do by ~80%)
    torch.testing.assert_close(_backward(model, batch), grads_before, rtol=1e-5, atol=1e-7)

    for _ in range(2):
        missing, unchanged = _train_step(model, optimizer, batch)
        assert missing == [], f"trainable parameters without a gradient: {missing}"
        assert unchanged == [], f"trainable parameters the optimizer step did not change: {unchanged}"
        _no_grad_passes(model, batch)
    assert _repacked_layers(model) == 0
    assert all(m.weight.dtype == torch.uint8 for m in base_layers)


@requires_bnb
def test_fix_is_idempotent_and_a_noop_without_4bit_layers(tiny_llama):
    model = _load(tiny_llama)  # applies the fix once
    assert keep_4bit_trainable_after_no_grad(model) == N_LINEAR
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert keep_4bit_trainable_after_no_grad(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0


@requires_bnb
@requires_repack
@no_autograd_warning
def test_without_fix_no_grad_pass_breaks_qlora_gradients(tiny_llama, batch):
    """Demonstrates the bug the fix prevents (deterministic on a CPU with AVX512-BF16, skipped elsewhere).

    Fresh LoRA (lora_B == 0): before any no-grad pass every lora_B gets a gradient. One eval-mode no-grad
    forward repacks all 4-bit layers; afterwards the base layers pass no gradient to their inputs and most
    lora_B get none.
    """
    model = _load(tiny_llama, fix=False)
    before = _backward(model, batch)
    lora_b = [n for n in before if "lora_B" in n]
    assert len(lora_b) == N_LINEAR and not set(lora_b) & set(_without_grad(before))

    model.eval()
    _log_probs(model, batch)
    assert _repacked_layers(model) == N_LINEAR

    after = _backward(model, batch)
    lost = set(lora_b) & set(_without_grad(after))
    assert len(lost) >= N_LINEAR // 2, f"expected most lora_B to lose their gradient, lost {sorted(lost)}"


@requires_bnb
@requires_repack
@no_autograd_warning
@pytest.mark.parametrize("nested", [False, True], ids=["nf4", "nf4-nested"])
def test_fix_unpacks_layers_that_were_already_repacked(tiny_llama, batch, nested):
    """Calling the fix late converts repacked layers back; close to the original (absmax went via bf16).

    The un-nested case covers down_proj (in_features 128 > blocksize 64), whose absmax bitsandbytes' own
    inverse leaves transposed.
    """
    model = _load(tiny_llama, nested=nested, fix=False)
    train_log_probs = _log_probs(model.train(), batch)
    reference = _backward(model, batch)
    model.eval()
    _log_probs(model, batch)
    assert _repacked_layers(model) == N_LINEAR

    with pytest.warns(UserWarning, match="already been repacked"):
        assert keep_4bit_trainable_after_no_grad(model) == N_LINEAR
    assert _repacked_layers(model) == 0
    grads = _backward(model, batch)
    assert _without_grad(grads) == _without_grad(reference)  # only the lora_A of a fresh adapter
    for name, grad in reference.items():
        if grad is not None and grad.norm() > 0:
            assert (grads[name] - grad).norm() / grad.norm() < 0.02, name
    torch.testing.assert_close(_log_probs(model.train(), batch), train_log_probs, rtol=0, atol=5e-3)
    _no_grad_passes(model, batch)
    assert _repacked_layers(model) == 0


# --- 8-bit ------------------------------------------------------------------------------------------------


@requires_bnb
def test_8bit_lora_trains_on_cpu(tiny_llama, batch):
    model = _load(tiny_llama, load_in_4bit=False)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    optimizer = torch.optim.Adam(_trainable(model).values(), lr=1e-2)
    _train_step(model, optimizer, batch)
    _no_grad_passes(model, batch)
    missing, unchanged = _train_step(model, optimizer, batch)
    assert missing == [] and unchanged == []


def test_paired_checkpointing_gives_the_same_4bit_gradients(tiny_llama, batch):
    """The second layer of a pair runs its forward without gradients and its first layer again in
    the backward (preftune.training.paired_checkpointing): with 4-bit layers, after the no-grad
    passes DPO makes, the gradients are still those of plain per-layer checkpointing."""
    from preftune.training.paired_checkpointing import paired_checkpointing

    model = _load(tiny_llama, prepare=True)
    with torch.no_grad():  # B starts at zero, and so would every gradient of A
        for name, param in _trainable(model).items():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    _no_grad_passes(model, batch)
    plain = _backward(model, batch)
    with paired_checkpointing(list(model.get_base_model().model.layers)) as pairs:
        paired = _backward(model, batch)
    assert pairs == 1
    assert not _without_grad(plain) and plain.keys() == paired.keys()
    for name in plain:
        assert torch.equal(plain[name], paired[name]), name
