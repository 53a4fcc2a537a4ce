"""Tests for preftune.demo_data."""

import json
from collections import Counter

import pytest

from preftune.demo_data import DEMO_JUDGE_SPEC, PROMPTS, all_facts, make_demo_pairs, write_demo_dataset
from preftune.evaluation.judges import get_rule_judge, json_answer, json_answer_correct


def test_sizes_and_row_format():
    train, test = make_demo_pairs()
    assert len(train) == 256 and len(test) == 64
    for row in train + test:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v.strip() for v in row.values())
        assert "\n" not in row["chosen"]
    small_train, small_test = make_demo_pairs(n_train=10, n_test=3, seed=1)
    assert len(small_train) == 10 and len(small_test) == 3


def test_no_prompt_or_fact_overlap():
    train, test = make_demo_pairs()
    train_prompts = [r["prompt"] for r in train]
    test_prompts = [r["prompt"] for r in test]
    assert len(set(train_prompts)) == len(train_prompts) and len(set(test_prompts)) == len(test_prompts)
    assert not set(train_prompts) & set(test_prompts)
    # held-out facts, not just phrasings: map every prompt back to its fact
    fact_of = {
        template.format(**dict(f.fields)): f
        for group in all_facts().values()
        for f in group
        for template in PROMPTS[f.category]
    }
    train_facts = {fact_of[p] for p in train_prompts}
    test_facts = {fact_of[p] for p in test_prompts}
    assert len(test_facts) == len(test) and not train_facts & test_facts


def test_facts_are_unique():
    facts = [f for group in all_facts().values() for f in group]
    assert len(facts) == len(set(facts))


def test_chosen_passes_and_rejected_fails_the_judge():
    train, test = make_demo_pairs()
    judge = get_rule_judge(DEMO_JUDGE_SPEC)
    for row in train + test:
        assert judge(row["prompt"], row["chosen"])
        assert not judge(row["prompt"], row["rejected"])
        assert not json_answer(row["prompt"], row["rejected"])
        assert json_answer_correct(row["prompt"], row["chosen"], row["chosen"])
        answer = json.loads(row["chosen"])["answer"]
        assert answer.lower() in row["rejected"].lower()  # the prose states the same fact


def test_splits_mix_topics_and_phrasings():
    train, test = make_demo_pairs()
    assert len({r["rejected"] for r in train}) > 200
    # the first word of a prompt is a rough topic/template signal; no single one dominates the test split
    first_words = Counter(r["prompt"].split()[0] for r in test)
    assert len(first_words) >= 6 and max(first_words.values()) < len(test) / 2


def test_deterministic_for_a_seed():
    assert make_demo_pairs(seed=3) == make_demo_pairs(seed=3)
    assert make_demo_pairs(seed=3) != make_demo_pairs(seed=4)


def test_too_many_pairs_is_an_error():
    with pytest.raises(ValueError, match="distinct facts"):
        make_demo_pairs(n_train=100_000)


def test_write_demo_dataset(tmp_path):
    folder = write_demo_dataset(tmp_path / "demo")
    assert folder == tmp_path / "demo"
    rows = {
        name: [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]
        for name in ("train.jsonl", "test.jsonl")
    }
    train, test = make_demo_pairs()
    assert rows["train.jsonl"] == train and rows["test.jsonl"] == test
