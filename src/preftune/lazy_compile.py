"""Import bitsandbytes without loading PyTorch's compiler.

bitsandbytes wraps some of its kernels (its default backend's 4-bit dequantization and 32-bit
optimizer steps) in `torch.compile` while it is being imported. `torch.compile` compiles nothing
until the wrapped function's first call, but it loads Inductor's compiler right away: about 40 MiB
of resident memory and a second of start-up on a CPU (`python -X importtime`; bf16 DPO on the
embedded model, peak RSS 969-973 MiB against 1009-1012 without it). peft and
`transformers.Trainer` import bitsandbytes whenever it is installed, so every training process
paid for the compiler, although only a quantized model on a CPU ever calls those kernels.

`import_bitsandbytes` imports it with a stand-in for `torch.compile` that calls the real one on
the wrapped function's first call, so the kernels are compiled as before, at the same moment; only
the compiler's import moves to where it is needed. Call it first thing in a process, before
anything imports peft or `transformers.Trainer` (`preftune` commands do).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
from collections.abc import Callable
from typing import Any


def deferred_compile(real_compile: Callable[..., Any]) -> Callable[..., Any]:
    """A `torch.compile` that calls `real_compile` (with the same options) when the function it
    wraps is first called. Anything but a plain function (a module) goes to `real_compile` at once.
    If compiling raises, the function runs uncompiled from then on, as bitsandbytes' own fallback
    does when `torch.compile` fails."""

    def compile(model: Any = None, **options: Any) -> Any:
        if model is None:  # the decorator form, @torch.compile(dynamic=False)
            return lambda fn: compile(fn, **options)
        if not inspect.isfunction(model):
            return real_compile(model, **options)
        compiled = None

        @functools.wraps(model)
        def compiled_on_first_call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                try:
                    compiled = real_compile(model, **options)
                except Exception:
                    compiled = model
            return compiled(*args, **kwargs)

        return compiled_on_first_call

    return compile


def import_bitsandbytes() -> bool:
    """Import bitsandbytes with its `torch.compile` calls deferred (see the module docstring).

    Returns whether this call imported it: False when it is already imported, is not installed,
    or fails to import (peft then handles that as it always does, when it tries again)."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return False
    import torch

    real_compile = torch.compile
    torch.compile = deferred_compile(real_compile)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    finally:
        torch.compile = real_compile
    return True
