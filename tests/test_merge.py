"""`preftune merge`: the merged model is a plain transformers model that gives the log-probs of base +
adapter, carries its tokenizer, chat template and generation config, and chats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.chat.engine import GenerationSettings, load_chat
from preftune.cli.main import main as preftune_main
from preftune.models.merge import MERGE_INFO_FILE, merge_adapter, probe_token_logps


@pytest.fixture
def adapter_dir(tiny_model_dir, tokenizer, tmp_path) -> Path:
    """A LoRA adapter with non-zero weights (B is not zero), saved like a preftune run folder."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    out = tmp_path / "run"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_merged_model_equals_base_plus_adapter(adapter_dir, tiny_model_dir, tokenizer, tmp_path):
    out = tmp_path / "merged"
    result = merge_adapter(str(adapter_dir), str(out))
    assert result.max_logprob_diff < 1e-4 and not result.trained_quantized

    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        MERGE_INFO_FILE,
    } <= names
    assert "adapter_config.json" not in names

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir
    ).eval()
    base_only = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
        tokenize=False,
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    expected = probe_token_logps(reference, ids)
    torch.testing.assert_close(probe_token_logps(merged.eval(), ids), expected, atol=1e-5, rtol=1e-5)
    assert (probe_token_logps(base_only, ids) - expected).abs().max() > 1e-3  # the adapter does matter

    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    assert saved_tokenizer.chat_template == tokenizer.chat_template
    assert merged.generation_config.eos_token_id is not None


def test_qlora_adapter_is_merged_into_an_unquantized_base(adapter_dir, tmp_path):
    (adapter_dir / "preftune_config.yaml").write_text(
        yaml.safe_dump({"model": {"use_4bit_quantization": True, "bnb_4bit_quant_type": "nf4"}})
    )
    result = merge_adapter(str(adapter_dir), str(tmp_path / "merged"), dtype="float32")
    assert result.trained_quantized and result.dtype == "float32"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_merge_refuses_a_plain_model_and_an_existing_output(tiny_model_dir, adapter_dir, tmp_path):
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        merge_adapter(str(tiny_model_dir), str(tmp_path / "x"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(ValueError, match="--overwrite"):
        merge_adapter(str(adapter_dir), str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "file").read_text() == "keep me"


def test_merge_command_and_chat_on_the_merged_model(adapter_dir, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exit_info:
        preftune_main(["merge", "--model", str(adapter_dir), "--output", str(out)])
    assert exit_info.value.code == 0
    chat = load_chat(str(out))  # chat loads it as a full model: one side, no reference
    assert not isinstance(chat.run.model, PeftModel) and chat.sides == ["tuned"]
    reply = "".join(chat.stream([{"role": "user", "content": "hi"}], GenerationSettings(4, 0.0, 1.0)))
    assert isinstance(reply, str)
