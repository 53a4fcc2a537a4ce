"""The demo's settings and its recipe file, and a miniature end-to-end demo on a tiny model."""

import json
from pathlib import Path

import yaml

from preftune.cli.demo import DEMO_SETTINGS
from preftune.cli.demo import main as demo_main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo-cpu.yaml"


def test_recipe_matches_demo_settings():
    assert yaml.safe_load(RECIPE.read_text()) == DEMO_SETTINGS


def test_demo_end_to_end_on_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    argv = [
        "--output_dir",
        str(out),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--n_train",
        "16",
        "--n_test",
        "4",
    ]
    argv += ["--max_new_tokens", "4", "--", "--bf16", "false", "--max_steps", "2"]
    assert demo_main(argv) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert results["n_prompts"] == 4 and len(results["samples"]) == 4
    for key in ("pass_rate_before", "pass_rate_after", "likelihood_accuracy_before", "reward_accuracy_after"):
        assert 0.0 <= results[key] <= 1.0
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert (out / "data" / "train.jsonl").read_text().count("\n") == 16
