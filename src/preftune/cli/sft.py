"""`preftune sft [flags]`: supervised fine-tuning (full, LoRA or QLoRA) on conversations, prompt /
completion pairs, plain text or the chosen replies of a preference set."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from preftune.training.distributed import is_main_process
from preftune.training.sft import SFTResult

# On top of preftune's training defaults (preftune.cli.main.DPO_DEFAULTS).
SFT_OVERRIDES = {"output_dir": "runs/sft", "learning_rate": 1e-4}

KEY_METRICS = ("loss", "perplexity", "token_accuracy")


def sft_defaults() -> dict:
    from preftune.cli.main import training_defaults

    return training_defaults(SFT_OVERRIDES)


def arg_types() -> tuple[type, ...]:
    from transformers import TrainingArguments

    from preftune.config import DataArguments, ModelArguments, SFTArguments

    return (ModelArguments, DataArguments, SFTArguments, TrainingArguments)


def print_sft_summary(result: SFTResult, console: Console | None = None) -> None:
    if not is_main_process():  # one summary per launch, not one per process
        return
    console = console or Console()
    table = Table(title=f"preftune sft: {result.output_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in KEY_METRICS:
        value = result.eval_metrics.get(f"eval_{name}")
        if value is not None:
            table.add_row(f"held-out {name}", f"{value:.4f}")
    table.add_row("train loss", f"{result.train_metrics.get('train_loss', float('nan')):.4f}")
    table.add_row("training examples (rows)", f"{result.n_train_examples} ({result.n_train})")
    table.add_row("held-out rows", str(result.n_eval))
    table.add_row("train runtime (s)", f"{result.train_metrics.get('train_runtime', float('nan')):.1f}")
    tokens_per_second = result.train_metrics.get("train_tokens_per_second")
    if tokens_per_second:
        table.add_row("tokens/s", f"{tokens_per_second:.0f}")
    console.print(table)
    console.print(
        f"adapter/model, tokenizer and run config saved in [bold]{result.output_dir}[/bold]; "
        f"preference-tune it with `preftune dpo --model_name_or_path {result.output_dir} ...`"
    )


def main(argv: list[str]) -> int:
    from preftune.cli.arguments import parse_command_args
    from preftune.training.sft import run_sft

    args = parse_command_args(arg_types(), argv, defaults=sft_defaults(), prog="preftune sft")
    print_sft_summary(run_sft(*args))
    return 0
