"""Evaluate a tuned run against its reference: held-out pairs, generations and judges.

`preftune eval --model RUN_DIR` runs `run_eval`, which
  1. loads the run (`load_run`): ONE base model, the tuned adapter on it, and the reference that
     training used: the base with the adapter disabled, or, for a run trained from an SFT adapter,
     that SFT adapter (loaded as a second adapter on the same base);
  2. reads the held-out split exactly as training did (`load_held_out`: dataset, splits, test_size
     and seed, chat template and max lengths from the run's preftune_config.yaml);
  3. scores the held-out pairs with the tuned model and with the reference (`score_held_out_pairs`):
     the implicit reward beta * (log pi - log ref) of each reply, its accuracy and margins, and the
     reference's own log-prob margins (the "before");
  4. generates replies to the held-out prompts with both models (greedy, or seeded sampling) and has
     every judge compare them (`evaluate_run`): win / tie / loss, win rate, 95% interval, lengths;
  5. writes eval_results.json into the run folder (`write_results`), which the run report reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from preftune.data import apply_template, load_preference_splits, tokenize_examples
from preftune.data.formats import PreferenceExample
from preftune.evaluation.generation import generate_from_ids
from preftune.evaluation.pairs import PairScores, score_pairs
from preftune.evaluation.pairwise import LLMJudge, Messages, prompt_text
from preftune.evaluation.winrate import LOSS, WIN

logger = logging.getLogger("preftune")

RUN_CONFIG_FILE = "preftune_config.yaml"
EVAL_RESULTS_FILE = "eval_results.json"
POLICY_ADAPTER, REFERENCE_ADAPTER = "default", "reference"
DEFAULT_SEED = 42  # transformers.TrainingArguments' default seed (it carves the held-out split)


@dataclass
class EvalSettings:
    """How replies are generated and results summarized."""

    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    beta: float | None = None  # implicit reward scale (None: the run's --beta, else 0.1)
    interval: str = "wilson"  # or "bootstrap"
    max_prompts: int | None = 64  # held-out prompts to generate for (None: all)
    show_progress: bool = True


@dataclass
class RunModels:
    """The tuned model and how to get its reference, for evaluation (no gradients)."""

    model: torch.nn.Module  # the tuned policy (a PeftModel for LoRA runs)
    tokenizer: Any
    reference_mode: str  # "adapter_disabled" | "reference_adapter" | "model_copy" | "none"
    reference_model: torch.nn.Module | None = None  # only for "model_copy"
    base_path: str | None = None  # the un-adapted base model in memory (for reusing it as a judge)

    @property
    def has_reference(self) -> bool:
        """Whether a reference is at hand ("none": a full model loaded alone, e.g. a merged one)."""
        return self.reference_mode != "none"

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The reference model, for the duration of the `with` block."""
        if self.reference_mode == "none":
            raise ValueError("no reference in memory: the model was loaded without one (a full model)")
        if self.reference_mode == "model_copy":
            yield self.reference_model
        elif self.reference_mode == "adapter_disabled":
            with self.model.disable_adapter():
                yield self.model
        elif self.reference_mode == "reference_adapter":
            self.model.set_adapter(REFERENCE_ADAPTER)
            try:
                yield self.model
            finally:
                self.model.set_adapter(POLICY_ADAPTER)
        else:
            raise ValueError(f"unknown reference mode {self.reference_mode!r}")

    @contextlib.contextmanager
    def base(self) -> Iterator[torch.nn.Module]:
        """The base model without any adapter (the original model of a full fine-tuning run)."""
        if self.reference_mode == "model_copy":
            yield self.reference_model
        else:
            with self.model.disable_adapter():
                yield self.model


@dataclass
class EvalData:
    """Held-out examples and their tokenized pairs, aligned."""

    examples: list[PreferenceExample]
    pairs: list[dict[str, list[int]]]  # prompt_ids, chosen_ids, rejected_ids (as in training)
    source: str = ""
    split: str = ""

    @property
    def prompts(self) -> list[Messages]:
        return [e.prompt for e in self.examples]


# --------------------------------------------------------------------------- the run folder


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The sections of a run's preftune_config.yaml, or of the run holding a checkpoint-* folder
    ({} if there is none)."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir.parent) if run_dir.name.startswith("checkpoint-") else (run_dir,):
        path = folder / RUN_CONFIG_FILE
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def _model_arguments(section: dict[str, Any], dtype: str | None):
    from preftune.config import ModelArguments

    known = {f.name for f in dataclasses.fields(ModelArguments)}
    args = ModelArguments(**{k: v for k, v in section.items() if k in known})
    if dtype:
        args.torch_dtype = dtype
    return args


def default_dtype(config: dict[str, Any]) -> str:
    """Evaluate in bf16 when the run trained in bf16 (several times faster on CPUs with bf16 units),
    else in the dtype the model was loaded in for training."""
    if (config.get("training") or {}).get("bf16"):
        return "bfloat16"
    return (config.get("model") or {}).get("torch_dtype") or "auto"


def load_run(
    run_dir: str | Path,
    dtype: str | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> RunModels:
    """Load a preftune run folder (or any PEFT adapter, local or on the Hub) for evaluation or chat,
    with ONE base model in memory for LoRA runs.

    The model flags come from the run's preftune_config.yaml (none for a bare adapter);
    `load_in_4bit` loads the base in 4 bits whatever the run used, `trust_remote_code` adds to the
    run's own setting.

    | the run trained                    | tuned model                 | reference                        |
    |------------------------------------|-----------------------------|----------------------------------|
    | a new LoRA on a base model         | base + run adapter          | base, adapter disabled           |
    | from an SFT adapter                | base + run adapter          | base + SFT adapter (`reference`) |
    | from an SFT adapter, merged first  | merged base + run adapter   | merged base, adapter disabled    |
    | all weights (no adapter)           | the run's model             | the starting model (a 2nd model) |
    """
    from peft import PeftModel

    from preftune.models.prepare import (
        adapter_base,
        load_base_model,
        load_tokenizer,
        resolve_model_path,
    )

    run = Path(run_dir)
    hub_name = (
        not run.exists() and str(run_dir).count("/") == 1 and not str(run_dir).startswith((".", "/", "~"))
    )
    # the adapter's base model (None: not an adapter); a Hub name is asked only when it looks like one
    run_base = adapter_base(str(run_dir)) if run.is_dir() or hub_name else None
    if not run.is_dir() and run_base is None:
        raise FileNotFoundError(f"--model: no such run folder: {run_dir}")
    config = read_run_config(run) if run.is_dir() else {}
    model_section = config.get("model") or {}
    args = _model_arguments(model_section, dtype or default_dtype(config))
    args.trust_remote_code = args.trust_remote_code or trust_remote_code
    if load_in_4bit:
        args.use_4bit_quantization, args.use_8bit_quantization = True, False
    start = model_section.get("model_name_or_path")  # what training started from (None: embedded)
    start_path = resolve_model_path(start)
    start_is_adapter = adapter_base(start_path) is not None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quantized = args.use_4bit_quantization or args.use_8bit_quantization

    def placed(model: torch.nn.Module) -> torch.nn.Module:
        return model.eval() if quantized else model.to(device).eval()

    if run_base is not None:
        base_path = resolve_model_path(run_base)
        tokenizer = load_tokenizer(str(run_dir), fallback=base_path, trust_remote_code=args.trust_remote_code)
        base = load_base_model(base_path, args)
        if start_is_adapter and args.merge_and_unload:
            base = PeftModel.from_pretrained(base, start_path).merge_and_unload()
            model = PeftModel.from_pretrained(base, str(run_dir), adapter_name=POLICY_ADAPTER)
            return RunModels(placed(model), tokenizer, "adapter_disabled", base_path=None)
        model = PeftModel.from_pretrained(base, str(run_dir), adapter_name=POLICY_ADAPTER)
        if start_is_adapter:
            model.load_adapter(start_path, adapter_name=REFERENCE_ADAPTER)
            model.set_adapter(POLICY_ADAPTER)
            return RunModels(placed(model), tokenizer, "reference_adapter", base_path=base_path)
        return RunModels(placed(model), tokenizer, "adapter_disabled", base_path=base_path)

    if not (run / "config.json").is_file():
        raise ValueError(
            f"{run_dir} holds neither a PEFT adapter (adapter_config.json) nor a model (config.json)"
        )
    if start_is_adapter:
        raise ValueError(f"{run_dir}: a full model trained from an adapter; evaluate it with an adapter run")
    logger.info(
        "full fine-tuning run: loading the starting model %s as the reference (a second model)", start_path
    )
    tokenizer = load_tokenizer(str(run), fallback=start_path)
    model = load_base_model(str(run), args)
    reference = load_base_model(start_path, args).requires_grad_(False)
    return RunModels(placed(model), tokenizer, "model_copy", placed(reference), base_path=start_path)


# --------------------------------------------------------------------------- held-out data


def load_held_out(
    data: dict[str, Any], tokenizer, seed: int = DEFAULT_SEED, max_samples: int | None = None
) -> EvalData:
    """The held-out split as training saw it, from a run config's `data` section (or the same keys).

    The held-out split is the second of `splits` (carved from the first with `test_size` and `seed`
    when the data has no such split), or the first when `splits` names only one (e.g. `--splits
    train` evaluates a whole file of pairs the run never saw).
    """
    dataset = data.get("dataset_name")
    if not dataset:
        raise ValueError("no data set: the run config names none; pass --dataset")
    splits = [s.strip() for s in str(data.get("splits") or "train,test").split(",") if s.strip()]
    template = data.get("chat_template_format") or "tokenizer"
    on_bad_rows = data.get("on_bad_rows") or "error"
    loaded = load_preference_splits(
        dataset,
        splits=splits,
        test_size=data.get("test_size"),
        data_format=data.get("data_format") or "auto",
        seed=seed,
        on_bad_rows=on_bad_rows,
    )
    split = splits[1] if len(splits) > 1 else splits[0]
    if split not in loaded.splits:
        raise ValueError(
            f"{dataset} has no {split!r} split and the run carved none: pass --test_size, or --splits "
            f"{splits[0]} to evaluate on a whole split"
        )
    limit = max_samples if max_samples is not None else data.get("max_eval_samples")
    examples = loaded.splits[split][:limit]
    apply_template(tokenizer, template)
    max_length = int(data.get("max_seq_length") or 512)
    tokenized, _ = tokenize_examples(
        examples,
        tokenizer,
        template,
        max_length=max_length,
        max_prompt_length=int(data.get("max_prompt_length") or max_length // 2),  # as DataArguments
        on_bad_rows=on_bad_rows,
        source=f"{dataset} [{split}]",
    )
    by_row = {e.row: e for e in examples}
    return EvalData(
        examples=[by_row[p.row] for p in tokenized],
        pairs=[
            {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
            for p in tokenized
        ],
        source=str(dataset),
        split=split,
    )


# --------------------------------------------------------------------------- pairs


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def pair_metrics(policy: PairScores, reference: PairScores, beta: float) -> dict[str, Any]:
    """Before (the reference alone) and after (the tuned model against the reference) on held-out pairs."""
    pc, pr = policy.chosen_logps.tolist(), policy.rejected_logps.tolist()
    rc, rr = reference.chosen_logps.tolist(), reference.rejected_logps.tolist()
    chosen_rewards = [beta * (p - r) for p, r in zip(pc, rc)]
    rejected_rewards = [beta * (p - r) for p, r in zip(pr, rr)]
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards)]
    return {
        "n": len(pc),
        "beta": beta,
        "before": {
            "likelihood_accuracy": _mean([float(c > r) for c, r in zip(rc, rr)]),
            "logp_margin": _mean([c - r for c, r in zip(rc, rr)]),
            "logps_chosen": _mean(rc),
            "logps_rejected": _mean(rr),
        },
        "after": {
            "reward_accuracy": _mean([float(m > 0) for m in margins]),
            "reward_margin": _mean(margins),
            "rewards_chosen": _mean(chosen_rewards),
            "rewards_rejected": _mean(rejected_rewards),
            "likelihood_accuracy": _mean([float(c > r) for c, r in zip(pc, pr)]),
            "logp_margin": _mean([c - r for c, r in zip(pc, pr)]),
            "logps_chosen": _mean(pc),
            "logps_rejected": _mean(pr),
        },
        # per pair, for the report's histograms
        "logps": {
            "tuned_chosen": [round(x, 4) for x in pc],
            "tuned_rejected": [round(x, 4) for x in pr],
            "reference_chosen": [round(x, 4) for x in rc],
            "reference_rejected": [round(x, 4) for x in rr],
        },
    }


def score_held_out_pairs(
    run: RunModels, pairs: list[dict], beta: float, batch_size: int = 8, show_progress: bool = True
) -> dict[str, Any]:
    """Summed reply log-probs of every held-out pair under the tuned model and the reference."""
    pad = run.tokenizer.pad_token_id
    policy = score_pairs(run.model, pairs, pad, batch_size, show_progress, desc="log-probs (tuned)")
    with run.reference() as reference_model:
        reference = score_pairs(
            reference_model, pairs, pad, batch_size, show_progress, desc="log-probs (reference)"
        )
    return pair_metrics(policy, reference, beta)


# --------------------------------------------------------------------------- generations and judges


def reply_lengths(tokenizer, replies: Sequence[str]) -> dict[str, float]:
    """Average length of replies in words and tokens (a judge may favour the longer reply)."""
    tokens = [len(tokenizer(r, add_special_tokens=False).input_ids) for r in replies]
    return {"words": _mean([len(r.split()) for r in replies]), "tokens": _mean(tokens)}


def generate_both(
    run: RunModels, prompt_ids: list[list[int]], settings: EvalSettings
) -> tuple[list[str], list[str]]:
    """(reference replies, tuned replies) to the same prompts, with the same decoding settings."""
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        show_progress=settings.show_progress,
    )
    with run.reference() as reference_model:
        reference = generate_from_ids(
            reference_model, run.tokenizer, prompt_ids, desc="generating (reference)", **kwargs
        )
    tuned = generate_from_ids(run.model, run.tokenizer, prompt_ids, desc="generating (tuned)", **kwargs)
    return reference, tuned


def _same_model(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def run_judge(judge, run: RunModels, prompts, tuned, reference, chosen, interval: str):
    """One judge's comparison; an LLM judge that IS the run's base model reuses it (no second copy)."""
    if (
        isinstance(judge, LLMJudge)
        and judge.model is None
        and _same_model(judge.resolved_path(), run.base_path)
    ):
        with run.base() as base:
            judge.model = base
            try:
                return judge.compare(prompts, tuned, reference, chosen, interval=interval)
            finally:
                judge.model = None
    return judge.compare(prompts, tuned, reference, chosen, interval=interval)


def evaluate_run(
    run: RunModels, data: EvalData, judges: Sequence[Any], settings: EvalSettings
) -> dict[str, Any]:
    """Pairs, generations and judges on held-out data; the results as a JSON-ready dict."""
    results: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": data.source,
        "split": data.split,
        "reference": run.reference_mode,
        "settings": dataclasses.asdict(settings),
    }
    beta = settings.beta if settings.beta is not None else 0.1
    results["pairs"] = score_held_out_pairs(
        run, data.pairs, beta, settings.batch_size, settings.show_progress
    )

    count = len(data.pairs) if settings.max_prompts is None else min(settings.max_prompts, len(data.pairs))
    prompts = data.prompts[:count]
    chosen = [e.chosen for e in data.examples[:count]]
    reference, tuned = generate_both(run, [p["prompt_ids"] for p in data.pairs[:count]], settings)
    results["generation"] = {
        "n_prompts": count,
        "decoding": "sampled" if settings.do_sample else "greedy",
        "length_reference": reply_lengths(run.tokenizer, reference),
        "length_tuned": reply_lengths(run.tokenizer, tuned),
    }
    judged = [run_judge(j, run, prompts, tuned, reference, chosen, settings.interval) for j in judges]
    results["judges"] = [j.to_dict() for j in judged]
    names = {WIN: "win", LOSS: "loss"}
    results["samples"] = [
        {
            "prompt": prompt_text(prompts[i]),
            "chosen": chosen[i],
            "reference": reference[i],
            "tuned": tuned[i],
            "verdicts": {j.name: names.get(j.outcomes[i], "tie") for j in judged},
        }
        for i in range(count)
    ]
    return results


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """eval_results.json (NaN -> null), written atomically."""
    from preftune.training.common import write_atomic

    path = Path(path)
    write_atomic(path, json.dumps(_json_safe(results), indent=2) + "\n")
    return path


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / EVAL_RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class EvalRequest:
    """What `preftune eval` was asked; None means: as the run was trained."""

    run_dir: str
    judges: list[str] = field(default_factory=list)
    dataset_name: str | None = None
    splits: str | None = None
    test_size: float | None = None
    data_format: str | None = None
    chat_template_format: str | None = None
    max_pairs: int | None = None
    dtype: str | None = None
    output: str | None = None  # default: RUN_DIR/eval_results.json


def run_eval(request: EvalRequest, settings: EvalSettings) -> tuple[dict[str, Any], Path]:
    """Load the run, evaluate it, write the results; returns (results, results path)."""
    from preftune.evaluation.pairwise import parse_judge

    config = read_run_config(request.run_dir)
    if not config:
        logger.warning(
            "%s has no %s: the reference is the base model, the data must be given",
            request.run_dir,
            RUN_CONFIG_FILE,
        )
    judges = [
        parse_judge(spec, batch_size=settings.batch_size, dtype=request.dtype) for spec in request.judges
    ]
    data_section = dict(config.get("data") or {})
    if request.dataset_name and request.dataset_name != data_section.get("dataset_name"):
        # another data set: none of the run's split settings apply
        data_section = {
            k: v
            for k, v in data_section.items()
            if k in ("chat_template_format", "max_seq_length", "max_prompt_length")
        }
        data_section["dataset_name"] = request.dataset_name
    for key in ("splits", "test_size", "data_format", "chat_template_format"):
        if getattr(request, key) is not None:
            data_section[key] = getattr(request, key)
    seed = int((config.get("training") or {}).get("seed", DEFAULT_SEED))
    if settings.beta is None:
        settings.beta = float((config.get("preference") or {}).get("beta", 0.1))

    run = load_run(request.run_dir, dtype=request.dtype)
    data = load_held_out(data_section, run.tokenizer, seed=seed, max_samples=request.max_pairs)
    if not data.pairs:
        raise ValueError(f"no held-out pairs in {data.source} [{data.split}]")
    logger.info(
        "%d held-out pairs from %s [%s]; reference: %s",
        len(data.pairs),
        data.source,
        data.split,
        run.reference_mode,
    )
    results = {"run_dir": str(request.run_dir), **evaluate_run(run, data, judges, settings)}
    output = Path(request.output) if request.output else Path(request.run_dir) / EVAL_RESULTS_FILE
    return results, write_results(results, output)
