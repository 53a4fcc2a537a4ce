"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models of the same vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dpo_en_demo.json"


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from preftune.models.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    from preftune.models.prepare import load_tokenizer

    return load_tokenizer(str(embedded_path))


def make_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved like a Hub model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tokenizer))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


PAIRS = [
    {
        "prompt": "What is the capital of France?",
        "chosen": '{"answer": "Paris"}',
        "rejected": "The capital of France is Paris.",
    },
    {"prompt": "What is 2 plus 3?", "chosen": '{"answer": "5"}', "rejected": "Two plus three equals five."},
    {
        "prompt": "Name the opposite of hot.",
        "chosen": '{"answer": "cold"}',
        "rejected": "The opposite of hot is cold.",
    },
    {
        "prompt": "What color is the sky?",
        "chosen": '{"answer": "blue"}',
        "rejected": "On a clear day the sky is blue.",
    },
    {
        "prompt": "What is the symbol for gold?",
        "chosen": '{"answer": "Au"}',
        "rejected": "Gold has the chemical symbol Au.",
    },
    {
        "prompt": "How many legs does a spider have?",
        "chosen": '{"answer": "8"}',
        "rejected": "A spider has eight legs.",
    },
    {
        "prompt": "What is the plural of mouse?",
        "chosen": '{"answer": "mice"}',
        "rejected": "The plural of mouse is mice.",
    },
    {
        "prompt": "Which planet is the largest?",
        "chosen": '{"answer": "Jupiter"}',
        "rejected": "Jupiter is the largest planet.",
    },
]


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    return path


# --------------------------------------------------------------------------- short quiet runs


def quiet_argv(model, data, out, *extra: str) -> list[str]:
    """Flags for a short, quiet training run on `data`; `extra` overrides."""
    return [
        "--model_name_or_path", str(model),
        "--dataset_name", str(data),
        "--output_dir", str(out),
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--save_strategy", "no",
        "--eval_strategy", "no",
        "--logging_steps", "1",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def dpo_args(model, data, out, *extra: str):
    """Parsed (model, data, preference, training) arguments for a 2-step quiet DPO run."""
    from transformers import TrainingArguments

    from preftune.cli.arguments import parse_command_args
    from preftune.cli.main import DPO_DEFAULTS
    from preftune.config import DataArguments, ModelArguments, PreferenceArguments

    types = (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments)
    return parse_command_args(
        types, quiet_argv(model, data, out, "--max_steps", "2", *extra), defaults=DPO_DEFAULTS
    )


def run_capturing(args, on_build=None):
    """run_dpo, also returning the trainer and prepared models it built; `on_build(trainer, prepared)`
    runs before training starts."""
    from preftune.training import dpo

    captured = {}
    real_build = dpo.build_trainer

    def build(prepared, *a, **kw):
        trainer = real_build(prepared, *a, **kw)
        captured.update(trainer=trainer, prepared=prepared)
        if on_build is not None:
            on_build(trainer, prepared)
        return trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpo, "build_trainer", build)
        result = dpo.run_dpo(*args)
    return result, captured["trainer"], captured["prepared"]


# --------------------------------------------------------------------------- chat


@pytest.fixture(scope="session")
def chat_adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A random (non-zero) LoRA adapter on the tiny model: the tuned side answers unlike the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    folder = tmp_path_factory.mktemp("chat-adapter")
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture
def paired_steps(monkeypatch) -> list[int]:
    """The number of layer pairs each training step's paired checkpointing set up
    (preftune.training.paired_checkpointing), one entry per step that entered it."""
    import contextlib

    from preftune.training import paired_checkpointing as paired_module

    pairs_per_step: list[int] = []
    real = paired_module.paired_checkpointing

    @contextlib.contextmanager
    def recording(layers):
        with real(layers) as pairs:
            pairs_per_step.append(pairs)
            yield pairs

    monkeypatch.setattr(paired_module, "paired_checkpointing", recording)
    return pairs_per_step
