"""Reference log-probs kept on disk, so a later run on the same data and reference skips the pass.

The reference never trains, so its log-probs of a pair depend only on (a) the pair's token ids,
(b) the reference's weights and (c) how the numbers are computed (autocast dtype, attention
implementation). A fingerprint of those three names a JSON file under the preftune cache
(`$PREFTUNE_CACHE/reference-logps/`, default ~/.cache/preftune). Any change (another tokenizer,
template, max length, data row, base model, SFT adapter, quantization, precision) gives another
fingerprint, so a stale file is never read. Sweeps over beta, loss type, learning rate or LoRA
settings of the policy reuse the same file.

The weights are fingerprinted from their values: every reference parameter's name, shape and dtype,
plus a strided sample of its values (at most 4096 per tensor). The trainable `default`
adapter is left out: with the adapter disabled it does not take part in the reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from preftune.models.embedded import cache_dir
from preftune.models.prepare import POLICY_ADAPTER
from preftune.training.common import write_atomic

logger = logging.getLogger("preftune")

FORMAT = "preftune-reference-logps-v1"
SAMPLES_PER_TENSOR = 4096


def _hash_tensor(h: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
    sample = flat[::step][:SAMPLES_PER_TENSOR].float().cpu()
    h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    h.update(sample.numpy().tobytes())


def reference_weights_fingerprint(model: torch.nn.Module, reference_mode: str) -> str:
    """A digest of the weights the reference computes with (the policy adapter excluded)."""
    h = hashlib.sha256(reference_mode.encode())
    for name, param in model.named_parameters():
        if f".{POLICY_ADAPTER}." in name or name.endswith(f".{POLICY_ADAPTER}"):
            continue  # the trainable adapter: disabled or swapped out while the reference runs
        _hash_tensor(h, name, param)
    for name, buffer in model.named_buffers():  # e.g. 4-bit quantization state kept as buffers
        _hash_tensor(h, name, buffer)
    return h.hexdigest()


def data_fingerprint(pairs: list[dict]) -> str:
    h = hashlib.sha256()
    for pair in pairs:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(json.dumps(list(pair[key])).encode())
        h.update(b";")
    return h.hexdigest()


def cache_path(weights: str, pairs: list[dict], compute: dict) -> Path:
    """The cache file of these weights, pairs and compute settings."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(weights.encode())
    h.update(data_fingerprint(pairs).encode())
    h.update(json.dumps(compute, sort_keys=True).encode())
    return cache_dir() / "reference-logps" / f"{h.hexdigest()[:32]}.json"


def load(path: Path, n_pairs: int) -> tuple[list[float], list[float]] | None:
    """The cached (chosen, rejected) log-probs, or None if absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    chosen, rejected = data.get("ref_chosen_logps"), data.get("ref_rejected_logps")
    if data.get("format") != FORMAT or not chosen or len(chosen) != n_pairs or len(rejected) != n_pairs:
        logger.warning("ignoring the reference log-prob cache %s: not this data's", path)
        return None
    return chosen, rejected


def save(path: Path, chosen: list[float], rejected: list[float]) -> None:
    write_atomic(
        path, json.dumps({"format": FORMAT, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected})
    )
