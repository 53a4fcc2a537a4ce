"""preftune.lazy_compile: bitsandbytes imported without PyTorch's compiler, its kernels compiled on
first call as before."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from preftune.lazy_compile import deferred_compile

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bitsandbytes")


class RecordingCompile:
    """A torch.compile that records its calls and returns a wrapper marking its results."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[object, dict]] = []
        self.fail = fail

    def __call__(self, model, **options):
        self.calls.append((model, options))
        if self.fail:
            raise RuntimeError("no compiler here")
        return lambda *args, **kwargs: ("compiled", model(*args, **kwargs))


def add(a, b=0):
    return a + b


def test_compiles_on_first_call_once_with_the_same_options():
    real = RecordingCompile()
    fn = deferred_compile(real)(add, dynamic=False)
    assert real.calls == []  # nothing compiled yet
    assert fn.__wrapped__ is add and fn.__name__ == "add"
    assert fn(1, b=2) == ("compiled", 3)
    assert fn(4) == ("compiled", 4)
    assert real.calls == [(add, {"dynamic": False})]


def test_decorator_form():
    real = RecordingCompile()

    @deferred_compile(real)(mode="reduce-overhead")
    def double(x):
        return 2 * x

    assert real.calls == []
    assert double(3) == ("compiled", 6)
    assert real.calls[0][1] == {"mode": "reduce-overhead"}


def test_a_module_is_compiled_at_once():
    torch = pytest.importorskip("torch")
    real = RecordingCompile()
    module = torch.nn.Identity()
    deferred_compile(real)(module)
    assert real.calls == [(module, {})]


def test_a_failed_compile_runs_the_function_as_it_is():
    real = RecordingCompile(fail=True)
    fn = deferred_compile(real)(add)
    assert fn(1, 2) == 3
    assert fn(5, 5) == 10
    assert len(real.calls) == 1  # not retried on every call


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_bnb
def test_peft_and_the_trainer_import_without_the_compiler():
    out = _python(
        "import sys, torch\n"
        "from preftune.lazy_compile import import_bitsandbytes\n"
        "real = torch.compile\n"
        "print(import_bitsandbytes(), import_bitsandbytes())\n"
        "import peft, transformers.trainer\n"
        "print(torch.compile is real, 'bitsandbytes' in sys.modules,\n"
        "      'torch._inductor.compile_fx' in sys.modules)\n"
    )
    assert out.split() == ["True", "False", "True", "True", "False"]


@needs_bnb
def test_bitsandbytes_kernels_still_go_through_torch_compile():
    # A recording torch.compile stands in for the real one (which would take ~20 s to compile):
    # bitsandbytes' wrapped kernel calls it on its first call, and computes the same values.
    out = _python(
        "import torch\n"
        "calls = []\n"
        "def recording_compile(model, **options):\n"
        "    calls.append(options)\n"
        "    return model\n"
        "torch.compile = recording_compile\n"
        "from preftune.lazy_compile import import_bitsandbytes\n"
        "assert import_bitsandbytes()\n"
        "from bitsandbytes.backends.default import ops\n"
        "kernel = getattr(ops, '_dequantize_blockwise_compute', None)\n"
        "if kernel is None:\n"
        "    print('absent'); raise SystemExit\n"
        "before = len(calls)\n"
        "A = torch.randint(0, 256, (256,), dtype=torch.uint8)\n"
        "absmax, code = torch.rand(4), torch.linspace(-1, 1, 256)\n"
        "out = kernel(A, absmax, code, 64, torch.float32)\n"
        "assert torch.equal(out, kernel.__wrapped__(A, absmax, code, 64, torch.float32))\n"
        "print(before, calls[before:])\n"
    )
    if out.strip() == "absent":
        pytest.skip("this bitsandbytes has no compiled blockwise dequantization")
    assert out.strip() == "0 [{'dynamic': False}]"
