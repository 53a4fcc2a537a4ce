"""Merge a LoRA adapter into its base model and save a standalone model.

The result is an ordinary model folder (safetensors weights, config, generation config, tokenizer
with its chat template) that `AutoModelForCausalLM.from_pretrained` loads without peft.

QLoRA adapters: the base is always loaded UNquantized (in --dtype) for merging: W + scale * B @ A is
computed in full precision and the 4-bit weights are never touched. Merging into a 4-bit base would
round the merged weights back to 4 bits; this way the merged model is the full-precision base plus
the learned update (it differs from the 4-bit training model only by the 4-bit rounding of the base,
as any de-quantized QLoRA model does).

Before saving, the log-probs of a probe conversation are compared between base + adapter and the
merged model; the largest difference is logged and returned.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from preftune.config import ModelArguments
from preftune.models.prepare import adapter_base, load_base_model, load_tokenizer, resolve_model_path

logger = logging.getLogger("preftune")

MERGE_INFO_FILE = "preftune_merge.json"
PROBE = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
    {"role": "assistant", "content": "Paris."},
]


@dataclass
class MergeResult:
    output_dir: str
    base_model: str
    adapter: str
    dtype: str
    trained_quantized: bool  # the adapter was trained on a 4/8-bit base (QLoRA)
    max_logprob_diff: float  # |log p(base + adapter) - log p(merged)| on the probe, per token, max


def trained_on_quantized_base(adapter_dir: str) -> bool:
    """Whether preftune trained this adapter with --use_4bit_quantization / --use_8bit_quantization."""
    config = Path(adapter_dir) / "preftune_config.yaml"
    if not config.is_file():
        return False
    model = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    return bool(model.get("use_4bit_quantization") or model.get("use_8bit_quantization"))


def probe_token_logps(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for every token of `input_ids` but the first, in fp32."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _probe_ids(tokenizer, device: torch.device) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(PROBE, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in PROBE)
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.to(device)


def _save_atomic(model, tokenizer, output_dir: Path, info: dict, overwrite: bool) -> None:
    """Write into a temporary folder next to output_dir, then rename it into place."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--output {output_dir} exists and is not empty (pass --overwrite to replace it)"
            )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_adapter(
    adapter: str,
    output_dir: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> MergeResult:
    """Merge the LoRA adapter in `adapter` (a run folder or Hub repo) into its base; save to output_dir."""
    from peft import PeftModel

    adapter_path = resolve_model_path(adapter)
    base_name = adapter_base(adapter_path)
    if base_name is None:
        raise ValueError(f"{adapter} is not a PEFT adapter (no adapter_config.json): nothing to merge")
    base_path = resolve_model_path(base_name)
    quantized = trained_on_quantized_base(adapter_path)
    if quantized:
        logger.info(
            "the adapter was trained on a quantized base (QLoRA): the base is loaded unquantized (%s) and "
            "the adapter merged in full precision; the merged model is not re-quantized",
            dtype,
        )

    # No quantization flags: the base always loads in full precision for merging.
    args = ModelArguments(
        model_name_or_path=base_path, torch_dtype=dtype, trust_remote_code=trust_remote_code
    )
    base = load_base_model(base_path, args)
    tokenizer = load_tokenizer(adapter_path, fallback=base_path, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter_path).eval()

    probe = _probe_ids(tokenizer, base.device)
    before = probe_token_logps(model, probe)
    merged = model.merge_and_unload()
    after = probe_token_logps(merged, probe)
    max_diff = (before - after).abs().max().item()
    logger.info("merged: largest per-token log-prob difference on a probe conversation %.2e", max_diff)

    generation = merged.generation_config
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True  # training may have turned it off; generation wants it

    result = MergeResult(
        output_dir=str(output_dir),
        base_model=str(base_path),
        adapter=str(adapter_path),
        dtype=str(merged.dtype).removeprefix("torch."),
        trained_quantized=quantized,
        max_logprob_diff=max_diff,
    )
    _save_atomic(merged, tokenizer, Path(output_dir), asdict(result), overwrite)
    return result
