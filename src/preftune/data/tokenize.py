"""Render preference pairs with a chat template and turn them into token ids, truncated to fit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from .formats import BadRow, BadRowsError, PreferenceExample, RowError
from .templates import render_prompt, render_reply

# Show a progress bar only when tokenizing takes long enough to wonder about it.
_PROGRESS_MIN_EXAMPLES = 1000


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the reply only; the model input is prompt_ids + chosen_ids
    rejected_ids: list[int]
    row: int  # 0-based row index in the source split


def _adds_bos(tokenizer) -> bool:
    """Does this tokenizer put a BOS token in front of text by default (Llama does, Qwen doesn't)?"""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def _encode(tokenizer, text: str) -> list[int]:
    # Special tokens already in the text (chat markers) are still recognized as such.
    return tokenizer(text, add_special_tokens=False).input_ids


def _keep_last(ids: list[int], n: int) -> list[int]:
    return ids[max(len(ids) - n, 0) :] if n > 0 else []


def _tokenize_pair(
    example: PreferenceExample,
    tokenizer,
    template_format: str,
    max_length: int,
    max_prompt_length: int,
    add_bos: bool,
) -> TokenizedPair:
    prompt_text = render_prompt(example.prompt, tokenizer, template_format, example.raw_prompt)
    body = _encode(tokenizer, prompt_text)
    bos = []
    if add_bos:
        # The model expects a BOS in front: add it unless the template wrote it, and keep it when
        # the prompt is cut from the left (keeping its end: the latest turns).
        has_bos = bool(tokenizer.bos_token) and prompt_text.startswith(tokenizer.bos_token)
        bos, body = (body[:1], body[1:]) if has_bos else ([tokenizer.bos_token_id], body)
    prompt_ids = bos + _keep_last(body, max_prompt_length - len(bos))

    room = max_length - len(prompt_ids)
    replies = []
    for reply in (example.chosen, example.rejected):
        text = render_reply(example.prompt, reply, tokenizer, template_format, example.raw_prompt)
        ids = _encode(tokenizer, text)[: max(room, 0)]
        if not ids:
            raise RowError(
                f"nothing left of the reply after truncation (prompt {len(prompt_ids)} tokens, max_length {max_length})"
            )
        replies.append(ids)
    return TokenizedPair(
        prompt_ids=prompt_ids, chosen_ids=replies[0], rejected_ids=replies[1], row=example.row
    )


def tokenize_pair(
    example: PreferenceExample, tokenizer, template_format: str, max_length: int, max_prompt_length: int
) -> TokenizedPair:
    """Tokenize one pair: prompt truncated from the left to max_prompt_length, then each reply
    truncated from the right so that prompt + reply fits in max_length.

    Raises RowError when nothing of a reply is left.
    """
    add_bos = _adds_bos(tokenizer)
    return _tokenize_pair(example, tokenizer, template_format, max_length, max_prompt_length, add_bos)


def tokenize_examples(
    examples: Sequence[PreferenceExample],
    tokenizer,
    template_format: str,
    max_length: int,
    max_prompt_length: int,
    on_bad_rows: str = "error",
    source: str = "<data>",
) -> tuple[list[TokenizedPair], list[BadRow]]:
    """Tokenize many pairs; returns (pairs, bad rows). on_bad_rows="error" raises BadRowsError instead."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    add_bos = _adds_bos(tokenizer)  # once, not per example
    pairs, bad = [], []
    bar = tqdm(examples, desc=f"tokenizing {source}", disable=len(examples) <= _PROGRESS_MIN_EXAMPLES)
    for example in bar:
        try:
            pairs.append(
                _tokenize_pair(example, tokenizer, template_format, max_length, max_prompt_length, add_bos)
            )
        except RowError as e:
            bad.append(BadRow(example.row, str(e)))
    if bad and on_bad_rows == "error":
        raise BadRowsError(bad, source)
    return pairs, bad
