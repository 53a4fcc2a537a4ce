"""Training end to end on a tiny random Llama: the loss goes down, what is saved reloads to the same
model, resume continues where it stopped, metrics are logged, the run folder is complete, and
precomputed reference log-probs give the same numbers as on-the-fly ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PAIRS, dpo_args, run_capturing
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from preftune.config import DataArguments, ModelArguments, PreferenceArguments
from preftune.models.prepare import REFERENCE_ADAPTER
from preftune.training import common, dpo
from preftune.training.logprobs import batch_logps

ARG_TYPES = (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments)
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


# --------------------------------------------------------------------------- helpers


def collate_all(trainer) -> dict[str, torch.Tensor]:
    """Every training pair as one fixed batch (without precomputed reference values)."""
    features = [
        {k: f[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for f in trainer.train_dataset
    ]
    return trainer.data_collator(features)


def batch_loss(trainer, batch) -> float:
    """The preference loss of the current policy on `batch`, in eval mode (no dropout), no grad."""
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        loss, _, _ = trainer.prediction_step(model, batch, prediction_loss_only=True)
    finally:
        model.train(was_training)
    return loss.item()


@torch.no_grad()
def logps(model, batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return batch_logps(model, batch).logps
    finally:
        model.train(was_training)


def load_base(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


class StepRecorder(TrainerCallback):
    """The global step at the start of every optimizer step."""

    def __init__(self):
        self.steps: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, data_file):
    """One LoRA DPO run with evaluation and a final checkpoint, shared by the tests below."""
    out = tmp_path_factory.mktemp("lora-run")
    start = {}

    def before_training(trainer, _prepared):
        start["batch"] = collate_all(trainer)
        start["loss"] = batch_loss(trainer, start["batch"])

    args = dpo_args(
        tiny_model_dir, data_file, out,
        "--use_peft_lora",
        "--test_size", "2",
        "--max_steps", "6",
        "--learning_rate", "1e-2",
        "--eval_strategy", "steps", "--eval_steps", "3",
        "--save_strategy", "steps", "--save_steps", "6",
    )  # fmt: skip
    result, trainer, _ = run_capturing(args, on_build=before_training)
    return {"out": out, "result": result, "trainer": trainer, **start}


# --------------------------------------------------------------------------- the loss goes down


def test_dpo_steps_lower_the_loss_on_a_fixed_batch(lora_run):
    # A new LoRA starts as the reference: every log-ratio is 0 and the sigmoid loss is log 2.
    assert lora_run["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    after = batch_loss(lora_run["trainer"], lora_run["batch"])
    assert after < lora_run["loss"] - 0.05, (lora_run["loss"], after)


def test_ipo_steps_lower_the_loss_on_a_fixed_batch(tiny_model_dir, data_file, tmp_path):
    start = {}

    def before_training(trainer, _prepared):
        start["batch"] = collate_all(trainer)
        start["loss"] = batch_loss(trainer, start["batch"])

    args = dpo_args(
        tiny_model_dir, data_file, tmp_path / "ipo",
        "--use_peft_lora", "--loss_type", "ipo", "--beta", "0.5",
        "--per_device_train_batch_size", "8", "--max_steps", "4", "--learning_rate", "1e-2",
    )  # fmt: skip
    _, trainer, _ = run_capturing(args, on_build=before_training)
    # IPO at log-ratio 0: (0 - 1 / (2 tau))^2 = 1 with tau (--beta) 0.5.
    assert start["loss"] == pytest.approx(1.0, abs=1e-5)
    after = batch_loss(trainer, start["batch"])
    assert after < 0.8 * start["loss"], (start["loss"], after)


# --------------------------------------------------------------------------- saved = in memory


def test_saved_adapter_reloads_to_the_same_log_probs(lora_run, tiny_model_dir):
    from peft import PeftModel

    batch = lora_run["batch"]
    in_memory = logps(lora_run["trainer"].model, batch)
    reloaded = PeftModel.from_pretrained(load_base(tiny_model_dir), str(lora_run["out"])).eval()
    torch.testing.assert_close(logps(reloaded, batch), in_memory, rtol=0, atol=1e-5)
    # ... and that is the trained policy, not the base model.
    assert (logps(load_base(tiny_model_dir), batch) - in_memory).abs().max() > 1e-2


# --------------------------------------------------------------------------- metrics and run folder


def test_reward_metrics_are_logged_for_train_and_eval(lora_run):
    history = trainer_state(lora_run["out"] / "checkpoint-6")["log_history"]
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in train] == list(range(1, 7))
    assert [h["step"] for h in evals] == [3, 6]
    for entry in train:
        missing = [m for m in METRICS if m not in entry]
        assert not missing, f"step {entry['step']} lacks {missing}"
    for entry in evals:
        missing = [f"eval_{m}" for m in METRICS if f"eval_{m}" not in entry]
        assert not missing, f"eval at step {entry['step']} lacks {missing}"
    for entry in train + evals:
        p = "eval_" if "eval_loss" in entry else ""
        assert 0.0 <= entry[f"{p}rewards/accuracies"] <= 1.0
        margin = entry[f"{p}rewards/chosen"] - entry[f"{p}rewards/rejected"]
        assert entry[f"{p}rewards/margins"] == pytest.approx(margin, abs=1e-4)
        assert entry[f"{p}logps/chosen"] < 0 and entry[f"{p}logps/rejected"] < 0
    # The returned eval metrics are those of the final evaluation.
    final = lora_run["result"].eval_metrics
    assert all(f"eval_{m}" in final for m in METRICS)


def test_run_folder_is_complete(lora_run, data_file):
    out = lora_run["out"]
    config = yaml.safe_load((out / common.RUN_CONFIG_FILE).read_text())
    assert list(config) == ["model", "data", "preference", "training"]
    assert config["model"]["use_peft_lora"] is True
    assert config["data"]["dataset_name"] == str(data_file)
    assert config["preference"]["beta"] == 0.1 and config["preference"]["loss_type"] == "sigmoid"
    assert config["training"]["max_steps"] == 6 and config["training"]["learning_rate"] == 1e-2

    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists(), "a LoRA run saves the adapter, not the whole model"
    assert not (out / REFERENCE_ADAPTER).exists()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.pad_token is not None
    assert len(tokenizer) == len(lora_run["trainer"].processing_class)


# --------------------------------------------------------------------------- resume


def test_resume_continues_and_matches_an_uninterrupted_run(tiny_model_dir, data_file, tmp_path):
    """4 steps + resume to 6 == 6 steps straight.

    The LR schedule is constant: with the default linear decay the interrupted run's first 4 steps are
    scheduled for max_steps=4, so its learning rates (and weights) legitimately differ from a 6-step run's.
    Data order and dropout are reproducible: the sampler is seeded per epoch and the checkpoint holds the
    RNG states.
    """
    common = ("--use_peft_lora", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant")
    resumed_dir, straight_dir = tmp_path / "resumed", tmp_path / "straight"

    first = dpo_args(
        tiny_model_dir, data_file, resumed_dir, *common,
        "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
    )  # fmt: skip
    dpo.run_dpo(*first)
    assert trainer_state(resumed_dir / "checkpoint-4")["global_step"] == 4
    history_4 = trainer_state(resumed_dir / "checkpoint-4")["log_history"]

    recorder = StepRecorder()
    second = dpo_args(
        tiny_model_dir, data_file, resumed_dir, *common,
        "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
        "--resume_from_checkpoint", "true",
    )  # fmt: skip
    run_capturing(second, on_build=lambda trainer, _: trainer.add_callback(recorder))
    assert recorder.steps == [4, 5], "the resumed run must start at step 4 and run steps 5 and 6 only"
    state = trainer_state(resumed_dir / "checkpoint-6")
    assert state["global_step"] == 6
    history = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[:4] == [h for h in history_4 if "loss" in h], "the log history must continue, not restart"

    straight = dpo_args(tiny_model_dir, data_file, straight_dir, *common, "--max_steps", "6")
    _, straight_trainer, _ = run_capturing(straight)

    straight_losses = [h["loss"] for h in straight_trainer.state.log_history if "loss" in h]
    assert [h["loss"] for h in history] == pytest.approx(straight_losses, abs=1e-4)
    a = load_file(str(resumed_dir / "adapter_model.safetensors"))
    b = load_file(str(straight_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_model_dir, data_file, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    args = dpo_args(tiny_model_dir, data_file, empty, "--use_peft_lora", "--resume_from_checkpoint", "true")
    with pytest.raises(ValueError, match="no checkpoint"):
        dpo.run_dpo(*args)


# --------------------------------------------------------------------------- precomputed reference


@pytest.mark.parametrize(
    "lora_dropout",
    [
        "0",
        "0.05",
    ],
    ids=["no-dropout", "default-dropout"],
)
def test_precomputed_reference_gives_the_same_metrics(lora_dropout, tiny_model_dir, data_file, tmp_path):
    common = (
        "--use_peft_lora", "--lora_dropout", lora_dropout,
        "--test_size", "2", "--do_eval", "true", "--learning_rate", "1e-2", "--max_steps", "2",
    )  # fmt: skip
    on_the_fly, otf_trainer, _ = run_capturing(dpo_args(tiny_model_dir, data_file, tmp_path / "otf", *common))
    precomputed, pre_trainer, _ = run_capturing(
        dpo_args(tiny_model_dir, data_file, tmp_path / "pre", *common, "--precompute_ref_log_probs", "true")
    )
    assert precomputed.reference_mode == "adapter_disabled"
    # The reference values really were precomputed and travelled with the data.
    assert all("ref_chosen_logps" in f and "ref_rejected_logps" in f for f in pre_trainer.train_dataset)
    assert all("ref_chosen_logps" in f for f in pre_trainer.eval_dataset)
    assert not any("ref_chosen_logps" in f for f in otf_trainer.train_dataset)

    def comparable(metrics):
        return {
            k: v
            for k, v in metrics.items()
            if k.startswith("eval_") and "runtime" not in k and "per_second" not in k
        }

    expected = comparable(on_the_fly.eval_metrics)
    assert {f"eval_{m}" for m in METRICS} | {"eval_loss"} <= expected.keys()
    assert comparable(precomputed.eval_metrics) == pytest.approx(expected, abs=1e-4)
    train_losses = [
        [h["loss"] for h in t.state.log_history if "loss" in h] for t in (otf_trainer, pre_trainer)
    ]
    assert train_losses[1] == pytest.approx(train_losses[0], abs=1e-4)


def test_reference_log_probs_are_cached_and_reused(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A second run with the same pairs and reference reads the first run's reference log-probs."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    common = ("--use_peft_lora", "--precompute_ref_log_probs", "true", "--max_steps", "1")
    _, first, _ = run_capturing(dpo_args(tiny_model_dir, data_file, tmp_path / "a", *common))
    files = list((tmp_path / "cache" / "reference-logps").glob("*.json"))
    assert len(files) == 1
    cached = json.loads(files[0].read_text())
    assert cached["ref_chosen_logps"] == [p["ref_chosen_logps"] for p in first.train_dataset]
    # mark the file: if the next run reads it, its pairs carry the marked values
    cached["ref_chosen_logps"] = [v + 1.0 for v in cached["ref_chosen_logps"]]
    files[0].write_text(json.dumps(cached))
    _, second, _ = run_capturing(dpo_args(tiny_model_dir, data_file, tmp_path / "b", *common))
    assert [p["ref_chosen_logps"] for p in second.train_dataset] == cached["ref_chosen_logps"]
    # other pairs (shorter max length) or another reference (IPO's per-token means, another base
    # model) get their own file
    run_capturing(dpo_args(tiny_model_dir, data_file, tmp_path / "c", *common, "--max_seq_length", "24"))
    run_capturing(dpo_args(tiny_model_dir, data_file, tmp_path / "d", *common, "--loss_type", "ipo"))
    assert len(list((tmp_path / "cache" / "reference-logps").glob("*.json"))) == 3
    _, off, _ = run_capturing(
        dpo_args(tiny_model_dir, data_file, tmp_path / "e", *common, "--cache_ref_log_probs", "false")
    )
    assert [p["ref_chosen_logps"] for p in off.train_dataset] == pytest.approx(
        [p["ref_chosen_logps"] for p in first.train_dataset], abs=1e-5
    )


def test_reference_fingerprint_follows_the_weights():
    from conftest import make_tiny_llama
    from peft import LoraConfig, get_peft_model

    from preftune.training.reference_cache import reference_weights_fingerprint

    def lora(seed):
        return get_peft_model(make_tiny_llama(97, seed=seed), LoraConfig(r=4, target_modules="all-linear"))

    a = reference_weights_fingerprint(lora(0), "adapter_disabled")
    assert a == reference_weights_fingerprint(lora(0), "adapter_disabled")
    assert a != reference_weights_fingerprint(lora(1), "adapter_disabled")
    trained = lora(0)
    with torch.no_grad():  # the trainable adapter changes: the reference does not
        next(p for n, p in trained.named_parameters() if "lora_B" in n).add_(1.0)
    assert reference_weights_fingerprint(trained, "adapter_disabled") == a


# --------------------------------------------------------------------------- shared-prompt rows


def test_shared_prompt_rows_train_like_padded_rows(tiny_model_dir, data_file, tmp_path):
    """The default engine (shared-prompt rows attended pair by pair, fused LoRA forward), the masked
    shared-prompt rows, and the plainest path (two padded rows per pair, PEFT's LoRA forward) give
    the same losses and metrics."""
    from preftune.training.batching import PairCollator, SharedPromptCollator

    common = (
        "--use_peft_lora", "--lora_dropout", "0", "--per_device_train_batch_size", "3",
        "--test_size", "2", "--do_eval", "true", "--learning_rate", "1e-2", "--max_steps", "3",
    )  # fmt: skip
    variants = {
        "default": (),
        "masked": ("--pair_attention", "false"),
        "plain": ("--share_prompt", "false", "--fused_lora", "false"),
    }
    runs = {
        name: run_capturing(dpo_args(tiny_model_dir, data_file, tmp_path / name, *common, *flags))
        for name, flags in variants.items()
    }
    assert isinstance(runs["default"][1].data_collator, SharedPromptCollator)
    assert runs["default"][1].data_collator.attention_ratio == 0.0  # one row per batch
    assert isinstance(runs["plain"][1].data_collator, PairCollator)

    def history(trainer):
        return [
            {k: v for k, v in h.items() if k in {"loss", "grad_norm", *METRICS}}
            for h in trainer.state.log_history
            if "loss" in h
        ]

    plain, plain_trainer, _ = runs["plain"]
    expected = history(plain_trainer)
    assert len(expected) == 3
    for name in ("default", "masked"):
        result, trainer, _ = runs[name]
        for got, want in zip(history(trainer), expected, strict=True):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4), name
        assert result.eval_metrics["eval_loss"] == pytest.approx(plain.eval_metrics["eval_loss"], abs=1e-4)


# --------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize(
    "use_reentrant",
    [
        False,
        True,
    ],
)
def test_gradient_checkpointing_uses_the_use_reentrant_flag(
    use_reentrant, tiny_model_dir, data_file, tmp_path
):
    args = dpo_args(
        tiny_model_dir, data_file, tmp_path / "gc",
        "--use_peft_lora", "--max_steps", "1",
        "--gradient_checkpointing", "true", "--use_reentrant", str(use_reentrant).lower(),
    )  # fmt: skip
    result, trainer, _ = run_capturing(args)
    assert torch.isfinite(torch.tensor(result.train_metrics["train_loss"]))
    funcs = [
        m._gradient_checkpointing_func
        for m in trainer.model.modules()
        if getattr(m, "gradient_checkpointing", False)
    ]
    assert funcs, "gradient checkpointing is not enabled on any layer"
    assert all(f.keywords.get("use_reentrant") is use_reentrant for f in funcs), [f.keywords for f in funcs]


def test_disable_dropout_makes_the_policy_deterministic():
    from conftest import make_tiny_llama
    from peft import LoraConfig, get_peft_model

    from preftune.models.prepare import disable_dropout

    model = get_peft_model(
        make_tiny_llama(97),
        LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear", init_lora_weights=False),
    ).train()
    ids = torch.randint(3, 97, (2, 12))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout draws
    assert disable_dropout(model) > 0
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bf16_lora_runs_store_the_frozen_linear_weights_in_bf16(tiny_model_dir, data_file, tmp_path):
    result, trainer, _ = run_capturing(
        dpo_args(
            tiny_model_dir,
            data_file,
            tmp_path / "bf16",
            "--use_peft_lora",
            "--bf16",
            "true",
            "--use_cpu",
            "true",
        )
    )
    params = dict(trainer.model.named_parameters())
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}  # LoRA, for AdamW
    frozen_linear = {n: p.dtype for n, p in params.items() if "base_layer" in n or "lm_head" in n}
    assert frozen_linear and set(frozen_linear.values()) == {torch.bfloat16}
    assert any("lm_head" in n for n in frozen_linear)  # its own bf16 copy (untied)
    others = {n: p.dtype for n, p in params.items() if n not in frozen_linear and not p.requires_grad}
    assert others and set(others.values()) == {torch.float32}  # embeddings, norms
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_cpu_training_steps_release_the_heap_between_layers(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """On a CPU a training step also hands the heap's free pages back after the hooked decoder
    layers in each forward pass and before them in the backward pass; no number changes, and the
    hooks are gone after the step (generation does not pay for them)."""
    from preftune.training import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "release_free_heap", lambda: calls.append(1) or True)
    counts, losses = {}, {}
    for every in (1, 1000):  # every layer; none of the tiny model's
        monkeypatch.setattr(trainer_module, "HEAP_RELEASE_EVERY_LAYERS", every)
        calls.clear()
        args = dpo_args(
            tiny_model_dir, data_file, tmp_path / f"every-{every}",
            "--use_peft_lora", "--max_steps", "2", "--gradient_checkpointing", "true",
        )  # fmt: skip
        _, trainer, _ = run_capturing(args)
        counts[every] = len(calls)
        losses[every] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    layers = trainer.model.get_base_model().config.num_hidden_layers
    # per step and layer: the reference forward, the policy forward, the backward
    assert counts[1] - counts[1000] == 2 * 3 * layers
    assert losses[1] == losses[1000] and len(losses[1]) == 2
    calls.clear()
    with torch.no_grad():
        trainer.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls == []


def test_paired_checkpointing_trains_exactly_like_per_layer_checkpointing(
    tiny_model_dir, data_file, tmp_path, monkeypatch, paired_steps
):
    """The default pairs the checkpointed decoder layers in each training step
    (preftune.training.paired_checkpointing); losses and gradient norms are the same, bit for bit,
    dropout on, as with every layer keeping its input (--paired_checkpointing false)."""
    from preftune.training import paired_checkpointing as paired_module

    second_layer_runs = []
    second_layer = paired_module._SecondLayer

    class CountingSecondLayer(second_layer):
        @staticmethod
        def forward(ctx, *args):
            second_layer_runs.append(1)
            return second_layer.forward(ctx, *args)

    monkeypatch.setattr(paired_module, "_SecondLayer", CountingSecondLayer)
    histories = {}
    for paired in ("true", "false"):
        args = dpo_args(
            tiny_model_dir, data_file, tmp_path / f"paired-{paired}",
            "--use_peft_lora", "--lora_dropout", "0.1", "--disable_dropout", "false",
            "--max_steps", "2", "--learning_rate", "1e-2", "--gradient_checkpointing", "true",
            "--paired_checkpointing", paired,
        )  # fmt: skip
        _, trainer, _ = run_capturing(args)
        histories[paired] = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    assert paired_steps == [1, 1]  # the tiny model's 2 layers, in each step of the paired run
    assert len(second_layer_runs) == 2  # the second layer took the paired path in both steps
    assert len(histories["true"]) == 2
    assert histories["true"] == histories["false"]
