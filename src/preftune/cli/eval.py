"""`preftune eval --model RUN_DIR [--judge SPEC ...]`: the tuned model against its reference, on held-out data.

On held-out pairs: the implicit-reward accuracy and margins of the tuned model against its reference,
and the same pairs scored by the reference alone (the "before"). On held-out prompts: replies from
the reference and from the tuned model (greedy, or seeded sampling with --do_sample), compared by
each --judge (repeatable):

  rule:NAME            json_answer, valid_json, regex:PATTERN, max_words:N, contains:TEXT, omits:TEXT,
                       or rule:package.module:callable (called as f(prompt, reply, reference) -> bool)
  reward-model:PATH    an AutoModelForSequenceClassification reward model scores both replies
  llm-judge[:PATH]     a causal chat model (default: the embedded one) picks the better reply, asked
                       in both orders; disagreement is a tie

Win rate = (wins + ties/2) / prompts, with a 95% Wilson score interval (--interval bootstrap for the
percentile bootstrap). The data set, splits, chat template and max lengths are the run's
(preftune_config.yaml) unless given. Results: RUN_DIR/eval_results.json; report: RUN_DIR/report/.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--model", required=True, help="a preftune run folder (adapter + preftune_config.yaml)"
    )
    parser.add_argument(
        "--judge",
        action="append",
        default=[],
        metavar="SPEC",
        help="rule:NAME, reward-model:PATH or llm-judge[:PATH]",
    )
    data = parser.add_argument_group("held-out data (default: the run's)")
    data.add_argument("--dataset", "--dataset_name", dest="dataset_name", default=None)
    data.add_argument(
        "--splits", default=None, help="train,test: the second is evaluated; one name: all of it"
    )
    data.add_argument(
        "--test_size", type=float, default=None, help="carve the held-out split (fraction or count)"
    )
    data.add_argument("--data_format", default=None)
    data.add_argument("--chat_template_format", default=None)
    data.add_argument("--max_pairs", type=int, default=None, help="score at most this many held-out pairs")
    data.add_argument("--max_prompts", type=int, default=64, help="generate for at most this many prompts")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max_new_tokens", type=int, default=128)
    gen.add_argument("--batch_size", type=int, default=8)
    gen.add_argument("--do_sample", action="store_true", help="seeded sampling instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top_p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("scoring and output")
    out.add_argument("--beta", type=float, default=None, help="implicit reward scale (default: the run's)")
    out.add_argument("--interval", choices=("wilson", "bootstrap"), default="wilson")
    out.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None)
    out.add_argument("--output", default=None, help="results file (default: RUN_DIR/eval_results.json)")
    out.add_argument("--no_report", action="store_true", help="do not (re)write RUN_DIR/report/")
    return parser


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _details(judge: dict[str, Any]) -> str:
    """A judge's diagnostics in a few words."""
    d = judge.get("details") or {}
    if judge["kind"] == "rule":
        return f"pass: ref {_pct(d.get('pass_rate_reference'))}, tuned {_pct(d.get('pass_rate_tuned'))}"
    if judge["kind"] == "reward-model":
        return f"reward: ref {_num(d.get('mean_reward_reference'))}, tuned {_num(d.get('mean_reward_tuned'))}"
    if judge["kind"] == "llm-judge":
        return (
            f"{d.get('identical_replies', 0)} identical pairs of replies (ties); on the others it picked "
            f"position A {_pct(d.get('position_a_rate'))}, both orders agreed {_pct(d.get('order_agreement'))}"
        )
    return ", ".join(f"{k}={v:.3g}" for k, v in d.items())


def print_eval_summary(results: dict[str, Any], console: Console | None = None) -> None:
    """One screen: held-out pair metrics before/after, each judge's win rate, reply lengths."""
    console = console or Console()
    pairs = results.get("pairs") or {}
    before, after = pairs.get("before") or {}, pairs.get("after") or {}
    table = Table(title=f"held-out pairs ({pairs.get('n', 0)}), reference: {results.get('reference')}")
    table.add_column("measure")
    table.add_column("before (reference)", justify="right")
    table.add_column("after (tuned)", justify="right")
    table.add_row("implicit-reward accuracy", "-", _pct(after.get("reward_accuracy")))
    table.add_row("implicit-reward margin", "0", _num(after.get("reward_margin")))
    table.add_row(
        "rewards chosen / rejected",
        "0 / 0",
        f"{_num(after.get('rewards_chosen'))} / {_num(after.get('rewards_rejected'))}",
    )
    table.add_row(
        "log p(chosen) > log p(rejected)",
        _pct(before.get("likelihood_accuracy")),
        _pct(after.get("likelihood_accuracy")),
    )
    table.add_row("log-prob margin", _num(before.get("logp_margin")), _num(after.get("logp_margin")))
    console.print(table)

    generation = results.get("generation") or {}
    judges = results.get("judges") or []
    table = Table(
        title=f"tuned vs reference on {generation.get('n_prompts', 0)} held-out prompts ({generation.get('decoding')})"
    )
    table.add_column("judge", overflow="fold")
    for column in ("win", "tie", "loss", "win rate", "95% CI"):
        table.add_column(column, justify="right")
    for j in judges:
        table.add_row(
            j["name"], str(j["wins"]), str(j["ties"]), str(j["losses"]), _pct(j["win_rate"]),
            f"[{_pct(j['ci_low'])}, {_pct(j['ci_high'])}]",
        )  # fmt: skip
    if judges:
        console.print(table)
        interval = (
            "Wilson score interval on (wins + ties/2)/n"
            if judges[0]["interval"] == "wilson"
            else "percentile bootstrap"
        )
        console.print(f"win rate = (wins + ties/2) / prompts; 95% CI: {interval}")
        for j in judges:
            console.print(f"  {j['name']}: {_details(j)}", highlight=False)
    else:
        console.print("no judge given: add --judge rule:NAME, --judge reward-model:PATH or --judge llm-judge")
    ref, tuned = generation.get("length_reference") or {}, generation.get("length_tuned") or {}
    if ref:
        console.print(
            f"average reply length: reference {ref['words']:.1f} words ({ref['tokens']:.1f} tokens), "
            f"tuned {tuned['words']:.1f} words ({tuned['tokens']:.1f} tokens)"
        )


def main(argv: list[str]) -> int:
    from preftune.evaluation.evaluate import EvalRequest, EvalSettings, run_eval
    from preftune.report import write_report

    args = build_parser().parse_args(argv)
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model: no such run folder: {args.model}")
    request = EvalRequest(
        run_dir=args.model,
        judges=args.judge,
        dataset_name=args.dataset_name,
        splits=args.splits,
        test_size=int(args.test_size)
        if args.test_size is not None and args.test_size >= 1
        else args.test_size,
        data_format=args.data_format,
        chat_template_format=args.chat_template_format,
        max_pairs=args.max_pairs,
        dtype=args.dtype,
        output=args.output,
    )
    settings = EvalSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        beta=args.beta,
        interval=args.interval,
        max_prompts=args.max_prompts,
    )
    results, path = run_eval(request, settings)
    console = Console()
    print_eval_summary(results, console)
    console.print(f"results: [bold]{path}[/bold]")
    if not args.no_report and path.parent.resolve() == Path(args.model).resolve():
        console.print(f"report: [bold]{write_report(args.model)}[/bold]")
    return 0
