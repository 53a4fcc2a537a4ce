"""Paired activation checkpointing: half the decoder layers' inputs kept for the backward pass.

With gradient checkpointing, every decoder layer keeps only its input for the backward pass, and
recomputes its activations from it there. Those inputs are the residual stream, in fp32 even
under bf16 autocast: 61 MiB for the embedded model's 30 layers at 920 tokens, the largest thing a
CPU training step holds beyond the weights. Here the layers go in pairs (a, b), and b keeps
nothing: its backward first recomputes its input by running a again, without gradients, from
a's kept input (which a's own backward needs anyway), then recomputes b's activations and runs
b's backward. The random state (dropout) and the autocast settings of each original forward are
restored for these reruns, so they give the same tensors, bit for bit, and the gradients are the
same as plain checkpointing's. The price is one more forward of a layer per pair, without
gradients, about a tenth of a step's layer work. bf16, embedded model, 6 steps, preftune alone,
three interleaved runs each: peak RSS 939-943 MiB against 969-977, at 4.9-5.6 against 5.2-6.6 s
a step (this machine's noise is larger than the difference; `benchmarks/dpo_vs_trl.py --tools
preftune --preftune_flags "--paired_checkpointing false"`, three more pairs: 944-952 against
971-972 MiB, 0.36-0.39 against 0.31-0.46 pairs/s). Against TRL the bf16 speedup went from
2.59-2.88x to 2.23-2.76x over the day's runs (README, "Performance").

This is segment checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost") with segments of two layers, where the second layer's recomputation starts from the
segment's input. It plugs into transformers' per-layer checkpointing
(`GradientCheckpointingLayer._gradient_checkpointing_func`) for the duration of a training step,
so the model and its module names stay as they are. A layer called in any other way (extra
positional inputs, a first layer whose output is not the second one's input, a non-tensor
output) takes the plain per-layer checkpoint.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from preftune.training.logprobs import unwrap_causal_lm

Tensor = torch.Tensor


class _ForwardState:
    """The random state and autocast settings at a layer's original forward, to rerun it alike."""

    def __init__(self, hidden: Tensor):
        self.device_type = hidden.device.type
        self.cpu_rng = torch.get_rng_state()
        self.devices, self.device_rngs = get_device_states(hidden)  # accelerator RNGs (none on a CPU)
        self.autocast = {
            device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in {self.device_type, "cpu"}
        }
        self.autocast_cache = torch.is_autocast_cache_enabled()

    def rerun(self, fn: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu_rng)
            if self.devices:
                set_device_states(self.devices, self.device_rngs, device_type=self.device_type)
            with contextlib.ExitStack() as stack:
                for device, (enabled, dtype) in self.autocast.items():
                    stack.enter_context(
                        torch.autocast(
                            device, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache
                        )
                    )
                return fn(hidden)


class _Pair:
    """What the second layer of a pair needs to recompute its input: the first layer's forward
    (transformers passes it with its keyword inputs bound), its input and its forward state."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.first_forward: Callable[[Tensor], Tensor] | None = None
        self.first_input: Tensor | None = None
        self.first_state: _ForwardState | None = None
        self.first_output: weakref.ref | None = None  # not a reference: the output is not kept


class _SecondLayer(torch.autograd.Function):
    """Runs the pair's second layer without keeping its input; the backward recomputes it."""

    @staticmethod
    def forward(ctx, hidden: Tensor, pair: _Pair, layer_forward: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.first = (pair.first_forward, pair.first_input, pair.first_state)
        ctx.layer_forward = layer_forward
        ctx.state = _ForwardState(hidden)
        return layer_forward(hidden)  # autograd is off inside forward: nothing is saved

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        first_forward, first_input, first_state = ctx.first
        with torch.no_grad():
            hidden = first_state.rerun(first_forward, first_input)
        hidden = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            output = ctx.state.rerun(ctx.layer_forward, hidden)
        torch.autograd.backward(output, grad_output)
        ctx.first = ctx.layer_forward = ctx.state = None
        return hidden.grad, None, None


def _first_of_pair(checkpoint: Callable, pair: _Pair) -> Callable:
    def run(layer_forward: Callable, hidden: Tensor, *args: Any, **kwargs: Any) -> Any:
        state = _ForwardState(hidden)
        output = checkpoint(layer_forward, hidden, *args, **kwargs)
        pair.clear()
        if not args and not kwargs and isinstance(output, Tensor):
            pair.first_forward, pair.first_input, pair.first_state = layer_forward, hidden, state
            pair.first_output = weakref.ref(output)
        return output

    return run


def _second_of_pair(checkpoint: Callable, pair: _Pair) -> Callable:
    def run(layer_forward: Callable, hidden: Tensor, *args: Any, **kwargs: Any) -> Any:
        follows_first = pair.first_output is not None and pair.first_output() is hidden
        if args or kwargs or not follows_first:
            pair.clear()
            return checkpoint(layer_forward, hidden, *args, **kwargs)
        output = _SecondLayer.apply(hidden, pair, layer_forward)
        pair.clear()  # the backward holds what it needs
        return output

    return run


@contextlib.contextmanager
def paired_checkpointing(layers: list[torch.nn.Module]) -> Iterator[int]:
    """Within this block, the checkpointed `layers` (a decoder's, in order) run in pairs as the
    module docstring says. Yields the number of pairs (0 where the layers are not checkpointed)."""
    checkpointed = [
        layer
        for layer in layers
        if getattr(layer, "gradient_checkpointing", False) and hasattr(layer, "_gradient_checkpointing_func")
    ]
    if len(checkpointed) != len(layers):  # none, or only some (every_n_layers): leave them alone
        yield 0
        return
    originals = [layer._gradient_checkpointing_func for layer in layers]
    for first, second in zip(layers[0::2], layers[1::2]):
        pair = _Pair()
        first._gradient_checkpointing_func = _first_of_pair(first._gradient_checkpointing_func, pair)
        second._gradient_checkpointing_func = _second_of_pair(second._gradient_checkpointing_func, pair)
    try:
        yield len(layers) // 2
    finally:
        for layer, original in zip(layers, originals):
            layer._gradient_checkpointing_func = original


def for_training_step(
    model: torch.nn.Module, enabled: bool, world_size: int
) -> contextlib.AbstractContextManager:
    """`paired_checkpointing` over the decoder layers of `model` (a causal LM, PEFT-wrapped or not)
    when `enabled` and in one process. Not under DDP: it takes the second layers' parameters, which
    the forward runs without gradients, for unused ones, then sees them ready a second time in their
    backward."""
    if not enabled or world_size > 1:
        return contextlib.nullcontext(0)
    decoder = unwrap_causal_lm(model).get_decoder()
    return paired_checkpointing(list(getattr(decoder, "layers", [])))
