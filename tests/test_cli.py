"""The command line: config files + flag overrides, helpful errors for typos, and `python -m preftune`
as a user runs it (exit codes, one clear message, no tracebacks), plus the shipped recipes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PAIRS
from transformers import TrainingArguments

from preftune.cli.arguments import UsageError, parse_command_args
from preftune.cli.main import DPO_DEFAULTS, training_defaults
from preftune.config import DataArguments, ModelArguments, PreferenceArguments

ARG_TYPES = (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def parse(argv: list[str]):
    return parse_command_args(ARG_TYPES, argv, defaults=DPO_DEFAULTS, prog="preftune dpo")


# --------------------------------------------------------------------------- config files


CONFIG = {
    "beta": 0.3,
    "loss_type": "ipo",
    "lora_r": 4,
    "use_peft_lora": True,
    "learning_rate": 1e-4,
    "report_to": ["none"],
    "output_dir": "runs/from-config",
}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("form", ["separate", "equals"])
def test_config_file_then_flags_override(suffix, form, tmp_path):
    config = tmp_path / f"run{suffix}"
    config.write_text(json.dumps(CONFIG) if suffix == ".json" else yaml.safe_dump(CONFIG))
    config_flag = ["--config", str(config)] if form == "separate" else [f"--config={config}"]
    model, data, pref, training = parse([*config_flag, "--beta", "0.2"])
    assert pref.beta == 0.2  # the flag wins over the file
    assert pref.loss_type == "ipo"  # the file wins over the default
    assert model.lora_r == 4 and model.use_peft_lora is True
    assert training.learning_rate == 1e-4  # the file wins over preftune's command default (5e-5)
    assert training.output_dir == "runs/from-config"
    assert training.report_to == [] or training.report_to in ("none", ["none"])
    assert training.logging_steps == DPO_DEFAULTS["logging_steps"]  # untouched defaults stay
    # The flag order does not matter: a flag before --config still overrides the file.
    _, _, pref, _ = parse(["--beta", "0.2", *config_flag])
    assert pref.beta == 0.2


def test_defaults_without_config():
    model, data, pref, training = parse([])
    assert pref.beta == 0.1 and pref.loss_type == "sigmoid"
    assert model.use_peft_lora is False and model.lora_r == 16
    assert training.learning_rate == DPO_DEFAULTS["learning_rate"]
    assert training.per_device_train_batch_size == DPO_DEFAULTS["per_device_train_batch_size"]


def test_unknown_config_key_names_the_file_and_key(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"bta": 0.3, "loss_type": "ipo"}))
    with pytest.raises(UsageError) as err:
        parse(["--config", str(config)])
    message = str(err.value)
    assert str(config) in message
    assert "'bta'" in message
    assert "did you mean beta" in message


def test_unknown_flag_suggests_the_close_one():
    with pytest.raises(UsageError, match=r"unknown flag --bta.*did you mean --beta\?"):
        parse(["--bta", "0.2"])


def test_missing_or_malformed_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UsageError, match=re.escape(str(missing))):
        parse(["--config", str(missing)])
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- beta\n- 0.3\n")
    with pytest.raises(UsageError, match="mapping"):
        parse(["--config", str(not_a_mapping)])
    broken = tmp_path / "broken.json"
    broken.write_text("{beta: ")
    with pytest.raises(UsageError, match=re.escape(str(broken))):
        parse(["--config", str(broken)])
    with pytest.raises(UsageError, match="needs a file"):
        parse(["--config"])


# --------------------------------------------------------------------------- recipes


def _is_single_command_recipe(path: Path) -> bool:
    """Multi-stage pipeline recipes (a `stages` list) are parsed by the pipeline's own tests, and
    recipes/accelerate/ holds accelerate's launch configs, not preftune's."""
    config = yaml.safe_load(path.read_text()) or {}
    return "stages" not in config and "distributed_type" not in config


RECIPE_FILES = (
    sorted(p for p in RECIPES.glob("**/*.y*ml") if _is_single_command_recipe(p)) if RECIPES.is_dir() else []
)
# Recipes known not to parse, with the reason (strict: the test fails once they are fixed, so the mark goes).
KNOWN_BROKEN: dict[str, str] = {}


def _recipe_param(path: Path):
    name = path.relative_to(RECIPES).as_posix()
    marks = (
        [pytest.mark.xfail(strict=True, raises=UsageError, reason=KNOWN_BROKEN[name])]
        if name in KNOWN_BROKEN
        else []
    )
    return pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize(
    "recipe",
    [_recipe_param(p) for p in RECIPE_FILES]
    or [pytest.param(None, id="none", marks=pytest.mark.skip(reason=f"no YAML recipes under {RECIPES}"))],
)
def test_recipe_parses(recipe):
    # The defaults `preftune dpo` itself uses (on a CPU-only machine they add use_cpu, so bf16 recipes parse).
    model, data, pref, training = parse_command_args(
        ARG_TYPES, ["--config", str(recipe)], defaults=training_defaults(), prog="preftune dpo"
    )
    config = yaml.safe_load(recipe.read_text())
    assert pref.loss_type in ("sigmoid", "ipo", "hinge", "kto_pair", "robust")
    assert training.output_dir == config.get("output_dir", training.output_dir)
    for key in ("model_name_or_path", "dataset_name", "beta", "lora_r", "use_peft_lora"):
        if key in config:
            parsed = next(getattr(a, key) for a in (model, data, pref) if hasattr(a, key))
            assert parsed == config[key], key


# --------------------------------------------------------------------------- `python -m preftune`


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(COLUMNS="80", LINES="40", NO_COLOR="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PREFTUNE_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_model_dir):
    """Run every `python -m preftune ...` case at once (each pays ~5 s of imports), keyed by case name.

    Only what must be seen from outside runs here; the rest goes through `main()` in-process (below).
    """
    folder = tmp_path_factory.mktemp("cli")
    pairs = folder / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    unknown_format = folder / "columns_a_b.jsonl"
    unknown_format.write_text('{"a": "x", "b": "y"}\n{"a": "z", "b": "w"}\n')
    paths = {
        "missing_data": folder / "no-such-pairs.jsonl",
        "unknown_format": unknown_format,
        "missing_model": folder / "no-such-model",
    }
    common = [
        "--output_dir",
        str(folder / "out"),
        "--report_to",
        "none",
        "--use_peft_lora",
        "--max_steps",
        "1",
    ]
    cases = {
        "help": ["--help"],
        "no_args": [],
        "unknown_command": ["dpoo"],
        "bad_flag": ["dpo", "--bta", "0.2"],
        "missing_data": ["dpo", "--model_name_or_path", str(tiny_model_dir),
                         "--dataset_name", str(paths["missing_data"]), *common],
        "unknown_format": ["dpo", "--model_name_or_path", str(tiny_model_dir),
                           "--dataset_name", str(unknown_format), *common],
        "missing_model": ["dpo", "--model_name_or_path", str(paths["missing_model"]),
                          "--dataset_name", str(pairs), *common],
    }  # fmt: skip
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "preftune", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_cli_env(),
            cwd=folder,
        )
        for name, argv in cases.items()
    }
    results = {}
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    results["paths"] = paths
    return results


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


def one_paragraph(text: str) -> str:
    """The output with line wrapping undone, to check what it says regardless of the terminal width."""
    return " ".join(text.split())


@pytest.mark.parametrize("case", ["bad_flag", "missing_data", "unknown_format", "missing_model"])
def test_cli_errors_exit_2_without_traceback(cli, case):
    result = cli[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert error_lines(result), result.stderr
    # bitsandbytes is imported early (preftune/lazy_compile.py), after the noise filters are set
    assert "kernels-community" not in result.stderr


def test_cli_bad_flag_message(cli):
    text = one_paragraph(cli["bad_flag"].stderr)
    assert "preftune dpo: error: unknown flag --bta (did you mean --beta?)" in text
    assert "preftune dpo --help" in text


def test_cli_missing_dataset_names_the_path(cli):
    text = one_paragraph(cli["missing_data"].stderr)
    assert str(cli["paths"]["missing_data"]) in text
    assert "not found" in text


def test_cli_unknown_data_format_names_the_file_and_the_formats(cli):
    text = one_paragraph(cli["unknown_format"].stderr)
    assert str(cli["paths"]["unknown_format"]) in text
    assert "['a', 'b']" in text
    for fmt in ("conversational", "explicit", "sharegpt", "hh"):
        assert fmt in text


def test_cli_missing_model_names_the_path(cli):
    text = one_paragraph(cli["missing_model"].stderr)
    assert str(cli["paths"]["missing_model"]) in text
    assert "--model_name_or_path" in text


@pytest.mark.parametrize("case", ["bad_flag", "missing_data", "unknown_format", "missing_model"])
def test_cli_error_is_one_line(cli, case):
    stderr = cli[case].stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "error:" in line)
    # Everything after the error line would be its wrapped continuation.
    assert lines[start + 1 :] == [], stderr


def test_cli_help(cli):
    top = cli["help"]
    assert top.returncode == 0
    for command in ("dpo", "demo", "chat"):
        assert re.search(rf"^\s+{command}\s", top.stdout, re.M), top.stdout
    assert cli["no_args"].returncode == 2 and "usage: preftune COMMAND" in cli["no_args"].stdout
    assert cli["unknown_command"].returncode == 2
    assert "dpoo" in cli["unknown_command"].stderr


# --------------------------------------------------------------------------- main() in-process


def run_main(argv: list[str]) -> int:
    from preftune.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_dpo_help_lists_the_flags(capsys):
    assert run_main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--config",
        "--beta",
        "--loss_type",
        "--use_peft_lora",
        "--use_4bit_quantization",
        "--per_device_train_batch_size",
        "--model_name_or_path",
        "--dataset_name",
        "--precompute_ref_log_probs",
    ):
        assert flag in out, flag


def test_bad_flag_value_exits_2_naming_the_flag(capsys):
    assert run_main(["dpo", "--beta", "abc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any("--beta" in line and "abc" in line for line in err.splitlines() if "error:" in line), err[
        -500:
    ]


def test_bad_flag_value_is_one_line(capsys):
    run_main(["dpo", "--beta", "abc"])
    err = capsys.readouterr().err
    assert "usage:" not in err, err[:300]
