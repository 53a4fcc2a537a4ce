"""Load the policy, its tokenizer and its reference, cheapest reference first.

| what --model_name_or_path is        | policy                          | reference                          |
|-------------------------------------|---------------------------------|------------------------------------|
| a base model, --use_peft_lora       | base + new LoRA `default`       | the base, adapter disabled         |
| a LoRA adapter (an SFT result)      | adapter loaded as `default`     | same adapter as frozen `reference` |
|   ... with --merge_and_unload       | merged base + new LoRA          | the merged base, adapter disabled  |
| a base model, full fine-tuning      | the model                       | a frozen copy                      |

The two LoRA cases keep ONE base model in memory: a reference costs an adapter, not a model
(the seed recipe's multi-adapter trick).
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from preftune.config import ModelArguments
from preftune.memory import file_mappings, in_mapped_file, release_file_pages
from preftune.models.embedded import embedded_model_path
from preftune.models.embedding import keep_seen_rows_only
from preftune.models.quantization import bnb_config, keep_4bit_trainable_after_no_grad

logger = logging.getLogger("preftune")

POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"


class ModelPathError(ValueError):
    """--model_name_or_path points at nothing loadable."""


@dataclass
class PreparedModels:
    model: torch.nn.Module  # the policy (a PeftModel for LoRA runs)
    tokenizer: PreTrainedTokenizerBase
    reference_mode: str  # "adapter_disabled" | "reference_adapter" | "model_copy" | "none"
    reference_model: torch.nn.Module | None = None  # only for "model_copy"
    base_model_name_or_path: str = ""


def resolve_model_path(model_name_or_path: str | None) -> str:
    """None means the embedded model; a local-looking path must exist."""
    if model_name_or_path is None:
        return str(embedded_model_path())
    path = Path(model_name_or_path).expanduser()
    looks_local = (
        model_name_or_path.startswith((".", "/", "~")) or path.exists() or model_name_or_path.count("/") > 1
    )
    if looks_local and not path.exists():
        raise ModelPathError(f"--model_name_or_path: no such folder: {model_name_or_path}")
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ModelPathError(
            f"--model_name_or_path: {model_name_or_path} has neither config.json (a model) nor "
            "adapter_config.json (a PEFT adapter)"
        )
    return str(path) if path.exists() else model_name_or_path


def adapter_base(model_path: str) -> str | None:
    """If `model_path` is a PEFT adapter, the base model it was trained on; else None."""
    config_file = Path(model_path) / "adapter_config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())["base_model_name_or_path"]
    if Path(model_path).exists():
        return None
    try:  # a Hub repo: ask PEFT whether it is an adapter
        from peft import PeftConfig

        return PeftConfig.from_pretrained(model_path).base_model_name_or_path
    except Exception:  # noqa: BLE001 - not an adapter (or not reachable): treat as a model
        return None


def _torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"--torch_dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def load_tokenizer(
    path: str, fallback: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model (or its base), with a pad token guaranteed."""
    source = path
    if fallback and not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        source = fallback
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_base_model(path: str, args: ModelArguments, for_training: bool = True) -> PreTrainedModel:
    """A causal LM with the requested quantization, dtype and attention implementation."""
    quantization = bnb_config(
        load_in_4bit=args.use_4bit_quantization,
        load_in_8bit=args.use_8bit_quantization,
        quant_type=args.bnb_4bit_quant_type,
        nested=args.use_nested_quant,
        compute_dtype=args.bnb_4bit_compute_dtype,
        quant_storage=args.bnb_4bit_quant_storage_dtype,
    )
    attn = "flash_attention_2" if args.use_flash_attn else args.attn_implementation
    kwargs = {"trust_remote_code": args.trust_remote_code, "dtype": _torch_dtype(args.torch_dtype)}
    if attn:
        kwargs["attn_implementation"] = attn
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization is not None:
        keep_4bit_trainable_after_no_grad(model)
    return model


def _lora_config(args: ModelArguments):
    from peft import LoraConfig

    targets = args.lora_target_modules.strip()
    target_modules = (
        "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _prepare_for_kbit(
    model: PreTrainedModel, gradient_checkpointing: bool, use_reentrant: bool
) -> PreTrainedModel:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )


def prepare_models(
    args: ModelArguments, gradient_checkpointing: bool = False, with_reference: bool = True
) -> PreparedModels:
    """Load policy + tokenizer and decide how the reference is computed (see the module table).

    with_reference=False (SFT): build no reference that costs memory, neither a frozen model copy
    nor a second adapter (reference_mode "none"); a new LoRA keeps "adapter_disabled", which is free.
    """
    from peft import PeftModel, get_peft_model

    quantized = args.use_4bit_quantization or args.use_8bit_quantization
    model_path = resolve_model_path(args.model_name_or_path)
    base_path = adapter_base(model_path)

    if base_path is not None:  # the model is a LoRA adapter, e.g. the output of SFT
        base_path = resolve_model_path(base_path)
        tokenizer = load_tokenizer(model_path, fallback=base_path, trust_remote_code=args.trust_remote_code)
        base = load_base_model(base_path, args)
        if args.merge_and_unload:
            if quantized:
                logger.warning(
                    "merging an adapter into a quantized base rounds the merged weights to 4/8 bits"
                )
            base = PeftModel.from_pretrained(base, model_path).merge_and_unload()
            if quantized:
                base = _prepare_for_kbit(base, gradient_checkpointing, args.use_reentrant)
            model = get_peft_model(base, _lora_config(args))
            return PreparedModels(model, tokenizer, "adapter_disabled", base_model_name_or_path=base_path)
        if quantized:
            base = _prepare_for_kbit(base, gradient_checkpointing, args.use_reentrant)
        model = PeftModel.from_pretrained(base, model_path, adapter_name=POLICY_ADAPTER, is_trainable=True)
        if not with_reference:
            return PreparedModels(model, tokenizer, "none", base_model_name_or_path=base_path)
        model.load_adapter(model_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter(POLICY_ADAPTER)
        freeze_adapter(model, REFERENCE_ADAPTER)
        return PreparedModels(model, tokenizer, "reference_adapter", base_model_name_or_path=base_path)

    tokenizer = load_tokenizer(model_path, trust_remote_code=args.trust_remote_code)
    base = load_base_model(model_path, args)
    if quantized and not args.use_peft_lora:
        raise ValueError(
            "--use_4bit_quantization/--use_8bit_quantization need --use_peft_lora: quantized weights cannot be trained directly"
        )
    if args.use_peft_lora:
        if quantized:
            base = _prepare_for_kbit(base, gradient_checkpointing, args.use_reentrant)
        model = get_peft_model(base, _lora_config(args))
        return PreparedModels(model, tokenizer, "adapter_disabled", base_model_name_or_path=model_path)

    if not with_reference:
        return PreparedModels(base, tokenizer, "none", base_model_name_or_path=model_path)
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the base was loaded in partitions: a copy would hold none
        raise ValueError(
            "full fine-tuning under DeepSpeed ZeRO-3 needs a partitioned reference model, which preftune "
            "does not build: use --use_peft_lora (reference: the base, adapter disabled) or FSDP "
            "(recipes/accelerate/fsdp.yaml)"
        )
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    return PreparedModels(
        base, tokenizer, "model_copy", reference_model=reference, base_model_name_or_path=model_path
    )


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of the model (LoRA's included) to p=0; returns how many there were.

    Preference losses compare the policy's log-probs with the reference's: with dropout on, the
    policy's are noisy draws, so the implicit rewards start away from 0 and every step pays for
    random masks. TRL's DPOTrainer does the same by default (disable_dropout=True)."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            count += 1
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "attention_dropout", 0):
        config.attention_dropout = 0.0
    return count


def store_frozen_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen base weights of linear layers in `dtype`; returns how many layers.

    LoRA weights (trainable or the frozen `reference` adapter) are left alone. The LM head is
    stored in `dtype` too: under autocast its matmul would cast the whole [vocab, hidden] weight
    at every call, a transient copy of it twice a step. A head tied to the input embedding is
    untied for this: the embedding keeps its dtype (its lookups are not autocast, so the numbers
    stay autocast's), the head gets its own `dtype` copy, and the embedding stays a view of the
    mapped checkpoint file (when it was loaded as one), and lookups keep a copy of the rows they
    read, no more (preftune.models.embedding)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm_head = causal_lm.get_output_embeddings()
    # Weights loaded from safetensors can be views of the memory-mapped file: after each cast the
    # file pages it read are released (release_file_pages), unless a weight is shared.
    storages = Counter(p.untyped_storage().data_ptr() for p in causal_lm.parameters())
    mappings = file_mappings()

    def unshared(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for t in tensors if storages[t.untyped_storage().data_ptr()] == 1]

    count = 0
    for name, module in causal_lm.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is lm_head or "lora_" in name:
            continue
        if any(p.requires_grad for p in module.parameters()):
            continue
        old = unshared([p.data for p in module.parameters()])
        module.to(dtype)
        release_file_pages(old, mappings)
        count += 1
    head_weight = getattr(lm_head, "weight", None)
    embedding_weight = getattr(causal_lm.get_input_embeddings(), "weight", None)
    if (
        type(lm_head) is torch.nn.Linear
        and not head_weight.requires_grad
        and head_weight.dtype != dtype
        and type(head_weight) in (torch.Tensor, torch.nn.Parameter)
    ):
        if embedding_weight is head_weight:  # tied
            lm_head.weight = torch.nn.Parameter(head_weight.detach().to(dtype), requires_grad=False)
            release_file_pages([head_weight.data], mappings)  # now the embedding's alone
        else:
            old = unshared([head_weight.data])
            lm_head.to(dtype)
            release_file_pages(old, mappings)
        count += 1
    # Own the frozen weights left in their dtype (norms), so the file pages go. Not the input
    # embedding once the LM head has its own copy: a lookup reads only the rows of a batch's
    # tokens, so it stays a view of the mapped file and keeps copies of the rows it reads (most
    # of a 49k-token table never is), where a copy would hold all of it.
    embedding_alone = getattr(lm_head, "weight", None) is not embedding_weight
    with torch.no_grad():
        for param in causal_lm.parameters():
            if param is embedding_weight and embedding_alone:
                continue
            if param.dtype != dtype and not param.requires_grad:
                old = unshared([param.data])
                param.data = param.data.clone()
                release_file_pages(old, mappings)
    if embedding_alone and embedding_weight is not None and in_mapped_file(embedding_weight, mappings):
        keep_seen_rows_only(causal_lm)  # a lookup maps whole page-cache folios: keep the rows only
    return count


def freeze_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """requires_grad=False on every weight of one adapter (PEFT's set_adapter can switch it back on)."""
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)


def adapter_state(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """A detached copy of one adapter's weights (used to prove the reference never changes)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter_name}." in n}
