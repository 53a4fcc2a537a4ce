"""The DPO recipe, top to bottom: model -> data -> trainer -> train -> evaluate -> save.

One readable function per step; `run_dpo` reads like the list of steps. Everything it knows comes
from the four argument dataclasses (see preftune.config and transformers.TrainingArguments).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed

from preftune.config import DataArguments, ModelArguments, PreferenceArguments
from preftune.data import apply_template, load_preference_splits, tokenize_examples
from preftune.models.prepare import (
    PreparedModels,
    disable_dropout,
    prepare_models,
    store_frozen_linear_weights,
)
from preftune.training import common, distributed, lora_forward, pair_attention
from preftune.training.batching import PairCollator, SharedPromptCollator, attention_cost_ratio
from preftune.training.logprobs import supports_shared_prompt, unwrap_causal_lm
from preftune.training.trainer import PreferenceTrainer

logger = logging.getLogger("preftune")


@dataclass
class DPOResult:
    output_dir: str
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    reference_mode: str
    n_train: int
    n_eval: int
    trainer: PreferenceTrainer  # holds the trained policy, for callers that evaluate it further
    held_out: list[dict]  # tokenized held-out pairs


def tokenized_splits(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[list[dict], list[dict]]:
    """Load, normalize and tokenize the train and held-out pairs."""
    if not data_args.dataset_name:
        raise ValueError("--dataset_name is required (a Hub name, a local file or a save_to_disk folder)")
    splits = [s.strip() for s in data_args.splits.split(",") if s.strip()]
    loaded = load_preference_splits(
        data_args.dataset_name,
        splits=splits,
        test_size=data_args.test_size,
        data_format=data_args.data_format,
        seed=seed,
        on_bad_rows=data_args.on_bad_rows,
    )
    limits = {splits[0]: data_args.max_train_samples}
    if len(splits) > 1:
        limits[splits[1]] = data_args.max_eval_samples
    tokenized = []
    for split_name in splits[:2]:
        examples = loaded.splits.get(split_name, [])[: limits.get(split_name)]
        pairs, _ = tokenize_examples(
            examples,
            tokenizer,
            data_args.chat_template_format,
            max_length=data_args.max_seq_length,
            max_prompt_length=data_args.max_prompt_length,
            on_bad_rows=data_args.on_bad_rows,
            source=f"{data_args.dataset_name} [{split_name}]",
        )
        tokenized.append(
            [
                {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                for p in pairs
            ]
        )
    train = tokenized[0]
    held_out = tokenized[1] if len(tokenized) > 1 else []
    if not train:
        raise ValueError(f"{data_args.dataset_name}: no usable training pairs in split {splits[0]!r}")
    return train, held_out


def prepare_policy_and_reference(
    model_args: ModelArguments, pref_args: PreferenceArguments, training_args: TrainingArguments
) -> PreparedModels:
    """The model (policy + how its reference is computed), dropout off unless asked to keep it.

    With --bf16 and a LoRA on a plain (not quantized, --torch_dtype auto) base, the frozen weights
    of the base's linear layers are stored in bfloat16: bf16 autocast casts them to bf16 for every
    matmul anyway, so the numbers stay the same while their memory halves and the per-matmul cast
    goes. The LM head too (untied from the input embedding if tied). The input embedding, norms
    and LoRA weights keep their dtype. (Not under FSDP or DeepSpeed, which cast and shard the
    weights themselves.) The LoRA layers take the lean forward
    of preftune.training.lora_forward (--fused_lora).
    """
    prepared = prepare_models(model_args, gradient_checkpointing=training_args.gradient_checkpointing)
    quantized = model_args.use_4bit_quantization or model_args.use_8bit_quantization
    plain_lora = model_args.use_peft_lora and not quantized and not distributed.shards_parameters()
    if training_args.bf16 and plain_lora and model_args.torch_dtype == "auto":
        store_frozen_linear_weights(prepared.model, torch.bfloat16)
    if pref_args.disable_dropout:
        disable_dropout(prepared.model)
    if pref_args.fused_lora and model_args.use_peft_lora and not distributed.shards_parameters():
        lora_forward.use_lean_lora_forward(prepared.model)
    return prepared


def pair_collator(
    prepared: PreparedModels, pref_args: PreferenceArguments, max_length: int
) -> PairCollator | SharedPromptCollator:
    """Shared-prompt rows where the model takes a custom attention mask, else padded rows."""
    pad_token_id = prepared.tokenizer.pad_token_id
    if pref_args.share_prompt and supports_shared_prompt(prepared.model, max_length):
        config = unwrap_causal_lm(prepared.model).config
        # Attended pair by pair, a row's attention work no longer grows with its length: pack full.
        by_pair = pref_args.pair_attention and pair_attention.can_use(config)
        ratio = 0.0 if by_pair else attention_cost_ratio(config)
        return SharedPromptCollator(pad_token_id=pad_token_id, attention_ratio=ratio)
    if pref_args.share_prompt:
        logger.info("--share_prompt: this model's attention takes no custom mask; using padded rows")
    return PairCollator(pad_token_id=pad_token_id)


def build_trainer(
    prepared: PreparedModels,
    pref_args: PreferenceArguments,
    training_args: TrainingArguments,
    train: list[dict],
    held_out: list[dict],
    max_length: int,
) -> PreferenceTrainer:
    return PreferenceTrainer(
        model=prepared.model,
        args=training_args,
        data_collator=pair_collator(prepared, pref_args, max_length),
        train_dataset=train,
        eval_dataset=held_out or None,
        processing_class=prepared.tokenizer,
        preference_args=pref_args,
        reference_mode=prepared.reference_mode,
        reference_model=prepared.reference_model,
    )


def run_dpo(
    model_args: ModelArguments,
    data_args: DataArguments,
    pref_args: PreferenceArguments,
    training_args: TrainingArguments,
) -> DPOResult:
    """Preference-tune a model end to end; returns the final metrics."""
    set_seed(training_args.seed)
    resume = common.resume_path(training_args)
    prepared = prepare_policy_and_reference(model_args, pref_args, training_args)
    apply_template(prepared.tokenizer, data_args.chat_template_format)
    train, held_out = tokenized_splits(data_args, prepared.tokenizer, training_args.seed)
    logger.info(
        "%d training pairs, %d held-out pairs, reference: %s",
        len(train),
        len(held_out),
        prepared.reference_mode,
    )

    common.configure_training_args(training_args, model_args, has_eval=bool(held_out))
    distributed.no_unsupported_chunking(pref_args, "chunked_logps", prepared.model)
    trainer = build_trainer(prepared, pref_args, training_args, train, held_out, data_args.max_seq_length)
    if trainer.is_world_process_zero():
        common.save_run_config(
            training_args.output_dir,
            model=model_args,
            data=data_args,
            preference=pref_args,
            training=training_args,
        )
    if pref_args.precompute_ref_log_probs:
        # (sharded weights would give each process its own fingerprint: no cache under FSDP/DeepSpeed)
        cache = pref_args.cache_ref_log_probs and not distributed.shards_parameters()
        trainer.precompute_reference_logps(train, desc="reference log-probs (train)", use_cache=cache)
        if held_out:
            trainer.precompute_reference_logps(
                held_out, desc="reference log-probs (held-out)", use_cache=cache
            )

    train_output = common.train(trainer, resume)
    # --eval_strategy no (and no --do_eval) skips the final evaluation, e.g. for the demo, which
    # scores the held-out pairs itself.
    eval_metrics = common.finish(trainer, prepared, has_eval=bool(held_out))
    return DPOResult(
        output_dir=training_args.output_dir,
        train_metrics=dict(train_output.metrics),
        eval_metrics=eval_metrics,
        reference_mode=prepared.reference_mode,
        n_train=len(train),
        n_eval=len(held_out),
        trainer=trainer,
        held_out=held_out,
    )
