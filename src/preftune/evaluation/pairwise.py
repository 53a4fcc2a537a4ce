"""Pairwise judges: which of two replies to the same prompt is better, the tuned model's or the reference's?

Judge specs (`preftune eval --judge SPEC`, repeatable):

  rule:NAME            a rule judge of preftune.evaluation.judges (json_answer, valid_json, regex:PATTERN,
                       max_words:N, contains:TEXT, omits:TEXT, ...) or `rule:package.module:callable`;
                       a reply that passes beats one that fails; both pass or both fail is a tie
  reward-model:PATH    any AutoModelForSequenceClassification reward model (Hub name or folder) scores
                       both replies; the higher reward wins, equal rewards tie
  llm-judge[:PATH]     any causal chat model (default: the embedded SmolLM2-135M-Instruct) is asked which
                       reply is better, answering "A" or "B" (read from its next-token probabilities).
                       It is asked twice, with the replies in both orders, to cancel position bias:
                       both orders prefer the tuned reply -> win, both the reference -> loss,
                       disagreement -> tie (counted as half a win)

A bare spec without a prefix (e.g. `json_answer`) is a rule judge. Identical replies are a tie
without asking the judge.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from preftune.evaluation.judges import get_rule_judge
from preftune.evaluation.winrate import LOSS, TIE, WIN, WinRate, outcome, win_rate

Messages = list[dict[str, str]]
# prefers_first(prompts, replies_a, replies_b) -> per prompt: 1.0 (A better), 0.0 (B better), 0.5 (tie)
PrefersFirst = Callable[[Sequence[Messages], Sequence[str], Sequence[str]], list[float]]

JUDGE_KINDS = ("rule", "reward-model", "llm-judge")

LLM_JUDGE_PROMPT = """Two assistants replied to the same user message. Which reply is better: more helpful, \
more correct, and closer to what the user asked for?

[User message]
{prompt}

[Reply A]
{a}

[Reply B]
{b}

Answer with a single letter: A or B."""


@dataclass
class JudgeResult:
    """One judge's verdicts on the held-out prompts, tuned (first) against reference (second)."""

    name: str  # the spec, e.g. "rule:json_answer"
    kind: str  # "rule" | "reward-model" | "llm-judge"
    outcomes: list[float]  # per prompt: WIN (1), TIE (0.5) or LOSS (0) for the tuned model
    win_rate: WinRate
    details: dict[str, float] = field(default_factory=dict)  # e.g. pass rates, mean rewards
    per_prompt: list[dict[str, Any]] = field(default_factory=list)  # e.g. each reply's reward

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            **self.win_rate.to_dict(),
            "details": self.details,
            "outcomes": self.outcomes,
            "per_prompt": self.per_prompt,
        }


def prompt_text(messages: Messages | str) -> str:
    """A prompt as plain text: the message itself for one user turn, else 'role: content' lines."""
    if isinstance(messages, str):
        return messages
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _check_lengths(prompts: Sequence, tuned: Sequence[str], reference: Sequence[str]) -> None:
    if not len(prompts) == len(tuned) == len(reference):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(tuned)} tuned and {len(reference)} reference replies"
        )


def judge_both_orders(
    prefers_first: PrefersFirst,
    prompts: Sequence[Messages],
    tuned: Sequence[str],
    reference: Sequence[str],
) -> tuple[list[float], list[dict[str, Any]]]:
    """Ask a position-sensitive judge twice, (tuned, reference) then (reference, tuned).

    Returns per prompt the tuned model's preference score in [0, 1], the mean of both orders (1: both
    orders prefer the tuned reply; 0.5: they disagree, or tie), and the per-order verdicts (with
    "identical": true where both replies are the same and the judge was not asked). A judge that
    always picks position A scores 0.5 everywhere: its bias cancels.
    """
    _check_lengths(prompts, tuned, reference)
    differ = [i for i in range(len(prompts)) if tuned[i].strip() != reference[i].strip()]
    scores = [TIE] * len(prompts)
    orders: list[dict[str, Any]] = [
        {"tuned_as_a": TIE, "tuned_as_b": TIE, "identical": True} for _ in prompts
    ]
    if differ:
        sub_prompts = [prompts[i] for i in differ]
        tuned_sub, reference_sub = [tuned[i] for i in differ], [reference[i] for i in differ]
        first = prefers_first(sub_prompts, tuned_sub, reference_sub)  # tuned in position A
        second = prefers_first(sub_prompts, reference_sub, tuned_sub)  # tuned in position B
        for i, a, b in zip(differ, first, second, strict=True):
            orders[i] = {"tuned_as_a": float(a), "tuned_as_b": 1.0 - float(b)}
            scores[i] = (float(a) + 1.0 - float(b)) / 2
    return scores, orders


# --------------------------------------------------------------------------- rule judges


class RulePairJudge:
    """A pass/fail rule judge turned pairwise: pass beats fail, anything else ties."""

    kind = "rule"

    def __init__(self, spec: str) -> None:
        self.rule = get_rule_judge(spec)
        self.name = f"rule:{spec}"

    def compare(
        self,
        prompts: Sequence[Messages],
        tuned: Sequence[str],
        reference: Sequence[str],
        chosen: Sequence[str | None] | None = None,
        interval: str = "wilson",
    ) -> JudgeResult:
        _check_lengths(prompts, tuned, reference)
        chosen = list(chosen) if chosen is not None else [None] * len(prompts)
        texts = [prompt_text(p) for p in prompts]
        tuned_pass = [bool(self.rule(p, r, c)) for p, r, c in zip(texts, tuned, chosen)]
        reference_pass = [bool(self.rule(p, r, c)) for p, r, c in zip(texts, reference, chosen)]
        outcomes = [WIN if t > r else LOSS if t < r else TIE for t, r in zip(tuned_pass, reference_pass)]
        n = max(len(prompts), 1)
        return JudgeResult(
            name=self.name,
            kind=self.kind,
            outcomes=outcomes,
            win_rate=win_rate(outcomes, interval),
            details={
                "pass_rate_tuned": sum(tuned_pass) / n,
                "pass_rate_reference": sum(reference_pass) / n,
            },
            per_prompt=[{"tuned_pass": t, "reference_pass": r} for t, r in zip(tuned_pass, reference_pass)],
        )


# --------------------------------------------------------------------------- model loading


def _dtype(name: str | None) -> Any:
    if name in (None, "auto"):
        return "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _resolve(path: str | None) -> str:
    from preftune.models.prepare import resolve_model_path

    return resolve_model_path(path)


def _release(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- reward model


def reward_model_text(tokenizer, messages: Messages, reply: str) -> str:
    """The conversation as the reward model reads it: its chat template, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        conversation = list(messages) + [{"role": "assistant", "content": reply}]
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    return prompt_text(messages) + "\n\n" + reply


@torch.no_grad()
def reward_scores(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Messages],
    replies: Sequence[str],
    batch_size: int = 8,
    max_length: int = 1024,
    desc: str = "reward model",
) -> list[float]:
    """One scalar reward per (prompt, reply): the single logit, or logit[1] - logit[0] for two labels."""
    texts = [reward_model_text(tokenizer, p, r) for p, r in zip(prompts, replies)]
    old_sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"  # keep the reply's end
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc):
            enc = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            ).to(device)
            logits = model(**enc).logits.float()
            if logits.shape[-1] == 1:
                values = logits[:, 0]
            elif logits.shape[-1] == 2:
                values = logits[:, 1] - logits[:, 0]
            else:
                raise ValueError(f"a reward model has 1 or 2 output labels; this one has {logits.shape[-1]}")
            scores += values.tolist()
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_sides
    return scores


class RewardModelJudge:
    """Scores both replies with an `AutoModelForSequenceClassification`; the higher reward wins."""

    kind = "reward-model"

    def __init__(
        self, path: str, batch_size: int = 8, max_length: int = 1024, dtype: str | None = None
    ) -> None:
        self.path = path
        self.name = f"reward-model:{path}"
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype

    def load(self):
        from transformers import AutoModelForSequenceClassification

        from preftune.models.prepare import load_tokenizer

        path = _resolve(self.path)
        tokenizer = load_tokenizer(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_dtype(self.dtype))
        if model.config.pad_token_id is None:  # needed to find each row's last token in a padded batch
            model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(_device()).eval(), tokenizer

    def compare(
        self,
        prompts: Sequence[Messages],
        tuned: Sequence[str],
        reference: Sequence[str],
        chosen: Sequence[str | None] | None = None,
        interval: str = "wilson",
    ) -> JudgeResult:
        _check_lengths(prompts, tuned, reference)
        model, tokenizer = self.load()
        try:
            kwargs = dict(batch_size=self.batch_size, max_length=self.max_length)
            tuned_rewards = reward_scores(
                model, tokenizer, prompts, tuned, desc="reward model (tuned)", **kwargs
            )
            reference_rewards = reward_scores(
                model, tokenizer, prompts, reference, desc="reward model (reference)", **kwargs
            )
        finally:
            _release(model)
        outcomes = [
            WIN if t > r else LOSS if t < r else TIE for t, r in zip(tuned_rewards, reference_rewards)
        ]
        n = max(len(prompts), 1)
        return JudgeResult(
            name=self.name,
            kind=self.kind,
            outcomes=outcomes,
            win_rate=win_rate(outcomes, interval),
            details={
                "mean_reward_tuned": sum(tuned_rewards) / n,
                "mean_reward_reference": sum(reference_rewards) / n,
            },
            per_prompt=[
                {"tuned_reward": t, "reference_reward": r} for t, r in zip(tuned_rewards, reference_rewards)
            ],
        )


# --------------------------------------------------------------------------- LLM judge


def _letter_ids(tokenizer, letter: str) -> list[int]:
    """Token ids that start an answer `letter` ("A" and " A" may be different tokens)."""
    ids = set()
    for text in (letter, " " + letter):
        encoded = tokenizer(text, add_special_tokens=False).input_ids
        if encoded:
            ids.add(encoded[0])
    return sorted(ids)


def llm_judge_text(tokenizer, messages: Messages, a: str, b: str, max_chars: int = 2000) -> str:
    """The judge's input: the question in one user turn, in the judge's chat template if it has one."""
    question = LLM_JUDGE_PROMPT.format(
        prompt=prompt_text(messages)[-max_chars:], a=a[:max_chars], b=b[:max_chars]
    )
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return question + "\nAnswer:"


class LLMJudge:
    """Asks a causal chat model which reply is better, in both orders (see the module docstring)."""

    kind = "llm-judge"

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 4,
        max_chars: int = 2000,
        dtype: str | None = None,
    ) -> None:
        self.path = path
        self.name = f"llm-judge:{path}" if path else "llm-judge"
        self.batch_size, self.max_chars, self.dtype = batch_size, max_chars, dtype
        self.model: torch.nn.Module | None = None  # set to reuse a model already in memory
        self.tokenizer = None

    def resolved_path(self) -> str:
        return _resolve(self.path)

    @contextlib.contextmanager
    def _loaded(self) -> Iterator[tuple[torch.nn.Module, Any]]:
        from transformers import AutoModelForCausalLM

        from preftune.models.prepare import load_tokenizer

        path = self.resolved_path()
        tokenizer = self.tokenizer or load_tokenizer(path)
        if tokenizer.pad_token is None:  # (a tokenizer passed in)
            tokenizer.pad_token = tokenizer.eos_token
        if self.model is not None:
            yield self.model, tokenizer
            return
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(self.dtype)).to(_device()).eval()
        try:
            yield model, tokenizer
        finally:
            _release(model)

    @torch.no_grad()
    def _prefers_first(
        self,
        model: torch.nn.Module,
        tokenizer,
        prompts: Sequence[Messages],
        a: Sequence[str],
        b: Sequence[str],
    ) -> list[float]:
        a_ids, b_ids = _letter_ids(tokenizer, "A"), _letter_ids(tokenizer, "B")
        if not a_ids or not b_ids or set(a_ids) & set(b_ids):
            raise ValueError("the judge's tokenizer cannot tell the answers 'A' and 'B' apart")
        texts = [llm_judge_text(tokenizer, p, x, y, self.max_chars) for p, x, y in zip(prompts, a, b)]
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # every row's last position is its answer position
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        verdicts: list[float] = []
        try:
            for start in tqdm(range(0, len(texts), self.batch_size), desc="llm judge"):
                enc = tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                logits = model(**enc, position_ids=position_ids, use_cache=False).logits[:, -1].float()
                logps = torch.log_softmax(logits, dim=-1)
                score_a = torch.logsumexp(logps[:, a_ids], dim=-1)
                score_b = torch.logsumexp(logps[:, b_ids], dim=-1)
                verdicts += [WIN if x > y else LOSS if x < y else TIE for x, y in zip(score_a, score_b)]
        finally:
            tokenizer.padding_side = old_side
            model.train(was_training)
        return verdicts

    def compare(
        self,
        prompts: Sequence[Messages],
        tuned: Sequence[str],
        reference: Sequence[str],
        chosen: Sequence[str | None] | None = None,
        interval: str = "wilson",
    ) -> JudgeResult:
        with self._loaded() as (model, tokenizer):
            scores, orders = judge_both_orders(
                lambda p, a, b: self._prefers_first(model, tokenizer, p, a, b), prompts, tuned, reference
            )
        return judge_result_from_orders(self.name, self.kind, scores, orders, interval)


def judge_result_from_orders(
    name: str, kind: str, scores: list[float], orders: list[dict[str, Any]], interval: str = "wilson"
) -> JudgeResult:
    """A JudgeResult from `judge_both_orders`, with position-bias diagnostics in `details`, over the
    prompts the judge was asked about: how often it picked position A (0.5: no position bias) and
    how often both orders gave the same verdict."""
    outcomes = [outcome(s) for s in scores]
    asked = [o for o in orders if not o.get("identical")]
    n = len(asked)
    # position A was picked when the tuned reply, in A, won, or when it, in B, lost
    picked_a = sum(o["tuned_as_a"] + (1 - o["tuned_as_b"]) for o in asked) / (2 * n) if n else float("nan")
    agree = sum(o["tuned_as_a"] == o["tuned_as_b"] for o in asked) / n if n else float("nan")
    return JudgeResult(
        name=name,
        kind=kind,
        outcomes=outcomes,
        win_rate=win_rate(outcomes, interval),
        details={"identical_replies": len(orders) - n, "position_a_rate": picked_a, "order_agreement": agree},
        per_prompt=orders,
    )


# --------------------------------------------------------------------------- specs


def parse_judge(spec: str, batch_size: int = 8, dtype: str | None = None):
    """A judge from its spec (see the module docstring); raises ValueError on a bad spec."""
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    if kind == "rule":
        if not arg:
            raise ValueError("rule judge needs a name, e.g. rule:json_answer or rule:my_pkg.judges:fn")
        return RulePairJudge(arg)
    if kind == "reward-model":
        if not arg:
            raise ValueError(
                "reward-model judge needs a model, e.g. reward-model:OpenAssistant/reward-model-deberta-v3-large-v2"
            )
        return RewardModelJudge(arg, batch_size=batch_size, dtype=dtype)
    if kind == "llm-judge":
        path = None if arg in ("", "embedded") else arg
        return LLMJudge(path, batch_size=max(1, batch_size // 2), dtype=dtype)
    try:
        return RulePairJudge(spec)
    except ValueError as err:
        raise ValueError(
            f"unknown judge {spec!r}: use rule:NAME, reward-model:PATH or llm-judge[:PATH] ({err})"
        ) from None
