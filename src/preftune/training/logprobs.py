"""Sequence log-probabilities of the reply tokens, the quantity every preference loss is built on.

A batch of B pairs always yields 2B sums: the B chosen replies, then the B rejected ones. Two batch
layouts feed the model (see preftune.training.batching):

- padded: 2B rows, prompt + chosen and prompt + rejected, right-padded (`PairCollator`);
- shared prompt (default): each pair is one segment `[prompt | chosen | rejected]`, several short
  pairs may share a row (`SharedPromptCollator`). A custom attention mask lets the rejected reply
  see the prompt but not the chosen reply, and its position ids restart where the prompt ends, so
  every token computes exactly what it would in its own padded row, while the prompt is run once.
  Within a training step (preftune.training.pair_attention switched on) the model attends the
  segments block by block from their layout instead, leaving the masked blocks out.

Two ways to turn the model's outputs into log-probs, with the same numbers:

- `plain`: take the [rows, tokens, vocab] logits, log-softmax, gather. Simple, works for any model,
  and it is what the tests compare against.
- `chunked` (default): ask the model for its last hidden states, then apply the LM head to the
  positions that predict a reply token alone, a chunk at a time, each chunk under activation
  checkpointing. Prompt and padding positions never reach the LM head, and the fp32 logits never
  exist for more than one chunk at once, in the forward or the backward pass. With vocabularies of
  50k-250k this is most of a small model's activation memory. For a plain bias-free LM head a
  chunk is one autograd function (`ReplyTokenLogps`) that holds a single [chunk, vocab] buffer,
  turned into the softmax and then the gradient in place, where cross-entropy's autograd holds
  the logits, the log-softmax and their two gradients.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from preftune.training import pair_attention

Tensor = torch.Tensor

# Attention implementations that take a custom [rows, 1, tokens, tokens] mask from transformers.
SHARED_PROMPT_ATTENTION = ("sdpa", "eager", pair_attention.PAIR_ATTENTION)


@dataclass
class SequenceLogps:
    """Summed log-probs of the reply tokens of each row, and how many reply tokens each row has."""

    logps: Tensor  # [rows], float32
    n_tokens: Tensor  # [rows], int

    def mean_per_token(self) -> Tensor:
        return self.logps / self.n_tokens.clamp(min=1)


@dataclass
class ReplyTargets:
    """Where the reply tokens are: which output position predicts which token, for which sum."""

    index: Tensor  # [n] flat position (row * tokens + t) in the model's output that predicts the token
    targets: Tensor  # [n] the reply token
    rows: Tensor  # [n] which of the n_rows sums (chosen 0..B-1, rejected B..2B-1) it adds to
    n_rows: int


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM under PEFT / DDP wrappers (LoRA layers stay injected in it)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, FSDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        else:
            return model


# ---- the two batch layouts -----------------------------------------------------------------------


def is_shared_prompt_batch(batch: dict[str, Tensor]) -> bool:
    return "segment_ids" in batch


def reply_targets(batch: dict[str, Tensor]) -> ReplyTargets:
    """The reply tokens of either layout, as flat positions of the model's output."""
    if is_shared_prompt_batch(batch):
        # the collator already lists them: position i predicts token i + 1 of the same segment,
        # except the first rejected token, predicted by the last prompt token
        return ReplyTargets(
            batch["predict_index"], batch["target_ids"], batch["target_rows"], len(batch["reply_lengths"])
        )
    # padded rows: position t predicts token t + 1 where loss_mask[t + 1] is set
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    n_rows, length = input_ids.shape
    predict = torch.zeros_like(loss_mask, dtype=torch.bool)
    predict[:, :-1] = loss_mask[:, 1:].bool()
    rows, t = predict.nonzero(as_tuple=True)
    return ReplyTargets(rows * length + t, input_ids[rows, t + 1], rows, n_rows)


def shared_prompt_mask(
    segment_ids: Tensor, branch_ids: Tensor, attn_implementation: str, dtype: torch.dtype
) -> Tensor:
    """[rows, 1, tokens, tokens] mask: a token sees the earlier tokens of its own pair's prompt and of
    its own reply (branch 1 chosen, 2 rejected; 0 prompt), never the other reply or another pair.
    Padding (segment -1) sees earlier padding, so no query row is empty (no NaN from softmax)."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_pair = segment_ids[:, :, None] == segment_ids[:, None, :]
    key_branch, query_branch = branch_ids[:, None, :], branch_ids[:, :, None]
    same_branch = (key_branch == 0) | (key_branch == query_branch)
    allowed = (causal & same_pair & same_branch).unsqueeze(1)
    if attn_implementation == "sdpa":
        return allowed  # SDPA takes a boolean mask: True = attend
    # eager attention adds the mask to the scores
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def model_inputs(model: torch.nn.Module, batch: dict[str, Tensor]) -> dict:
    """The forward arguments of either layout."""
    if not is_shared_prompt_batch(batch):
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    causal_lm = unwrap_causal_lm(model)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if causal_lm.config._attn_implementation == pair_attention.PAIR_ATTENTION:
        # Attention block by block from the layout. The mask is a zero-memory placeholder (a 4D
        # mask keeps transformers from building its own); `_forward` checks the layout was used.
        rows, length = batch["input_ids"].shape
        placeholder = torch.ones((), dtype=torch.bool, device=batch["input_ids"].device)
        inputs["attention_mask"] = placeholder.expand(rows, 1, length, length)
        inputs["pair_layout"] = pair_attention.segments_of(batch)
        return inputs
    inputs["attention_mask"] = shared_prompt_mask(
        batch["segment_ids"],
        batch["branch_ids"],
        causal_lm.config._attn_implementation,
        causal_lm.get_input_embeddings().weight.dtype,
    )
    return inputs


def _forward(model: torch.nn.Module, batch: dict[str, Tensor], **kwargs):
    """The model's forward on a batch of either layout."""
    inputs = model_inputs(model, batch)
    calls = pair_attention.calls_with_layout
    out = model(**inputs, **kwargs, use_cache=False)
    if "pair_layout" in inputs and pair_attention.calls_with_layout == calls:
        raise RuntimeError(
            f"{type(unwrap_causal_lm(model)).__name__} does not pass extra keywords to its attention "
            "function, so it cannot take shared-prompt rows block by block: run with "
            "--pair_attention false"
        )
    return out


def supports_shared_prompt(model: torch.nn.Module, max_length: int) -> bool:
    """A custom 4D mask needs sdpa/eager attention and no sliding window shorter than the rows."""
    config = unwrap_causal_lm(model).config
    window = getattr(config, "sliding_window", None)
    short_window = window is not None and (
        getattr(config, "use_sliding_window", True) and window < max_length
    )
    return config._attn_implementation in SHARED_PROMPT_ATTENTION and not short_window


# ---- log-probs from the model's outputs -------------------------------------------------------


def _sum_per_row(token_logps: Tensor, targets: ReplyTargets) -> SequenceLogps:
    sums = torch.zeros(targets.n_rows, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, targets.rows, token_logps.float())
    counts = torch.bincount(targets.rows, minlength=targets.n_rows)
    return SequenceLogps(logps=sums, n_tokens=counts)


def plain_sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor]) -> SequenceLogps:
    """Reference implementation: full logits, log-softmax in fp32, gather the reply tokens."""
    logits = _forward(model, batch).logits
    targets = reply_targets(batch)
    logps = logits.flatten(0, 1)[targets.index].float().log_softmax(dim=-1)  # [n_reply_tokens, vocab]
    token_logps = logps.gather(1, targets.targets.unsqueeze(1)).squeeze(1)
    return _sum_per_row(token_logps, targets)


def chunk_logits(hidden: Tensor, head: torch.nn.Module | Tensor, softcap: float | None = None) -> Tensor:
    """fp32 logits of a chunk of hidden states; `head` is the LM head or its (cast) weight."""
    if isinstance(head, Tensor):
        logits = F.linear(hidden.to(head.dtype), head)
    else:
        weight = getattr(head, "weight", None)  # a bf16 head and fp32 hidden states: one dtype
        logits = head(hidden if weight is None else hidden.to(weight.dtype))
    logits = logits.float()
    if softcap:  # Gemma 2/3 cap their final logits: softcap * tanh(logits / softcap)
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _chunk_token_logps(
    hidden: Tensor, targets: Tensor, head: torch.nn.Module | Tensor, softcap: float | None
) -> Tensor:
    return -F.cross_entropy(chunk_logits(hidden, head, softcap), targets, reduction="none")


def plain_head_weight(lm_head: torch.nn.Module, device: torch.device) -> Tensor | None:
    """A plain head's weight for the chunks and `ReplyTokenLogps` (cast to the autocast dtype once,
    under autocast), or None for a head the module must run: a bias, a subclass, a sharded weight
    (FSDP's DTensor or DeepSpeed's empty placeholder, which the module gathers itself)."""
    plain = type(lm_head) is torch.nn.Linear and lm_head.bias is None
    local = type(lm_head.weight) in (torch.Tensor, torch.nn.Parameter) and lm_head.weight.numel() > 0
    if not (plain and local):
        return None
    if torch.is_autocast_enabled(device.type):
        return lm_head.weight.to(torch.get_autocast_dtype(device.type))
    return lm_head.weight


def head_for_chunks(lm_head: torch.nn.Module, device: torch.device) -> torch.nn.Module | Tensor:
    """The LM head's weight when it is a plain bias-free local one (`plain_head_weight`: cast once
    for all chunks under autocast, which would cast the whole [vocab, hidden] matrix again for every
    chunk), else the head module itself."""
    weight = plain_head_weight(lm_head, device)
    return lm_head if weight is None else weight


# fp32 logits per chunk: 2**22 floats (16 MiB), e.g. 85 tokens of a 49k vocabulary, 16 of a 256k one.
# On a CPU a quarter of that (21 tokens of a 49k vocabulary): the chunk's logits and the copy of them
# that MKL packs for the backward matmul shrink 4x and stay in cache. Measured on the embedded model
# (`benchmarks/dpo_vs_trl.py --tools preftune`, fp32, two runs each): peak RSS 1248-1270 MiB against
# 1265-1310 MiB with 2**22, at the same or better speed (bf16: same memory, faster).
CHUNK_LOGITS = 2**22
CPU_CHUNK_LOGITS = 2**20


def default_chunk_size(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk of LM-head logits: the device's logits budget over the vocabulary, at least 16."""
    budget = CPU_CHUNK_LOGITS if device.type == "cpu" else CHUNK_LOGITS
    return max(16, budget // vocab_size)


class ReplyTokenLogps(torch.autograd.Function):
    """log p(target | hidden) of a chunk of positions under a bias-free LM head `weight`:

        logits = hidden @ weight^T  (in weight's dtype, as autocast would compute it), then fp32
        logp   = logits[target] - logsumexp(logits)
        d logp / d logits = onehot(target) - softmax(logits)

    The same numbers as -cross_entropy(logits), with one [chunk, vocab] fp32 buffer alive at a time:
    the forward keeps only the logsumexp per position and the backward recomputes the logits and
    turns them into the softmax and the gradient in place (cross-entropy's autograd keeps the
    logits and the log-softmax and allocates a gradient for each).

    Returns (logp, is_argmax): the second, not differentiable, says whether the target is the
    model's top token (SFT's token accuracy), from the same pass that finds the logits' maximum."""

    @staticmethod
    def forward(ctx, hidden: Tensor, targets: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.linear(hidden.to(weight.dtype), weight).float()
        target_logits = logits.gather(1, targets[:, None]).squeeze(1)
        peak, top = logits.max(dim=1, keepdim=True)
        lse = logits.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))
        is_argmax = top.squeeze(1) == targets
        ctx.mark_non_differentiable(is_argmax)
        ctx.save_for_backward(hidden, targets, weight, lse)
        return target_logits - lse, is_argmax

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_is_argmax: Tensor | None):
        hidden, targets, weight, lse = ctx.saved_tensors
        h = hidden.to(weight.dtype)
        grad_logits = F.linear(h, weight).float().sub_(lse[:, None]).exp_()  # the softmax
        grad_logits.mul_(-grad[:, None])
        grad_logits.scatter_add_(1, targets[:, None], grad[:, None])
        grad_logits = grad_logits.to(weight.dtype)
        grad_hidden = (grad_logits @ weight).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ h if ctx.needs_input_grad[2] else None
        return grad_hidden, None, grad_weight


def chunked_sequence_logps(
    model: torch.nn.Module, batch: dict[str, Tensor], chunk_size: int | None = None
) -> SequenceLogps:
    """Same result as `plain_sequence_logps`, with the LM head applied to reply tokens only, in chunks
    of `chunk_size` tokens (default: `default_chunk_size`)."""
    causal_lm = unwrap_causal_lm(model)
    lm_head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    # Go through the wrapped model's own forward (so DDP/FSDP hooks and PEFT adapters apply), with
    # no logits at all, and take the decoder's output (after the final norm).
    with catch_decoder_output(model) as caught:
        _forward(model, batch, logits_to_keep=no_logits(batch["input_ids"].device))
    targets = reply_targets(batch)
    reply_hidden = caught[-1].flatten(0, 1)[targets.index]  # [n_reply_tokens, hidden]
    head = head_for_chunks(lm_head, reply_hidden.device)
    chunk_size = chunk_size or default_chunk_size(lm_head.weight.shape[0], reply_hidden.device)
    fused = isinstance(head, Tensor) and not softcap

    pieces = []
    for start in range(0, reply_hidden.shape[0], chunk_size):
        h, t = reply_hidden[start : start + chunk_size], targets.targets[start : start + chunk_size]
        if fused:
            pieces.append(ReplyTokenLogps.apply(h, t, head)[0])
        elif torch.is_grad_enabled() and h.requires_grad:
            # Recompute this chunk's logits in the backward pass instead of keeping them alive.
            pieces.append(checkpoint(_chunk_token_logps, h, t, head, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(h, t, head, softcap))
    token_logps = torch.cat(pieces) if pieces else reply_hidden.new_zeros(0, dtype=torch.float32)
    return _sum_per_row(token_logps, targets)


def no_logits(device: torch.device) -> Tensor:
    """`logits_to_keep` that keeps no position: an empty index tensor (transformers takes a tensor
    as the positions to keep; the integer 0 would mean all of them).

    Why not `logits_to_keep=1`: its slice `hidden[:, -1:]` of a [rows, tokens, hidden] tensor keeps
    the row stride of the full sequence, and torch's bf16 linear then takes the batched-matmul path
    that copies the expanded [hidden, vocab] weight for every row (measured on the embedded model:
    a 54 MiB copy per row and ~120 ms per forward on this CPU; fp32 is unaffected)."""
    return torch.empty(0, dtype=torch.long, device=device)


@contextlib.contextmanager
def catch_decoder_output(model: torch.nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, the decoder's output (the last hidden states, after the final norm) of each
    forward is appended to the yielded list. A forward hook, because output_hidden_states would keep
    every layer's output alive until the log-probs are done (in a no-grad pass nothing else does)."""
    caught: list[Tensor] = []
    decoder = unwrap_causal_lm(model).get_decoder()
    handle = decoder.register_forward_hook(lambda module, args, output: caught.append(output[0]))
    try:
        yield caught
    finally:
        handle.remove()


def supports_chunked_logps(model: torch.nn.Module) -> bool:
    """Chunked log-probs need a decoder + LM head split and a plain logits transform."""
    causal_lm = unwrap_causal_lm(model)
    config = causal_lm.config
    unsupported_scaling = any(
        getattr(config, name, None) not in (None, 1, 1.0) for name in ("logit_scale", "logits_scaling")
    )
    accepts_logits_to_keep = "logits_to_keep" in inspect.signature(causal_lm.forward).parameters
    try:
        decoder = causal_lm.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    has_decoder = isinstance(decoder, torch.nn.Module) and decoder is not causal_lm
    return (
        causal_lm.get_output_embeddings() is not None
        and accepts_logits_to_keep
        and has_decoder
        and not unsupported_scaling
    )


def batch_logps(model: torch.nn.Module, batch: dict[str, Tensor], chunked: bool = True) -> SequenceLogps:
    """Summed reply-token log-probs: 2B sums for a batch of B pairs (chosen first, then rejected).

    `chunked` picks the memory-lean path when the model allows."""
    if chunked and supports_chunked_logps(model):
        return chunked_sequence_logps(model, batch)
    return plain_sequence_logps(model, batch)
