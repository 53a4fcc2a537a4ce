"""Packing and batching for SFT.

Packing puts several short examples into one row of at most `max_length` tokens (best-fit decreasing,
examples are never split). The packed row is padding-free: no attention mask, `position_ids` restart
at 0 at each example. transformers reads packed rows from position ids when the attention mask is
None and no KV cache is in use (sdpa, eager and flex build a block-diagonal causal mask; flash
attention uses varlen kernels), so no example attends to another, and each example's first token is
never a target, so none is predicted from the example before it. `SFTTrainer` calls the model with
`use_cache=False`; with a cache, transformers would skip the packed-sequence detection.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity`.

    Best-fit decreasing: longest item first, each into the fullest bin it still fits in.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free room, bin index)
    for i in order:
        length = lengths[i]
        if length > capacity:
            raise ValueError(f"example of {length} tokens is longer than the packing length {capacity}")
        slot = bisect.bisect_left(free, (length, -1))  # the bin with the least room that fits
        if slot == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - length, len(bins) - 1))
            continue
        room, row = free.pop(slot)
        bins[row].append(i)
        bisect.insort(free, (room - length, row))
    return bins


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Pack {"input_ids", "loss_mask"} examples into rows of at most max_length tokens.

    Each row also gets "seq_lengths", the lengths of its examples in order.
    """
    rows = best_fit_decreasing([len(e["input_ids"]) for e in examples], max_length)
    packed = []
    for members in rows:
        packed.append(
            {
                "input_ids": [t for i in members for t in examples[i]["input_ids"]],
                "loss_mask": [m for i in members for m in examples[i]["loss_mask"]],
                "seq_lengths": [len(examples[i]["input_ids"]) for i in members],
            }
        )
    return packed


def packed_position_ids(seq_lengths: Sequence[int], length: int) -> list[int]:
    """Positions restarting at 0 for each example; the padding after them is one more segment."""
    positions = [p for n in seq_lengths for p in range(n)]
    return positions + list(range(length - len(positions)))


@dataclass
class SFTCollator:
    """{"input_ids", "loss_mask"[, "seq_lengths"]} features -> model inputs + `labels`.

    labels: the token where loss_mask is 1, IGNORE_INDEX elsewhere (prompt, padding, each example's
    first token). Padding-free batches (packed rows) carry `position_ids` and no `attention_mask`;
    the others are right-padded with an attention mask. `n_tokens` counts the real tokens per row.
    """

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids, labels, extra = [], [], []
        for f in features:
            ids, n_pad = list(f["input_ids"]), length - len(f["input_ids"])
            input_ids.append(ids + [self.pad_token_id] * n_pad)
            labels.append(
                [t if m else IGNORE_INDEX for t, m in zip(ids, f["loss_mask"])] + [IGNORE_INDEX] * n_pad
            )
            if self.padding_free:
                extra.append(packed_position_ids(f.get("seq_lengths", [len(ids)]), length))
            else:
                extra.append([1] * len(ids) + [0] * n_pad)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "n_tokens": torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.long),
        }
        batch["position_ids" if self.padding_free else "attention_mask"] = torch.tensor(
            extra, dtype=torch.long
        )
        return batch
