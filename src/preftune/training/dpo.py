"""The DPO recipe, top to bottom: model -> data -> trainer -> train -> evaluate -> save.

One readable function per step; `run_dpo` reads like the list of steps. Everything it knows comes
from the four argument dataclasses (see preftune.config and transformers.TrainingArguments).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from preftune.config import DataArguments, ModelArguments, PreferenceArguments
from preftune.data import apply_template, load_preference_splits, tokenize_examples
from preftune.models.prepare import POLICY_ADAPTER, PreparedModels, prepare_models
from preftune.report import report_run
from preftune.training.batching import PairCollator
from preftune.training.trainer import PreferenceTrainer

logger = logging.getLogger("preftune")

RUN_CONFIG_FILE = "preftune_config.yaml"


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


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file + rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_run_config(output_dir: str, **sections: Any) -> None:
    """The full run config (every argument of every section) as YAML in the output folder."""
    config = {}
    for name, args in sections.items():
        values = args.to_dict() if hasattr(args, "to_dict") else dataclasses.asdict(args)
        config[name] = json.loads(json.dumps(values, default=str))  # enums, paths -> plain values
    write_atomic(Path(output_dir) / RUN_CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))


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


def _configure_training_args(args: TrainingArguments, model_args: ModelArguments, has_eval: bool) -> None:
    args.remove_unused_columns = False  # our features are token lists, not model kwargs
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    if args.gradient_checkpointing:
        # transformers 5 reads activation_checkpointing_kwargs (the old name is copied only at init)
        kwargs = {**(getattr(args, "activation_checkpointing_kwargs", None) or {}), "use_reentrant": model_args.use_reentrant}
        args.gradient_checkpointing_kwargs = kwargs
        if hasattr(args, "activation_checkpointing_kwargs"):
            args.activation_checkpointing_kwargs = kwargs
    if not has_eval and args.eval_strategy != "no":
        logger.warning("no held-out split: evaluation during training is off")
        args.eval_strategy = "no"


def _resume_path(args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint PATH, or true/last for the newest checkpoint in --output_dir."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("true", "last", "latest"):
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {args.output_dir}")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint: no such folder: {value}")
    return value


def save_policy(trainer: PreferenceTrainer, prepared: PreparedModels, output_dir: str) -> None:
    """The trained policy in PEFT format (only the `default` adapter) or as a full model, + tokenizer."""
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config"):
        model.save_pretrained(output_dir, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
    else:
        model.save_pretrained(output_dir, safe_serialization=True)
    prepared.tokenizer.save_pretrained(output_dir)


def build_trainer(
    prepared: PreparedModels,
    pref_args: PreferenceArguments,
    training_args: TrainingArguments,
    train: list[dict],
    held_out: list[dict],
) -> PreferenceTrainer:
    return PreferenceTrainer(
        model=prepared.model,
        args=training_args,
        data_collator=PairCollator(pad_token_id=prepared.tokenizer.pad_token_id),
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
    resume = _resume_path(training_args)
    prepared = prepare_models(model_args, gradient_checkpointing=training_args.gradient_checkpointing)
    apply_template(prepared.tokenizer, data_args.chat_template_format)
    train, held_out = tokenized_splits(data_args, prepared.tokenizer, training_args.seed)
    logger.info(
        "%d training pairs, %d held-out pairs, reference: %s",
        len(train),
        len(held_out),
        prepared.reference_mode,
    )

    _configure_training_args(training_args, model_args, has_eval=bool(held_out))
    trainer = build_trainer(prepared, pref_args, training_args, train, held_out)
    if trainer.is_world_process_zero():
        save_run_config(
            training_args.output_dir,
            model=model_args,
            data=data_args,
            preference=pref_args,
            training=training_args,
        )
    if pref_args.precompute_ref_log_probs:
        trainer.precompute_reference_logps(train, desc="reference log-probs (train)")
        if held_out:
            trainer.precompute_reference_logps(held_out, desc="reference log-probs (held-out)")

    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        # Keep what was learned: a checkpoint at the current step, resumable with
        # --resume_from_checkpoint true.
        if trainer.state.global_step > 0:
            trainer._save_checkpoint(trainer.model, trial=None)
            logger.warning(
                "interrupted at step %d: checkpoint saved in %s; continue with --resume_from_checkpoint true",
                trainer.state.global_step,
                training_args.output_dir,
            )
        raise
    # --eval_strategy no (and no --do_eval) skips the final evaluation too, e.g. for the demo,
    # which scores the held-out pairs itself.
    eval_metrics = trainer.evaluate() if held_out and training_args.do_eval else {}
    save_policy(trainer, prepared, training_args.output_dir)
    trainer.save_state()  # trainer_state.json (the log history) in the run folder
    report_run(trainer)  # report/report.html: curves, config (and eval results when there are)
    return DPOResult(
        output_dir=training_args.output_dir,
        train_metrics=dict(train_output.metrics),
        eval_metrics=dict(eval_metrics),
        reference_mode=prepared.reference_mode,
        n_train=len(train),
        n_eval=len(held_out),
        trainer=trainer,
        held_out=held_out,
    )
