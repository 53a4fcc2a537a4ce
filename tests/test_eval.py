"""preftune eval: win-rate arithmetic and intervals, pairwise judges (rule, reward model, LLM judge with
both orders), the run loader's references, and `preftune eval` on a tiny run folder."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from preftune.evaluation.pairwise import (
    LLMJudge,
    RewardModelJudge,
    RulePairJudge,
    judge_both_orders,
    judge_result_from_orders,
    parse_judge,
    reward_scores,
)
from preftune.evaluation.winrate import LOSS, TIE, WIN, bootstrap_interval, outcome, wilson_interval, win_rate

PROMPTS = [
    [{"role": "user", "content": q}]
    for q in ("Capital of France?", "2 plus 3?", "Opposite of hot?", "Sky color?")
]
TUNED = ['{"answer": "Paris"}', '{"answer": "5"}', "It is cold.", '{"answer": "blue"}']
REFERENCE = ["The capital is Paris.", '{"answer": "5"}', '{"answer": "cold"}', "Blue."]


# --------------------------------------------------------------------------- win rate arithmetic


def test_win_rate_counts_ties_as_half():
    result = win_rate([WIN, WIN, WIN, TIE, LOSS])
    assert (result.wins, result.ties, result.losses, result.n) == (3, 1, 1, 5)
    assert result.win_rate == pytest.approx(0.7)  # (3 + 1/2) / 5


def test_wilson_interval_hand_computed():
    # p = 8/10, z = 1.96: center = (0.8 + 0.19208) / 1.38415 = 0.71674,
    # half = 1.96 * sqrt(0.016 + 0.0096037) / 1.38415 = 0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # wins + ties/2 = 2 + 2/2 = 3 of 6: symmetric around 0.5; half = 1.96 * sqrt(1/24 + 3.8415/144) / 1.64025
    result = win_rate([WIN, WIN, TIE, TIE, LOSS, LOSS])
    assert result.win_rate == 0.5
    assert result.ci_low == pytest.approx(0.1876, abs=1e-4) and result.ci_high == pytest.approx(
        0.8124, abs=1e-4
    )
    # all wins: the upper bound is 1, the lower n / (n + z^2) = 5 / 8.8415 = 0.5655
    low, high = wilson_interval(5, 5)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.5655, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_interval_is_seeded_and_sensible():
    scores = [WIN] * 6 + [LOSS] * 4
    low, high = bootstrap_interval(scores, seed=1)
    assert (low, high) == bootstrap_interval(scores, seed=1)
    assert 0.0 <= low < 0.6 < high <= 1.0
    assert bootstrap_interval([WIN] * 5) == (1.0, 1.0)  # no spread to resample
    result = win_rate(scores, interval="bootstrap")
    assert result.interval == "bootstrap" and result.win_rate == pytest.approx(0.6)


def test_outcome_rounding_and_bad_input():
    assert [outcome(s) for s in (1.0, 0.75, 0.5, 0.25, 0.0)] == [WIN, WIN, TIE, LOSS, LOSS]
    with pytest.raises(ValueError, match="interval"):
        win_rate([WIN], interval="normal")
    with pytest.raises(ValueError, match="outcomes"):
        win_rate([0.75])


# --------------------------------------------------------------------------- position swap


def test_judge_that_always_picks_a_comes_out_at_fifty_percent():
    calls = []

    def always_a(prompts, a, b):
        calls.append((list(a), list(b)))
        return [WIN] * len(prompts)

    scores, orders = judge_both_orders(always_a, PROMPTS, TUNED, REFERENCE)
    result = judge_result_from_orders("stub", "llm-judge", scores, orders)
    # identical replies (prompt 2) are a tie without asking; the others are asked in both orders
    assert calls[0] == ([TUNED[i] for i in (0, 2, 3)], [REFERENCE[i] for i in (0, 2, 3)])
    assert calls[1] == ([REFERENCE[i] for i in (0, 2, 3)], [TUNED[i] for i in (0, 2, 3)])
    assert result.win_rate.win_rate == 0.5 and result.win_rate.ties == 4
    assert result.details == {"identical_replies": 1, "position_a_rate": 1.0, "order_agreement": 0.0}


def test_consistent_judge_decides_in_both_orders():
    def prefers_json(prompts, a, b):
        return [
            WIN
            if x.startswith("{") and not y.startswith("{")
            else LOSS
            if y.startswith("{") and not x.startswith("{")
            else TIE
            for x, y in zip(a, b)
        ]  # noqa: E501

    scores, orders = judge_both_orders(prefers_json, PROMPTS, TUNED, REFERENCE)
    result = judge_result_from_orders("json", "llm-judge", scores, orders)
    assert result.outcomes == [WIN, TIE, LOSS, WIN]
    assert result.win_rate.win_rate == pytest.approx(2.5 / 4)
    assert result.details["order_agreement"] == 1.0


# --------------------------------------------------------------------------- rule judges


def test_rule_pair_judge_pass_beats_fail():
    result = RulePairJudge("json_answer").compare(PROMPTS, TUNED, REFERENCE)
    assert result.outcomes == [WIN, TIE, LOSS, WIN]
    assert (result.win_rate.wins, result.win_rate.ties, result.win_rate.losses) == (2, 1, 1)
    assert result.details == {"pass_rate_tuned": 0.75, "pass_rate_reference": 0.5}
    # with the chosen replies as references: json_answer_correct checks the fact too
    chosen = ['{"answer": "Paris"}', '{"answer": "5"}', '{"answer": "cold"}', '{"answer": "grey"}']
    correct = RulePairJudge("json_answer_correct").compare(PROMPTS, TUNED, REFERENCE, chosen)
    assert correct.outcomes == [WIN, TIE, LOSS, TIE]


def test_rule_judge_specs(tmp_path, monkeypatch):
    assert parse_judge("rule:max_words:2").compare(PROMPTS, TUNED, REFERENCE).outcomes == [
        WIN,
        TIE,
        LOSS,
        TIE,
    ]
    assert parse_judge("json_answer").name == "rule:json_answer"  # a bare rule spec
    module = tmp_path / "my_eval_judges.py"
    module.write_text(
        textwrap.dedent(
            """
            def mentions_number(prompt, reply, reference=None):
                return any(ch.isdigit() for ch in reply)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = parse_judge("rule:my_eval_judges:mentions_number")
    assert judge.compare(PROMPTS, TUNED, REFERENCE).outcomes == [TIE, TIE, TIE, TIE]
    assert judge.compare(PROMPTS[:1], ["7"], ["seven"]).outcomes == [WIN]
    for bad in ("rule:", "rule:no_such_rule", "nonsense", "reward-model:"):
        with pytest.raises(ValueError):
            parse_judge(bad)
    assert isinstance(parse_judge("llm-judge"), LLMJudge) and parse_judge("llm-judge").path is None
    sys.modules.pop("my_eval_judges", None)


# --------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
    )  # fmt: skip
    assert config.pad_token_id is None  # the judge sets it from the tokenizer
    folder = tmp_path_factory.mktemp("reward-model")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_judge_scores_both_replies(reward_model_dir):
    judge = parse_judge(f"reward-model:{reward_model_dir}", batch_size=3)
    assert isinstance(judge, RewardModelJudge)
    result = judge.compare(PROMPTS, TUNED, REFERENCE)
    rewards = result.per_prompt
    assert len(rewards) == 4 and result.win_rate.n == 4
    for r, o in zip(rewards, result.outcomes):
        expected = (
            WIN
            if r["tuned_reward"] > r["reference_reward"]
            else LOSS
            if r["tuned_reward"] < r["reference_reward"]
            else TIE
        )  # noqa: E501
        assert o == expected
    assert rewards[1]["tuned_reward"] == pytest.approx(rewards[1]["reference_reward"])  # same reply
    # batched (padded) scores equal one-at-a-time scores
    model, tokenizer = judge.load()
    single = [reward_scores(model, tokenizer, [p], [r])[0] for p, r in zip(PROMPTS, TUNED)]
    assert [r["tuned_reward"] for r in rewards] == pytest.approx(single, abs=1e-4)


# --------------------------------------------------------------------------- LLM judge


def test_llm_judge_runs_both_orders_and_aggregates(tiny_model_dir, monkeypatch):
    judge = parse_judge(f"llm-judge:{tiny_model_dir}", batch_size=4)
    seen = []
    real = LLMJudge._prefers_first

    def spy(self, model, tokenizer, prompts, a, b):
        verdicts = real(self, model, tokenizer, prompts, a, b)
        seen.append((list(a), list(b), verdicts))
        return verdicts

    monkeypatch.setattr(LLMJudge, "_prefers_first", spy)
    result = judge.compare(PROMPTS, TUNED, REFERENCE)
    (a1, b1, first), (a2, b2, second) = seen
    assert (a1, b1) == (b2, a2)  # the second call swaps the positions
    assert all(v in (WIN, TIE, LOSS) for v in first + second)
    asked = [0, 2, 3]  # prompt 1 has identical replies
    for k, i in enumerate(asked):
        assert result.per_prompt[i] == {"tuned_as_a": first[k], "tuned_as_b": 1 - second[k]}
        assert result.outcomes[i] == outcome((first[k] + 1 - second[k]) / 2)
    assert result.outcomes[1] == TIE and result.per_prompt[1]["identical"]
    assert result.win_rate.n == 4 and 0 <= result.details["position_a_rate"] <= 1


# --------------------------------------------------------------------------- run folders and `preftune eval`


def _dpo(model: Path | str, data: Path, out: Path, *extra: str):
    """A 2-step quiet DPO run with 3 held-out pairs."""
    from conftest import dpo_args

    from preftune.training.dpo import run_dpo

    return run_dpo(*dpo_args(model, data, out, "--learning_rate", "1e-2", "--test_size", "3", *extra))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from conftest import PAIRS

    path = tmp_path_factory.mktemp("eval-data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, data_file) -> Path:
    out = tmp_path_factory.mktemp("eval-run") / "run"
    _dpo(tiny_model_dir, data_file, out, "--use_peft_lora")
    return out


def _logps(model, pairs, pad_token_id):
    from preftune.evaluation.pairs import score_pairs

    return score_pairs(model, pairs, pad_token_id).chosen_logps


def test_load_run_reference_is_the_base_with_the_adapter_disabled(lora_run, tiny_model_dir, data_file):
    from transformers import AutoModelForCausalLM

    from preftune.evaluation.evaluate import load_held_out, load_run, read_run_config

    run = load_run(lora_run)
    assert run.reference_mode == "adapter_disabled" and run.base_path == str(tiny_model_dir)
    data = load_held_out(read_run_config(lora_run)["data"], run.tokenizer, seed=42)
    assert len(data.pairs) == 3 and len(data.examples) == 3  # --test_size 3, carved with the run's seed
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pad = run.tokenizer.pad_token_id
    with run.reference() as reference:
        torch.testing.assert_close(_logps(reference, data.pairs, pad), _logps(base, data.pairs, pad))
    assert (_logps(run.model, data.pairs, pad) - _logps(base, data.pairs, pad)).abs().max() > 1e-3


def test_load_run_trained_from_an_sft_adapter_uses_it_as_reference(tmp_path, tiny_model_dir, data_file):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from preftune.evaluation.evaluate import load_held_out, load_run, read_run_config

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    sft_dir = tmp_path / "sft"
    sft.save_pretrained(sft_dir)
    _dpo(sft_dir, data_file, tmp_path / "dpo")

    run = load_run(tmp_path / "dpo")
    assert run.reference_mode == "reference_adapter"
    data = load_held_out(read_run_config(tmp_path / "dpo")["data"], run.tokenizer, seed=42)
    pad = run.tokenizer.pad_token_id
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sft_model = PeftModel.from_pretrained(fresh, sft_dir).eval()
    with run.reference() as reference:
        torch.testing.assert_close(_logps(reference, data.pairs, pad), _logps(sft_model, data.pairs, pad))
    tuned = _logps(run.model, data.pairs, pad)  # back on the tuned adapter after the `with`
    assert (tuned - _logps(sft_model, data.pairs, pad)).abs().max() > 1e-3


def test_preftune_eval_command(lora_run, tiny_model_dir, capsys):
    from preftune.cli.main import main

    argv = [
        "eval",
        "--model",
        str(lora_run),
        "--judge",
        "rule:json_answer",
        "--judge",
        f"llm-judge:{tiny_model_dir}",
    ]
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--max_new_tokens", "6", "--batch_size", "2", "--interval", "bootstrap"])
    assert exit_.value.code == 0
    results = json.loads((lora_run / "eval_results.json").read_text())
    assert results["pairs"]["n"] == 3 and results["generation"]["n_prompts"] == 3
    assert results["pairs"]["beta"] == 0.1  # the run's --beta
    assert 0.0 <= results["pairs"]["after"]["reward_accuracy"] <= 1.0
    assert len(results["pairs"]["logps"]["tuned_chosen"]) == 3
    names = [j["name"] for j in results["judges"]]
    assert names == ["rule:json_answer", f"llm-judge:{tiny_model_dir}"]
    for j in results["judges"]:
        assert j["wins"] + j["ties"] + j["losses"] == 3 and j["interval"] == "bootstrap"
        assert j["ci_low"] <= j["win_rate"] <= j["ci_high"]
    assert len(results["samples"]) == 3 and set(results["samples"][0]["verdicts"]) == set(names)
    assert set(results["generation"]["length_tuned"]) == {"words", "tokens"}
    assert (lora_run / "report" / "report.html").is_file()
    out = capsys.readouterr().out
    assert "win rate" in out and "implicit-reward accuracy" in out


def test_preftune_eval_errors_are_one_line(tmp_path, capsys):
    from preftune.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    assert "no such run folder" in capsys.readouterr().err
