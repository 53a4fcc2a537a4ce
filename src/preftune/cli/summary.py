"""One-screen summaries printed at the end of a command."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from preftune.training.distributed import is_main_process
from preftune.training.dpo import DPOResult

KEY_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


def print_dpo_summary(result: DPOResult, console: Console | None = None) -> None:
    if not is_main_process():  # one summary per launch, not one per process
        return
    console = console or Console()
    table = Table(title=f"preftune dpo: {result.output_dir}")
    train_logs = [h for h in result.trainer.state.log_history if "loss" in h]
    if train_logs:  # the last logged training metrics
        last_train, header = train_logs[-1], f"train (step {train_logs[-1].get('step', '?')})"
    else:  # fewer steps than --logging_steps: the run's mean loss
        last_train, header = {"loss": result.train_metrics.get("train_loss")}, "train (mean)"
    table.add_column("metric")
    table.add_column(header, justify="right")
    table.add_column("held-out", justify="right")
    for name in KEY_METRICS:
        train_value, eval_value = last_train.get(name), result.eval_metrics.get(f"eval_{name}")
        if train_value is not None or eval_value is not None:
            table.add_row(name, *(f"{v:.4f}" if v is not None else "-" for v in (train_value, eval_value)))
    table.add_row("training pairs", str(result.n_train), "")
    table.add_row("held-out pairs", "", str(result.n_eval))
    table.add_row("train runtime (s)", f"{result.train_metrics.get('train_runtime', float('nan')):.1f}", "")
    table.add_row("reference", result.reference_mode, "")
    console.print(table)
    console.print(f"adapter/model, tokenizer and run config saved in [bold]{result.output_dir}[/bold]")
