"""Row normalization: each format, auto-detection, forced formats and every kind of bad row."""

import pytest

from preftune.data import BadRow, DataFormatError, PreferenceExample, detect_format, normalize_rows

USER_Q = {"role": "user", "content": "What is the capital of France?"}


def conv(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


# --------------------------------------------------------------------------- good rows, one per format


def test_conversational_multi_turn():
    shared = conv(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Capital of France?")
    )
    row = {
        "prompt": "ignored",
        "chosen": shared + conv(("assistant", "Paris")),
        "rejected": shared + conv(("assistant", "Lyon")),
        "score_chosen": 9.0,  # extra columns are ignored
    }
    examples, bad = normalize_rows([row])
    assert bad == []
    assert examples == [
        PreferenceExample(prompt=shared, chosen="Paris", rejected="Lyon", raw_prompt=None, row=0)
    ]


def test_explicit_string_prompt_keeps_raw_prompt():
    examples, bad = normalize_rows([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    assert bad == []
    assert examples[0] == PreferenceExample(conv(("user", "2+2?")), "4", "5", raw_prompt="2+2?", row=0)


def test_explicit_message_lists():
    row = {
        "prompt": [USER_Q],
        "chosen": conv(("assistant", "Paris")),
        "rejected": [USER_Q, {"role": "assistant", "content": "Lyon"}],  # a full conversation: last reply
    }
    (ex,), bad = normalize_rows([row], data_format="explicit")
    assert bad == []
    assert (ex.prompt, ex.chosen, ex.rejected, ex.raw_prompt) == ([USER_Q], "Paris", "Lyon", None)


def test_explicit_prompt_with_reply_only_lists_is_detected_as_explicit():
    row = {"prompt": "Q", "chosen": conv(("assistant", "A")), "rejected": conv(("assistant", "B"))}
    assert detect_format(row.keys(), row) == "explicit"
    (ex,), _ = normalize_rows([row])
    assert (ex.prompt, ex.chosen, ex.rejected) == (conv(("user", "Q")), "A", "B")


def test_sharegpt_roles_and_system_column():
    row = {
        "system": "You are helpful.",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "user", "value": "Capital of France?"},
        ],
        "chosen": {"from": "gpt", "value": "Paris"},
        "rejected": {"from": "model", "value": "Lyon"},
    }
    (ex,), bad = normalize_rows([row])
    assert bad == []
    assert ex.prompt == conv(
        ("system", "You are helpful."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Capital of France?")
    )
    assert (ex.chosen, ex.rejected) == ("Paris", "Lyon")


def test_sharegpt_system_turn_inside_conversations():
    row = {
        "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
        "chosen": {"from": "assistant", "value": "A"},
        "rejected": {"from": "gpt", "value": "B"},
    }
    (ex,), _ = normalize_rows([row])
    assert ex.prompt == conv(("system", "S"), ("user", "Q"))


def test_hh_text():
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant:"
    row = {"chosen": prompt + " Paris", "rejected": prompt + "  Lyon"}
    (ex,), bad = normalize_rows([row])
    assert bad == []
    assert ex.prompt == conv(("user", "Hi"), ("assistant", "Hello!"), ("user", "Capital of France?"))
    assert ex.raw_prompt == prompt
    assert ex.chosen == "Paris"
    assert ex.rejected == " Lyon"  # only a single leading space is stripped


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"chosen": [USER_Q, {"role": "assistant", "content": "a"}], "rejected": []}, "conversational"),
        (
            {"prompt": "q", "chosen": [USER_Q, {"role": "assistant", "content": "a"}], "rejected": []},
            "conversational",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "explicit"),
        ({"conversations": [], "chosen": {}, "rejected": {}, "system": ""}, "sharegpt"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "x"}, "hh"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row.keys(), row) == expected


def test_unknown_columns_name_source_columns_and_formats():
    with pytest.raises(DataFormatError) as e:
        normalize_rows([{"question": "q", "answer": "a"}], source="my.jsonl")
    msg = str(e.value)
    assert "my.jsonl" in msg and "['answer', 'question']" in msg
    for name in ("conversational", "explicit", "sharegpt", "hh"):
        assert name in msg


def test_plain_text_chosen_without_prompt_is_not_guessed():
    with pytest.raises(DataFormatError, match="can't tell"):
        detect_format(["chosen", "rejected"], {"chosen": "a", "rejected": "b"})


def test_forced_format_overrides_detection():
    # Detection says "conversational" (chosen holds the whole conversation); forcing "explicit" takes
    # the prompt column and the last assistant turn instead.
    row = {
        "prompt": "Say hi",
        "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "hi"}],
        "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "bye"}],
    }
    (auto,), _ = normalize_rows([row])
    (forced,), _ = normalize_rows([row], data_format="explicit")
    assert auto.prompt == conv(("user", "other"))
    assert forced.prompt == conv(("user", "Say hi")) and forced.raw_prompt == "Say hi"


def test_forced_format_missing_columns_and_unknown_format():
    with pytest.raises(DataFormatError, match="'conversations'.*sharegpt"):
        normalize_rows(
            [{"prompt": "q", "chosen": "a", "rejected": "b"}], data_format="sharegpt", source="f.json"
        )
    with pytest.raises(DataFormatError, match="unknown data format 'alpaca'"):
        normalize_rows([{"prompt": "q", "chosen": "a", "rejected": "b"}], data_format="alpaca")


def test_empty_input():
    assert normalize_rows([]) == ([], [])


# --------------------------------------------------------------------------- bad rows

GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    "bad_row, reason",
    [
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
        ({"prompt": "q", "rejected": "b"}, "missing field 'chosen'"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty prompt"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty chosen reply"),
        ({"prompt": "q", "chosen": "a", "rejected": "\n"}, "empty rejected reply"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
        (
            {"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
            "unknown role 'robot'",
        ),
        (
            {"prompt": [USER_Q, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "prompt does not end with a user turn",
        ),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' should be a list of messages"),
    ],
)
def test_explicit_bad_rows_carry_row_number_and_reason(bad_row, reason):
    examples, bad = normalize_rows([GOOD, GOOD, bad_row, GOOD], data_format="explicit")
    assert [ex.row for ex in examples] == [0, 1, 3]
    assert len(bad) == 1 and bad[0].row == 2
    assert reason in bad[0].reason
    assert str(bad[0]).startswith("row 2: ")


def test_conversational_prompt_turns_differ():
    rows = [
        {
            "chosen": [USER_Q, {"role": "assistant", "content": "Paris"}],
            "rejected": [USER_Q, {"role": "assistant", "content": "Lyon"}],
        },
        {
            "chosen": [USER_Q, {"role": "assistant", "content": "Paris"}],
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "Lyon"}],
        },
        {
            "chosen": [USER_Q, {"role": "user", "content": "x"}],
            "rejected": [USER_Q, {"role": "assistant", "content": "y"}],
        },
        {
            "chosen": [USER_Q, {"role": "assistant", "content": "Paris"}],
            "rejected": [USER_Q, {"role": "tool", "content": "y"}],
        },
    ]
    examples, bad = normalize_rows(rows)
    assert len(examples) == 1
    assert bad[0] == BadRow(1, "prompt turns differ between chosen and rejected (first difference at turn 0)")
    assert bad[1] == BadRow(2, "the last turn of 'chosen' is not an assistant turn")
    assert bad[2].row == 3 and "unknown role 'tool'" in bad[2].reason


def test_hh_bad_rows():
    p = "\n\nHuman: Q\n\nAssistant:"
    rows = [
        {"chosen": p + " A", "rejected": p + " B"},
        {"chosen": p + " A", "rejected": "\n\nHuman: other\n\nAssistant: B"},
        {"chosen": p + " A", "rejected": "no turns here"},
        {"chosen": p + " ", "rejected": p + " B"},
    ]
    examples, bad = normalize_rows(rows, data_format="hh")
    assert len(examples) == 1
    assert [b.row for b in bad] == [1, 2, 3]
    assert "prompt turns differ" in bad[0].reason
    assert "no '\\n\\nAssistant:' turn in 'rejected'" in bad[1].reason
    assert bad[2].reason == "empty chosen reply"


def test_sharegpt_bad_rows():
    def row(conversations, chosen=("gpt", "A")):
        return {
            "conversations": [{"from": f, "value": v} for f, v in conversations],
            "chosen": {"from": chosen[0], "value": chosen[1]},
            "rejected": {"from": "gpt", "value": "B"},
        }

    rows = [
        row([("human", "Q")]),
        row([("observation", "Q")]),
        row([("human", "Q"), ("gpt", "A0")]),
        row([("human", "Q")], chosen=("human", "A")),
    ]
    examples, bad = normalize_rows(rows)
    assert len(examples) == 1
    assert [b.row for b in bad] == [1, 2, 3]
    assert "unknown role 'observation'" in bad[0].reason
    assert bad[1].reason == "prompt does not end with a user turn"
    assert "expected an assistant turn" in bad[2].reason
