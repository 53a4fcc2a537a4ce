"""`preftune demo`: the whole job on the embedded model, small enough for a laptop CPU.

1. Write a preference data set the project makes itself (src/preftune/demo_data.py): the chosen
   reply answers as a JSON object {"answer": ...}, the rejected one in prose; a rule judges it.
2. DPO with LoRA on the embedded SmolLM2-135M-Instruct (the same run as recipes/demo-cpu.yaml).
3. On the held-out prompts and pairs, before (the reference: adapter off) and after (the policy):
   the rule-judged pass rate of greedy generations, the reward accuracy, two sample generations
   (the evaluation of `preftune eval`; eval_results.json and the run report land in the run folder).

Any `preftune dpo` flag after `--` overrides the demo's settings, e.g.
`preftune demo -- --num_train_epochs 1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# The demo's training settings. recipes/demo-cpu.yaml holds the same values (a test keeps them equal).
DEMO_SETTINGS = {
    "use_peft_lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": "all-linear",
    "beta": 0.1,
    "loss_type": "sigmoid",
    "rpo_alpha": 1.0,
    "max_seq_length": 192,
    "max_prompt_length": 128,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "logging_steps": 2,
    "bf16": True,
    "gradient_checkpointing": False,  # a small model on little data: speed over memory
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument(
        "--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M-Instruct"
    )
    parser.add_argument("--n_train", type=int, default=128, help="training pairs")
    parser.add_argument("--n_test", type=int, default=64, help="held-out pairs and prompts")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument(
        "--judge", default=None, help="rule judge spec (default: the demo data's json_answer)"
    )
    return parser


def main(argv: list[str]) -> int:
    from transformers import TrainingArguments

    from preftune.cli.arguments import parse_command_args
    from preftune.cli.main import training_defaults
    from preftune.config import DataArguments, ModelArguments, PreferenceArguments
    from preftune.demo_data import DEMO_JUDGE_SPEC, write_demo_dataset
    from preftune.evaluation.evaluate import (
        EVAL_RESULTS_FILE,
        EvalSettings,
        RunModels,
        evaluate_run,
        load_held_out,
        write_results,
    )
    from preftune.evaluation.pairwise import RulePairJudge
    from preftune.report import write_report
    from preftune.training.dpo import run_dpo

    split = argv.index("--") if "--" in argv else len(argv)
    own, dpo_flags = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(own)
    console = Console()
    out = Path(args.output_dir)

    data_dir = write_demo_dataset(out / "data", n_train=args.n_train, n_test=args.n_test)
    console.print(
        f"[bold]1/3[/bold] demo data: {args.n_train} training pairs, {args.n_test} held-out, in {data_dir}"
    )

    settings = training_defaults(DEMO_SETTINGS) | {
        "dataset_name": str(data_dir),
        "output_dir": str(out / "model"),
    }
    if args.model_name_or_path:
        settings["model_name_or_path"] = args.model_name_or_path
    model_args, data_args, pref_args, training_args = parse_command_args(
        (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments),
        dpo_flags,
        defaults=settings,
        prog="preftune demo",
    )
    console.print("[bold]2/3[/bold] DPO with LoRA")
    result = run_dpo(model_args, data_args, pref_args, training_args)

    console.print("[bold]3/3[/bold] evaluating on held-out prompts, before (reference) and after (tuned)")
    policy = result.trainer.accelerator.unwrap_model(result.trainer.model, keep_fp32_wrapper=False)
    tokenizer = result.trainer.processing_class
    if training_args.bf16:
        # The adapter is saved; evaluate in bf16 too (several times faster on CPUs with bf16 units).
        policy.to(torch.bfloat16)
    # The evaluation of `preftune eval`: the rule-judged pass rates come from its rule judges, the
    # accuracies from its held-out pair scores.
    run = RunModels(policy, tokenizer, result.reference_mode, result.trainer.reference_model)
    data = load_held_out(dataclasses.asdict(data_args), tokenizer, seed=training_args.seed)
    judge = RulePairJudge(args.judge or DEMO_JUDGE_SPEC)
    correct = RulePairJudge("json_answer_correct")  # the format AND the right fact
    settings = EvalSettings(
        max_new_tokens=args.max_new_tokens, batch_size=16, beta=pref_args.beta, max_prompts=None
    )
    results = evaluate_run(run, data, [judge, correct], settings)
    judged, judged_correct = results["judges"]
    pairs = results["pairs"]
    summary = {
        "judge": judge.rule.name if hasattr(judge.rule, "name") else str(judge.rule),
        "n_prompts": results["generation"]["n_prompts"],
        "pass_rate_before": judged["details"]["pass_rate_reference"],
        "pass_rate_after": judged["details"]["pass_rate_tuned"],
        "correct_rate_before": judged_correct["details"]["pass_rate_reference"],
        "correct_rate_after": judged_correct["details"]["pass_rate_tuned"],
        "likelihood_accuracy_before": pairs["before"]["likelihood_accuracy"],
        "likelihood_accuracy_after": pairs["after"]["likelihood_accuracy"],
        "reward_accuracy_after": pairs["after"]["reward_accuracy"],
        "win_rate": judged["win_rate"],
        "win_rate_ci": [judged["ci_low"], judged["ci_high"]],
        "train_runtime_s": result.train_metrics.get("train_runtime"),
        "samples": [
            {"prompt": x["prompt"], "before": x["reference"], "after": x["tuned"]} for x in results["samples"]
        ],
    }
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    _print_summary(console, summary, out)
    model_dir = Path(training_args.output_dir)
    write_results({"run_dir": str(model_dir), **results}, model_dir / EVAL_RESULTS_FILE)
    console.print(f"evaluation in {model_dir / EVAL_RESULTS_FILE}; report: {write_report(model_dir)}")
    return 0


def _print_summary(console: Console, s: dict, out: Path) -> None:
    table = Table(title="preftune demo: did the tuning work?")
    table.add_column("held-out measure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row(
        f"rule-judged pass rate ({s['judge']}, greedy)",
        f"{s['pass_rate_before']:.0%}",
        f"{s['pass_rate_after']:.0%}",
    )
    table.add_row(
        "... and the answer is right (json_answer_correct)",
        f"{s['correct_rate_before']:.0%}",
        f"{s['correct_rate_after']:.0%}",
    )
    table.add_row(
        "log p(chosen) > log p(rejected)",
        f"{s['likelihood_accuracy_before']:.0%}",
        f"{s['likelihood_accuracy_after']:.0%}",
    )
    table.add_row("implicit-reward accuracy", "-", f"{s['reward_accuracy_after']:.0%}")
    low, high = s["win_rate_ci"]
    table.add_row(
        f"win rate vs reference ({s['judge']}; 95% Wilson)",
        "-",
        f"{s['win_rate']:.0%} [{low:.0%}, {high:.0%}]",
    )
    console.print(table)
    for sample in s["samples"][:2]:
        console.print(f"[bold]prompt:[/bold] {escape(sample['prompt'])}", highlight=False)
        console.print(f"  [red]before:[/red] {escape(sample['before'])}", highlight=False)
        console.print(f"  [green]after:[/green]  {escape(sample['after'])}", highlight=False)
    console.print(f"results in {out / 'demo_results.json'}, adapter in {out / 'model'}")
