"""Run reports (written at the end of a run and by `preftune report`), their rendering in headless
Chromium, and tracking defaults (TensorBoard when installed, --report_to none)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import PAIRS

from preftune.evaluation.evaluate import EVAL_RESULTS_FILE, pair_metrics, write_results
from preftune.evaluation.pairs import PairScores
from preftune.evaluation.pairwise import JudgeResult
from preftune.evaluation.winrate import LOSS, TIE, WIN, win_rate
from preftune.report import write_report
from preftune.report.browser import dump_dom, find_chromium, screenshot

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
CURVES = (
    "loss",
    "rewards_accuracies",
    "rewards_margins",
    "rewards_chosen_and_rewards_rejected",
    "learning_rate",
)


def _dpo(model: Path, data: Path, out: Path, *extra: str):
    from transformers import TrainingArguments

    from preftune.cli.arguments import parse_command_args
    from preftune.cli.main import training_defaults
    from preftune.config import DataArguments, ModelArguments, PreferenceArguments
    from preftune.training.dpo import run_dpo

    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
        "--use_peft_lora", "--test_size", "3", "--disable_tqdm", "true", "--save_strategy", "no",
        "--logging_steps", "1", "--max_steps", "2", "--learning_rate", "1e-2", *extra,
    ]  # fmt: skip
    types = (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments)
    return run_dpo(*parse_command_args(types, argv, defaults=training_defaults()))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report-data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, data_file) -> Path:
    """A 2-step LoRA DPO run with evaluation at every step and the default tracking."""
    out = tmp_path_factory.mktemp("report-run") / "run"
    _dpo(tiny_model_dir, data_file, out, "--eval_strategy", "steps", "--eval_steps", "1")
    return out


def fake_eval_results() -> dict:
    """eval_results.json as `preftune eval` writes it, with hand-picked numbers: 5 wins, 3 losses."""
    policy = PairScores(torch.tensor([-10.0, -12.0, -9.0, -20.0]), torch.tensor([-14.0, -11.0, -15.0, -21.0]))
    reference = PairScores(
        torch.tensor([-11.0, -12.5, -10.0, -20.0]), torch.tensor([-13.0, -11.5, -14.0, -19.5])
    )
    outcomes = [WIN] * 5 + [LOSS] * 3
    rule = JudgeResult("rule:json_answer", "rule", outcomes, win_rate(outcomes), {"pass_rate_tuned": 0.75})
    llm = [WIN, TIE, TIE, LOSS, WIN, WIN, TIE, LOSS]
    llm_judge = JudgeResult("llm-judge", "llm-judge", llm, win_rate(llm), {"position_a_rate": 0.6})
    samples = [
        {
            "prompt": f"Question <b>{i}</b>?",
            "chosen": '{"answer": "x"}',
            "reference": f"reference reply {i}",
            "tuned": f'{{"answer": "tuned {i}"}}',
            "verdicts": {"rule:json_answer": "win" if o == WIN else "loss", "llm-judge": "tie"},
        }
        for i, o in enumerate(outcomes)
    ]
    return {
        "run_dir": "run",
        "dataset": "pairs.jsonl",
        "split": "test",
        "reference": "adapter_disabled",
        "pairs": pair_metrics(policy, reference, beta=0.1),
        "generation": {
            "n_prompts": 8,
            "decoding": "greedy",
            "length_reference": {"words": 3.0, "tokens": 5.0},
            "length_tuned": {"words": 2.0, "tokens": 9.0},
        },
        "judges": [rule.to_dict(), llm_judge.to_dict()],
        "samples": samples,
    }


# --------------------------------------------------------------------------- written at the end of a run


def test_every_run_ends_with_trainer_state_and_a_report(run_dir):
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("eval_loss" in h for h in state["log_history"])
    report = run_dir / "report" / "report.html"
    assert report.is_file()
    for name in CURVES:
        assert (run_dir / "report" / f"{name}.png").stat().st_size > 2000, name
    page = report.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= len(CURVES) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "<script" not in page  # self-contained, nothing fetched
    assert "Run config" in page and "learning_rate: 0.01" in page
    assert "No evaluation yet" in page


def test_report_with_eval_results(run_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("trainer_state.json", "preftune_config.yaml"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    write_results(fake_eval_results(), folder / EVAL_RESULTS_FILE)
    from preftune.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["report", str(folder)])
    assert exit_.value.code == 0
    page = (folder / "report" / "report.html").read_text()
    # rule judge: 5/8 = 62.5%, Wilson [30.6%, 86.3%]; LLM judge: (3 + 3/2) / 8 = 56.2%
    assert "62.5%" in page and "[30.6%, 86.3%]" in page and "56.2%" in page
    assert "Wilson on wins + ties/2" in page
    # pairs: implicit-reward accuracy 3/4 (margins 0.2, 0, 0.2, 0.15); reference likelihood accuracy 2/4
    assert "75.0%" in page and "50.0%" in page
    assert "Question &lt;b&gt;0&lt;/b&gt;?" in page and "<b>0</b>" not in page  # escaped
    for name in ("reward_margins.png", "win_rates.png", *(f"{c}.png" for c in CURVES)):
        assert (folder / "report" / name).is_file(), name


# --------------------------------------------------------------------------- rendered in a browser


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("trainer_state.json", "preftune_config.yaml"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    write_results(fake_eval_results(), folder / EVAL_RESULTS_FILE)
    report = write_report(folder)

    png = screenshot(report, tmp_path / "shot.png", width=1280, height=2000)
    image = Image.open(png).convert("L")
    assert image.size == (1280, 2000)
    low, high = image.getextrema()
    assert high - low > 100  # text and figures, not a blank page
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram)  # not (almost) one single colour

    dom = dump_dom(report)
    for text in (
        "preftune report",
        "62.5%",
        "[30.6%, 86.3%]",
        "rule:json_answer",
        "Held-out pairs",
        "Sample generations",
    ):
        assert text in dom, text
    assert dom.count("data:image/png;base64,") >= 7


# --------------------------------------------------------------------------- tracking


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_by_default(run_dir):
    from preftune.cli.main import training_defaults

    assert training_defaults()["report_to"] == "tensorboard"
    events = list((run_dir / "runs").glob("*/events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_report_to_none_writes_no_tracking_logs(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    _dpo(tiny_model_dir, data_file, out, "--report_to", "none", "--max_steps", "1")
    assert not (out / "runs").exists()
    assert (out / "report" / "report.html").is_file() and (out / "trainer_state.json").is_file()


def test_sft_run_ends_with_a_report(tmp_path, tiny_model_dir, data_file):
    from transformers import TrainingArguments

    from preftune.cli.arguments import parse_command_args
    from preftune.cli.sft import sft_defaults
    from preftune.config import DataArguments, ModelArguments, SFTArguments
    from preftune.training.sft import run_sft

    out = tmp_path / "sft"
    argv = [
        "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data_file), "--output_dir", str(out),
        "--use_peft_lora", "--test_size", "2", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no", "--logging_steps", "1", "--max_steps", "2", "--eval_strategy", "steps",
        "--eval_steps", "1",
    ]  # fmt: skip
    types = (ModelArguments, DataArguments, SFTArguments, TrainingArguments)
    run_sft(*parse_command_args(types, argv, defaults=sft_defaults()))
    assert (out / "trainer_state.json").is_file()
    for name in ("loss", "token_accuracy", "perplexity_held_out", "learning_rate"):
        assert (out / "report" / f"{name}.png").is_file(), name
    page = (out / "report" / "report.html").read_text()
    assert "<td>sft</td>" in page and "token_accuracy" in page
