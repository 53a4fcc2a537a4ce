"""preftune: preference-tune chat models with DPO, IPO and friends."""

__version__ = "0.1.0"
