"""Win / tie / loss counts and the win rate of the tuned model against its reference, with a 95% interval.

Each compared prompt gets one score for the tuned model: 1 (win), 0.5 (tie) or 0 (loss). The win
rate is their mean, (wins + ties / 2) / n. Two intervals:

  wilson     the Wilson score interval for a proportion, applied to p = (wins + ties/2) / n with n the
             number of prompts (the default: closed form, stays inside [0, 1], good at small n)
  bootstrap  the percentile bootstrap of the mean per-prompt score (seeded resampling)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

WIN, TIE, LOSS = 1.0, 0.5, 0.0
INTERVALS = ("wilson", "bootstrap")
Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


@dataclass(frozen=True)
class WinRate:
    """Outcome counts and the win rate, with its interval (see the module docstring)."""

    wins: int
    ties: int
    losses: int
    win_rate: float  # (wins + ties / 2) / n
    ci_low: float
    ci_high: float
    interval: str  # "wilson" or "bootstrap"
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def to_dict(self) -> dict:
        return {**asdict(self), "n": self.n}

    def describe(self) -> str:
        """E.g. '62.5% [41.3%, 79.8%] (95% Wilson on wins + ties/2)'."""
        how = "Wilson on wins + ties/2" if self.interval == "wilson" else "percentile bootstrap"
        return f"{self.win_rate:.1%} [{self.ci_low:.1%}, {self.ci_high:.1%}] ({self.confidence:.0%} {how})"


def outcome(score: float) -> float:
    """A per-prompt preference for the tuned model in [0, 1] (e.g. the mean of two judge orders)
    rounded to WIN (> 0.5), TIE (= 0.5) or LOSS (< 0.5)."""
    if score > 0.5:
        return WIN
    if score < 0.5:
        return LOSS
    return TIE


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (successes may be fractional:
    wins + ties / 2). (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_interval(
    scores: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores` (resampled with replacement, seeded)."""
    n = len(scores)
    if n == 0:
        return 0.0, 1.0
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(n_resamples))
    alpha = (1 - confidence) / 2
    low = means[int(math.floor(alpha * (n_resamples - 1)))]
    high = means[int(math.ceil((1 - alpha) * (n_resamples - 1)))]
    return low, high


def win_rate(outcomes: Sequence[float], interval: str = "wilson", seed: int = 0) -> WinRate:
    """Counts, win rate and 95% interval of per-prompt outcomes (each WIN, TIE or LOSS)."""
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
    bad = [o for o in outcomes if o not in (WIN, TIE, LOSS)]
    if bad:
        raise ValueError(f"outcomes must be 1 (win), 0.5 (tie) or 0 (loss), got {bad[:3]}")
    wins = sum(o == WIN for o in outcomes)
    ties = sum(o == TIE for o in outcomes)
    losses = sum(o == LOSS for o in outcomes)
    n = len(outcomes)
    rate = (wins + ties / 2) / n if n else 0.0
    if interval == "wilson":
        low, high = wilson_interval(wins + ties / 2, n)
    else:
        low, high = bootstrap_interval(list(outcomes), seed=seed)
    return WinRate(wins, ties, losses, rate, low, high, interval)
