"""Preference losses (DPO, IPO, hinge, KTO-pair, robust/cDPO) as pure functions of log-probs."""

from preftune.losses.preference import LOSSES, PreferenceLossOutput, preference_loss

__all__ = ["LOSSES", "PreferenceLossOutput", "preference_loss"]
