#!/usr/bin/env bash
# The GPU rows of README "Performance", in one device call (after benchmarks/gpu/prepare.sh here):
#     run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=540)
# On the GPU machine: installs the carried wheels, builds one random-init model of Llama-3.2-1B's
# shape, checks the path on a tiny model first (one step; a failure there stops the script before
# the long runs), then runs benchmarks/dpo_vs_trl.py with LoRA and with QLoRA, bf16, batch 8.
# Each run's log and its last line (the JSON summary) land in $OUT.
# A dry run on this CPU machine: ALLOW_CPU=1 SKIP_INSTALL=1 PYTHON=.venv/bin/python SHAPE=tiny BATCH=2 \
#     STEPS=1 OUT=/tmp/o bash benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/preftune-gpu-out}
PY=${PYTHON:-python3}
SHAPE=${SHAPE:-llama-1b}
BATCH=${BATCH:-8}
STEPS=${STEPS:-3}
WORK=${WORK:-/tmp/preftune-gpu}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PREFTUNE_CACHE="$WORK/cache"

if [ -z "${SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .gpu/whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
tar -xzf .gpu/inputs.tar.gz -C "$WORK" || exit 1

{
  date -u
  echo "preftune at $(cat .gpu/commit.txt 2>/dev/null || echo '?') (benchmarks/gpu/prepare.sh)"
  nvidia-smi -L 2>&1
  "$PY" - <<'PYEOF'
import os
import accelerate, bitsandbytes, datasets, fsspec, peft, pyarrow, torch, transformers, trl
modules = (torch, transformers, peft, trl, datasets, bitsandbytes, accelerate, pyarrow, fsspec)
print({m.__name__: m.__version__ for m in modules})
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
if not torch.cuda.is_available() and not os.environ.get("ALLOW_CPU"):
    raise SystemExit("no CUDA device: these runs are for a GPU (ALLOW_CPU=1 for a dry run on a CPU)")
PYEOF
} 2>&1 | tee "$OUT/env.txt" || exit 1  # a package that does not import: stop here

bench() {  # bench NAME SECONDS ARGS...: one benchmark run, its log and JSON line in $OUT
  local name=$1 limit=$2
  shift 2
  echo "== $name: dpo_vs_trl.py $*"
  timeout "$limit" "$PY" benchmarks/dpo_vs_trl.py --data "$WORK/data/dpo_en_demo.json" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "^{" "$OUT/$name.log" | tail -n 24  # the summary table (the JSON line is in $OUT)
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
  echo "== $name: exit $rc"
  return $rc
}

bench smoke 240 --model random:tiny --tokenizer "$WORK/tokenizer" --precision bf16 --steps 1 || exit 1

MODEL="$WORK/random-$SHAPE"
"$PY" - "$SHAPE" "$MODEL" "$WORK/tokenizer" <<'PYEOF' || exit 1
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from dpo_vs_trl import build_random_model

shape, folder, tokenizer = sys.argv[1:]
if not (Path(folder) / "config.json").is_file():
    build_random_model(shape, Path(folder), tokenizer)
print(f"random-init {shape} model in {folder}")
PYEOF

common=(--model "$MODEL" --precision bf16 --batch_size "$BATCH" --steps "$STEPS")
bench lora 300 "${common[@]}"
bench qlora 300 "${common[@]}" --qlora
