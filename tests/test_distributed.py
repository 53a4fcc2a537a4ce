"""Two processes with the gloo backend (`accelerate launch --multi_gpu --num_processes 2` on a CPU) train like one
process with the same global batch: same loss trajectory, a loadable adapter, and only rank 0
writes the run's files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PAIRS

WORKER = Path(__file__).with_name("ddp_worker.py")
# Float sums are reduced in another order across 2 processes: equal up to rounding.
LOSS_RTOL = 1e-4


def _dpo_flags(model_dir, data, out, per_device_batch):
    return [
        "dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--splits", "train",
        "--use_peft_lora", "--lora_dropout", "0", "--max_steps", "4", "--output_dir", str(out),
        "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "4",
        "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--per_device_train_batch_size",
        str(per_device_batch), "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0",
    ]  # fmt: skip


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


# `--cpu` would start a single process unless MPI is installed; `--multi_gpu` starts the processes
# with torchrun, and on a machine without a GPU they use the gloo backend.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS * 4) + "\n")
    two, two_precomputed, one = tmp / "two" / "out", tmp / "two-precomputed" / "out", tmp / "one"
    two.parent.mkdir()
    two_precomputed.parent.mkdir()
    _run([*LAUNCH, str(WORKER), *_dpo_flags(tiny_model_dir, data, two, per_device_batch=2)])
    flags = _dpo_flags(tiny_model_dir, data, two_precomputed, per_device_batch=2) + [
        "--precompute_ref_log_probs"
    ]
    _run([*LAUNCH, str(WORKER), *flags])
    _run([sys.executable, "-m", "preftune", *_dpo_flags(tiny_model_dir, data, one, per_device_batch=4)])
    return {"two": two, "two_precomputed": two_precomputed, "one": one, "tiny": tiny_model_dir}


def test_two_processes_match_one_process_loss(runs):
    two, one = _losses(runs["two"]), _losses(runs["one"])
    assert len(two) == len(one) == 4
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    assert two[-1] < two[0]  # and it really trained


def test_reference_precomputed_across_processes_matches(runs):
    # each process scores its shard of the pairs; the gathered log-probs give the same training
    assert _losses(runs["two_precomputed"]) == pytest.approx(_losses(runs["one"]), rel=LOSS_RTOL)


def test_adapter_from_two_processes_loads(runs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["tiny"]), runs["two"])
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) > 0 for p in lora_b)


def test_only_rank_zero_writes_run_files(runs):
    rank0 = (runs["two"].parent / "writes-rank0.txt").read_text().split()
    rank1 = (runs["two"].parent / "writes-rank1.txt").read_text().split()
    assert any(p.endswith("preftune_config.yaml") or ".preftune_config" in p for p in rank0)
    assert any("adapter_config.json" in p for p in rank0)
    # The Trainer saves each process's RNG state in a checkpoint, for an exact resume: that is
    # the one file another rank may write.
    assert [p for p in rank1 if not Path(p).name.startswith("rng_state_1")] == []
