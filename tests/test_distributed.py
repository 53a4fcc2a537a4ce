"""Two processes with the gloo backend (`accelerate launch --multi_gpu --num_processes 2` on a CPU) train like one
process with the same global batch: same loss trajectory, a loadable adapter, and only rank 0
writes the run's files. DPO, SFT and a pipeline (SFT then DPO) under DDP; DPO under FSDP2 with
both LoRA references (the base with the adapter disabled, and a frozen copy of an SFT adapter)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PAIRS

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
# Float sums are reduced in another order across 2 processes: equal up to rounding.
LOSS_RTOL = 1e-4

# Every run: LoRA, 4 steps at a constant learning rate, a loss logged at every step.
TRAINING = {
    "splits": "train", "use_peft_lora": True, "lora_dropout": 0, "max_steps": 4, "logging_steps": 1,
    "eval_strategy": "no", "save_strategy": "no", "learning_rate": 1e-2, "lr_scheduler_type": "constant",
    "report_to": "none", "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
}  # fmt: skip


def _flags(command: str, model, data, out, per_device_batch: int, **values) -> list[str]:
    values = {
        **TRAINING,
        "model_name_or_path": model,
        "dataset_name": data,
        "output_dir": out,
        "per_device_train_batch_size": per_device_batch,
        **values,
    }
    flags = [command]
    for key, value in values.items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def _dpo_flags(model_dir, data, out, per_device_batch):
    # saves a checkpoint at the last step: the one file another rank writes is its RNG state
    return _flags("dpo", model_dir, data, out, per_device_batch, save_strategy="steps", save_steps=4)


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


# `--cpu` would start a single process unless MPI is installed; `--multi_gpu` starts the processes
# with torchrun, and on a machine without a GPU they use the gloo backend.
COMMON_LAUNCH = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
COMMON_LAUNCH += ["--dynamo_backend", "no"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", *COMMON_LAUNCH]
# The repository's FSDP2 recipe, in 2 processes and fp32 (no bf16 on this CPU); preftune keeps FSDP
# on the CPU, where accelerate alone would fall back to DDP (preftune.training.distributed).
FSDP_CONFIG = REPO / "recipes" / "accelerate" / "fsdp.yaml"
FSDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
FSDP_LAUNCH += COMMON_LAUNCH


def _run(command: list[str], **env: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), **env}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _launched(tmp: Path, name: str) -> Path:
    """The output folder of a launched run, in a folder of its own (for the writes-rank files)."""
    (tmp / name).mkdir()
    return tmp / name / "out"


def _rank_writes(out: Path, rank: int) -> list[str]:
    return (out.parent / f"writes-rank{rank}.txt").read_text().split()


def _assert_adapter_loads_and_trained(base: Path, adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) > 0 for p in lora_b)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS * 4) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data):
    tmp = tmp_path_factory.mktemp("ddp")
    two, two_precomputed, one = _launched(tmp, "two"), _launched(tmp, "two-precomputed"), tmp / "one"
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
    _assert_adapter_loads_and_trained(runs["tiny"], runs["two"])


def test_only_rank_zero_writes_run_files(runs):
    rank0, rank1 = _rank_writes(runs["two"], 0), _rank_writes(runs["two"], 1)
    assert any(p.endswith("preftune_config.yaml") or ".preftune_config" in p for p in rank0)
    assert any("adapter_config.json" in p for p in rank0)
    # The Trainer saves each process's RNG state in a checkpoint, for an exact resume: that is
    # the one file another rank may write.
    assert [p for p in rank1 if not Path(p).name.startswith("rng_state_1")] == []


# --------------------------------------------------------------------------- SFT and a pipeline


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, tiny_model_dir, data):
    """`preftune pipeline` (SFT, then DPO from the SFT adapter) in 2 processes; SFT in 1 process."""
    tmp = tmp_path_factory.mktemp("pipeline")
    recipe = {
        **TRAINING,
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(data),
        "per_device_train_batch_size": 2,
        "stages": [
            {"name": "sft", "command": "sft"},
            {"name": "dpo", "command": "dpo", "args": {"max_steps": 2}},
        ],
    }
    config = tmp / "pipeline.yaml"
    config.write_text(yaml.safe_dump(recipe))
    two, one = _launched(tmp, "two"), tmp / "one"
    output = _run([*LAUNCH, str(WORKER), "pipeline", "--config", str(config), "--output_dir", str(two)])
    _run([sys.executable, "-m", "preftune", *_flags("sft", tiny_model_dir, data, one, per_device_batch=4)])
    return {"two": two, "one": one, "output": output}


def test_sft_in_two_processes_matches_one_process_loss(pipeline_runs):
    two, one = _losses(pipeline_runs["two"] / "sft"), _losses(pipeline_runs["one"])
    assert len(two) == len(one) == 4
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    assert two[-1] < two[0]


def test_pipeline_in_two_processes_runs_both_stages_and_writes_from_rank_zero_only(
    pipeline_runs, tiny_model_dir
):
    two = pipeline_runs["two"]
    for stage in ("sft", "dpo"):
        assert (two / stage / "preftune_stage_done.json").is_file()
        assert any(p.startswith(f"{stage}/") and "adapter_config.json" in p for p in _rank_writes(two, 0))
    assert _rank_writes(two, 1) == []
    assert pipeline_runs["output"].count("preftune pipeline") == 1  # one summary, not one per process
    assert "reference_adapter" in pipeline_runs["output"]  # DPO: the SFT adapter against its frozen copy
    _assert_adapter_loads_and_trained(tiny_model_dir, two / "sft")
    _assert_adapter_loads_and_trained(tiny_model_dir, two / "dpo")


# --------------------------------------------------------------------------- FSDP


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, runs, pipeline_runs, data):
    """DPO under FSDP2 in 2 processes: from the base model (reference: adapter disabled), and from
    the pipeline's SFT adapter (reference: its frozen copy), with that run in 1 process too."""
    tmp = tmp_path_factory.mktemp("fsdp")
    base, adapter = _launched(tmp, "base"), _launched(tmp, "adapter")
    sft_adapter, one_adapter = pipeline_runs["two"] / "sft", tmp / "one-adapter"
    _run([*FSDP_LAUNCH, str(WORKER), *_dpo_flags(runs["tiny"], data, base, per_device_batch=2)])
    flags = _flags("dpo", sft_adapter, data, adapter, per_device_batch=2)
    _run([*FSDP_LAUNCH, str(WORKER), *flags], PREFTUNE_TEST_DUMP_REFERENCE="1")
    one_flags = _flags("dpo", sft_adapter, data, one_adapter, per_device_batch=4)
    _run([sys.executable, "-m", "preftune", *one_flags])
    return {"base": base, "adapter": adapter, "one_adapter": one_adapter, "sft_adapter": sft_adapter}


def test_fsdp_with_the_adapter_disabled_reference_matches_one_process(fsdp_runs, runs):
    base = fsdp_runs["base"]
    assert (base / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()  # it really ran sharded
    assert _losses(base) == pytest.approx(_losses(runs["one"]), rel=LOSS_RTOL)
    _assert_adapter_loads_and_trained(runs["tiny"], base)  # gathered from the shards, then saved
    # Another rank writes only its shards of the checkpoint (weights, optimizer, RNG state).
    assert [p for p in _rank_writes(base, 1) if not p.startswith("checkpoint-4/")] == []


def test_fsdp_with_a_frozen_reference_adapter_matches_one_process(fsdp_runs):
    two, one = _losses(fsdp_runs["adapter"]), _losses(fsdp_runs["one_adapter"])
    assert len(two) == 4 and two == pytest.approx(one, rel=LOSS_RTOL)
    _assert_reference_is_unchanged_in_both_processes(fsdp_runs["adapter"], fsdp_runs["sft_adapter"])


def _assert_reference_is_unchanged_in_both_processes(out: Path, sft_adapter: Path) -> None:
    """The reference stayed the SFT adapter it was loaded from, the same in both processes."""
    from safetensors.torch import load_file

    sft = load_file(sft_adapter / "adapter_model.safetensors")
    for rank in (0, 1):
        reference = load_file(out.parent / f"reference-rank{rank}.safetensors")
        assert reference.keys() == sft.keys()
        assert all((reference[k] == sft[k]).all() for k in sft)


# --------------------------------------------------------------------------- DeepSpeed ZeRO-3

# The repository's ZeRO-3 recipe in 2 processes, fp32, on DeepSpeed's CPU accelerator (gloo without
# oneCCL). deepspeed is optional (pip install 'preftune[deepspeed]'); its first run on a machine
# compiles DeepSpeed's shared-memory communication op (a minute or two, then cached).
ZERO3_CONFIG = REPO / "recipes" / "accelerate" / "deepspeed_zero3.yaml"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("reference", ["adapter_disabled", "reference_adapter"])
def test_deepspeed_zero3_matches_one_process(reference, runs, fsdp_runs, data, tmp_path):
    out = _launched(tmp_path, "zero3")
    if reference == "adapter_disabled":  # from the base model; compared with the DDP test's single process
        flags, one = _dpo_flags(runs["tiny"], data, out, per_device_batch=2), runs["one"]
    else:  # from the SFT adapter; compared with the FSDP test's single process
        flags = _flags("dpo", fsdp_runs["sft_adapter"], data, out, per_device_batch=2)
        one = fsdp_runs["one_adapter"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3_CONFIG)]
    _run(
        [*launch, *COMMON_LAUNCH, str(WORKER), *flags], DS_ACCELERATOR="cpu", PREFTUNE_TEST_DUMP_REFERENCE="1"
    )
    assert yaml.safe_load((out / "preftune_config.yaml").read_text())["preference"]["chunked_logps"] is False
    assert _losses(out) == pytest.approx(_losses(one), rel=LOSS_RTOL)
    _assert_adapter_loads_and_trained(runs["tiny"], out)  # gathered from the partitions, then saved
    # Another rank writes only its partitions of the checkpoint.
    assert [p for p in _rank_writes(out, 1) if not p.startswith("checkpoint-4/")] == []
    if reference == "reference_adapter":
        _assert_reference_is_unchanged_in_both_processes(out, fsdp_runs["sft_adapter"])
