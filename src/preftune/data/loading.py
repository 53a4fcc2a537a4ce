"""Load preference data from local files, saved datasets or the Hub, as normalized splits."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .formats import BadRow, BadRowsError, DataFormatError, PreferenceExample, normalize_rows

logger = logging.getLogger(__name__)

# Longest suffixes first, so "x.jsonl.gz" is not taken for some other ".gz".
SUPPORTED_EXTENSIONS = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")
# Used only to tell a mistyped local path from a Hub dataset name.
_PATH_LIKE_EXTENSIONS = SUPPORTED_EXTENSIONS + (".csv.gz", ".tsv", ".txt", ".arrow", ".gz")

Rows = list[dict[str, Any]]


@dataclass
class LoadedData:
    """Normalized examples per split, plus the rows that were skipped (with reasons) per split."""

    splits: dict[str, list[PreferenceExample]]
    bad_rows: dict[str, list[BadRow]] = field(default_factory=dict)
    source: str = "<data>"

    def __getitem__(self, split: str) -> list[PreferenceExample]:
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits


# --------------------------------------------------------------------------- reading files


def _extension(path: str | Path) -> str | None:
    name = str(path).lower()
    return next((ext for ext in SUPPORTED_EXTENSIONS if name.endswith(ext)), None)


def _looks_like_path(name: str) -> bool:
    """A Hub name is "owner/name"; anything with a data extension or path syntax is a local path."""
    return (
        name.lower().endswith(_PATH_LIKE_EXTENSIONS)
        or name.startswith(("/", "./", "../", "~", ".\\"))
        or name.count("/") > 1
    )


def _parse_json_lines(lines: list[str], path: Path) -> Rows:
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path} line {lineno}: invalid JSON ({e.msg})") from e
    return rows


def _read_json(path: Path) -> Rows:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if _extension(path) in (".jsonl", ".jsonl.gz"):
        rows = _parse_json_lines(text.splitlines(), path)
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            # Plenty of ".json" files are really JSON lines.
            rows = _parse_json_lines(text.splitlines(), path)
    if isinstance(rows, dict) and rows and all(isinstance(v, list) for v in rows.values()):
        # Column-oriented JSON: {"prompt": [...], "chosen": [...], ...}
        rows = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataFormatError(f"{path}: expected a list of JSON objects (one per example)")
    return rows


def _decode_cell(cell: str) -> Any:
    """CSV can't hold lists, so message lists are stored as JSON text: decode those cells."""
    s = cell.strip()
    if not (s.startswith("[") and s.endswith("]")) and not (s.startswith("{") and s.endswith("}")):
        return cell
    try:
        value = json.loads(s)
    except json.JSONDecodeError:
        return cell
    # Only structured data (messages); keep e.g. "[1, 2]" as the text it probably was.
    if isinstance(value, dict) or (
        isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
    ):
        return value
    return cell


def _read_csv(path: Path) -> Rows:
    # Replies can be longer than the csv module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {k: _decode_cell(v) if isinstance(v, str) else v for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_data_file(path: str | Path) -> Rows:
    """Read one local data file into a list of row dicts."""
    path = Path(path)
    ext = _extension(path)
    if ext is None:
        raise DataFormatError(
            f"unsupported data file type: {path} (supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    if ext == ".parquet":
        return _read_parquet(path)
    if ext == ".csv":
        return _read_csv(path)
    return _read_json(path)


def _read_source(name: str) -> dict[str, Rows | datasets.Dataset]:
    """All splits of a dataset, keyed by split name. A single file has only "train"."""
    path = Path(name).expanduser()
    if path.is_file():
        return {"train": read_data_file(path)}
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))  # made by save_to_disk
        else:
            try:
                loaded = datasets.load_dataset(str(path))  # a folder of data files
            except Exception as e:
                raise DataFormatError(f"could not load the dataset folder {path}: {e}") from e
        return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if _looks_like_path(name):
        raise FileNotFoundError(f"dataset file not found: {name}")
    return dict(datasets.load_dataset(name))  # a Hub dataset


def _take_rows(data: Rows | datasets.Dataset, max_samples: int | None) -> Rows:
    if isinstance(data, datasets.Dataset):
        if max_samples is not None and max_samples < len(data):
            data = data.select(range(max_samples))
        return data.to_list()
    return data[:max_samples] if max_samples is not None else data


# --------------------------------------------------------------------------- splits


def _test_count(test_size: float | int, n: int, source: str) -> int:
    if isinstance(test_size, float) and 0 < test_size < 1:
        count = round(test_size * n)
    elif float(test_size).is_integer() and test_size >= 1:
        count = int(test_size)
    else:
        raise ValueError(f"test_size must be a fraction in (0, 1) or a count >= 1, got {test_size!r}")
    if not 1 <= count < n:
        raise ValueError(f"test_size={test_size!r} gives {count} test examples out of {n} in {source}")
    return count


def carve_test_split(
    examples: list[PreferenceExample], test_size: float | int, seed: int = 42, source: str = "<data>"
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Seeded random split into (train, test); both keep the source order."""
    count = _test_count(test_size, len(examples), source)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    test_ids = set(order[:count])
    train = [ex for i, ex in enumerate(examples) if i not in test_ids]
    test = [ex for i, ex in enumerate(examples) if i in test_ids]
    return train, test


def _report_bad_rows(bad: list[BadRow], n_rows: int, source: str, on_bad_rows: str) -> None:
    if not bad:
        return
    if on_bad_rows == "error":
        raise BadRowsError(bad, source)
    reasons = "\n".join(f"  {b}" for b in bad[:5])
    logger.warning(
        "skipped %d bad row(s) of %d in %s (rows are 0-based):\n%s", len(bad), n_rows, source, reasons
    )


def load_preference_splits(
    dataset_name: str,
    splits: list[str] | tuple[str, ...] | None = ("train", "test"),
    test_size: float | int | None = None,
    data_format: str = "auto",
    seed: int = 42,
    max_samples: int | None = None,
    on_bad_rows: str = "error",
) -> LoadedData:
    """Load and normalize preference data.

    dataset_name: a data file (.json, .jsonl, .jsonl.gz, .json.gz, .parquet, .csv), a folder made by
        `save_to_disk`, a folder of data files, or a Hub dataset name.
    splits: the splits to return. The first one is the training split and must exist; the others
        are returned when the data has them. None returns every split and requires "train".
    test_size: carve a held-out split (fraction or count, seeded shuffle) from the training split,
        named after the second requested split ("test" by default). Only done when that split is not
        in the data; to replace a split the data has, don't request it (e.g. splits=["train"]).
    max_samples: keep only the first max_samples rows of each split (before carving).
    on_bad_rows: "error" raises BadRowsError listing them; "skip" drops them, logs a summary and
        reports them in LoadedData.bad_rows.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    raw = _read_source(dataset_name)
    wanted = list(splits) if splits else list(raw)
    train_split = wanted[0] if splits else "train"
    if train_split not in raw:
        raise ValueError(f"dataset {dataset_name} has no {train_split!r} split; it has: {', '.join(raw)}")

    out = LoadedData(splits={}, bad_rows={}, source=dataset_name)
    for split in [s for s in wanted if s in raw]:
        rows = _take_rows(raw[split], max_samples)
        source = f"{dataset_name} (split {split!r})"
        examples, bad = normalize_rows(rows, data_format, source)
        _report_bad_rows(bad, len(rows), source, on_bad_rows)
        if not examples:
            raise ValueError(f"no usable examples in {source}")
        out.splits[split], out.bad_rows[split] = examples, bad

    if test_size is not None:
        test_split = wanted[1] if splits and len(wanted) > 1 else "test"
        if test_split in out.splits:
            logger.warning(
                "%s already has a %r split: test_size=%r is ignored", dataset_name, test_split, test_size
            )
        else:
            train, test = carve_test_split(out.splits[train_split], test_size, seed, dataset_name)
            out.splits[train_split], out.splits[test_split] = train, test
            out.bad_rows.setdefault(test_split, [])
    return out
