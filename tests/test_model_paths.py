"""The four ways to get a policy and its reference (see the table in preftune.models.prepare), end to end.

new LoRA on a base -> adapter disabled; a LoRA adapter -> frozen `reference` adapter on the same base;
--merge_and_unload -> merged base + new LoRA; full fine-tuning -> frozen copy; plus QLoRA / 8-bit on CPU
and the errors for impossible combinations and missing paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, dpo_args, run_capturing
from transformers import AutoModelForCausalLM, TrainingArguments

from preftune.config import DataArguments, ModelArguments, PreferenceArguments
from preftune.data import apply_template
from preftune.models.prepare import (
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    ModelPathError,
    adapter_state,
    prepare_models,
)
from preftune.training import dpo
from preftune.training.batching import PairCollator
from preftune.training.logprobs import batch_logps

ARG_TYPES = (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments)

try:
    import bitsandbytes as bnb

    HAS_BNB = True
except Exception:  # not installed or no usable native library
    HAS_BNB = False
requires_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not importable")


# --------------------------------------------------------------------------- helpers


def fixed_batch(tokenizer, data_file: Path, n: int = 4) -> dict[str, torch.Tensor]:
    """The first `n` pairs of `data_file`, tokenized exactly as run_dpo does, as one collated batch."""
    apply_template(tokenizer, "tokenizer")
    train, _ = dpo.tokenized_splits(DataArguments(dataset_name=str(data_file), splits="train"), tokenizer, 0)
    return PairCollator(pad_token_id=tokenizer.pad_token_id)(train[:n])


@torch.no_grad()
def logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed reply log-probs of the 2B rows (chosen then rejected), in eval mode, on the default path."""
    was_training = model.training
    model.eval()
    try:
        out = batch_logps(model, batch)
    finally:
        model.train(was_training)
    return out.logps


def load_base(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def make_trainer(prepared, tmp_path: Path, **pref):
    return dpo.build_trainer(
        prepared,
        PreferenceArguments(**pref),
        TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none", use_cpu=True),
        train=[{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}],
        held_out=[],
        max_length=64,
    )


def base_linear_count(model: torch.nn.Module) -> int:
    """nn.Linear modules that are model weights, not LoRA A/B matrices."""
    return sum(
        isinstance(m, torch.nn.Linear) and ".lora_" not in f".{name}" for name, m in model.named_modules()
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir, data_file) -> Path:
    """A LoRA adapter on the tiny model, produced by a short DPO run (stands in for an SFT result)."""
    out = tmp_path_factory.mktemp("sft-adapter")
    dpo.run_dpo(
        *dpo_args(
            tiny_model_dir, data_file, out, "--use_peft_lora", "--lora_r", "4", "--learning_rate", "2e-2"
        )
    )
    assert (out / "adapter_config.json").is_file()
    return out


# --------------------------------------------------------------------------- new LoRA on a base


def test_new_lora_reference_is_the_plain_base_model(tiny_model_dir, tokenizer, data_file, tmp_path):
    prepared = prepare_models(ModelArguments(model_name_or_path=str(tiny_model_dir), use_peft_lora=True))
    assert prepared.reference_mode == "adapter_disabled"
    assert prepared.reference_model is None
    model = prepared.model
    assert set(model.peft_config) == {POLICY_ADAPTER}
    # A fresh LoRA has B = 0 (policy == base); make the policy differ so "adapter off" means something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))

    trainer = make_trainer(prepared, tmp_path)
    batch = fixed_batch(tokenizer, data_file)
    model.train()
    ref_chosen, ref_rejected = trainer.reference_logps(model, batch)
    assert model.training, "the reference pass must give the policy back in train mode"

    expected = logps(load_base(tiny_model_dir), batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=0, atol=1e-5)
    policy = logps(model, batch)
    assert (policy - expected).abs().max() > 1e-2, "the policy should differ from the reference here"


# --------------------------------------------------------------------------- a LoRA adapter


def test_adapter_path_has_two_adapters_on_one_base(sft_adapter, tiny_model_dir):
    prepared = prepare_models(ModelArguments(model_name_or_path=str(sft_adapter)))
    model = prepared.model
    assert prepared.reference_mode == "reference_adapter"
    assert prepared.reference_model is None
    assert set(model.peft_config) == {POLICY_ADAPTER, REFERENCE_ADAPTER}
    assert model.active_adapter == POLICY_ADAPTER

    # ONE base model: as many weight Linears as the plain model, each carrying both adapters.
    plain = load_base(tiny_model_dir)
    assert base_linear_count(model) == base_linear_count(plain)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == sum(
        p.numel() for p in plain.parameters()
    )
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert lora_layers
    assert all(set(m.lora_A) == {POLICY_ADAPTER, REFERENCE_ADAPTER} for m in lora_layers)

    # Only the policy adapter trains.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(f".{POLICY_ADAPTER}." in n for n in trainable)
    reference = adapter_state(model, REFERENCE_ADAPTER)
    assert reference and not any(p.requires_grad for n, p in model.named_parameters() if n in reference)
    # Both adapters start as the same weights.
    default = adapter_state(model, POLICY_ADAPTER)
    for name, value in reference.items():
        torch.testing.assert_close(
            default[name.replace(f".{REFERENCE_ADAPTER}.", f".{POLICY_ADAPTER}.")], value
        )


def test_adapter_training_keeps_the_reference_adapter_frozen(
    sft_adapter, tiny_model_dir, tokenizer, data_file, tmp_path
):
    from peft import PeftModel

    before = {}

    def snapshot(trainer, prepared):
        before["reference"] = adapter_state(prepared.model, REFERENCE_ADAPTER)
        before["default"] = adapter_state(prepared.model, POLICY_ADAPTER)

    seen = []  # (batch, reference chosen, reference rejected) of every training step
    real_reference_logps = dpo.PreferenceTrainer.reference_logps

    def recording_reference_logps(self, model, batch):
        chosen, rejected = real_reference_logps(self, model, batch)
        if model.training:
            seen.append(({k: v.clone() for k, v in batch.items()}, chosen.clone(), rejected.clone()))
        return chosen, rejected

    out = tmp_path / "run"
    args = dpo_args(sft_adapter, data_file, out, "--max_steps", "3", "--learning_rate", "1e-2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpo.PreferenceTrainer, "reference_logps", recording_reference_logps)
        result, trainer, prepared = run_capturing(args, on_build=snapshot)
    assert result.reference_mode == "reference_adapter"
    model = trainer.accelerator.unwrap_model(trainer.model)

    after_ref = adapter_state(model, REFERENCE_ADAPTER)
    assert after_ref.keys() == before["reference"].keys() and after_ref
    for name, value in after_ref.items():
        assert torch.equal(value, before["reference"][name]), f"reference weight {name} changed"
    after_default = adapter_state(model, POLICY_ADAPTER)
    changed = [n for n, v in after_default.items() if not torch.equal(v, before["default"][n])]
    assert changed, "the policy adapter did not train"
    assert all(f".{POLICY_ADAPTER}." in n for n, p in model.named_parameters() if p.requires_grad)

    # The reference log-probs used in every training step are those of the original adapter.
    assert len(seen) == 3
    fresh = PeftModel.from_pretrained(load_base(tiny_model_dir), str(sft_adapter)).eval()
    for batch, chosen, rejected in seen:
        torch.testing.assert_close(torch.cat([chosen, rejected]), logps(fresh, batch), rtol=0, atol=1e-5)
    # ... and they are not the trained policy's.
    batch = seen[-1][0]
    assert not torch.allclose(logps(model, batch), logps(fresh, batch), rtol=0, atol=1e-4)

    # The saved run holds only the policy adapter.
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / REFERENCE_ADAPTER).exists()
    saved = PeftModel.from_pretrained(load_base(tiny_model_dir), str(out)).eval()
    assert set(saved.peft_config) == {"default"}
    torch.testing.assert_close(logps(saved, batch), logps(model, batch), rtol=0, atol=1e-5)


def test_merge_and_unload_trains_a_new_lora_on_the_merged_base(
    sft_adapter, tiny_model_dir, tokenizer, data_file, tmp_path
):
    from peft import PeftModel

    prepared = prepare_models(
        ModelArguments(
            model_name_or_path=str(sft_adapter), merge_and_unload=True, use_peft_lora=True, lora_r=8
        )
    )
    model = prepared.model
    assert prepared.reference_mode == "adapter_disabled"
    assert set(model.peft_config) == {POLICY_ADAPTER}
    assert model.peft_config[POLICY_ADAPTER].r == 8  # the new LoRA, not the loaded one (r=4)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b), "a new LoRA starts at B = 0"
    assert base_linear_count(model) == base_linear_count(load_base(tiny_model_dir))

    # The reference (adapter off) is the merged model: base + the SFT adapter, whatever the new LoRA holds.
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    batch = fixed_batch(tokenizer, data_file)
    trainer = make_trainer(prepared, tmp_path)
    chosen, rejected = trainer.reference_logps(model, batch)
    sft = PeftModel.from_pretrained(load_base(tiny_model_dir), str(sft_adapter)).eval()
    torch.testing.assert_close(torch.cat([chosen, rejected]), logps(sft, batch), rtol=0, atol=1e-4)
    assert not torch.allclose(logps(sft, batch), logps(load_base(tiny_model_dir), batch), rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- full fine-tuning


def test_full_finetune_uses_a_frozen_copy(tiny_model_dir, data_file, tmp_path):
    before = {}

    def snapshot(trainer, prepared):
        assert prepared.reference_model is not None and prepared.reference_model is not prepared.model
        before["reference"] = {n: p.detach().clone() for n, p in prepared.reference_model.named_parameters()}
        before["policy"] = {n: p.detach().clone() for n, p in prepared.model.named_parameters()}
        policy_storage = {p.data_ptr() for p in prepared.model.parameters()}
        assert not policy_storage & {p.data_ptr() for p in prepared.reference_model.parameters()}

    args = dpo_args(tiny_model_dir, data_file, tmp_path / "run", "--learning_rate", "1e-3")
    result, trainer, prepared = run_capturing(args, on_build=snapshot)
    assert result.reference_mode == "model_copy"
    reference, policy = trainer.reference_model, trainer.accelerator.unwrap_model(trainer.model)
    assert not hasattr(policy, "peft_config")
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(p, before["reference"][name]), f"reference weight {name} changed"
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p.detach(), before["policy"][n])]
    assert len(changed) >= len(before["policy"]) // 2, f"only {changed} changed"
    assert (tmp_path / "run" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- quantized bases


@requires_bnb
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "flags",
    [
        ["--use_4bit_quantization", "--bnb_4bit_quant_type", "nf4", "--use_nested_quant", "true"],
        ["--use_8bit_quantization"],
    ],
    ids=["qlora-4bit-nf4-nested", "8bit"],
)
def test_quantized_lora_trains_and_saves_a_loadable_adapter(flags, tiny_model_dir, data_file, tmp_path):
    """quantization.py documents 4-bit on CPU (with the repack fix); tests/test_qlora_cpu.py shows 8-bit trains."""
    from peft import PeftModel

    before = {}

    def snapshot(trainer, prepared):
        before.update(adapter_state(prepared.model, POLICY_ADAPTER))

    out = tmp_path / "run"
    args = dpo_args(
        tiny_model_dir,
        data_file,
        out,
        "--use_peft_lora",
        "--learning_rate",
        "1e-2",
        "--test_size",
        "2",
        "--do_eval",
        "true",
        *flags,
    )
    result, trainer, prepared = run_capturing(args, on_build=snapshot)
    assert result.reference_mode == "adapter_disabled"
    assert trainer.state.global_step == 2
    layer = bnb.nn.Linear4bit if "--use_4bit_quantization" in flags else bnb.nn.Linear8bitLt
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert any(isinstance(m, layer) for m in model.modules())
    if "--use_nested_quant" in flags:
        q = next(m for m in model.modules() if isinstance(m, layer)).weight.quant_state
        assert q.quant_type == "nf4" and q.nested
    after = adapter_state(model, POLICY_ADAPTER)
    assert any(not torch.equal(after[n], before[n]) for n in before), "no LoRA weight trained"
    assert all(torch.isfinite(v).all() for v in after.values())
    assert torch.isfinite(torch.tensor(result.eval_metrics["eval_loss"]))

    saved = PeftModel.from_pretrained(load_base(tiny_model_dir), str(out))
    assert set(saved.peft_config) == {"default"}
    loaded = adapter_state(saved, "default")
    assert loaded.keys() == after.keys()
    for name, value in loaded.items():
        torch.testing.assert_close(value, after[name].float().cpu())


# --------------------------------------------------------------------------- errors


@requires_bnb
@pytest.mark.parametrize("flag", ["use_4bit_quantization", "use_8bit_quantization"])
def test_quantization_without_lora_is_refused(flag, tiny_model_dir):
    with pytest.raises(ValueError, match="--use_peft_lora"):
        prepare_models(ModelArguments(model_name_or_path=str(tiny_model_dir), **{flag: True}))


@pytest.mark.parametrize("name", ["/no/such/model-folder", "./no-such-model", "~/no-such-model-dir"])
def test_missing_local_model_path_names_the_path(name):
    with pytest.raises(ModelPathError, match="no such folder") as err:
        prepare_models(ModelArguments(model_name_or_path=name, use_peft_lora=True))
    assert name in str(err.value)


def test_missing_model_path_through_run_dpo(data_file, tmp_path):
    missing = tmp_path / "not-here"
    with pytest.raises(ValueError, match="no such folder") as err:
        dpo.run_dpo(*dpo_args(missing, data_file, tmp_path / "out", "--use_peft_lora"))
    assert str(missing) in str(err.value)


def test_missing_base_of_an_adapter_names_the_base_path(sft_adapter, tmp_path):
    adapter = tmp_path / "moved-adapter"
    adapter.mkdir()
    for f in sft_adapter.iterdir():
        if f.is_file():
            (adapter / f.name).write_bytes(f.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelPathError, match="deleted-base"):
        prepare_models(ModelArguments(model_name_or_path=str(adapter)))


def test_folder_that_is_not_a_model_names_the_path(tmp_path):
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="just-a-folder"):
        prepare_models(ModelArguments(model_name_or_path=str(folder), use_peft_lora=True))
