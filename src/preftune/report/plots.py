"""The report's figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPI = 100
TRAIN_COLOR, EVAL_COLOR = "#1f77b4", "#ff7f0e"
REFERENCE_COLOR, TUNED_COLOR = "#7f7f7f", "#2ca02c"


@dataclass(frozen=True)
class Panel:
    """One curve plot: a title and the (log-history key, legend label) series it draws."""

    title: str
    series: tuple[tuple[str, str], ...]
    ylabel: str = ""


PANELS = (
    Panel("loss", (("loss", "train"), ("eval_loss", "eval"))),
    Panel("rewards/accuracies", (("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval"))),
    Panel("rewards/margins", (("rewards/margins", "train"), ("eval_rewards/margins", "eval"))),
    Panel(
        "rewards/chosen and rewards/rejected",
        (
            ("rewards/chosen", "train chosen"),
            ("rewards/rejected", "train rejected"),
            ("eval_rewards/chosen", "eval chosen"),
            ("eval_rewards/rejected", "eval rejected"),
        ),
    ),
    Panel("token accuracy", (("token_accuracy", "train"), ("eval_token_accuracy", "eval"))),
    Panel("perplexity (held-out)", (("eval_perplexity", "eval"),)),
    Panel("learning rate", (("learning_rate", "learning rate"),)),
    Panel("gradient norm", (("grad_norm", "grad norm"),)),
)


def _figure(width: float = 5.2, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def series(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged metric; the last value logged at a step wins (the final
    evaluation repeats the one at the last step)."""
    by_step = {h["step"]: h[key] for h in log_history if isinstance(h.get(key), int | float) and "step" in h}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def curve_figures(log_history: Sequence[dict[str, Any]], out_dir: Path) -> list[tuple[str, Path]]:
    """One PNG per panel that has data; returns [(title, path)]."""
    written = []
    for panel in PANELS:
        drawn = [(label, *series(log_history, key)) for key, label in panel.series]
        drawn = [d for d in drawn if d[1]]
        if not drawn:
            continue
        figure = _figure()
        axes = figure.add_subplot()
        for i, (label, steps, values) in enumerate(drawn):
            is_eval = label.startswith("eval")
            axes.plot(
                steps,
                values,
                marker="o" if is_eval or len(steps) < 20 else None,
                markersize=3,
                linestyle="--" if is_eval else "-",
                label=label,
                color=f"C{i}",
            )
        axes.set_title(panel.title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if len(drawn) > 1 or drawn[0][0] not in ("learning rate", "grad norm"):
            axes.legend(fontsize=8)
        path = out_dir / f"{slug(panel.title)}.png"
        figure.savefig(path)
        written.append((panel.title, path))
    return written


def margin_histograms(pairs: dict[str, Any], out_dir: Path) -> Path | None:
    """Held-out reward margins: the log-prob margin log p(chosen) - log p(rejected) of the reference
    (before) and of the tuned model (after), and the tuned model's implicit reward margin."""
    logps = pairs.get("logps") or {}
    needed = ("tuned_chosen", "tuned_rejected", "reference_chosen", "reference_rejected")
    if not all(logps.get(k) for k in needed):
        return None
    beta = pairs.get("beta") or 0.1
    before = [c - r for c, r in zip(logps["reference_chosen"], logps["reference_rejected"])]
    after = [c - r for c, r in zip(logps["tuned_chosen"], logps["tuned_rejected"])]
    reward = [beta * (a - b) for a, b in zip(after, before)]
    bins = max(5, min(30, len(before) // 2))

    figure = _figure(10.4, 3.4)
    left, right = figure.subplots(1, 2)
    low, high = min(before + after), max(before + after)
    if high <= low:
        high = low + 1.0
    left.hist(
        before, bins=bins, range=(low, high), alpha=0.6, color=REFERENCE_COLOR, label="before (reference)"
    )
    left.hist(
        after,
        bins=bins,
        range=(low, high),
        histtype="step",
        linewidth=2,
        color=TUNED_COLOR,
        label="after (tuned)",
    )
    left.axvline(0, color="black", linewidth=0.8)
    left.set_title("log p(chosen) - log p(rejected), held-out pairs")
    left.set_xlabel("log-prob margin (nats)")
    left.set_ylabel("pairs")
    left.legend(fontsize=8)
    right.hist(reward, bins=bins, color=TUNED_COLOR, alpha=0.8)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_title(f"implicit reward margin, tuned (beta={beta:g}; before: 0)")
    right.set_xlabel("beta * (log-prob margin after - before)")
    right.set_ylabel("pairs")
    path = out_dir / "reward_margins.png"
    figure.savefig(path)
    return path


def win_rate_figure(judges: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Win / tie / loss shares per judge as stacked bars, with the win rate and its 95% interval."""
    judges = [j for j in judges if j.get("n")]
    if not judges:
        return None
    figure = _figure(10.4, 1.2 + 0.55 * len(judges))
    axes = figure.add_subplot()
    names = [j["name"] for j in judges]
    y = list(range(len(judges)))
    left = [0.0] * len(judges)
    for key, color, label in (
        ("wins", TUNED_COLOR, "win"),
        ("ties", "#c7c7c7", "tie"),
        ("losses", "#d62728", "loss"),
    ):
        shares = [j[key] / j["n"] for j in judges]
        axes.barh(y, shares, left=left, color=color, label=label, height=0.6)
        left = [a + b for a, b in zip(left, shares)]
    rates = [j["win_rate"] for j in judges]
    errors = [
        [r - j["ci_low"] for r, j in zip(rates, judges)],
        [j["ci_high"] - r for r, j in zip(rates, judges)],
    ]
    axes.errorbar(
        rates, y, xerr=errors, fmt="D", color="black", markersize=4, capsize=3, label="win rate, 95% CI"
    )
    axes.axvline(0.5, color="black", linewidth=0.6, linestyle=":")
    axes.set_yticks(y, names, fontsize=8)
    axes.set_xlim(0, 1)
    axes.invert_yaxis()
    axes.set_xlabel("share of held-out prompts (tuned vs reference)")
    figure.legend(fontsize=8, ncols=4, loc="outside upper center")
    path = out_dir / "win_rates.png"
    figure.savefig(path)
    return path
