"""bitsandbytes quantization for (Q)LoRA: the loading config and a CPU training fix.

``bnb_config`` turns the CLI flags into a ``transformers.BitsAndBytesConfig``.

``keep_4bit_trainable_after_no_grad`` must be called once on every model loaded in 4 bits
(``load_base_model`` does it). Without it, QLoRA on a CPU with AVX512-BF16 silently trains with wrong
gradients as soon as the model has run one evaluation, generation or reference forward pass; see its
docstring.
"""

from __future__ import annotations

import logging
import warnings

import torch
from transformers import BitsAndBytesConfig

logger = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_STORAGE_DTYPES = {**_DTYPES, "uint8": torch.uint8, "int8": torch.int8}


def _dtype(value: str | torch.dtype, table: dict[str, torch.dtype], flag: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in table.values():
            return value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in table:
            return table[key]
    choices = ", ".join(sorted({str(d).removeprefix("torch.") for d in table.values()}))
    raise ValueError(f"{flag} must be one of {choices}, got {value!r}")


def bnb_config(
    load_in_4bit: bool,
    load_in_8bit: bool,
    quant_type: str = "nf4",
    nested: bool = False,
    compute_dtype: str = "float32",
    quant_storage: str | None = None,
) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` for the quantization flags; None when neither 4 nor 8 bits is asked for.

    The 4-bit options (quant type, nested quant, compute dtype, storage dtype) are validated in every case,
    so a typo fails early, but they are only used with ``load_in_4bit``. On CPU keep ``compute_dtype``
    float32: float16 matmuls are slow there and bfloat16 ones lose precision.
    """
    if not isinstance(load_in_4bit, bool):
        raise ValueError(f"--use_4bit_quantization must be a boolean, got {load_in_4bit!r}")
    if not isinstance(load_in_8bit, bool):
        raise ValueError(f"--use_8bit_quantization must be a boolean, got {load_in_8bit!r}")
    if not isinstance(nested, bool):
        raise ValueError(f"--use_nested_quant must be a boolean, got {nested!r}")
    if load_in_4bit and load_in_8bit:
        raise ValueError(
            "--use_4bit_quantization and --use_8bit_quantization are mutually exclusive: pick one"
        )
    qtype = quant_type.strip().lower() if isinstance(quant_type, str) else quant_type
    if qtype not in QUANT_TYPES:
        raise ValueError(f"--bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    compute = _dtype(compute_dtype, _DTYPES, "--bnb_4bit_compute_dtype")
    storage = None
    if quant_storage is not None:
        storage = _dtype(quant_storage, _STORAGE_DTYPES, "--bnb_4bit_quant_storage_dtype")

    if load_in_8bit:
        if nested or storage is not None:
            logger.info("--use_nested_quant / --bnb_4bit_quant_storage_dtype only apply to 4-bit: ignored")
        return BitsAndBytesConfig(load_in_8bit=True)
    if not load_in_4bit:
        return None
    extra = {} if storage is None else {"bnb_4bit_quant_storage": storage}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qtype,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=compute,
        **extra,
    )


def keep_4bit_trainable_after_no_grad(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference, so QLoRA keeps correct gradients.

    The problem (bitsandbytes >= 0.49, on a CPU with AVX512-BF16: Intel Sapphire Rapids / AMD Zen 4 and
    later): ``bitsandbytes.nn.Linear4bit.forward`` converts its weight *in place* to an inference-only
    layout (``bitsandbytes.functional._convert_weight_packed_for_cpu``: nibbles re-tiled, double-quant
    absmax expanded and rounded to bfloat16, ``quant_state.packing_format_for_cpu = True``) the first time
    it gets a CPU input while ``module.training`` is False and ``x.requires_grad`` is False: any
    evaluation, ``generate``, or DPO reference pass under ``model.eval()`` + ``torch.no_grad()``. Nothing
    converts it back. From then on ``bitsandbytes.matmul_4bit`` sends *every* call on that layer, training
    included, to ``torch.ops.bitsandbytes.gemv_4bit``, a bfloat16 kernel with no autograd formula (PyTorch
    only warns "an autograd kernel was not registered"). The base layer then passes no gradient to its
    input, so every LoRA weight upstream of it gets a wrong gradient, or none while ``lora_B`` is still
    zero, and log-probs shift by ~1e-3 because the packed kernel computes in bfloat16.

    The fix: ``Linear4bit`` decides whether to repack from its per-module attribute
    ``support_avx512bf16_for_cpu`` (set in ``__init__`` from ``bitsandbytes.functional.has_avx512bf16()``).
    There is no global switch or environment variable, so we set that attribute to False on every 4-bit
    layer of ``model`` (LoRA wrappers keep the same base-layer objects, so calling before or after
    ``get_peft_model`` both work). Weights stay 4-bit, nothing is dequantized in memory; no-grad passes use
    the same dequantize-then-matmul path as training, so eval and train log-probs are identical. Cost: CPU
    inference does not use the fused AVX512-BF16 kernel (which is less accurate anyway).

    A layer that was already repacked is converted back with bitsandbytes' own inverse, with a warning: that
    is lossy (absmax was rounded to bfloat16: ~0.2-0.4% change in the dequantized weights), so call this
    right after loading, before any forward pass.

    Idempotent. A no-op for models without bitsandbytes 4-bit layers and for bitsandbytes versions without
    the repack; on CUDA/XPU the attribute is never read, so setting it changes nothing there. Returns the
    number of 4-bit layers seen.
    """
    try:
        import bitsandbytes as bnb
    except Exception:  # not installed, or its native library failed to load: no 4-bit layers can exist
        return 0

    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    if linear4bit is None:
        return 0
    inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
    has_repack = hasattr(bnb.functional, "_convert_weight_packed_for_cpu")

    count = unpacked = 0
    unknown_mechanism = False
    for module in model.modules():
        if not isinstance(module, linear4bit):
            continue
        count += 1
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        elif has_repack:
            unknown_mechanism = True
        weight = module.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
            continue
        if inverse is None:
            raise RuntimeError(
                "a bitsandbytes 4-bit layer was already repacked for CPU inference and this bitsandbytes has "
                "no inverse conversion: reload the model and call keep_4bit_trainable_after_no_grad() before "
                "any forward pass"
            )
        data, quant_state = inverse(weight.data, quant_state)
        if not quant_state.nested:
            # bitsandbytes' inverse (0.50.2) restores nested absmax, but leaves plain absmax in the packed layout:
            # [in_features // blocksize, out_features], bfloat16. Dequantizing with it as-is scrambles the scales
            # of every layer with in_features > blocksize (~20% weight error; bitsandbytes' own state_dict()/
            # .cuda() after a CPU eval pass hit the same bug). Undo the transpose; quantize_4bit makes fp32.
            absmax = quant_state.absmax
            if absmax.dim() == 2:
                absmax = absmax.T.reshape(-1)
            quant_state.absmax = absmax.float().contiguous()
        weight.data = data
        weight.quant_state = quant_state
        module.quant_state = quant_state
        unpacked += 1

    if unpacked:
        warnings.warn(
            f"{unpacked} bitsandbytes 4-bit layers had already been repacked for CPU inference (an eval/no-grad "
            "forward ran before keep_4bit_trainable_after_no_grad); they were converted back, but their absmax "
            "scales were rounded to bfloat16. Call it right after loading to keep the exact weights.",
            stacklevel=2,
        )
    if unknown_mechanism:
        warnings.warn(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} repacks 4-bit weights for CPU inference but its "
            "Linear4bit has no support_avx512bf16_for_cpu attribute: QLoRA gradients on CPU may be wrong after "
            "an eval/no-grad pass. Check preftune.models.quantization against this bitsandbytes version.",
            stacklevel=2,
        )
    if count:
        logger.debug("CPU repacking disabled on %d bitsandbytes 4-bit layers (%d unpacked)", count, unpacked)
    return count
