"""What preftune adds to accelerate's multi-process setup (`accelerate launch ... -m preftune ...`).

FSDP on the CPU: accelerate keeps an FSDP plugin only for GPU-like devices; with processes on the
CPU (the gloo backend) it drops the plugin without a word and trains with plain data parallelism.
PyTorch's FSDP2 does run on the CPU with gloo, so when FSDP version 2 is asked for there, preftune
keeps it: the same sharded code path as on GPUs (slowly), to try a launch config or test it in CI.

Chunked log-probs (and SFT's chunked loss) apply the LM head outside the model's forward, a chunk
at a time, and recompute each chunk in the backward pass. Two backends break that, so preftune
computes the full logits there instead: DeepSpeed ZeRO-3, which partitions the LM head again after
each use (the recomputation finds an empty weight: torch.utils.checkpoint.CheckpointError,
recomputed shape [0]), and FSDP when the LM head itself trains, as in full fine-tuning (the
processes crash in the backward pass, SIGSEGV on the CPU). FSDP with LoRA keeps the chunks.

A sharding backend that was asked for (by the launch config's environment) and is not in effect is
reported, never silently replaced.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger("preftune")


def is_main_process() -> bool:
    """True in the process that writes the run's files and prints summaries: global rank 0, or the
    only process without a launch."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _asked_for(backend: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{backend}", "false").lower() == "true"


def shards_parameters() -> bool:
    """Launched with FSDP or DeepSpeed (which manage parameter dtypes and storage themselves)."""
    return _asked_for("FSDP") or _asked_for("DEEPSPEED")


def keep_fsdp_on_cpu() -> None:
    """Have accelerate keep an FSDP2 plugin when the processes run on the CPU (see the module
    docstring). Only an FSDP launch on the CPU is affected; calling it again does nothing."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_preftune_keeps_cpu_fsdp", False) or not _asked_for("FSDP"):
        return

    @functools.wraps(original)
    def init(self, *args, fsdp_plugin=None, **kwargs) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        on_cpu = self.distributed_type == DistributedType.MULTI_CPU
        if on_cpu and getattr(fsdp_plugin, "fsdp_version", 1) == 2:
            # Both states: AcceleratorState copies PartialState's fields each time it is created.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            if self.mixed_precision != "no":  # as accelerate does for FSDP on GPUs
                fsdp_plugin.set_mixed_precision(self.mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    init._preftune_keeps_cpu_fsdp = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = init


def warn_if_backend_dropped(trainer: Trainer) -> None:
    """A warning when the launch asked for FSDP or DeepSpeed and the Trainer does not use it."""
    dropped = [
        name
        for name, env, enabled in (
            ("FSDP", "FSDP", trainer.is_fsdp_enabled),
            ("DeepSpeed", "DEEPSPEED", trainer.is_deepspeed_enabled),
        )
        if _asked_for(env) and not enabled
    ]
    for name in dropped:
        logger.warning(
            "the launch asked for %s, but accelerate did not enable it on %s: training runs as plain "
            "data parallelism (each process holds the whole model)%s",
            name,
            trainer.args.device,
            " (on the CPU preftune keeps FSDP only with fsdp_version: 2)" if name == "FSDP" else "",
        )


def no_unsupported_chunking(args: Any, flag: str, model: torch.nn.Module) -> None:
    """Set `args.<flag>` (the chunked log-probs or loss) to False, with a log line, under the
    backends that break it (see the module docstring). Call it after the TrainingArguments exist."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from preftune.training.logprobs import unwrap_causal_lm

    if not getattr(args, flag):
        return
    head = unwrap_causal_lm(model).get_output_embeddings()
    head_trains = head is not None and any(p.requires_grad for p in head.parameters())
    if is_deepspeed_zero3_enabled():
        reason = "DeepSpeed ZeRO-3 re-partitions the LM head between chunks"
    elif _asked_for("FSDP") and head_trains:
        reason = "FSDP with a trainable LM head"
    else:
        return
    logger.info("--%s false: %s", flag, reason)
    setattr(args, flag, False)
