"""Tests for preftune.evaluation.judges."""

import sys
import textwrap

import pytest

from preftune.evaluation.judges import (
    RuleJudge,
    contains,
    expected_answer,
    get_rule_judge,
    json_answer,
    json_answer_correct,
    judge_replies,
    max_words,
    omits,
    pass_rate,
    regex,
    valid_json,
)

P = "What is the capital of France?"


@pytest.mark.parametrize(
    "reply, ok",
    [
        ('{"answer": "Paris"}', True),
        ('  {"answer": 12}\n', True),
        ('{"answer": "Paris", "confidence": 0.9}', True),
        ('{"city": "Paris"}', False),
        ('["answer", "Paris"]', False),
        ('"Paris"', False),
        ("The capital of France is Paris.", False),
        ('Sure! {"answer": "Paris"}', False),
        ('{"answer": "Paris"', False),
        ("", False),
    ],
)
def test_json_answer(reply, ok):
    assert json_answer(P, reply) is ok


def test_json_answer_correct():
    ref = '{"answer": "Paris"}'
    assert json_answer_correct(P, '{"answer": "paris"}', ref)
    assert json_answer_correct(P, '{"answer": " PARIS. "}', ref)
    assert not json_answer_correct(P, '{"answer": "Lyon"}', ref)
    assert not json_answer_correct(P, "Paris", ref)
    assert json_answer_correct("2+2?", '{"answer": 4}', '{"answer": "4"}')  # numbers compare as text
    assert json_answer_correct(P, '{"answer": "Paris"}', "Paris")  # a plain-text reference is the answer
    with pytest.raises(ValueError, match="reference"):
        json_answer_correct(P, '{"answer": "Paris"}')


def test_expected_answer():
    assert expected_answer('{"answer": "Paris"}') == "Paris"
    assert expected_answer(" Paris \n") == "Paris"


def test_valid_json():
    assert valid_json(P, '{"a": 1}') and valid_json(P, " [1, 2] ") and valid_json(P, "3")
    assert not valid_json(P, "{a: 1}") and not valid_json(P, "Paris")


def test_regex_max_words_contains_omits():
    assert regex(r"^\{")(P, '  {"answer": "Paris"}')
    assert not regex(r"^\{")(P, 'Answer: {"answer": "Paris"}')
    assert max_words(3)(P, "one two  three\n") and not max_words(3)(P, "one two three four")
    assert max_words(0)(P, "   ")
    assert contains("paris")(P, "It is PARIS.") and not contains("Lyon")(P, "Paris")
    assert omits("as an AI")(P, "Paris.") and not omits("as an AI")(P, "As an AI, I think Paris.")
    with pytest.raises(ValueError):
        max_words(-1)


def test_judges_have_names_and_return_bools():
    for judge, name in [
        (json_answer, "json_answer"),
        (valid_json, "valid_json"),
        (regex("x+"), "regex:x+"),
        (max_words(5), "max_words:5"),
        (contains("a"), "contains:a"),
        (omits("b"), "omits:b"),
    ]:
        assert isinstance(judge, RuleJudge) and judge.name == name
        assert type(judge(P, "Paris")) is bool


@pytest.mark.parametrize(
    "spec, reply, ok",
    [
        ("json_answer", '{"answer": "x"}', True),
        ("valid_json", "[1]", True),
        ("regex:^\\{", '{"answer": "x"}', True),
        ("regex:^\\{", "x", False),
        ("regex:a:b", "xa:bx", True),  # only the first ':' splits the spec
        ("max_words:2", "one two", True),
        ("max_words:2", "one two three", False),
        ("contains:foo", "a Foo b", True),
        ("omits:bar", "a Bar b", False),
        (" json_answer ", '{"answer": "x"}', True),
    ],
)
def test_get_rule_judge_specs(spec, reply, ok):
    assert get_rule_judge(spec)(P, reply) is ok


def test_get_rule_judge_json_answer_correct():
    judge = get_rule_judge("json_answer_correct")
    assert judge(P, '{"answer": "Paris"}', '{"answer": "Paris"}')


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nonsense", "unknown judge"),
        ("max_words:abc", "integer"),
        ("max_words", "needs an argument"),
        ("contains:", "needs an argument"),
        ("json_answer:5", "takes no argument"),
        ("no_such_module_xyz:judge", "cannot import"),
        ("json:judge_that_does_not_exist", "no attribute"),
        ("json:__doc__", "not callable"),
        ("", "unknown judge"),
    ],
)
def test_get_rule_judge_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        get_rule_judge(spec)
    if match == "unknown judge":
        assert "json_answer" in str(info.value) and "max_words:N" in str(info.value)  # lists built-ins


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_judges_mod.py").write_text(
        textwrap.dedent(
            """
            def shouty(prompt, reply, reference=None):
                return reply.isupper()

            class EndsWithPeriod:
                name = "ends_with_period"

                def __call__(self, prompt, reply, reference=None):
                    return reply.endswith(".")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_judges_mod"
    sys.modules.pop("my_judges_mod", None)


def test_get_rule_judge_imports_user_callable(user_module):
    judge = get_rule_judge(f"{user_module}:shouty")
    assert judge.name == f"{user_module}:shouty"
    assert judge(P, "PARIS") and not judge(P, "Paris")
    cls_judge = get_rule_judge(f"{user_module}:EndsWithPeriod")
    assert cls_judge.name == "ends_with_period"
    assert cls_judge(P, "Paris.") and not cls_judge(P, "Paris")


def test_pass_rate_arithmetic():
    prompts = ["a", "b", "c", "d"]
    replies = ['{"answer": "1"}', "one", '{"answer": "3"}', '{"answer": "x"}']
    assert pass_rate(json_answer, prompts, replies) == 0.75
    refs = ['{"answer": "1"}', '{"answer": "2"}', '{"answer": "3"}', '{"answer": "4"}']
    assert judge_replies(json_answer_correct, prompts, replies, refs) == [True, False, True, False]
    assert pass_rate(json_answer_correct, prompts, replies, refs) == 0.5
    assert pass_rate(lambda p, r, ref=None: True, prompts, replies) == 1.0
    assert pass_rate(json_answer, [], []) == 0.0
    with pytest.raises(ValueError):
        pass_rate(json_answer, prompts, replies[:2])
    with pytest.raises(ValueError):
        pass_rate(json_answer, prompts, replies, refs[:1])
