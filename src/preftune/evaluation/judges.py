"""Rule judges: cheap, deterministic pass/fail checks on a generated reply.

A judge is any callable ``judge(prompt, reply, reference=None) -> bool``. The built-ins are small
`RuleJudge` objects that also carry a ``name`` for reports:

    json_answer            reply (stripped) is a JSON object with an "answer" key
    json_answer_correct    ... and its answer equals the reference's answer (case-insensitive)
    valid_json             reply (stripped) parses as JSON
    regex(pattern)         re.search(pattern, reply.strip()) finds a match
    max_words(n)           reply has at most n whitespace-separated words
    contains(s) / omits(s) reply contains / does not contain s (case-insensitive)

`get_rule_judge` builds one from a spec string (e.g. from the command line or a YAML config):
"json_answer", "regex:^\\{", "max_words:20", "contains:foo", "omits:bar", "valid_json", or
"my_package.my_module:my_judge" to import your own callable.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Judge = Callable[..., bool]  # judge(prompt, reply, reference=None) -> bool


@dataclass(frozen=True)
class RuleJudge:
    """A named judge. `check(prompt, reply, reference)` returns whether the reply passes."""

    name: str
    check: Callable[[str, str, str | None], Any]

    def __call__(self, prompt: str, reply: str, reference: str | None = None) -> bool:
        return bool(self.check(prompt, reply, reference))

    def __repr__(self) -> str:
        return f"RuleJudge({self.name!r})"


# -----------------------------------------------------------------------------
# JSON judges

_NOT_JSON = object()


def _parse_json(text: str) -> Any:
    """Parsed JSON of the stripped text, or the `_NOT_JSON` sentinel."""
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, TypeError):
        return _NOT_JSON


def _normalize(value: Any) -> str:
    """Comparable form of an answer: string, stripped, case-folded, without a final period."""
    return str(value).strip().rstrip(".").strip().casefold()


def expected_answer(reference: str) -> str:
    """The answer in a reference reply: its "answer" value if it is a JSON answer, else the text itself."""
    parsed = _parse_json(reference)
    if isinstance(parsed, dict) and "answer" in parsed:
        return str(parsed["answer"])
    return reference.strip()


def _json_answer(prompt: str, reply: str, reference: str | None) -> bool:
    parsed = _parse_json(reply)
    return isinstance(parsed, dict) and "answer" in parsed


def _json_answer_correct(prompt: str, reply: str, reference: str | None) -> bool:
    if reference is None:
        raise ValueError("the json_answer_correct judge needs a reference (the chosen reply) for each prompt")
    parsed = _parse_json(reply)
    if not (isinstance(parsed, dict) and "answer" in parsed):
        return False
    return _normalize(parsed["answer"]) == _normalize(expected_answer(reference))


def _valid_json(prompt: str, reply: str, reference: str | None) -> bool:
    return _parse_json(reply) is not _NOT_JSON


json_answer = RuleJudge("json_answer", _json_answer)
json_answer_correct = RuleJudge("json_answer_correct", _json_answer_correct)
valid_json = RuleJudge("valid_json", _valid_json)

# -----------------------------------------------------------------------------
# parametrized judges


def regex(pattern: str) -> RuleJudge:
    """Passes when `re.search(pattern, reply.strip())` matches."""
    compiled = re.compile(pattern)
    return RuleJudge(f"regex:{pattern}", lambda p, reply, r: compiled.search(reply.strip()) is not None)


def max_words(n: int) -> RuleJudge:
    """Passes when the reply has at most `n` whitespace-separated words."""
    if n < 0:
        raise ValueError(f"max_words needs a non-negative word count, got {n}")
    return RuleJudge(f"max_words:{n}", lambda p, reply, r: len(reply.split()) <= n)


def contains(s: str) -> RuleJudge:
    """Passes when the reply contains `s` (case-insensitive)."""
    needle = s.casefold()
    return RuleJudge(f"contains:{s}", lambda p, reply, r: needle in reply.casefold())


def omits(s: str) -> RuleJudge:
    """Passes when the reply does NOT contain `s` (case-insensitive)."""
    needle = s.casefold()
    return RuleJudge(f"omits:{s}", lambda p, reply, r: needle not in reply.casefold())


# -----------------------------------------------------------------------------
# spec parsing

PLAIN_JUDGES: dict[str, RuleJudge] = {j.name: j for j in (json_answer, json_answer_correct, valid_json)}
PARAM_JUDGES: dict[str, Callable[[str], RuleJudge]] = {
    "regex": regex,
    "max_words": lambda arg: max_words(_parse_int(arg)),
    "contains": contains,
    "omits": omits,
}
BUILTIN_SPECS = [*PLAIN_JUDGES, "regex:PATTERN", "max_words:N", "contains:TEXT", "omits:TEXT"]
_MODULE_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def _parse_int(arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise ValueError(f"max_words needs an integer, as in 'max_words:20', got {arg!r}") from None


def _help() -> str:
    return "built-in judges: " + ", ".join(BUILTIN_SPECS) + "; or 'package.module:callable' for your own"


def _import_judge(spec: str, module_name: str, attr: str) -> Judge:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"judge {spec!r}: cannot import module {module_name!r} ({e}); {_help()}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"judge {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):  # a judge class with a no-argument constructor
        obj = obj()
    if not callable(obj):
        raise ValueError(f"judge {spec!r}: {module_name}:{attr} is not callable")
    name = getattr(obj, "name", None)
    return RuleJudge(name if isinstance(name, str) else spec, obj)


def get_rule_judge(spec: str) -> Judge:
    """Build a judge from a spec string; raises ValueError (listing the built-ins) on a bad spec.

    Examples: "json_answer", "json_answer_correct", "valid_json", "regex:^\\{", "max_words:20",
    "contains:foo", "omits:bar", "my_package.judges:is_polite". An imported callable is called as
    ``f(prompt, reply, reference)``; an imported class is instantiated with no arguments first.
    """
    spec = spec.strip()
    if spec in PLAIN_JUDGES:
        return PLAIN_JUDGES[spec]
    head, sep, arg = spec.partition(":")
    if sep and head in PARAM_JUDGES:
        if arg == "" and head != "regex":
            raise ValueError(f"judge {spec!r} needs an argument after ':', as in '{head}:...'; {_help()}")
        return PARAM_JUDGES[head](arg)
    if sep and head in PLAIN_JUDGES:
        raise ValueError(f"judge {head!r} takes no argument, got {spec!r}; {_help()}")
    if head in PARAM_JUDGES:
        raise ValueError(f"judge {spec!r} needs an argument, as in '{head}:...'; {_help()}")
    if sep and _MODULE_PATH.match(head) and _MODULE_PATH.match(arg):
        return _import_judge(spec, head, arg)
    raise ValueError(f"unknown judge {spec!r}; {_help()}")


# -----------------------------------------------------------------------------
# scoring


def judge_replies(
    judge: Judge,
    prompts: Sequence[str],
    replies: Sequence[str],
    references: Sequence[str | None] | None = None,
) -> list[bool]:
    """Per-reply verdicts of `judge`; `references` (e.g. the chosen replies) is optional."""
    if len(prompts) != len(replies):
        raise ValueError(f"got {len(prompts)} prompts but {len(replies)} replies")
    if references is None:
        references = [None] * len(replies)
    elif len(references) != len(replies):
        raise ValueError(f"got {len(replies)} replies but {len(references)} references")
    return [bool(judge(p, r, ref)) for p, r, ref in zip(prompts, replies, references, strict=True)]


def pass_rate(
    judge: Judge,
    prompts: Sequence[str],
    replies: Sequence[str],
    references: Sequence[str | None] | None = None,
) -> float:
    """Fraction of replies that pass `judge` (0.0 for no replies)."""
    verdicts = judge_replies(judge, prompts, replies, references)
    return sum(verdicts) / len(verdicts) if verdicts else 0.0
