"""Votes on chat turns ("which reply is better?") saved as preference pairs that `preftune dpo` reads.

A vote for one side writes one line to the votes file (`RUN_DIR/votes.jsonl` by default) in the
`explicit` preference format of `preftune.data.formats`:

    {"prompt": [system?, ..., {"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}], "vote": "tuned", "chosen_side": "tuned", ...}

The prompt is the conversation the chosen reply answered: the system prompt, the chosen side's own
history and the user message (on the first turn both sides saw the same prompt). Extra keys (vote,
sides, settings, time) are ignored by the loader. Votes that make no valid pair (a tie, "both bad",
identical or empty replies) go to a second file beside it, `votes_unpaired.jsonl`, so the votes file
itself always loads: `preftune dpo --dataset_name RUN_DIR/votes.jsonl`.

Each vote is one `write` of one whole line to a file opened for appending, so concurrent writers
never interleave inside a line.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preftune.chat.engine import REFERENCE, TUNED, Turn

VOTES_FILE = "votes.jsonl"
UNPAIRED_FILE = "votes_unpaired.jsonl"
TIE, BOTH_BAD = "tie", "both_bad"
VOTES = (REFERENCE, TUNED, TIE, BOTH_BAD)

_write_lock = threading.Lock()


def default_votes_file(model: str | None) -> Path:
    """`MODEL_DIR/votes.jsonl` for a local run or model folder, else `runs/chat/votes.jsonl`."""
    if model and Path(model).expanduser().is_dir():
        return Path(model).expanduser() / VOTES_FILE
    return Path("runs") / "chat" / VOTES_FILE


def unpaired_file(votes_file: str | Path) -> Path:
    """Where the votes that make no pair go: `votes_unpaired.jsonl` beside the votes file."""
    return Path(votes_file).with_name(UNPAIRED_FILE)


def vote_record(turn: Turn, vote: str, model: str = "") -> tuple[dict[str, Any], str | None]:
    """The JSON line for `vote` on `turn`, and None if it is a valid preference pair, else the reason
    it is not one (then it belongs in the unpaired file)."""
    from preftune.data.formats import RowError, normalize_row

    if vote not in VOTES:
        raise ValueError(f"unknown vote {vote!r}; expected one of {', '.join(VOTES)}")
    info: dict[str, Any] = {
        "vote": vote,
        "model": model,
        "settings": vars(turn.settings),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    unpaired = {"prompts": turn.prompts, "replies": turn.replies, **info}
    if vote in (TIE, BOTH_BAD):
        reason = "a tie" if vote == TIE else "both bad"
        return unpaired | {"reason": reason}, reason
    if set(turn.replies) != {REFERENCE, TUNED}:
        raise ValueError("a vote needs both a reference and a tuned reply")
    loser = REFERENCE if vote == TUNED else TUNED
    record = {
        "prompt": turn.prompts[vote],
        "chosen": [{"role": "assistant", "content": turn.replies[vote]}],
        "rejected": [{"role": "assistant", "content": turn.replies[loser]}],
        "chosen_side": vote,
        "rejected_side": loser,
        **info,
    }
    reason = None
    try:  # exactly the checks `preftune dpo` runs on every row
        normalize_row(record, "explicit")
    except RowError as err:
        reason = str(err)
    if reason is None and turn.replies[vote].strip() == turn.replies[loser].strip():
        reason = "chosen and rejected are identical"
    return (record, None) if reason is None else (unpaired | {"reason": reason}, reason)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append `record` as one line, with a single write to a file opened for appending."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with _write_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)


def record_vote(turn: Turn, vote: str, votes_file: str | Path, model: str = "") -> tuple[Path, str | None]:
    """Save `vote` on `turn`; returns the file it went to and, for a vote that made no pair, why."""
    record, reason = vote_record(turn, vote, model)
    path = Path(votes_file) if reason is None else unpaired_file(votes_file)
    append_jsonl(path, record)
    turn.vote = vote
    return path, reason
