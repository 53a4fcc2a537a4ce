"""Where preftune's DPO step spends its time and memory (the same setup as dpo_vs_trl.py's preftune worker).

    python benchmarks/profile_preftune_step.py --precision fp32 --max_length 512 --batch_size 2

Runs --warmup steps, then --steps measured steps with phase timers (wall clock) and an RSS sampler
that attributes the peak to the phase it was seen in, then one step under torch.profiler (op table).
Phases: reference forward (no grad, adapter disabled), policy forward (log-probs with grad), backward,
optimizer step. Also prints the token budget of the batches: padding, prompt share (what prefix
sharing would save) and reply share (what reaches the LM head). Instrumentation wraps the trainer's
methods in this process only; src/ is untouched.

--layer_trace: through the last measured step, a sampler (every ~5 ms) records the process's RSS,
the resident part of glibc's heap ([heap] in /proc/self/smaps) and what malloc has handed out
(mallinfo2), marked with the decoder layer running (forward: its pre-hook; backward: the gradient
of its output arriving); prints one line per mark, so the step's peak has a place, and the heap's
resident free memory (heap RSS - in use) shows the fragmentation at that place. Linux/glibc only.

--checkpoint_segments K (an experiment, not a preftune setting): the decoder's layers run in
segments of K under one outer activation checkpoint each, with the per-layer checkpoints nested
inside, so a step keeps the inputs of the segments plus those of one segment instead of every
layer's, for one more forward of K-1 layers in K (Llama-style decoders, whose loop hands every
layer the same keywords).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpo_vs_trl as bench  # noqa: E402


class PhaseTracker:
    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.phase = "other"
        self.wall = collections.defaultdict(float)
        self.peak_rss = collections.defaultdict(int)
        self.rss_at = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.peak_rss[self.phase] = max(self.peak_rss[self.phase], rss)
            self._stop.wait(0.01)

    @contextlib.contextmanager
    def __call__(self, name: str):
        from torch.profiler import record_function

        outer = self.phase
        self.phase = name
        self.rss_at[f"before {name}"] = self.proc.memory_info().rss
        t0 = time.perf_counter()
        try:
            with record_function(f"phase::{name}"):
                yield
        finally:
            self.wall[name] += time.perf_counter() - t0
            self.rss_at[f"after {name}"] = self.proc.memory_info().rss
            self.phase = outer

    def reset(self) -> None:
        self.wall.clear()
        self.peak_rss.clear()
        self.rss_at.clear()

    def stop(self) -> None:
        self._stop.set()


OP_GROUPS = [
    ("matmul (mm/addmm/bmm/linear)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("log-softmax / cross-entropy", ("log_softmax", "cross_entropy", "nll_loss", "_log_softmax")),
    ("dtype casts / copies", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("elementwise (mul/add/silu/...)", ("aten::mul", "aten::add", "aten::silu", "aten::sub", "aten::div",
                                        "aten::neg", "aten::cat", "aten::sigmoid", "aten::tanh", "aten::exp")),
    ("norm (pow/mean/rsqrt)", ("aten::pow", "aten::mean", "aten::rsqrt")),
    ("dropout", ("dropout", "bernoulli")),
    ("optimizer (adamw)", ("_foreach", "adam")),
    ("embedding", ("embedding",)),
    ("index / gather / masked", ("index", "gather", "masked", "nonzero", "where")),
]  # fmt: skip


class _Segment:
    """K consecutive decoder layers called as one, under an outer non-reentrant checkpoint in training."""

    def __init__(self, layers: list) -> None:
        self.layers = layers

    def __call__(self, hidden_states, **kwargs):
        import torch
        from torch.utils.checkpoint import checkpoint

        def run(h):
            for layer in self.layers:
                h = layer(h, **kwargs)
            return h

        if self.layers[0].training and torch.is_grad_enabled():
            return checkpoint(run, hidden_states, use_reentrant=False)
        return run(hidden_states)


class LayerTrace:
    """RSS, heap RSS and malloc's in-use bytes, sampled with the decoder layer running (--layer_trace)."""

    def __init__(self, model) -> None:
        import ctypes

        import torch

        from preftune.training.logprobs import unwrap_causal_lm

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = MallInfo2
        self.mark, self.on, self.rows = "other", False, []
        self._stop = threading.Event()

        def before(i):
            def hook(module, inputs):
                self.mark = f"{'forward' if torch.is_grad_enabled() else 'no-grad forward'} {i}"

            return hook

        def after(i):
            def hook(module, inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                if self.on and torch.is_grad_enabled() and hidden.requires_grad:
                    hidden.register_hook(lambda grad: setattr(self, "mark", f"backward {i}"))

            return hook

        for i, layer in enumerate(unwrap_causal_lm(model).get_decoder().layers):
            layer.register_forward_pre_hook(before(i))
            layer.register_forward_hook(after(i))
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def _heap_rss() -> int:
        with open("/proc/self/smaps") as f:
            in_heap = False
            for line in f:
                if in_heap and line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
                if line.rstrip().endswith("[heap]"):
                    in_heap = True
        return 0

    def _sample(self) -> None:
        with open("/proc/self/statm") as statm:
            while not self._stop.is_set():
                if self.on:
                    statm.seek(0)
                    rss = int(statm.read().split()[1]) * 4096
                    info = self._libc.mallinfo2()
                    self.rows.append((self.mark, rss, self._heap_rss(), info.uordblks))
                self._stop.wait(0.005)

    def report(self) -> None:
        """One line per mark (consecutive samples under the same mark), in MiB."""
        mib = 2**20
        print("\nlayer trace, last measured step (MiB; heap free = resident heap - malloc in use):")
        print(
            f"{'mark':22}{'RSS max':>9}{'heap RSS':>10}{'in use max':>12}{'heap free max':>15}{'outside heap':>14}"
        )
        peak = max(r[1] for r in self.rows)
        groups = []
        for mark, rss, heap, used in self.rows:
            if not groups or groups[-1][0] != mark:
                groups.append([mark, []])
            groups[-1][1].append((rss, heap, used))
        for mark, samples in groups:
            rss = max(x[0] for x in samples)
            print(f"{mark:22}{rss / mib:>9.0f}{max(x[1] for x in samples) / mib:>10.0f}"
                  f"{max(x[2] for x in samples) / mib:>12.0f}{max(x[1] - x[2] for x in samples) / mib:>15.0f}"
                  f"{max(x[0] - x[1] for x in samples) / mib:>14.0f}{'  <- peak' if rss == peak else ''}")  # fmt: skip

    def stop(self) -> None:
        self._stop.set()


def checkpoint_in_segments(model, k: int) -> None:
    """Make the decoder's forward loop run its layers in segments of k (see the module docstring).
    Indexing, iteration and the state dict still see the layers themselves; only the slice the
    decoder loops over (`self.layers[:n]`) comes back as segments."""
    import torch

    from preftune.training.logprobs import unwrap_causal_lm

    class SegmentedLayers(torch.nn.ModuleList):
        def __getitem__(self, idx):
            if not isinstance(idx, slice):
                return super().__getitem__(idx)
            layers = list(super().__getitem__(idx))
            return [_Segment(layers[i : i + k]) for i in range(0, len(layers), k)]

    decoder = unwrap_causal_lm(model).get_decoder()
    decoder.layers = SegmentedLayers(list(decoder.layers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--model", default="embedded")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="steps with phase timers (after warm-up)")
    p.add_argument("--n_pairs", type=int, default=64)
    p.add_argument("--gradient_checkpointing", choices=("default", "on", "off"), default="default")
    p.add_argument("--precompute_ref", action="store_true")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--no_torch_profiler", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--checkpoint_segments", type=int, default=1, help="layers per outer checkpoint (1: off)")
    p.add_argument(
        "--layer_trace", action="store_true", help="RSS and heap by decoder layer, last measured step"
    )
    cli = p.parse_args()
    # what `preftune dpo` and the benchmark's preftune worker do first (preftune/memory.py,
    # preftune/lazy_compile.py)
    from preftune.lazy_compile import import_bitsandbytes
    from preftune.memory import restart_with_malloc_tunables

    restart_with_malloc_tunables()
    import_bitsandbytes()

    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    tmp = Path(tempfile.mkdtemp(prefix="profile-preftune-"))
    model_dir = bench.resolve_model(cli.model, tmp)
    data_file = tmp / "pairs.json"
    bench.select_pairs(str(bench.DEFAULT_DATA), model_dir, cli.max_length, cli.n_pairs, data_file)
    profiled = 0 if cli.no_torch_profiler else 1
    args = bench.parse_args(
        [
            "--precision", cli.precision, "--max_length", str(cli.max_length),
            "--batch_size", str(cli.batch_size), "--warmup", str(cli.warmup),
            "--steps", str(cli.steps + profiled), "--gradient_checkpointing", cli.gradient_checkpointing,
            "--lora_dropout", str(cli.lora_dropout),
        ]
        + (["--precompute_ref"] if cli.precompute_ref else [])
    )  # fmt: skip
    args.model_dir, args.data_file = str(model_dir), str(data_file)
    trainer, info = bench.build_preftune_trainer(args)
    if cli.checkpoint_segments > 1:
        checkpoint_in_segments(trainer.model, cli.checkpoint_segments)

    layer_trace = LayerTrace(trainer.model) if cli.layer_trace else None
    track = PhaseTracker()
    # ---- instrumentation (instance attributes shadow the class methods, in this process only)
    orig_ref, orig_seq = trainer.reference_logps, trainer._sequence_logps
    orig_backward = trainer.accelerator.backward

    def reference_logps(model, batch):
        with track("reference forward"):
            return orig_ref(model, batch)

    def sequence_logps(model, batch):
        if track.phase == "reference forward":
            return orig_seq(model, batch)
        with track("policy forward"):
            return orig_seq(model, batch)

    def backward(loss, **kwargs):
        with track("backward"):
            return orig_backward(loss, **kwargs)

    trainer.reference_logps = reference_logps
    trainer._sequence_logps = sequence_logps
    trainer.accelerator.backward = backward

    from transformers import TrainerCallback

    results = {"steps": []}
    prof_holder = {}
    total_steps = cli.warmup + cli.steps + profiled

    class Probe(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            track.reset()
            self.t0 = time.perf_counter()
            self.rss0 = track.proc.memory_info().rss
            if layer_trace is not None:  # the last measured step only
                layer_trace.on = state.global_step == cli.warmup + cli.steps - 1
                layer_trace.mark = "step start"
            if profiled and state.global_step == total_steps - 1:
                prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
                prof.__enter__()
                prof_holder["prof"] = prof

        def on_pre_optimizer_step(self, a, state, control, **kw):
            self.t_opt = time.perf_counter()
            track.phase = "optimizer"

        def on_optimizer_step(self, a, state, control, **kw):
            track.wall["optimizer"] += time.perf_counter() - self.t_opt
            track.phase = "other"

        def on_step_end(self, a, state, control, **kw):
            step_s = time.perf_counter() - self.t0
            if layer_trace is not None:
                layer_trace.on = False
            if "prof" in prof_holder and state.global_step == total_steps:
                prof_holder["prof"].__exit__(None, None, None)
                results["profiled_step_s"] = step_s
                return
            if state.global_step <= cli.warmup:
                return
            results["steps"].append(
                {
                    "step_s": step_s,
                    "wall": dict(track.wall),
                    "peak_rss_mib": {k: v / 2**20 for k, v in track.peak_rss.items()},
                    "rss_mib": {k: v / 2**20 for k, v in track.rss_at.items()},
                    "rss_step_start_mib": self.rss0 / 2**20,
                }
            )

    trainer.add_callback(Probe())
    stats = bench._BatchStats(trainer.data_collator, "loss_mask")
    trainer.data_collator = stats
    trainer.train()
    track.stop()
    if layer_trace is not None:
        layer_trace.stop()

    # ---- report
    steps = results["steps"]
    n = len(steps)
    print(f"\npreftune step profile: {cli.model}, {cli.precision}, max_length {cli.max_length}, batch "
          f"{cli.batch_size}, checkpointing {info['gradient_checkpointing']}, precompute_ref {cli.precompute_ref}, "
          f"lora_dropout {cli.lora_dropout}, "
          f"{n} measured step(s), torch threads {torch.get_num_threads()}")  # fmt: skip
    mean_step = sum(s["step_s"] for s in steps) / n
    phases = ["reference forward", "policy forward", "backward", "optimizer"]
    print(f"{'phase':24}{'s/step':>10}{'share':>9}{'peak RSS MiB':>14}")
    accounted = 0.0
    for ph in phases:
        w = sum(s["wall"].get(ph, 0.0) for s in steps) / n
        accounted += w
        pk = max(s["peak_rss_mib"].get(ph, 0.0) for s in steps)
        print(f"{ph:24}{w:>10.2f}{w / mean_step:>9.1%}{pk:>14.0f}")
    print(
        f"{'other (data, loss, log)':24}{mean_step - accounted:>10.2f}{(mean_step - accounted) / mean_step:>9.1%}"
    )
    print(f"{'step':24}{mean_step:>10.2f}")
    last = steps[-1]
    print(
        "RSS at phase boundaries (last measured step, MiB): step start "
        f"{last['rss_step_start_mib']:.0f}; " + "; ".join(f"{k} {v:.0f}" for k, v in last["rss_mib"].items())
    )

    if layer_trace is not None:
        layer_trace.report()

    # token budget of the batches this run saw
    b = stats.batches[:total_steps]  # the loader may have prefetched one more
    model_tok = sum(x["model_tokens"] for x in b)  # prompt + chosen and prompt + rejected
    fed = sum(x["fed_tokens"] for x in b)  # non-pad tokens the model ran on
    padded = sum(x["padded_tokens"] for x in b)  # the rows' tokens, padding included
    reply = sum(x["reply_tokens"] for x in b)
    prompt_dup = model_tok - sum(x["unique_tokens"] for x in b)  # the second copy of each prompt
    print(f"token budget over {len(b)} batches: model tokens {model_tok} (each prompt twice), fed to the "
          f"model {fed} ({1 - fed / model_tok:.1%} fewer: the prompt copies shared, {prompt_dup} tokens), "
          f"rows {padded} tokens (padding {1 - fed / padded:.1%}), reply tokens (LM head) {reply} "
          f"({reply / model_tok:.1%} of the model tokens)")  # fmt: skip

    if "prof" in prof_holder:
        prof = prof_holder["prof"]
        averages = prof.key_averages()
        total_self = sum(e.self_cpu_time_total for e in averages)
        print(f"\ntorch.profiler, one step ({results['profiled_step_s']:.1f} s wall with profiler): "
              f"top {cli.top} ops by self CPU time")  # fmt: skip
        print(f"{'op':48}{'self ms':>10}{'share':>8}{'calls':>8}{'self alloc MiB':>16}")
        for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[: cli.top]:
            print(f"{e.key[:47]:48}{e.self_cpu_time_total / 1e3:>10.0f}{e.self_cpu_time_total / total_self:>8.1%}"
                  f"{e.count:>8}{e.self_cpu_memory_usage / 2**20:>16.0f}")  # fmt: skip
        groups = collections.defaultdict(float)
        for e in averages:
            if e.key.startswith("phase::"):
                continue
            name = next((g for g, keys in OP_GROUPS if any(k in e.key for k in keys)), "other")
            groups[name] += e.self_cpu_time_total
        print("\nself CPU time by op group:")
        for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {g:40}{t / 1e3:>10.0f} ms{t / total_self:>8.1%}")
        results["op_groups_ms"] = {g: t / 1e3 for g, t in groups.items()}

        # live tensor memory over the step: every allocation/free the profiler saw, in time order
        events = prof.events()
        phases_at = [
            (e.time_range.start, e.time_range.end, e.name.split("::", 1)[1])
            for e in events
            if e.name.startswith("phase::")
        ]
        deltas = sorted(
            (e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage
        )
        live, peak_at, peak = 0, None, 0
        per_phase = collections.defaultdict(int)

        def phase_of(t):
            inner = [p for p in phases_at if p[0] <= t <= p[1]]
            return min(inner, key=lambda p: p[1] - p[0])[2] if inner else "other"

        for t, d in deltas:
            live += d
            if live > peak:
                peak, peak_at = live, t
            ph = phase_of(t)
            per_phase[ph] = max(per_phase[ph], live)
        print(
            f"\nlive tensor memory allocated during the profiled step (from profiler alloc/free events): "
            f"peak +{peak / 2**20:.0f} MiB over the step start, reached in {phase_of(peak_at) if peak_at else '-'}; "
            "peak per phase: " + ", ".join(f"{k} +{v / 2**20:.0f} MiB" for k, v in per_phase.items())
        )
        results["live_peak_mib"] = peak / 2**20
        results["live_peak_per_phase_mib"] = {k: v / 2**20 for k, v in per_phase.items()}
    results["token_budget"] = {
        "padded": padded, "model": model_tok, "fed": fed, "prompt_copy": prompt_dup, "reply": reply,
    }  # fmt: skip
    results["mean_step_s"] = mean_step
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
