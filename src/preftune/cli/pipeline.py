"""`preftune pipeline --config RECIPE [--output_dir DIR] [--FLAG VALUE ...]`: run a multi-stage recipe
(e.g. SFT then DPO from the SFT adapter), each stage in its own sub-folder of output_dir; a second
run skips the stages already finished. Extra flags override every stage that has them, e.g.
`--max_steps 5`. See preftune.training.pipeline for the recipe format.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from preftune.training.distributed import is_main_process
from preftune.training.pipeline import StageCommand, StageOutcome, parse_pipeline, run_pipeline

SHOWN_METRICS = (
    "eval_loss",
    "eval_perplexity",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "train_loss",
)


def _stage_command(
    prog: str, arg_types: tuple[type, ...], defaults: Callable[[], dict], run: Callable, summarize: Callable
) -> StageCommand:
    """A StageCommand that parses a stage's flags exactly like `preftune <command>` does."""
    from transformers import HfArgumentParser

    from preftune.cli.arguments import _known_flags, config_to_flags, parse_command_args

    known = _known_flags(HfArgumentParser(arg_types))

    def parse(args: dict[str, Any]) -> tuple:
        return parse_command_args(
            arg_types, config_to_flags(args, known, prog), defaults=defaults(), prog=prog
        )

    def run_stage(args: dict[str, Any]) -> dict[str, float]:
        result = run(*parse(args))
        summarize(result)
        metrics = {**result.train_metrics, **result.eval_metrics}
        del result
        _free_memory()
        return metrics

    return StageCommand(known_keys={f[2:] for f in known}, check=parse, run=run_stage)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_commands() -> dict[str, StageCommand]:
    """The commands a pipeline stage can run."""
    from transformers import TrainingArguments

    from preftune.cli import sft as sft_cli
    from preftune.cli.main import training_defaults
    from preftune.cli.summary import print_dpo_summary
    from preftune.config import DataArguments, ModelArguments, PreferenceArguments
    from preftune.training.dpo import run_dpo
    from preftune.training.sft import run_sft

    return {
        "sft": _stage_command(
            "preftune sft", sft_cli.arg_types(), sft_cli.sft_defaults, run_sft, sft_cli.print_sft_summary
        ),
        "dpo": _stage_command(
            "preftune dpo",
            (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments),
            training_defaults,
            run_dpo,
            print_dpo_summary,
        ),
    }


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """["--max_steps", "5", "--bf16", "--lr=1e-4"] -> {"max_steps": "5", "bf16": "true", "lr": "1e-4"}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"preftune pipeline: expected --FLAG [VALUE], got {token!r}")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value = token[2:], rest[i + 1]
            i += 2
        else:
            key, value = token[2:], "true"
            i += 1
        overrides[key] = value
    return overrides


def print_outcomes(outcomes: list[StageOutcome], console: Console | None = None) -> None:
    if not is_main_process():  # one table per launch, not one per process
        return
    console = console or Console()
    table = Table(title="preftune pipeline")
    for column in ("stage", "command", "status", "seconds", "key metrics", "output"):
        table.add_column(column, no_wrap=column == "key metrics", overflow="fold")
    for o in outcomes:
        shown = "\n".join(f"{k}={o.metrics[k]:.4g}" for k in SHOWN_METRICS if k in o.metrics)
        table.add_row(o.name, o.command, o.status, f"{o.seconds:.0f}", shown, o.output_dir)
    console.print(table)


def main(argv: list[str]) -> int:
    from preftune.cli.arguments import read_config_file

    parser = argparse.ArgumentParser(
        prog="preftune pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the recipe: a YAML or JSON file")
    parser.add_argument("--dry_run", action="store_true", help="print every stage's flags and stop")
    args, rest = parser.parse_known_args(argv)
    pipeline = parse_pipeline(read_config_file(args.config), source=args.config)
    overrides = parse_overrides(rest)
    commands = stage_commands()
    if args.dry_run:
        from preftune.training.pipeline import stage_arguments

        for stage, stage_args in zip(pipeline.stages, stage_arguments(pipeline, commands, overrides)):
            commands[stage.command].check(stage_args)
            Console().print(f"[bold]{stage.name}[/bold] ({stage.command}): {stage_args}")
        return 0
    print_outcomes(run_pipeline(pipeline, commands, overrides))
    return 0
