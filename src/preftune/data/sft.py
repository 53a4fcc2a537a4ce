"""SFT data: load rows of any supported layout, normalize them to conversations, render them with the
chat template and tokenize them with a loss mask on the assistant replies.

Layouts (`--data_format`, detected from the columns when "auto"):
  messages           `messages`: [{role, content}, ...] with at least one assistant turn
  sharegpt           `conversations`: [{from, value}, ...] (+ optional `system`); with `chosen` /
                     `rejected` columns it is a preference set (below)
  prompt_completion  `prompt` + `completion`, each a string or a message list
  text               `text`: plain text, trained on whole (no chat template)
  conversational, explicit, sharegpt, hh
                     a preference set: the prompt and its CHOSEN reply (see preftune.data.formats)

Every example becomes (input_ids, loss_mask). `loss_mask[t] == 1` means token t is a training target
(predicted from the tokens before it). The first token of an example is never a target, so packed
examples never learn to predict across a boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from .formats import (
    FORMATS,
    BadRow,
    BadRowsError,
    DataFormatError,
    RowError,
    _field,
    _messages,
    _reply,
    _sharegpt_turn,
    detect_format,
    normalize_rows,
)
from .loading import _read_source, _report_bad_rows, _take_rows, carve_test_split
from .templates import render_prompt, render_reply
from .tokenize import _adds_bos, _encode

SFT_FORMATS = ("messages", "sharegpt", "prompt_completion", "text")
PREFERENCE_FORMATS = FORMATS  # their chosen side is used


@dataclass
class SFTExample:
    """One training conversation (or plain text)."""

    messages: list[dict[str, str]]  # chat turns; empty for plain text
    text: str | None = None  # plain text (format "text"): trained on whole, no template
    raw_prompt: str | None = None  # the prompt as given, when it was text (template "none")
    row: int = -1  # 0-based row index in the source split


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1: this token is a training target
    row: int = -1

    def as_feature(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "loss_mask": self.loss_mask}


# --------------------------------------------------------------------------- normalization


def detect_sft_format(columns, first_row: dict, source: str = "<data>") -> str:
    """Guess the layout from the column names; preference sets are recognized too."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return detect_format(cols, first_row, source)
    for name, needed in (
        ("messages", {"messages"}),
        ("sharegpt", {"conversations"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("text", {"text"}),
    ):
        if needed <= cols:
            return name
    raise DataFormatError(
        f"can't tell the SFT data format of {source}: it has columns {sorted(cols)}. Expected `messages`, "
        "`conversations`, `prompt` + `completion`, `text`, or a preference set (`chosen` + `rejected`); "
        "set --data_format to force one."
    )


def _check_conversation(messages: list[dict[str, str]]) -> None:
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowError("no assistant reply to train on")


def _parse_messages(row: dict) -> SFTExample:
    messages = _messages(_field(row, "messages"), "messages")
    _check_conversation(messages)
    return SFTExample(messages)


def _parse_sharegpt(row: dict) -> SFTExample:
    turns = _field(row, "conversations")
    if not isinstance(turns, list):
        raise RowError(f"field 'conversations' should be a list, got {type(turns).__name__}")
    messages = [_sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(turns)]
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    _check_conversation(messages)
    return SFTExample(messages)


def _parse_prompt_completion(row: dict) -> SFTExample:
    prompt = _field(row, "prompt")
    completion = _reply(_field(row, "completion"), "completion")
    if not completion.strip():
        raise RowError("empty completion")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty prompt")
        return SFTExample(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            raw_prompt=prompt,
        )
    return SFTExample(_messages(prompt, "prompt") + [{"role": "assistant", "content": completion}])


def _parse_text(row: dict) -> SFTExample:
    text = _field(row, "text")
    if not isinstance(text, str) or not text.strip():
        raise RowError("field 'text' is empty or not text")
    return SFTExample([], text=text)


SFT_PARSERS = {
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "prompt_completion": _parse_prompt_completion,
    "text": _parse_text,
}


def normalize_sft_rows(
    rows: list[dict], data_format: str = "auto", source: str = "<data>"
) -> tuple[list[SFTExample], list[BadRow]]:
    """Normalize rows of any SFT or preference layout; returns (good examples, bad rows with reasons)."""
    if not rows:
        return [], []
    if data_format == "auto":
        data_format = detect_sft_format(rows[0].keys(), rows[0], source)
    is_preference = data_format in PREFERENCE_FORMATS and (data_format != "sharegpt" or "chosen" in rows[0])
    if is_preference:
        pairs, bad = normalize_rows(rows, data_format, source)
        examples = [
            SFTExample(
                p.prompt + [{"role": "assistant", "content": p.chosen}], raw_prompt=p.raw_prompt, row=p.row
            )
            for p in pairs
        ]
        return examples, bad
    if data_format not in SFT_PARSERS:
        raise DataFormatError(
            f"unknown SFT data format {data_format!r} for {source}; known: auto, "
            f"{', '.join(SFT_PARSERS)}, or a preference format ({', '.join(PREFERENCE_FORMATS)})"
        )
    examples, bad = [], []
    for index, row in enumerate(rows):
        try:
            example = SFT_PARSERS[data_format](row)
        except RowError as e:
            bad.append(BadRow(index, str(e)))
            continue
        example.row = index
        examples.append(example)
    return examples, bad


def load_sft_splits(
    dataset_name: str,
    splits: Sequence[str] = ("train", "test"),
    test_size: float | int | None = None,
    data_format: str = "auto",
    seed: int = 42,
    on_bad_rows: str = "error",
) -> dict[str, list[SFTExample]]:
    """Load and normalize SFT data; same sources, splits and test_size rules as load_preference_splits."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    raw = _read_source(dataset_name)
    if splits[0] not in raw:
        raise ValueError(f"dataset {dataset_name} has no {splits[0]!r} split; it has: {', '.join(raw)}")
    out: dict[str, list[SFTExample]] = {}
    for split in [s for s in splits if s in raw]:
        rows = _take_rows(raw[split], None)
        source = f"{dataset_name} (split {split!r})"
        examples, bad = normalize_sft_rows(rows, data_format, source)
        _report_bad_rows(bad, len(rows), source, on_bad_rows)
        if not examples:
            raise ValueError(f"no usable examples in {source}")
        out[split] = examples
    if test_size is not None:
        test_split = splits[1] if len(splits) > 1 else "test"
        if test_split not in out:
            out[splits[0]], out[test_split] = carve_test_split(out[splits[0]], test_size, seed, dataset_name)
    return out


# --------------------------------------------------------------------------- rendering and tokenizing


def render_segments(example: SFTExample, tokenizer, template_format: str) -> list[tuple[str, bool]]:
    """The example's text as ordered (piece, is_reply) segments; the pieces concatenate to the
    whole rendered conversation. Reply pieces are assistant turns with their end-of-turn marker,
    exactly as preference pairs are rendered (`render_reply`), so SFT and DPO see the same tokens."""
    if example.text is not None:
        return [(example.text + (tokenizer.eos_token or ""), True)]
    messages = example.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments: list[tuple[str, bool]] = []
    done = ""  # the text rendered so far
    for i in range(last + 1):
        if messages[i]["role"] != "assistant":
            continue
        raw = example.raw_prompt if i == last else None
        prompt = render_prompt(messages[:i], tokenizer, template_format, raw)
        if not prompt.startswith(done):
            # The template renders earlier turns differently once more follow (e.g. it drops
            # reasoning): train on the final reply alone, after the whole conversation as prompt.
            prompt = render_prompt(messages[:last], tokenizer, template_format, example.raw_prompt)
            reply = render_reply(
                messages[:last], messages[last]["content"], tokenizer, template_format, example.raw_prompt
            )
            return [(prompt, False), (reply, True)]
        reply = render_reply(messages[:i], messages[i]["content"], tokenizer, template_format, raw)
        segments += [(prompt[len(done) :], False), (reply, True)]
        done = prompt + reply
    return [(text, is_reply) for text, is_reply in segments if text]


def _tokenize(
    example: SFTExample,
    tokenizer,
    template_format: str,
    max_length: int,
    max_prompt_length: int,
    completion_only: bool,
    add_bos: bool,
) -> TokenizedExample:
    segments = render_segments(example, tokenizer, template_format)
    ids: list[int] = []
    mask: list[int] = []
    n_bos = 0
    if add_bos and not (tokenizer.bos_token and segments[0][0].startswith(tokenizer.bos_token)):
        ids, mask, n_bos = [tokenizer.bos_token_id], [0], 1
    elif add_bos:
        n_bos = 1  # the template wrote it
    n_prompt = None  # tokens before the first reply
    for text, is_reply in segments:
        if is_reply and n_prompt is None:
            n_prompt = len(ids)
        piece = _encode(tokenizer, text)
        ids += piece
        mask += [int(is_reply or not completion_only)] * len(piece)

    # As for preference pairs: the prompt (everything before the first reply) is cut from the left
    # to max_prompt_length, keeping the BOS; then the whole example is cut from the right.
    if n_prompt is not None and n_prompt > max_prompt_length and example.text is None:
        cut = n_prompt - max(max_prompt_length, n_bos)
        ids, mask = ids[:n_bos] + ids[n_bos + cut :], mask[:n_bos] + mask[n_bos + cut :]
    ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0  # nothing in the example predicts its first token
    if sum(mask) == 0:
        raise RowError(f"nothing left to train on after truncation to max_length {max_length}")
    return TokenizedExample(ids, mask, example.row)


def tokenize_sft_example(
    example: SFTExample,
    tokenizer,
    template_format: str,
    max_length: int,
    max_prompt_length: int,
    completion_only: bool = True,
) -> TokenizedExample:
    """Tokenize one example. completion_only: targets are the assistant replies only (with their
    end-of-turn marker); otherwise every token is. Raises RowError when no target is left."""
    return _tokenize(
        example,
        tokenizer,
        template_format,
        max_length,
        max_prompt_length,
        completion_only,
        _adds_bos(tokenizer),
    )


def tokenize_sft_examples(
    examples: Sequence[SFTExample],
    tokenizer,
    template_format: str,
    max_length: int,
    max_prompt_length: int,
    completion_only: bool = True,
    on_bad_rows: str = "error",
    source: str = "<data>",
) -> tuple[list[TokenizedExample], list[BadRow]]:
    """Tokenize many examples; returns (examples, bad rows). on_bad_rows="error" raises instead."""
    add_bos = _adds_bos(tokenizer)
    out, bad = [], []
    for example in tqdm(examples, desc=f"tokenizing {source}", disable=len(examples) <= 1000):
        try:
            out.append(
                _tokenize(
                    example,
                    tokenizer,
                    template_format,
                    max_length,
                    max_prompt_length,
                    completion_only,
                    add_bos,
                )
            )
        except RowError as e:
            bad.append(BadRow(example.row, str(e)))
    if bad and on_bad_rows == "error":
        raise BadRowsError(bad, source)
    return out, bad
