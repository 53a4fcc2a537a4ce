"""The run report: one self-contained HTML file (figures embedded as base64 PNG) plus the PNGs.

`write_report(RUN_DIR)` reads what the run folder holds and writes RUN_DIR/report/report.html:
  - trainer_state.json (log history)      -> summary numbers and training / eval curves
  - eval_results.json (`preftune eval`)   -> held-out pair metrics, reward-margin histograms, the judges'
                                             win / tie / loss table, reply lengths, sample generations
  - preftune_config.yaml                  -> the run config
Every part is optional: a report is written for whatever is there.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from preftune.report import plots

logger = logging.getLogger("preftune")

REPORT_DIR = "report"
REPORT_FILE = "report.html"
STATE_FILE = "trainer_state.json"
N_SAMPLES = 8

CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 12px; }
.figures img, img.wide { max-width: 100%; border: 1px solid #eee; }
table.samples td { width: 30%; white-space: pre-wrap; word-break: break-word; font-size: 0.88em; }
table.samples td.verdict { width: 10%; white-space: normal; }
.win { color: #2ca02c; font-weight: bold; } .loss { color: #d62728; font-weight: bold; } .tie { color: #777; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
.row { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    return format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _img(path: Path, alt: str, css_class: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str] | None, rows: list[list[str]], css_class: str = "") -> str:
    """A table of already-rendered cells (see `_td`) under an optional header row."""
    cls = f' class="{css_class}"' if css_class else ""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table{cls}>{head}{body}</table>"


def _td(value: str, numeric: bool = False, css_class: str = "") -> str:
    classes = " ".join(c for c in ("num" if numeric else "", css_class) if c)
    return f'<td class="{classes}">{value}</td>' if classes else f"<td>{value}</td>"


# --------------------------------------------------------------------------- reading the run folder


def read_trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """trainer_state.json of the run folder, else of its newest checkpoint."""
    candidates = [run_dir / STATE_FILE]
    checkpoints = sorted(
        run_dir.glob("checkpoint-*/" + STATE_FILE),
        key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1,
    )
    candidates += list(reversed(checkpoints))
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _command(config: dict[str, Any]) -> str:
    if "preference" in config:
        return "dpo"
    if "sft" in config:
        return "sft"
    return "run"


# --------------------------------------------------------------------------- sections


def _summary_section(config: dict[str, Any], state: dict[str, Any] | None) -> str:
    model = (config.get("model") or {}).get("model_name_or_path") or "embedded SmolLM2-135M-Instruct"
    data = config.get("data") or {}
    history = (state or {}).get("log_history") or []
    run_rows = [
        ["command", _command(config)],
        ["started from", model],
        ["data set", data.get("dataset_name", "-")],
    ]
    if state:
        run_rows.append(
            ["steps", f"{state.get('global_step', '-')} (epoch {_num(state.get('epoch'), '.3g')})"]
        )
    train_end = next((h for h in reversed(history) if "train_runtime" in h), {})
    if train_end:
        run_rows.append(["train runtime (s)", _num(train_end.get("train_runtime"), ".1f")])
        run_rows.append(["mean train loss", _num(train_end.get("train_loss"))])
    tables = [_table(["run", ""], [[_td(_e(a)), _td(_e(b))] for a, b in run_rows])]

    last_train = next((h for h in reversed(history) if "loss" in h), {})
    last_eval = next((h for h in reversed(history) if "eval_loss" in h), {})
    shown = [
        k for k in last_train if not k.startswith("eval_") and k not in ("step", "epoch", "learning_rate")
    ]
    shown += [k[5:] for k in last_eval if k.startswith("eval_") and k[5:] not in shown]
    skip = ("runtime", "per_second", "grad_norm", "total_flos")
    metric_rows = []
    for name in shown:
        if any(s in name for s in skip):
            continue
        train_value, eval_value = last_train.get(name), last_eval.get(f"eval_{name}")
        metric_rows.append([_td(_e(name)), _td(_num(train_value), True), _td(_num(eval_value), True)])
    if metric_rows:
        header = [
            "last logged metric",
            f"train (step {last_train.get('step', '-')})",
            f"held-out (step {last_eval.get('step', '-')})",
        ]
        tables.append(_table(header, metric_rows))
    return f'<h2>Summary</h2><div class="row">{"".join(tables)}</div>'


def _pairs_section(pairs: dict[str, Any], histogram: Path | None) -> str:
    before, after = pairs.get("before") or {}, pairs.get("after") or {}
    rows = [
        ["implicit-reward accuracy (margin &gt; 0)", "-", _pct(after.get("reward_accuracy"))],
        ["implicit-reward margin (mean)", "0", _num(after.get("reward_margin"))],
        ["rewards/chosen (mean)", "0", _num(after.get("rewards_chosen"))],
        ["rewards/rejected (mean)", "0", _num(after.get("rewards_rejected"))],
        [
            "log p(chosen) &gt; log p(rejected)",
            _pct(before.get("likelihood_accuracy")),
            _pct(after.get("likelihood_accuracy")),
        ],
        [
            "log p(chosen) - log p(rejected) (mean)",
            _num(before.get("logp_margin")),
            _num(after.get("logp_margin")),
        ],
        ["log p(chosen) (mean)", _num(before.get("logps_chosen")), _num(after.get("logps_chosen"))],
        ["log p(rejected) (mean)", _num(before.get("logps_rejected")), _num(after.get("logps_rejected"))],
    ]
    table = _table(
        ["held-out pairs: measure", "before (reference)", "after (tuned)"],
        [[_td(a), _td(b, True), _td(c, True)] for a, b, c in rows],
    )
    note = (
        f'<p class="note">{pairs.get("n", 0)} held-out pairs; implicit reward = beta * (log pi - log ref), '
        f"beta = {_num(pairs.get('beta'))}. Before tuning the policy is the reference, so every implicit reward is 0.</p>"
    )
    figure = _img(histogram, "reward margin histograms", "wide") if histogram else ""
    return f"<h2>Held-out pairs</h2>{table}{note}{figure}"


def _judges_section(results: dict[str, Any], figure: Path | None) -> str:
    judges = results.get("judges") or []
    generation = results.get("generation") or {}
    parts = ["<h2>Judged generations: tuned vs reference</h2>"]
    if judges:
        rows = []
        for j in judges:
            interval = "Wilson on wins + ties/2" if j.get("interval") == "wilson" else "percentile bootstrap"
            details = ", ".join(f"{k} {_num(v, '.3g')}" for k, v in (j.get("details") or {}).items())
            rows.append(
                [
                    _td(_e(j["name"])),
                    _td(str(j["wins"]), True),
                    _td(str(j["ties"]), True),
                    _td(str(j["losses"]), True),
                    _td(_pct(j["win_rate"]), True),
                    _td(f"[{_pct(j['ci_low'])}, {_pct(j['ci_high'])}]", True),
                    _td(_e(interval)),
                    _td(_e(details)),
                ]
            )
        parts.append(
            _table(["judge", "wins", "ties", "losses", "win rate", "95% CI", "interval", "details"], rows)
        )
        parts.append(
            '<p class="note">Win rate = (wins + ties/2) / prompts. LLM judges are asked in both orders; '
            "a verdict that flips with the order is a tie.</p>"
        )
        if figure:
            parts.append(_img(figure, "win rates", "wide"))
    else:
        parts.append('<p class="note">No judge was given (preftune eval --judge ...).</p>')
    ref, tuned = generation.get("length_reference") or {}, generation.get("length_tuned") or {}
    if ref:
        parts.append(
            _table(
                ["average reply length", "reference", "tuned"],
                [
                    [
                        _td("words"),
                        _td(_num(ref.get("words"), ".1f"), True),
                        _td(_num(tuned.get("words"), ".1f"), True),
                    ],
                    [
                        _td("tokens"),
                        _td(_num(ref.get("tokens"), ".1f"), True),
                        _td(_num(tuned.get("tokens"), ".1f"), True),
                    ],
                ],
            )
        )
        parts.append(
            f'<p class="note">{generation.get("n_prompts", 0)} held-out prompts, {_e(generation.get("decoding", ""))} '
            "decoding; judges can favour longer replies (length bias).</p>"
        )
    return "".join(parts)


def _verdict(name: str, verdict: str) -> str:
    return f'<span class="{_e(verdict)}">{_e(verdict)}</span> <span class="note">{_e(name)}</span>'


def _samples_section(samples: list[dict[str, Any]]) -> str:
    rows = []
    for s in samples[:N_SAMPLES]:
        verdicts = "<br>".join(_verdict(k, v) for k, v in (s.get("verdicts") or {}).items()) or "-"
        rows.append(
            [
                _td(_e(s["prompt"])),
                _td(_e(s["reference"])),
                _td(_e(s["tuned"])),
                _td(verdicts, css_class="verdict"),
            ]
        )
    table = _table(["prompt", "reference (before)", "tuned (after)", "verdict for tuned"], rows, "samples")
    return f"<h2>Sample generations</h2>{table}"


def _config_section(config: dict[str, Any]) -> str:
    text = yaml.safe_dump(config, sort_keys=False) if config else "(no preftune_config.yaml)"
    return (
        "<h2>Run config</h2><details><summary>preftune_config.yaml: every argument of the run</summary>"
        f"<pre>{_e(text)}</pre></details>"
    )


# --------------------------------------------------------------------------- the report


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write RUN_DIR/report/report.html and the PNGs beside it; returns the HTML path."""
    from preftune.evaluation.evaluate import read_results, read_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such run folder: {run_dir}")
    out = Path(out_dir) if out_dir else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    config = read_run_config(run_dir)
    state = read_trainer_state(run_dir)
    results = read_results(run_dir)

    sections = [_summary_section(config, state)]
    if results:
        histogram = plots.margin_histograms(results.get("pairs") or {}, out)
        win_figure = plots.win_rate_figure(results.get("judges") or [], out)
        sections.append(_judges_section(results, win_figure))
        if results.get("pairs"):
            sections.append(_pairs_section(results["pairs"], histogram))
    curves = plots.curve_figures((state or {}).get("log_history") or [], out)
    if curves:
        images = "".join(_img(path, title) for title, path in curves)
        sections.append(f'<h2>Training and eval curves</h2><div class="figures">{images}</div>')
    else:
        sections.append(
            '<h2>Training and eval curves</h2><p class="note">No trainer_state.json in the run folder.</p>'
        )
    if results and results.get("samples"):
        sections.append(_samples_section(results["samples"]))
    if not results:
        sections.append(
            f'<p class="note">No evaluation yet: run <code>preftune eval --model {_e(run_dir)} --judge ...</code> '
            "to add held-out pair metrics, judged generations and samples.</p>"
        )
    sections.append(_config_section(config))

    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>preftune report: {_e(run_dir.name)}</title><style>{CSS}</style></head><body>"
        f'<h1>preftune report: {_e(run_dir.name)}</h1><p class="sub">{_e(run_dir.resolve())} - {created}</p>'
        + "".join(sections)
        + "</body></html>\n"
    )
    path = out / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


def report_run(trainer: Any) -> Path | None:
    """At the end of a training run: write the report into the trainer's output folder (main process
    only). A failing report is logged, never raised: the trained model is already saved."""
    if not trainer.is_world_process_zero():
        return None
    output_dir = trainer.args.output_dir
    try:
        path = write_report(output_dir)
    except Exception as err:  # noqa: BLE001 - the report must not fail a finished run
        logger.warning("could not write the run report in %s: %s", output_dir, err)
        return None
    logger.info("run report: %s", path)
    if "tensorboard" in (trainer.args.report_to or []):
        logger.info("TensorBoard logs: tensorboard --logdir %s", Path(output_dir) / "runs")
    return path
