"""Run `preftune` in one process of an `accelerate launch`, recording which files it opens for
writing under the output folder (Python-level opens, via an audit hook) in writes-rank<N>.txt
beside the output folder. Used by tests/test_distributed.py."""

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


sys.addaudithook(audit)
from preftune.cli.main import main  # noqa: E402

try:
    main(sys.argv[1:])
finally:
    (output_dir.parent / f"writes-rank{rank}.txt").write_text("\n".join(writes))
