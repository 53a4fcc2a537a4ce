"""`preftune pipeline`: SFT then DPO from the SFT adapter, each stage in its own folder; a second run
skips finished stages; recipes are checked before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from preftune.cli import pipeline as pipeline_cli
from preftune.training.pipeline import (
    STAGE_MARKER,
    StageCommand,
    parse_pipeline,
    run_pipeline,
    stage_arguments,
)

REPO = Path(__file__).resolve().parents[1]
QUIET = {"report_to": "none", "disable_tqdm": True, "save_strategy": "no", "eval_strategy": "no", "seed": 0}


def recipe(tmp_path: Path, model: Path, data: Path) -> Path:
    config = {
        "output_dir": str(tmp_path / "run"),
        "model_name_or_path": str(model),
        "dataset_name": str(data),
        "max_seq_length": 128,
        "use_peft_lora": True,
        "lora_r": 4,
        "logging_steps": 1,
        **QUIET,
        "stages": [
            {
                "name": "sft",
                "command": "sft",
                "args": {"max_steps": 2, "learning_rate": 1e-3, "packing": True},
            },
            {"name": "dpo", "command": "dpo", "args": {"max_steps": 1, "loss_type": "ipo"}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sft_then_dpo_then_a_second_run_skips_both(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    config = recipe(tmp_path, tiny_model_dir, pairs_file)
    ran: list[str] = []
    real_commands = pipeline_cli.stage_commands

    def recording(run, name):
        def wrapped(args):
            ran.append(name)
            return run(args)

        return wrapped

    def recording_commands():
        commands = real_commands()
        for name, command in commands.items():
            command.run = recording(command.run, name)
        return commands

    monkeypatch.setattr(pipeline_cli, "stage_commands", recording_commands)
    assert pipeline_cli.main(["--config", str(config)]) == 0
    assert ran == ["sft", "dpo"]
    sft_dir, dpo_dir = tmp_path / "run" / "sft", tmp_path / "run" / "dpo"
    assert (sft_dir / "adapter_config.json").is_file() and (dpo_dir / "adapter_config.json").is_file()
    sft_marker = json.loads((sft_dir / STAGE_MARKER).read_text())
    dpo_marker = json.loads((dpo_dir / STAGE_MARKER).read_text())
    assert dpo_marker["args"]["model_name_or_path"] == str(sft_dir)  # DPO starts from the SFT adapter
    assert "train_loss" in sft_marker["metrics"]
    # The DPO adapter sits on the original base, like the SFT adapter it came from.
    assert json.loads((dpo_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir
    )
    assert yaml.safe_load((dpo_dir / "preftune_config.yaml").read_text())["preference"]["loss_type"] == "ipo"

    ran.clear()
    assert pipeline_cli.main(["--config", str(config)]) == 0
    assert ran == []  # both finished: nothing runs again


def fake_commands(calls: list) -> dict[str, StageCommand]:
    def run(args):
        calls.append(args)
        Path(args["output_dir"]).mkdir(parents=True, exist_ok=True)
        return {"train_loss": 1.0}

    keys = {
        "model_name_or_path",
        "output_dir",
        "max_steps",
        "learning_rate",
        "beta",
        "packing",
        "dataset_name",
    }
    return {
        "sft": StageCommand(keys - {"beta"}, check=lambda args: None, run=run),
        "dpo": StageCommand(keys - {"packing"}, check=lambda args: None, run=run),
    }


def two_stages(tmp_path: Path, **top) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        **top,
        "stages": [
            {"name": "sft", "command": "sft"},
            {"name": "dpo", "command": "dpo", "args": {"beta": 0.2}},
        ],
    }


def test_flags_go_to_the_stages_that_have_them(tmp_path):
    pipeline = parse_pipeline(two_stages(tmp_path, learning_rate=1e-4, packing=True, model_name_or_path="m"))
    sft, dpo = stage_arguments(pipeline, fake_commands([]), overrides={"max_steps": "3"})
    assert sft == {
        "learning_rate": 1e-4,
        "packing": True,
        "max_steps": "3",
        "model_name_or_path": "m",
        "output_dir": str(tmp_path / "run" / "sft"),
    }
    assert dpo["model_name_or_path"] == str(tmp_path / "run" / "sft") and dpo["beta"] == 0.2
    assert "packing" not in dpo
    with pytest.raises(ValueError, match="did you mean learning_rate"):
        stage_arguments(parse_pipeline(two_stages(tmp_path, learning_rat=1)), fake_commands([]))


@pytest.mark.parametrize(
    "stages, message",
    [
        ([], "non-empty list"),
        ([{"name": "a", "command": "sft"}, {"name": "a", "command": "dpo"}], "unique"),
        ([{"command": "sft", "args": {"output_dir": "x"}}], "set by the pipeline"),
        ([{"command": "sft", "extra": 1}], "unknown keys"),
    ],
)
def test_bad_recipes_are_refused(stages, message):
    with pytest.raises(ValueError, match=message):
        parse_pipeline({"stages": stages})


def test_unknown_command_is_refused(tmp_path):
    pipeline = parse_pipeline({"stages": [{"command": "kto"}]})
    with pytest.raises(ValueError, match="unknown command 'kto'"):
        run_pipeline(pipeline, fake_commands([]))


def test_rerunning_a_stage_reruns_the_ones_after_it_and_interrupted_stages_resume(tmp_path):
    calls: list[dict] = []
    pipeline = parse_pipeline(two_stages(tmp_path))
    run_pipeline(pipeline, fake_commands(calls))
    assert len(calls) == 2
    assert [o.status for o in run_pipeline(pipeline, fake_commands(calls))] == ["skipped", "skipped"]

    (tmp_path / "run" / "sft" / STAGE_MARKER).unlink()  # as if sft had been interrupted...
    (tmp_path / "run" / "sft" / "checkpoint-7").mkdir()  # ... after saving a checkpoint
    calls.clear()
    outcomes = run_pipeline(pipeline, fake_commands(calls))
    assert [o.status for o in outcomes] == ["ran", "ran"]  # dpo's input changed: it runs again too
    assert calls[0]["resume_from_checkpoint"] == str(tmp_path / "run" / "sft" / "checkpoint-7")
    assert "resume_from_checkpoint" not in calls[1]


def test_cpu_recipe_parses(monkeypatch):
    monkeypatch.chdir(REPO)
    assert pipeline_cli.main(["--config", "recipes/pipeline-cpu.yaml", "--dry_run", "--max_steps", "2"]) == 0


def test_parse_overrides():
    assert pipeline_cli.parse_overrides(["--max_steps", "5", "--bf16", "--learning_rate=1e-4"]) == {
        "max_steps": "5",
        "bf16": "true",
        "learning_rate": "1e-4",
    }
    with pytest.raises(ValueError, match="expected --FLAG"):
        pipeline_cli.parse_overrides(["max_steps"])
