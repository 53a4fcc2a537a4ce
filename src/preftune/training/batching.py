"""Batching of tokenized pairs: one concatenated forward for chosen and rejected.

A batch of B pairs becomes 2B rows, the B chosen sequences (prompt + chosen reply) followed by the
B rejected ones (prompt + rejected reply), right-padded to the longest row. `loss_mask` marks the
reply tokens, the only positions whose log-probs count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _pad(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=torch.long)


@dataclass
class PairCollator:
    """Turns a list of {"prompt_ids", "chosen_ids", "rejected_ids"} into model inputs."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [f["prompt_ids"] for f in features]
        replies = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        prompts = prompts + prompts
        sequences = [list(p) + list(r) for p, r in zip(prompts, replies)]
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        reply_marks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, replies)]
        batch = {
            "input_ids": _pad(sequences, self.pad_token_id, length),
            "attention_mask": _pad([[1] * len(s) for s in sequences], 0, length),
            "loss_mask": _pad(reply_marks, 0, length).bool(),
        }
        if all(k in features[0] for k in REF_KEYS):  # precomputed reference log-probs travel along
            for key in REF_KEYS:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        return batch
