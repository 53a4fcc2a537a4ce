"""Batching of tokenized pairs: one forward for chosen and rejected together.

Two layouts (preftune.training.logprobs reads both):
- `PairCollator`: a batch of B pairs becomes 2B rows, the B chosen sequences (prompt + chosen reply)
  followed by the B rejected ones (prompt + rejected reply), right-padded to the longest row.
  `loss_mask` marks the reply tokens, the only positions whose log-probs count.
- `SharedPromptCollator` (default for training): one `[prompt | chosen | rejected]` segment per pair,
  short pairs packed together, so the prompt is computed once and little padding is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preftune.training.packing import best_fit_decreasing

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
        _add_reference_logps(batch, features)
        return batch


@dataclass
class SharedPromptCollator:
    """B pairs -> rows of `[prompt | chosen | rejected]` segments: each prompt is run once.

    Pairs are packed into rows (best-fit decreasing), all padded to the fullest row. Longer rows
    mean less padding but attention work that grows with the square of the row length, so the
    row capacity is the one (from the longest pair up to all pairs in one row) that minimizes
    rows * length * (1 + attention_ratio * length), `attention_ratio` being the model's attention
    FLOPs per token and per token of context over its matmul FLOPs per token (`attention_ratio`
    from `attention_cost_ratio`; 0 packs everything into one row, None keeps rows to the longest
    pair).
    Per token: `position_ids` (the rejected reply restarts where the prompt ends), `segment_ids`
    (the pair's index in the batch, -1 on padding) and `branch_ids` (0 prompt, 1 chosen, 2 rejected),
    from which `preftune.training.logprobs.shared_prompt_mask` builds the attention mask. Per pair:
    `segments` [B, 5] (row, start, prompt, chosen and rejected lengths), the layout that
    `preftune.training.pair_attention` attends block by block. Per reply
    token: `predict_index` (flat row * length + t position whose output predicts it), `target_ids` and
    `target_rows` (chosen of pair i -> i, rejected -> B + i). `reply_lengths` [2B] counts them.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    attention_ratio: float | None = None

    def _rows(self, lengths: list[int]) -> tuple[list[list[int]], int]:
        """The cheapest packing: (pair indices per row, row length)."""
        best = None
        longest, total = max(lengths), sum(lengths)
        for capacity in sorted({longest + (total - longest) * k // 8 for k in range(9)}):
            rows = best_fit_decreasing(lengths, capacity)
            length = max(sum(lengths[i] for i in row) for row in rows)
            if self.pad_to_multiple_of:
                length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
            cost = len(rows) * length * (1 + (self.attention_ratio or 0) * length)
            if best is None or cost < best[0]:
                best = (cost, rows, length)
            if self.attention_ratio is None:
                break
        return best[1], best[2]

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n_pairs = len(features)
        lengths = [len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features]
        rows, length = self._rows(lengths)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        position_ids = torch.arange(length).repeat(len(rows), 1)
        segment_ids = torch.full((len(rows), length), -1, dtype=torch.long)
        branch_ids = torch.zeros((len(rows), length), dtype=torch.long)
        predict, targets, target_rows, segments = [], [], [], []
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                p, c, j = features[i]["prompt_ids"], features[i]["chosen_ids"], features[i]["rejected_ids"]
                n_p, n_c, n_j = len(p), len(c), len(j)
                end = start + n_p + n_c + n_j
                input_ids[r, start:end] = torch.tensor(list(p) + list(c) + list(j))
                position_ids[r, start:end] = torch.cat(
                    [torch.arange(n_p + n_c), torch.arange(n_p, n_p + n_j)]
                )
                segment_ids[r, start:end] = i
                segments.append((r, start, n_p, n_c, n_j))
                branch_ids[r, start + n_p : start + n_p + n_c] = 1
                branch_ids[r, start + n_p + n_c : end] = 2
                # token k of a reply is predicted by the token before it; the first token of either
                # reply by the last prompt token (none without a prompt, as in the padded layout)
                base = r * length + start
                chosen_from = [base + n_p + k - 1 for k in range(n_c)]
                rejected_from = [base + n_p - 1] + [base + n_p + n_c + k - 1 for k in range(1, n_j)]
                for sources, replies, row in ((chosen_from, c, i), (rejected_from, j, n_pairs + i)):
                    keep = [k for k in range(len(replies)) if n_p > 0 or k > 0]
                    predict += [sources[k] for k in keep]
                    targets += [replies[k] for k in keep]
                    target_rows += [row] * len(keep)
                start = end
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "branch_ids": branch_ids,
            "segments": torch.tensor(segments, dtype=torch.long).reshape(-1, 5),
            "predict_index": torch.tensor(predict, dtype=torch.long),
            "target_ids": torch.tensor(targets, dtype=torch.long),
            "target_rows": torch.tensor(target_rows, dtype=torch.long),
            "reply_lengths": torch.bincount(
                torch.tensor(target_rows, dtype=torch.long), minlength=2 * n_pairs
            ),
        }
        _add_reference_logps(batch, features)
        return batch


def _add_reference_logps(batch: dict[str, torch.Tensor], features: list[dict]) -> None:
    """Precomputed reference log-probs travel along with their pairs."""
    if all(k in features[0] for k in REF_KEYS):
        for key in REF_KEYS:
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)


def attention_cost_ratio(config) -> float:
    """Attention FLOPs per token per token of context (4 * query width: scores and weighted sum),
    over matmul FLOPs per token of one decoder layer (2 * its projection weights)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    weights = 2 * hidden * q_width + 2 * hidden * kv_width + 3 * hidden * intermediate
    return 4 * q_width / (2 * weights)
