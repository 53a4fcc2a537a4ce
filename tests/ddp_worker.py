"""Run `preftune` in one process of an `accelerate launch`, recording which files it opens for
writing under the output folder (Python-level opens, via an audit hook) in writes-rank<N>.txt
beside the output folder. Used by tests/test_distributed.py.

With PREFTUNE_TEST_DUMP_REFERENCE=1, a DPO run also saves, at the end of training, its `reference`
adapter as every process sees it, gathered whole from the shards under FSDP or ZeRO-3, in
reference-rank<N>.safetensors beside the output folder (keys as in the adapter file it came from).
"""

import os
import sys
from pathlib import Path

output_dir = Path(sys.argv[sys.argv.index("--output_dir") + 1]).resolve()
rank = os.environ.get("RANK", "0")
writes: list[str] = []


def audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], str | os.PathLike):
        path, mode, flags = Path(os.fsdecode(args[0])).resolve(), args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
        )
        if writing and output_dir in path.parents:
            writes.append(str(path.relative_to(output_dir)))


def dump_reference_at_finish() -> None:
    import contextlib

    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from preftune.models.prepare import REFERENCE_ADAPTER
    from preftune.training import common

    finish = common.finish

    def dumping_finish(trainer, *args, **kwargs):
        model = trainer.accelerator.unwrap_model(trainer.model)
        # the same order in every process: gathering is a collective
        params = [(n, p) for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n]
        gathered = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for _, p in params):  # DeepSpeed ZeRO-3 partitions
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([p for _, p in params])
        reference = {}
        with gathered:
            for name, param in params:
                assert not param.requires_grad, f"{name} is trainable"
                whole = param.full_tensor() if isinstance(param, DTensor) else param  # FSDP2 shards
                reference[name.replace(f".{REFERENCE_ADAPTER}.", ".")] = whole.detach().cpu().clone()
        save_file(reference, str(output_dir.parent / f"reference-rank{rank}.safetensors"))
        return finish(trainer, *args, **kwargs)

    common.finish = dumping_finish


sys.addaudithook(audit)
if os.environ.get("PREFTUNE_TEST_DUMP_REFERENCE"):
    dump_reference_at_finish()
from preftune.cli.main import main  # noqa: E402

try:
    main(sys.argv[1:])
finally:
    (output_dir.parent / f"writes-rank{rank}.txt").write_text("\n".join(writes))
