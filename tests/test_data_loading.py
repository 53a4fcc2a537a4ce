"""Loading: every format from every file type, splits, test_size, bad rows and clear errors."""

import csv
import gzip
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.data import (
    BadRowsError,
    DataFormatError,
    LoadedData,
    load_preference_splits,
    normalize_rows,
)

DEMO_FILE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dpo_en_demo.json"


def _turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def _hh(prompt_turns, reply):
    text = "".join(f"\n\n{speaker}: {content}" for speaker, content in prompt_turns)
    return text + "\n\nAssistant: " + reply


# A few good rows of each format; every file type must load them the same as in memory.
SAMPLES = {
    "conversational": [
        {
            "prompt": "Capital of France?",
            "chosen": _turns(("user", "Capital of France?"), ("assistant", "Paris")),
            "rejected": _turns(("user", "Capital of France?"), ("assistant", "Lyon")),
        },
        {
            "prompt": "And Spain?",
            "chosen": _turns(
                ("user", "Hi"), ("assistant", "Hello"), ("user", "And Spain?"), ("assistant", "Madrid")
            ),
            "rejected": _turns(
                ("user", "Hi"), ("assistant", "Hello"), ("user", "And Spain?"), ("assistant", "Rome")
            ),
        },
    ],
    "explicit": [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Say hi, in French.", "chosen": "Bonjour", "rejected": "Hallo"},
        {"prompt": "Red or blue?", "chosen": "Blue, calm.", "rejected": "Green"},
    ],
    "explicit_messages": [
        {
            "prompt": _turns(("system", "Be brief."), ("user", "2+2?")),
            "chosen": _turns(("assistant", "4")),
            "rejected": _turns(("assistant", "22")),
        },
        {
            "prompt": _turns(("user", "3+3?")),
            "chosen": _turns(("assistant", "6")),
            "rejected": _turns(("assistant", "33")),
        },
    ],
    "sharegpt": [
        {
            "conversations": [{"from": "human", "value": "Capital of France?"}],
            "chosen": {"from": "gpt", "value": "Paris"},
            "rejected": {"from": "gpt", "value": "Lyon"},
            "system": "Be brief.",
        },
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "And Spain?"},
            ],
            "chosen": {"from": "gpt", "value": "Madrid"},
            "rejected": {"from": "gpt", "value": "Rome"},
            "system": "",
        },
    ],
    "hh": [
        {
            "chosen": _hh([("Human", "Capital of France?")], "Paris"),
            "rejected": _hh([("Human", "Capital of France?")], "Lyon"),
        },
        {
            "chosen": _hh([("Human", "Hi"), ("Assistant", "Hello"), ("Human", "And Spain?")], "Madrid"),
            "rejected": _hh([("Human", "Hi"), ("Assistant", "Hello"), ("Human", "And Spain?")], "Rome"),
        },
    ],
}
EXPECTED_FORMAT = {name: name.replace("_messages", "") for name in SAMPLES}
FILE_KINDS = [".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".csv", "save_to_disk"]


def write_rows(rows: list[dict], path: Path) -> Path:
    """Write rows as the file type given by path's suffix (or a save_to_disk folder)."""
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif name.endswith(".json") or name.endswith(".json.gz"):
        text = json.dumps(rows)
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    elif name.endswith(".csv"):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:  # lists/dicts go in as JSON text, the usual way to put messages in a CSV
                writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
        return path
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def data_path(tmp_path: Path, kind: str, stem: str = "data") -> Path:
    return tmp_path / (stem if kind == "save_to_disk" else stem + kind)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep datasets.load_dataset's cache inside the test folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# --------------------------------------------------------------------------- formats x file types


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_every_format_loads_from_every_file_type(tmp_path, sample, kind):
    rows = SAMPLES[sample]
    path = write_rows(rows, data_path(tmp_path, kind))
    loaded = load_preference_splits(str(path))
    assert isinstance(loaded, LoadedData)
    assert list(loaded.splits) == ["train"]
    expected, _ = normalize_rows(rows, data_format=EXPECTED_FORMAT[sample])
    assert loaded["train"] == expected
    assert loaded.bad_rows == {"train": []}


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_forced_format_matches_auto(tmp_path, sample):
    path = write_rows(SAMPLES[sample], tmp_path / "data.jsonl")
    auto = load_preference_splits(str(path))
    forced = load_preference_splits(str(path), data_format=EXPECTED_FORMAT[sample])
    assert auto["train"] == forced["train"]


def test_expected_examples_content(tmp_path):
    path = write_rows(SAMPLES["sharegpt"], tmp_path / "data.parquet")
    first, second = load_preference_splits(str(path))["train"]
    assert first.prompt == _turns(("system", "Be brief."), ("user", "Capital of France?"))
    assert (first.chosen, first.rejected, first.row) == ("Paris", "Lyon", 0)
    assert second.prompt == _turns(("user", "Hi"), ("assistant", "Hello"), ("user", "And Spain?"))


def test_csv_keeps_text_that_only_looks_like_json(tmp_path):
    rows = [{"prompt": "[1, 2] summed?", "chosen": "[3]", "rejected": "{not json}"}]
    (ex,) = load_preference_splits(str(write_rows(rows, tmp_path / "d.csv")))["train"]
    assert (ex.raw_prompt, ex.chosen, ex.rejected) == ("[1, 2] summed?", "[3]", "{not json}")


def test_csv_long_cells(tmp_path):
    rows = [{"prompt": "Write a lot.", "chosen": "word " * 50_000, "rejected": "short"}]
    (ex,) = load_preference_splits(str(write_rows(rows, tmp_path / "d.csv")))["train"]
    assert ex.chosen == rows[0]["chosen"]


def test_json_file_holding_json_lines_and_columnar_json(tmp_path):
    rows = SAMPLES["explicit"]
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    assert len(load_preference_splits(str(lines))["train"]) == 3
    assert len(load_preference_splits(str(columns))["train"]) == 3


def test_invalid_jsonl_line_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SAMPLES["explicit"][0]) + "\n{oops\n")
    with pytest.raises(DataFormatError, match=r"d\.jsonl line 2: invalid JSON"):
        load_preference_splits(str(path))


# --------------------------------------------------------------------------- splits


def _split_folder(tmp_path: Path, kind: str, splits: dict[str, list[dict]]) -> Path:
    folder = tmp_path / "ds"
    if kind == "save_to_disk":
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
            str(folder)
        )
    else:  # a folder of data files; load_dataset infers the splits from the file names
        folder.mkdir()
        for name, rows in splits.items():
            write_rows(rows, folder / f"{name}.jsonl")
    return folder


@pytest.mark.parametrize("kind", ["save_to_disk", "data_files"])
def test_named_splits(tmp_path, kind, datasets_cache):
    train, test = SAMPLES["explicit"], SAMPLES["explicit"][:1]
    folder = _split_folder(tmp_path, kind, {"train": train, "test": test})
    loaded = load_preference_splits(str(folder))
    assert {k: len(v) for k, v in loaded.splits.items()} == {"train": 3, "test": 1}
    only_train = load_preference_splits(str(folder), splits=["train", "validation"])
    assert list(only_train.splits) == ["train"]
    everything = load_preference_splits(str(folder), splits=None)
    assert set(everything.splits) == {"train", "test"}


def test_first_requested_split_is_required(tmp_path):
    folder = _split_folder(
        tmp_path, "save_to_disk", {"train_prefs": SAMPLES["hh"], "test_prefs": SAMPLES["hh"]}
    )
    with pytest.raises(ValueError, match=r"ds has no 'train' split; it has: train_prefs, test_prefs"):
        load_preference_splits(str(folder))
    loaded = load_preference_splits(str(folder), splits=["train_prefs", "test_prefs"])
    assert set(loaded.splits) == {"train_prefs", "test_prefs"}


def test_single_file_split_named_test_is_missing(tmp_path):
    path = write_rows(SAMPLES["explicit"], tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="has no 'test' split; it has: train"):
        load_preference_splits(str(path), splits=["test"])


def _many_rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(n)]


@pytest.mark.parametrize("test_size, n_test", [(0.2, 4), (3, 3), (5.0, 5)])
def test_test_size_carves_a_seeded_split(tmp_path, test_size, n_test):
    path = write_rows(_many_rows(20), tmp_path / "d.jsonl")
    loaded = load_preference_splits(str(path), test_size=test_size, seed=1)
    train, test = loaded["train"], loaded["test"]
    assert (len(train), len(test)) == (20 - n_test, n_test)
    assert {ex.row for ex in train} | {ex.row for ex in test} == set(range(20))
    assert [ex.row for ex in test] == sorted(ex.row for ex in test)  # source order kept
    again = load_preference_splits(str(path), test_size=test_size, seed=1)["test"]
    other_seed = load_preference_splits(str(path), test_size=test_size, seed=2)["test"]
    assert again == test
    assert other_seed != test


def test_test_size_keeps_an_existing_test_split_unless_not_requested(tmp_path, caplog):
    folder = _split_folder(tmp_path, "save_to_disk", {"train": _many_rows(10), "test": _many_rows(2)})
    with caplog.at_level(logging.WARNING):
        kept = load_preference_splits(str(folder), test_size=0.5)
    assert len(kept["test"]) == 2 and len(kept["train"]) == 10
    assert "test_size=0.5 is ignored" in caplog.text
    carved = load_preference_splits(str(folder), splits=["train"], test_size=0.5)
    assert len(carved["test"]) == 5 and len(carved["train"]) == 5


@pytest.mark.parametrize("test_size", [0.0, 1.5, 20, -1])
def test_bad_test_size(tmp_path, test_size):
    path = write_rows(_many_rows(20), tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="test_size"):
        load_preference_splits(str(path), test_size=test_size)


def test_max_samples(tmp_path):
    path = write_rows(_many_rows(20), tmp_path / "d.parquet")
    loaded = load_preference_splits(str(path), max_samples=6, test_size=2)
    assert (len(loaded["train"]), len(loaded["test"])) == (4, 2)
    assert {ex.row for ex in loaded["train"] + loaded["test"]} == set(range(6))


# --------------------------------------------------------------------------- bad rows


def _rows_with_bad_ones() -> list[dict]:
    rows = _many_rows(30)
    rows[3]["chosen"] = rows[3]["rejected"]
    rows[7]["prompt"] = ""
    for i in range(10, 22):
        rows[i]["rejected"] = None
    return rows


def test_bad_rows_error_lists_rows_reasons_and_source(tmp_path):
    path = write_rows(_rows_with_bad_ones(), tmp_path / "d.jsonl")
    with pytest.raises(BadRowsError) as e:
        load_preference_splits(str(path))
    msg = str(e.value)
    assert "14 bad row(s)" in msg and "d.jsonl (split 'train')" in msg
    assert "row 3: chosen and rejected are identical" in msg
    assert "row 7: empty prompt" in msg
    assert "row 10: missing field 'rejected'" in msg
    assert "row 17:" in msg and "row 18:" not in msg  # the first 10 only
    assert "... and 4 more" in msg and "on_bad_rows='skip'" in msg
    assert len(e.value.bad_rows) == 14


def test_bad_rows_skip_returns_good_rows_and_report(tmp_path, caplog):
    path = write_rows(_rows_with_bad_ones(), tmp_path / "d.jsonl")
    with caplog.at_level(logging.WARNING, logger="preftune"):
        loaded = load_preference_splits(str(path), on_bad_rows="skip")
    assert len(loaded["train"]) == 16
    assert [b.row for b in loaded.bad_rows["train"]] == [3, 7, *range(10, 22)]
    assert "skipped 14 bad row(s) of 30" in caplog.text
    assert "row 3: chosen and rejected are identical" in caplog.text
    assert "row 12:" in caplog.text and "row 13:" not in caplog.text  # first 5 reasons


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_rows([{"prompt": "q", "chosen": "a", "rejected": "a"}], tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="no usable examples"):
        load_preference_splits(str(path), on_bad_rows="skip")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["missing/data.jsonl", "nope.parquet", "./data", "/no/such/dir/data"])
def test_missing_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"dataset file not found: {name}"):
        load_preference_splits(name)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataFormatError) as e:
        load_preference_splits(str(path))
    assert "data.xlsx" in str(e.value) and ".jsonl.gz" in str(e.value) and ".parquet" in str(e.value)


def test_unknown_columns(tmp_path):
    path = write_rows([{"question": "q", "answer": "a"}], tmp_path / "qa.jsonl")
    with pytest.raises(DataFormatError, match=r"qa\.jsonl.*'answer', 'question'.*sharegpt"):
        load_preference_splits(str(path))


def test_on_bad_rows_value_is_checked(tmp_path):
    with pytest.raises(ValueError, match="on_bad_rows"):
        load_preference_splits(str(tmp_path), on_bad_rows="ignore")


# --------------------------------------------------------------------------- the real demo file


@pytest.mark.skipif(not DEMO_FILE.exists(), reason="shared/data/dpo_en_demo.json is not next to the repo")
def test_llama_factory_demo_file_loads_as_sharegpt():
    loaded = load_preference_splits(str(DEMO_FILE))
    examples = loaded["train"]
    assert len(examples) == 300 and loaded.bad_rows["train"] == []
    rows = json.loads(DEMO_FILE.read_text())
    assert rows[0].keys() >= {"conversations", "chosen", "rejected"}
    assert all(ex.prompt[-1]["role"] == "user" for ex in examples)
    assert sum(ex.prompt[0]["role"] == "system" for ex in examples) == 80
    assert examples[0].chosen == rows[0]["chosen"]["value"]
