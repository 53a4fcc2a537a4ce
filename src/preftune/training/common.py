"""What every training recipe (dpo, sft) does the same way around `trainer.train()`: resolve the
checkpoint to resume from, write the run config, save a checkpoint on Ctrl-C, save the trained
policy, the trainer state and the run report."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from preftune.config import ModelArguments
from preftune.memory import configure_cpu_malloc
from preftune.models.prepare import POLICY_ADAPTER, PreparedModels
from preftune.report import report_run
from preftune.training import distributed

logger = logging.getLogger("preftune")

RUN_CONFIG_FILE = "preftune_config.yaml"


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


def configure_training_args(args: TrainingArguments, model_args: ModelArguments, has_eval: bool) -> None:
    args.remove_unused_columns = False  # our features are token lists, not model kwargs
    distributed.keep_fsdp_on_cpu()  # before the Trainer builds its Accelerator
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    if args.use_cpu or not torch.cuda.is_available():
        # activations in CPU RAM: reuse their memory without letting it fragment (preftune.memory).
        # (After the model is loaded: set before, the load's resident set doubled.)
        configure_cpu_malloc(low_memory=model_args.low_cpu_memory)
    if args.gradient_checkpointing:
        # transformers 5 reads activation_checkpointing_kwargs (the old name is copied only at init)
        kwargs = {
            **(getattr(args, "activation_checkpointing_kwargs", None) or {}),
            "use_reentrant": model_args.use_reentrant,
        }
        args.gradient_checkpointing_kwargs = kwargs
        if hasattr(args, "activation_checkpointing_kwargs"):
            args.activation_checkpointing_kwargs = kwargs
    if not has_eval and args.eval_strategy != "no":
        logger.warning("no held-out split: evaluation during training is off")
        args.eval_strategy = "no"


def resume_path(args: TrainingArguments) -> str | None:
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


def save_policy(trainer: Trainer, prepared: PreparedModels, output_dir: str) -> None:
    """The trained policy in PEFT format (only the `default` adapter) or as a full model, + tokenizer.

    Under FSDP or DeepSpeed ZeRO-3 each process holds a shard of the weights: every process takes
    part in gathering them, and the main process writes them.
    """
    state_dict = None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    kwargs = {"safe_serialization": True, "state_dict": state_dict}
    if hasattr(model, "peft_config"):
        model.save_pretrained(output_dir, selected_adapters=[POLICY_ADAPTER], **kwargs)
    else:
        if state_dict is not None:  # gathered: tied weights (embeddings = LM head) come back twice
            _drop_tied_copies(model, state_dict)
        model.save_pretrained(output_dir, **kwargs)
    prepared.tokenizer.save_pretrained(output_dir)


def _drop_tied_copies(model: torch.nn.Module, state_dict: dict[str, Any]) -> None:
    """Keep one entry per parameter, as save_pretrained does for a model's own state dict."""
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(param), name) != name:
            state_dict.pop(name, None)


def train(trainer: Trainer, resume: str | None) -> TrainOutput:
    """trainer.train(), keeping what was learned on Ctrl-C: a checkpoint at the current step,
    resumable with --resume_from_checkpoint true."""
    distributed.warn_if_backend_dropped(trainer)
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        if trainer.state.global_step > 0:
            trainer._save_checkpoint(trainer.model, trial=None)
            logger.warning(
                "interrupted at step %d: checkpoint saved in %s; continue with --resume_from_checkpoint true",
                trainer.state.global_step,
                trainer.args.output_dir,
            )
        raise


def finish(trainer: Trainer, prepared: PreparedModels, has_eval: bool) -> dict[str, float]:
    """Final evaluation (unless --eval_strategy no and no --do_eval), then save the policy, the
    trainer state (log history) and the run report. Returns the eval metrics."""
    eval_metrics = trainer.evaluate() if has_eval and trainer.args.do_eval else {}
    save_policy(trainer, prepared, trainer.args.output_dir)
    trainer.save_state()  # trainer_state.json (the log history) in the run folder
    report_run(trainer)  # report/report.html: curves, config (and eval results when there are)
    # Under several processes only the main one writes: the others wait for its files, so that
    # what runs next (e.g. a pipeline's next stage) can read them.
    trainer.accelerator.wait_for_everyone()
    return dict(eval_metrics)
