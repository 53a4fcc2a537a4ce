"""Multi-stage runs (e.g. SFT then DPO) from one recipe file, resumable stage by stage.

Recipe (YAML or JSON):

    output_dir: runs/pipeline          # each stage writes to output_dir/<stage name>
    model_name_or_path: null           # the first stage's model (null: the embedded model)
    dataset_name: data.json            # any other top-level key is a flag for every stage
    max_seq_length: 256                #   whose command has it
    stages:
      - name: sft
        command: sft
        args: {use_peft_lora: true, learning_rate: 2.0e-4}
      - name: dpo
        command: dpo                   # starts from the previous stage's output (here the SFT
        args: {beta: 0.1}              #   adapter, which DPO also uses, frozen, as its reference)

Precedence for a stage's flags, lowest first: the command's defaults, the top-level keys, the
stage's `args`, then command-line overrides. A stage's `model_name_or_path` replaces the previous
stage's output as its starting point.

A finished stage leaves a marker file (written atomically, last) in its folder; a second run skips
stages with a marker, and runs every stage after one that ran (their input changed). A stage
interrupted before its marker resumes from its newest checkpoint.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from preftune.training.common import write_atomic
from preftune.training.distributed import is_main_process

logger = logging.getLogger("preftune")

STAGE_MARKER = "preftune_stage_done.json"
PIPELINE_KEYS = ("output_dir", "model_name_or_path", "stages")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class StageCommand:
    """How the pipeline runs one command: its flag names, a check and a run of parsed flags."""

    known_keys: set[str]  # flag names without the leading "--"
    check: Callable[[dict[str, Any]], None]  # parse the flags; raise on a bad one
    run: Callable[[dict[str, Any]], dict[str, float]]  # run the command; return its metrics


@dataclass
class Stage:
    name: str
    command: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pipeline:
    output_dir: str
    stages: list[Stage]
    shared: dict[str, Any] = field(default_factory=dict)  # top-level flags for every stage
    model_name_or_path: str | None = None  # the first stage's model


@dataclass
class StageOutcome:
    name: str
    command: str
    output_dir: str
    status: str  # "ran" | "skipped"
    metrics: dict[str, float]
    seconds: float


def parse_pipeline(config: dict[str, Any], source: str = "<pipeline>") -> Pipeline:
    """Validate the structure of a recipe mapping (see the module docstring)."""
    stages_config = config.get("stages")
    if not isinstance(stages_config, list) or not stages_config:
        raise ValueError(f"{source}: `stages` must be a non-empty list of {{name, command, args}}")
    stages, names = [], set()
    for i, entry in enumerate(stages_config):
        if not isinstance(entry, dict) or "command" not in entry:
            raise ValueError(f"{source}: stage {i} must be a mapping with at least `command`")
        unknown = set(entry) - {"name", "command", "args"}
        if unknown:
            raise ValueError(f"{source}: stage {i} has unknown keys {sorted(unknown)} (name, command, args)")
        name = str(entry.get("name") or entry["command"])
        if not _STAGE_NAME.match(name) or name in names:
            raise ValueError(f"{source}: stage name {name!r} must be unique and a plain folder name")
        args = entry.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError(f"{source}: stage {name!r}: `args` must be a mapping of flag names to values")
        for key in ("output_dir", "resume_from_checkpoint"):
            if key in args:
                raise ValueError(f"{source}: stage {name!r}: `{key}` is set by the pipeline")
        names.add(name)
        stages.append(Stage(name, str(entry["command"]), dict(args)))
    shared = {k: v for k, v in config.items() if k not in PIPELINE_KEYS}
    return Pipeline(
        output_dir=str(config.get("output_dir") or "runs/pipeline"),
        stages=stages,
        shared=shared,
        model_name_or_path=config.get("model_name_or_path"),
    )


def stage_arguments(
    pipeline: Pipeline, commands: dict[str, StageCommand], overrides: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every stage's flags, resolved (see the module docstring for the precedence)."""
    overrides = dict(overrides or {})
    for stage in pipeline.stages:
        if stage.command not in commands:
            raise ValueError(
                f"stage {stage.name!r}: unknown command {stage.command!r} ({', '.join(commands)})"
            )
    all_keys = sorted(set().union(*(commands[s.command].known_keys for s in pipeline.stages)))
    for origin, values in (("top-level key", pipeline.shared), ("override", overrides)):
        for key in values:
            if key not in all_keys and key not in PIPELINE_KEYS:
                close = difflib.get_close_matches(key, all_keys, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"pipeline {origin} {key!r} is a flag of no stage's command{hint}")

    resolved, previous = [], overrides.pop("model_name_or_path", pipeline.model_name_or_path)
    output_dir = Path(overrides.pop("output_dir", pipeline.output_dir))
    for stage in pipeline.stages:
        command = commands[stage.command]
        args = {k: v for k, v in pipeline.shared.items() if k in command.known_keys}
        args.update(stage.args)
        args.update({k: v for k, v in overrides.items() if k in command.known_keys})
        if "model_name_or_path" not in stage.args and previous is not None:
            args["model_name_or_path"] = str(previous)
        args["output_dir"] = str(output_dir / stage.name)
        previous = args["output_dir"]
        resolved.append(args)
    return resolved


def read_marker(stage_dir: Path) -> dict[str, Any] | None:
    marker = stage_dir / STAGE_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def _json_safe(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def run_pipeline(
    pipeline: Pipeline, commands: dict[str, StageCommand], overrides: dict[str, Any] | None = None
) -> list[StageOutcome]:
    """Run the stages in order, skipping those already finished; returns what happened to each."""
    all_args = stage_arguments(pipeline, commands, overrides)
    for stage, args in zip(pipeline.stages, all_args):  # every flag checked before anything runs
        commands[stage.command].check(args)

    outcomes: list[StageOutcome] = []
    upstream_ran = False
    for stage, args in zip(pipeline.stages, all_args):
        stage_dir = Path(args["output_dir"])
        marker = read_marker(stage_dir)
        if marker is not None and not upstream_ran:
            if marker.get("args") != args:
                logger.warning(
                    "stage %s finished earlier with other flags; delete %s to run it again",
                    stage.name,
                    stage_dir,
                )
            logger.info("stage %s: already finished (%s), skipped", stage.name, stage_dir / STAGE_MARKER)
            outcomes.append(
                StageOutcome(stage.name, stage.command, str(stage_dir), "skipped", marker["metrics"], 0.0)
            )
            continue
        if marker is not None:
            logger.info("stage %s: an earlier stage ran again, so it runs again too", stage.name)
            if is_main_process():
                (stage_dir / STAGE_MARKER).unlink(missing_ok=True)

        run_args = dict(args)
        checkpoint = get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
        if checkpoint is not None and marker is None:
            logger.info("stage %s: resuming from %s", stage.name, checkpoint)
            run_args["resume_from_checkpoint"] = checkpoint
        logger.info("stage %s (%s) -> %s", stage.name, stage.command, stage_dir)
        start = time.perf_counter()
        metrics = _json_safe(commands[stage.command].run(run_args))
        seconds = time.perf_counter() - start
        record = {
            "stage": stage.name,
            "command": stage.command,
            "args": args,
            "metrics": metrics,
            "seconds": seconds,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if is_main_process():  # under several processes: the one that wrote the stage's files
            write_atomic(stage_dir / STAGE_MARKER, json.dumps(record, indent=2, default=str) + "\n")
        outcomes.append(StageOutcome(stage.name, stage.command, str(stage_dir), "ran", metrics, seconds))
        upstream_ran = True
    return outcomes
