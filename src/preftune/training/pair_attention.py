"""Attention over shared-prompt rows that skips the masked blocks.

A shared-prompt row holds `[prompt | chosen | rejected]` segments (preftune.training.batching).
With one custom mask over the whole row, SDPA computes every (query, key) score of the row and
throws most of them away: the other pairs', the rejected reply's view of the chosen one, the future.
Here each segment is two small SDPA calls instead:

    prompt + chosen   -> causal attention over itself (SDPA's is_causal path skips the future)
    rejected          -> attention over [prompt keys | its own keys], causal within the reply

So a pair costs about (P + C)^2 / 2 + J * (P + J) scores instead of (row length)^2, the work no
longer grows with how many pairs share a row, and rows can be packed full (no padding). The numbers
are the masked path's: the same scores, softmax and weighted sums, only the masked terms left out.

On a CPU in bf16/fp16 (autocast included), every block is padded to a multiple of LENGTH_BUCKET (see
`attend`): torch's CPU flash attention compiles a kernel for each new sequence length in those
dtypes and keeps all of them for the life of the process, so without this a run's memory grew with
every new pair length (to over 1 GiB in a few hundred steps). Padding is exact: padded keys are
masked or, in a causal block, after every real query; padded queries' outputs are dropped.

The layout travels as a `pair_layout` keyword through the model's forward to its attention function
(transformers passes extra keywords down to `AttentionInterface` functions, as it does for
flash-attention's packed sequences). The model also keeps getting the full boolean mask, so a model
that drops the keyword still computes the right thing through plain SDPA, only slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

Tensor = torch.Tensor

PAIR_ATTENTION = "preftune_pairs"

# One segment of a row: (row, start, prompt length, chosen length, rejected length).
Segment = tuple[int, int, int, int, int]

# Block lengths are rounded up to a multiple of this on a CPU in bf16/fp16 (module docstring).
LENGTH_BUCKET = 64

# How many attention calls took a layout (preftune.training.logprobs checks a forward made some).
calls_with_layout = 0


def pair_attention_forward(
    module: torch.nn.Module,
    query: Tensor,  # [rows, heads, tokens, head_dim]
    key: Tensor,  # [rows, kv_heads, tokens, head_dim]
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    pair_layout: tuple[Segment, ...] | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """An `AttentionInterface` function: per-segment SDPA with `pair_layout`, plain SDPA without."""
    if pair_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    global calls_with_layout
    calls_with_layout += 1
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    length = query.shape[2]
    by_row: dict[int, list[Segment]] = {}
    for segment in pair_layout:
        by_row.setdefault(segment[0], []).append(segment)

    # Split each row into its blocks with `split` (whose backward is one concatenation): slicing
    # the full tensor block by block would make each slice's backward zero-fill the whole row.
    out_rows = []
    for row, (q_row, k_row, v_row) in enumerate(zip(query.split(1), key.split(1), value.split(1))):
        segments = sorted(by_row.get(row, []), key=lambda s: s[1])
        end = 0
        for _, start, n_prompt, n_chosen, n_rejected in segments:
            if start != end:
                raise ValueError(f"pair_layout: row {row}'s segments are not back to back from 0: {segments}")
            end += n_prompt + n_chosen + n_rejected
        sizes = [n for _, _, p, c, j in segments for n in (p + c, j)]
        sizes.append(length - sum(sizes))  # padding at the row's end
        qs, ks, vs = (t.split(sizes, dim=2) for t in (q_row, k_row, v_row))
        pieces = []
        for i, (_, _, n_prompt, n_chosen, n_rejected) in enumerate(segments):
            shared, reply = 2 * i, 2 * i + 1
            if n_prompt + n_chosen == 0 or n_rejected == 0:  # (SDPA takes no empty query)
                pieces.append(_masked_block(qs, ks, vs, shared, reply, n_prompt, dropout, scaling))
                continue
            # prompt + chosen: causal over itself
            pieces.append(attend(qs[shared], ks[shared], vs[shared], None, dropout, scaling))
            # rejected: reply token t sees every prompt key and reply keys 0..t
            keys = torch.cat([ks[shared][:, :, :n_prompt], ks[reply]], dim=2)
            values = torch.cat([vs[shared][:, :, :n_prompt], vs[reply]], dim=2)
            mask = torch.ones(n_rejected, n_prompt + n_rejected, dtype=torch.bool, device=query.device)
            pieces.append(attend(qs[reply], keys, values, mask.tril(diagonal=n_prompt), dropout, scaling))
        # padding: zeros (nothing reads it; no NaN from an empty softmax)
        pieces.append(q_row.new_zeros(1, q_row.shape[1], sizes[-1], v_row.shape[-1]))
        out_rows.append(torch.cat(pieces, dim=2))
    out = torch.cat(out_rows)
    return out.transpose(1, 2).contiguous(), None


def _masked_block(qs, ks, vs, shared: int, reply: int, n_prompt: int, dropout: float, scaling):
    """A segment with an empty part, attended in one masked pass (rare: empty prompt and chosen
    reply, or an empty rejected reply)."""
    q, k, v = (torch.cat([t[shared], t[reply]], dim=2) for t in (qs, ks, vs))
    n_shared, n = qs[shared].shape[2], q.shape[2]
    position = torch.arange(n, device=q.device)
    causal = position[None, :] <= position[:, None]
    other_branch = (position[:, None] >= n_shared) & (position[None, :] >= n_prompt)
    other_branch &= position[None, :] < n_shared
    mask = causal & ~other_branch
    return attend(q, k, v, mask, dropout, scaling)


def _bucketed_lengths(query: Tensor) -> bool:
    """Whether torch's SDPA would compile a kernel per sequence length: on a CPU in bf16/fp16, which
    is also the case for fp32 inputs under a bf16/fp16 autocast (SDPA is on autocast's list, and
    rotary embeddings in fp32 hand the attention fp32 queries and keys)."""
    if query.device.type != "cpu":
        return False
    low_precision = (torch.bfloat16, torch.float16)
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low_precision
    return query.dtype in low_precision or autocast


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    """`t` [rows, heads, tokens, dim] with zero tokens appended up to `length`."""
    extra = length - t.shape[2]
    return t if extra == 0 else torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, scaling) -> Tensor:
    """SDPA of one block: causal when `mask` is None (then q and k have the same length), else with
    the boolean `mask` [q tokens, k tokens] (True: attend).

    On a CPU in bf16/fp16 the query and key lengths are rounded up to a multiple of LENGTH_BUCKET
    (module docstring). The padded keys are never seen by a real query (masked, or after it in a
    causal block), each padded query sees at least one key (no empty softmax), and the padded
    queries' outputs are dropped, so real outputs and gradients are the unpadded ones."""
    n_q, n_k = q.shape[2], k.shape[2]
    if _bucketed_lengths(q):
        padded_q, padded_k = (-(-n // LENGTH_BUCKET) * LENGTH_BUCKET for n in (n_q, n_k))
    else:
        padded_q, padded_k = n_q, n_k
    if mask is not None and (padded_q, padded_k) != (n_q, n_k):
        full = torch.zeros(padded_q, padded_k, dtype=torch.bool, device=mask.device)
        full[:n_q, :n_k] = mask
        full[n_q:, 0] = True
        mask = full
    q, k, v = _pad_tokens(q, padded_q), _pad_tokens(k, padded_k), _pad_tokens(v, padded_k)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
    )
    return out if padded_q == n_q else out[:, :, :n_q]


AttentionInterface.register(PAIR_ATTENTION, pair_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(PAIR_ATTENTION, sdpa_mask)


def segments_of(batch: dict[str, Tensor]) -> tuple[Segment, ...]:
    """The batch's `segments` tensor [n, 5] as Python ints (read once per forward, not per layer)."""
    return tuple(tuple(s) for s in batch["segments"].tolist())


def can_use(config) -> bool:
    """Pair attention replaces SDPA; eager (e.g. for logit soft-capping) keeps its masked path."""
    return config._attn_implementation in ("sdpa", PAIR_ATTENTION)


@contextlib.contextmanager
def enabled(config) -> Iterator[bool]:
    """Within the block (forward and backward: activation checkpointing recomputes in backward),
    the model's attention is `pair_attention_forward`. Yields whether it is."""
    previous = config._attn_implementation
    if not can_use(config):
        yield False
        return
    config._attn_implementation = PAIR_ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = previous
