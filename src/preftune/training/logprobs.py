"""Sequence log-probabilities of the reply tokens, the quantity every preference loss is built on.

Two paths that give the same numbers:

- `plain`: run the causal LM, take its [rows, tokens, vocab] logits, log-softmax, gather. Simple,
  works for any model, and it is what the tests compare against.
- `chunked` (default): run the model for its last hidden states, then apply the LM head to the
  reply positions alone, a chunk of tokens at a time, each chunk under activation checkpointing.
  Prompt and padding positions never reach the LM head, and the fp32 logits never exist for more
  than one chunk at once, in the forward or the backward pass. With vocabularies of 50k-250k this
  is most of a small model's activation memory.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor


@dataclass
class SequenceLogps:
    """Summed log-probs of the reply tokens of each row, and how many reply tokens each row has."""

    logps: Tensor  # [rows], float32
    n_tokens: Tensor  # [rows], int

    def mean_per_token(self) -> Tensor:
        return self.logps / self.n_tokens.clamp(min=1)


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM under PEFT / DDP wrappers (LoRA layers stay injected in it)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, FSDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        else:
            return model


def _shifted_targets(input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Position t predicts token t+1: the mask of predicting positions and the tokens they predict."""
    predict_mask = loss_mask[:, 1:].bool()
    targets = input_ids[:, 1:][predict_mask]
    return predict_mask, targets


def _sum_per_row(token_logps: Tensor, predict_mask: Tensor) -> SequenceLogps:
    rows = predict_mask.nonzero()[:, 0]
    n_rows = predict_mask.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, rows, token_logps.float())
    return SequenceLogps(logps=sums, n_tokens=predict_mask.sum(dim=1))


def plain_sequence_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    position_ids: Tensor | None = None,
) -> SequenceLogps:
    """Reference implementation: full logits, log-softmax in fp32, gather the reply tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    predict_mask, targets = _shifted_targets(input_ids, loss_mask)
    logps = logits[:, :-1].float().log_softmax(dim=-1)[predict_mask]  # [n_reply_tokens, vocab]
    token_logps = logps.gather(1, targets.unsqueeze(1)).squeeze(1)
    return _sum_per_row(token_logps, predict_mask)


def _chunk_token_logps(
    hidden: Tensor, targets: Tensor, lm_head: torch.nn.Module, softcap: float | None
) -> Tensor:
    logits = lm_head(hidden).float()
    if softcap:  # Gemma 2/3 cap their final logits: softcap * tanh(logits / softcap)
        logits = softcap * torch.tanh(logits / softcap)
    return -F.cross_entropy(logits, targets, reduction="none")


def chunked_sequence_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    position_ids: Tensor | None = None,
    chunk_size: int = 1024,
) -> SequenceLogps:
    """Same result as `plain_sequence_logps`, with the LM head applied to reply tokens only, in chunks."""
    causal_lm = unwrap_causal_lm(model)
    lm_head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    # Go through the wrapped model's own forward (so DDP/FSDP hooks and PEFT adapters apply), ask
    # for the last hidden state (after the final norm) and only one position of logits.
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = out.hidden_states[-1]
    predict_mask, targets = _shifted_targets(input_ids, loss_mask)
    reply_hidden = hidden[:, :-1][predict_mask]  # [n_reply_tokens, hidden]

    pieces = []
    for start in range(0, reply_hidden.shape[0], chunk_size):
        h, t = reply_hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            # Recompute this chunk's logits in the backward pass instead of keeping them alive.
            pieces.append(checkpoint(_chunk_token_logps, h, t, lm_head, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(h, t, lm_head, softcap))
    token_logps = torch.cat(pieces) if pieces else reply_hidden.new_zeros(0, dtype=torch.float32)
    return _sum_per_row(token_logps, predict_mask)


def supports_chunked_logps(model: torch.nn.Module) -> bool:
    """Chunked log-probs need a decoder + LM head split and a plain logits transform."""
    causal_lm = unwrap_causal_lm(model)
    config = causal_lm.config
    unsupported_scaling = any(
        getattr(config, name, None) not in (None, 1, 1.0) for name in ("logit_scale", "logits_scaling")
    )
    accepts_logits_to_keep = "logits_to_keep" in inspect.signature(causal_lm.forward).parameters
    return (
        causal_lm.get_output_embeddings() is not None and accepts_logits_to_keep and not unsupported_scaling
    )


def sequence_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    position_ids: Tensor | None = None,
    chunked: bool = True,
) -> SequenceLogps:
    """Summed reply-token log-probs per row; `chunked` picks the memory-lean path when the model allows."""
    if chunked and supports_chunked_logps(model):
        return chunked_sequence_logps(model, input_ids, attention_mask, loss_mask, position_ids)
    return plain_sequence_logps(model, input_ids, attention_mask, loss_mask, position_ids)
