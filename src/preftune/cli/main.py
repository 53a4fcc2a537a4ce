"""`preftune COMMAND [flags]`: the one entry point.

Commands:
  dpo    preference-tune a model (DPO, IPO, hinge, KTO-pair, robust) on preference pairs
  sft    supervised fine-tuning (full, LoRA, QLoRA) on conversations or chosen replies
  merge  merge a LoRA adapter into its base and save a standalone model
  pipeline  run a multi-stage recipe (e.g. SFT then DPO), skipping finished stages
  eval   a run against its reference: held-out pairs, judged generations, win rate
  report write a run's HTML report (curves, evaluation, samples)
  demo   a complete small run on the embedded model: data, DPO, before/after evaluation
  chat   chat with a model or a trained run folder, in the terminal or a web page (--ui)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

from rich.console import Console
from rich.markup import escape

from preftune.lazy_compile import import_bitsandbytes
from preftune.memory import restart_with_malloc_tunables

console = Console(stderr=True)

COMMANDS = {
    "dpo": "preference-tune a model on (prompt, chosen, rejected) pairs",
    "demo": "a small end-to-end run on the embedded model, with before/after evaluation",
    "chat": "chat with a model or a run folder in the terminal, or beside its reference in a web page (--ui)",
    "sft": "supervised fine-tuning on conversations, completions, text or chosen replies",
    "merge": "merge a LoRA adapter into its base model and save a standalone model",
    "pipeline": "run a multi-stage recipe (e.g. SFT then DPO), skipping stages already finished",
    "eval": "a run against its reference: held-out pairs, judged generations, win rate",
    "report": "write a run's HTML report: curves, evaluation, samples (RUN_DIR/report/report.html)",
}

DPO_DEFAULTS = {
    "output_dir": "runs/dpo",
    "logging_steps": 5,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 4,
    "learning_rate": 5e-5,
    # Recompute each layer's activations in the backward pass: a fraction of the activation memory
    # for about one more forward pass (benchmarks/dpo_vs_trl.py; TRL's default too).
    "gradient_checkpointing": True,
}


def training_defaults(overrides: dict | None = None) -> dict:
    """preftune's defaults for a training command; on a machine without a GPU, train on the CPU
    (so --bf16 means bf16 autocast on the CPU instead of an error)."""
    import torch

    defaults = dict(DPO_DEFAULTS)
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
    # TensorBoard logs by default when it is installed (--report_to none / wandb / ... override)
    defaults["report_to"] = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    return defaults | (overrides or {})


def _usage() -> str:
    lines = ["usage: preftune COMMAND [flags]   (preftune COMMAND --help for its flags)", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )
    logging.getLogger("preftune").setLevel(logging.INFO)
    # Known noise that says nothing to a user: bitsandbytes' optional CPU kernel download (which
    # would need the Hub) and a transformers deprecation raised inside peft.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def cmd_dpo(argv: list[str]) -> int:
    from transformers import TrainingArguments

    from preftune.cli.arguments import parse_command_args
    from preftune.cli.summary import print_dpo_summary
    from preftune.config import DataArguments, ModelArguments, PreferenceArguments
    from preftune.training.dpo import run_dpo

    model_args, data_args, pref_args, training_args = parse_command_args(
        (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments),
        argv,
        defaults=training_defaults(),
        prog="preftune dpo",
    )
    result = run_dpo(model_args, data_args, pref_args, training_args)
    print_dpo_summary(result)
    return 0


def cmd_chat(argv: list[str]) -> int:
    from preftune.cli.chat import main as chat_main

    return chat_main(argv)


def cmd_demo(argv: list[str]) -> int:
    from preftune.cli.demo import main as demo_main

    return demo_main(argv)


def cmd_sft(argv: list[str]) -> int:
    from preftune.cli.sft import main as sft_main

    return sft_main(argv)


def cmd_merge(argv: list[str]) -> int:
    from preftune.cli.merge import main as merge_main

    return merge_main(argv)


def cmd_pipeline(argv: list[str]) -> int:
    from preftune.cli.pipeline import main as pipeline_main

    return pipeline_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from preftune.cli.eval import main as eval_main

    return eval_main(argv)


def cmd_report(argv: list[str]) -> int:
    from preftune.cli.report import main as report_main

    return report_main(argv)


HANDLERS = {
    "dpo": cmd_dpo,
    "demo": cmd_demo,
    "chat": cmd_chat,
    "sft": cmd_sft,
    "merge": cmd_merge,
    "pipeline": cmd_pipeline,
    "eval": cmd_eval,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        console.print(f"[red]preftune: unknown command {command!r}[/red]\n{_usage()}")
        sys.exit(2)
    if from_command_line:
        restart_with_malloc_tunables()  # CPU memory: see preftune/memory.py
    _setup_logging()
    if command != "report":  # every other command loads a model, and so imports bitsandbytes
        import_bitsandbytes()  # without PyTorch's compiler: see preftune/lazy_compile.py
    try:
        sys.exit(HANDLERS[command](rest))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except (ValueError, FileNotFoundError, OSError) as err:
        # Bad flags, paths, configs and data rows end in one clear line, not a traceback.
        # PREFTUNE_DEBUG=1 shows the traceback for bug reports.
        if os.environ.get("PREFTUNE_DEBUG"):
            raise
        console.print(  # escaped: "[ui]" in a message is text, not markup
            f"[red]preftune {command}: error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
