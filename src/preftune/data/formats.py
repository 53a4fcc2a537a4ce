"""Normalize preference rows from the common dataset layouts into one type.

Every layout ends up as a `PreferenceExample`: the prompt as chat messages plus the chosen and
rejected assistant replies as plain text. Rows that can't be used become `BadRow`s with a reason,
so the caller can either stop with a clear report or skip them.

Supported layouts (`data_format`):
  conversational  chosen/rejected are full message lists sharing every turn but the last
                  (e.g. HuggingFaceH4/ultrafeedback_binarized)
  explicit        prompt + chosen + rejected, each a string or a message list
  sharegpt        conversations [{from, value}] + chosen {from, value} + rejected {from, value}
                  (LLaMA-Factory style), optional system column
  hh              Anthropic HH text: "\\n\\nHuman: ...\\n\\nAssistant: ..." in chosen/rejected
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass

FORMATS = ("conversational", "explicit", "sharegpt", "hh")
ROLES = ("system", "user", "assistant")
REQUIRED_COLUMNS = {
    "conversational": ("chosen", "rejected"),
    "explicit": ("prompt", "chosen", "rejected"),
    "sharegpt": ("conversations", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
}
# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
HH_ASSISTANT = "\n\nAssistant:"
# A turn marker at the start of the text or after a blank line.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclass
class PreferenceExample:
    prompt: list[dict[str, str]]  # chat messages {"role","content"}; the last one is a user turn
    chosen: str  # the chosen assistant reply (text only)
    rejected: str  # the rejected assistant reply
    raw_prompt: str | None = None  # the prompt as plain text when the source gave text (template "none")
    row: int = -1  # 0-based row index in the source split, for error messages


@dataclass
class BadRow:
    row: int  # 0-based row index in the source split
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


class DataFormatError(ValueError):
    """The data as a whole can't be read: unknown layout, unsupported file type, ..."""


class BadRowsError(ValueError):
    """Some rows can't be used and the caller asked to stop on bad rows."""

    def __init__(self, bad_rows: list[BadRow], source: str, max_listed: int = 10):
        self.bad_rows = bad_rows
        self.source = source
        listed = "\n".join(f"  {b}" for b in bad_rows[:max_listed])
        more = f"\n  ... and {len(bad_rows) - max_listed} more" if len(bad_rows) > max_listed else ""
        super().__init__(
            f"{len(bad_rows)} bad row(s) in {source} (rows are 0-based):\n{listed}{more}\n"
            "Fix the data, or skip these rows with on_bad_rows='skip'."
        )


class RowError(ValueError):
    """Raised inside the per-row parsers; turned into a BadRow by the caller."""


# --------------------------------------------------------------------------- detection


def _is_message_list(value: object) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def detect_format(columns: Iterable[str], first_row: dict, source: str = "<data>") -> str:
    """Guess the layout from the column names (and the first row's value types)."""
    cols = set(columns)
    if {"conversations", "chosen", "rejected"} <= cols:
        return "sharegpt"
    if {"chosen", "rejected"} <= cols:
        chosen = first_row.get("chosen")
        # A chosen list holding more than the assistant reply is the whole conversation: the
        # prompt comes from its shared turns, even if there is also a prompt column.
        if _is_message_list(chosen) and any(m.get("role") != "assistant" for m in chosen):
            return "conversational"
        if "prompt" in cols:
            return "explicit"
        if isinstance(chosen, str) and HH_ASSISTANT in chosen:
            return "hh"
    raise DataFormatError(
        f"can't tell the preference data format of {source}: it has columns {sorted(cols)}. "
        f"Known formats (set data_format to force one): "
        + "; ".join(f"{name} needs {', '.join(req)}" for name, req in REQUIRED_COLUMNS.items())
    )


# --------------------------------------------------------------------------- field helpers


def _field(row: dict, name: str) -> object:
    value = row.get(name)
    if value is None:
        raise RowError(f"missing field '{name}'")
    return value


def _messages(value: object, name: str) -> list[dict[str, str]]:
    """Validate a list of {"role","content"} messages and keep only those two keys."""
    if not _is_message_list(value):
        raise RowError(f"field '{name}' should be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError(f"unknown role {role!r} in '{name}' turn {i} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RowError(f"'{name}' turn {i} has no text content")
        out.append({"role": role, "content": content})
    return out


def _reply(value: object, name: str) -> str:
    """A reply given as text, one assistant message, or a conversation ending with the reply."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value, name)
    if messages[-1]["role"] != "assistant":
        raise RowError(f"the last turn of '{name}' is not an assistant turn")
    return messages[-1]["content"]


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------- per-format parsers
# Each returns (prompt messages, chosen, rejected, raw_prompt) or raises RowError.

Parsed = tuple[list[dict[str, str]], str, str, str | None]


def _parse_conversational(row: dict) -> Parsed:
    chosen = _messages(_field(row, "chosen"), "chosen")
    rejected = _messages(_field(row, "rejected"), "rejected")
    if len(chosen) == 1 and row.get("prompt") is not None:
        # Only the reply is in chosen: the prompt column carries the prompt.
        return _parse_explicit(row)
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise RowError(f"the last turn of '{name}' is not an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        turn = _first_difference(chosen[:-1], rejected[:-1])
        raise RowError(f"prompt turns differ between chosen and rejected (first difference at turn {turn})")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], None


def _parse_explicit(row: dict) -> Parsed:
    prompt = _field(row, "prompt")
    chosen = _reply(_field(row, "chosen"), "chosen")
    rejected = _reply(_field(row, "rejected"), "rejected")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], chosen, rejected, prompt
    return _messages(prompt, "prompt"), chosen, rejected, None


def _sharegpt_turn(turn: object, name: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise RowError(f"'{name}' should be a {{from, value}} object, got {type(turn).__name__}")
    speaker, value = turn.get("from"), turn.get("value")
    if speaker not in SHAREGPT_ROLES:
        raise RowError(f"unknown role {speaker!r} in '{name}' (expected one of {', '.join(SHAREGPT_ROLES)})")
    if not isinstance(value, str):
        raise RowError(f"'{name}' has no text value")
    return {"role": SHAREGPT_ROLES[speaker], "content": value}


def _parse_sharegpt(row: dict) -> Parsed:
    conversations = _field(row, "conversations")
    if not isinstance(conversations, list):
        raise RowError(f"field 'conversations' should be a list, got {type(conversations).__name__}")
    prompt = [_sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(conversations)]
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (prompt and prompt[0]["role"] == "system"):
        prompt.insert(0, {"role": "system", "content": system})
    replies = []
    for name in ("chosen", "rejected"):
        value = _field(row, name)
        if isinstance(value, str):
            replies.append(value)
            continue
        turn = _sharegpt_turn(value, name)
        if turn["role"] != "assistant":
            raise RowError(f"'{name}' is from {value.get('from')!r}, expected an assistant turn")
        replies.append(turn["content"])
    return prompt, replies[0], replies[1], None


def _parse_hh_prompt(text: str) -> list[dict[str, str]]:
    """Split "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:" into messages."""
    parts = _HH_TURN.split(text)  # [preamble, speaker, content, speaker, content, ...]
    messages = []
    if parts[0].strip():
        # Text before the first turn marker acts as a system prompt.
        messages.append({"role": "system", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    # The prompt ends with an empty "Assistant:" turn: that is the generation prompt, not a message.
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


def _split_hh(text: object, name: str) -> tuple[str, str]:
    if not isinstance(text, str):
        raise RowError(f"field '{name}' should be text, got {type(text).__name__}")
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowError(f"no '\\n\\nAssistant:' turn in '{name}'")
    cut += len(HH_ASSISTANT)
    reply = text[cut:]
    return text[:cut], reply[1:] if reply.startswith(" ") else reply


def _parse_hh(row: dict) -> Parsed:
    prompt, chosen = _split_hh(_field(row, "chosen"), "chosen")
    rejected_prompt, rejected = _split_hh(_field(row, "rejected"), "rejected")
    if prompt != rejected_prompt:
        c, r = _parse_hh_prompt(prompt), _parse_hh_prompt(rejected_prompt)
        raise RowError(
            f"prompt turns differ between chosen and rejected (first difference at turn {_first_difference(c, r)})"
        )
    return _parse_hh_prompt(prompt), chosen, rejected, prompt


PARSERS = {
    "conversational": _parse_conversational,
    "explicit": _parse_explicit,
    "sharegpt": _parse_sharegpt,
    "hh": _parse_hh,
}


# --------------------------------------------------------------------------- normalization


def _check(prompt: list[dict[str, str]], chosen: str, rejected: str) -> None:
    """Checks shared by every format, run after parsing."""
    if not prompt or not prompt[-1]["content"].strip():
        raise RowError("empty prompt")
    if not chosen.strip():
        raise RowError("empty chosen reply")
    if not rejected.strip():
        raise RowError("empty rejected reply")
    if chosen == rejected:
        raise RowError("chosen and rejected are identical")
    if prompt[-1]["role"] != "user":
        raise RowError("prompt does not end with a user turn")


def normalize_row(row: dict, data_format: str, index: int = -1) -> PreferenceExample:
    """Turn one row into a PreferenceExample; raises RowError with the reason when it can't."""
    prompt, chosen, rejected, raw_prompt = PARSERS[data_format](row)
    _check(prompt, chosen, rejected)
    return PreferenceExample(
        prompt=prompt, chosen=chosen, rejected=rejected, raw_prompt=raw_prompt, row=index
    )


def normalize_rows(
    rows: Iterable[dict], data_format: str = "auto", source: str = "<data>"
) -> tuple[list[PreferenceExample], list[BadRow]]:
    """Normalize rows of any supported format; returns (good examples, bad rows with reasons)."""
    it = iter(rows)
    first = next(it, None)
    if first is None:
        return [], []
    if data_format == "auto":
        data_format = detect_format(first.keys(), first, source)
    elif data_format not in FORMATS:
        raise DataFormatError(
            f"unknown data format {data_format!r} for {source}; known: auto, {', '.join(FORMATS)}"
        )
    else:
        missing = [c for c in REQUIRED_COLUMNS[data_format] if c not in first]
        if missing:
            raise DataFormatError(
                f"{source} has no column(s) {missing} needed by format {data_format!r} "
                f"(it has {sorted(first.keys())})"
            )
    examples, bad = [], []
    for index, row in enumerate(itertools.chain([first], it)):
        try:
            examples.append(normalize_row(row, data_format, index))
        except RowError as e:
            bad.append(BadRow(index, str(e)))
    return examples, bad
