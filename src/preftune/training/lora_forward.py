"""A leaner forward for PEFT's LoRA linear layers: y = x W^T + b + s * (x A^T) B^T.

PEFT computes `result + lora_B(lora_A(dropout(x))) * scaling`: the scaling multiplies and the sum
adds two full [tokens, out_features] tensors in every LoRA layer, forward and backward, and under
bf16 autocast every linear casts its fp32 input to bf16 again, so q, k and v (and gate and up)
each cast the same input twice (once for the base weight, once for lora_A). On a CPU those
memory-bound passes cost about as much as the small LoRA matmuls themselves.

Here the scaling is folded into B (an [out, r] matrix), the low-rank product is accumulated into
the base output by one in-place addmm, and an input is cast to the autocast dtype once and shared
by every layer that reads it. Same maths: only the order of floating-point roundings changes.

Used for the plain case only: one active adapter, unmerged, no DoRA or other variant, no dropout,
an `nn.Linear` base; with the adapters disabled (the reference pass), the base layer alone.
Anything else takes PEFT's forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# The last input cast for autocast, reused while the same tensor comes in (q/k/v, gate/up), in the
# same grad mode (a cast made under no_grad carries no graph back to its input).
_last_cast: tuple[Tensor, int, torch.dtype, bool, Tensor] | None = None


def _autocast_input(x: Tensor) -> Tensor:
    """x in the autocast dtype of its device (x itself without autocast), cast once per tensor."""
    global _last_cast
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not x.is_floating_point():
        return x
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == dtype:
        return x
    key = (x._version, dtype, torch.is_grad_enabled())
    if _last_cast is not None and _last_cast[0] is x and _last_cast[1:4] == key:
        return _last_cast[4]
    cast = x.to(dtype)
    _last_cast = (x, *key, cast)
    return cast


def _plain_adapter(layer) -> str | None:
    """The one active adapter when this call can take the lean path, else None."""
    if layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
        return None
    return name


def _lean_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """Bound to each eligible `peft.tuners.lora.Linear` instead of its own forward."""
    if args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    if self.disable_adapters:
        if self.merged:
            return type(self).forward(self, x)
        return F.linear(_autocast_input(x), base.weight, base.bias)
    name = _plain_adapter(self)
    if name is None:
        return type(self).forward(self, x)
    xc = _autocast_input(x)
    result = F.linear(xc, base.weight, base.bias)
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in], [out, r]
    low_rank = F.linear(xc, lora_a)  # [..., r]
    scaled_b = (lora_b * self.scaling[name]).to(result.dtype)
    # result += low_rank @ (s * B)^T, in place (the base output is saved by no backward)
    result.view(-1, result.shape[-1]).addmm_(low_rank.reshape(-1, low_rank.shape[-1]), scaled_b.t())
    return result


def use_lean_lora_forward(model: torch.nn.Module) -> int:
    """Bind the lean forward to every LoRA linear layer over an `nn.Linear`; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and type(module.base_layer) is torch.nn.Linear:
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
