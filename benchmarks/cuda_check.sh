#!/usr/bin/env bash
# Issue 10's GPU check: bf16 parity on CUDA, then decode tok/s at concurrency 1 and 64 against transformers on the
# same GPU and against the GPU's bandwidth bound (benchmarks/cuda_check.py). Under 8 minutes on one H200.
# Exits 2 at once, running nothing, when torch sees no CUDA device. Extra arguments go to the driver.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec timeout "${CUDA_CHECK_TIMEOUT:-480}" "$PY" benchmarks/cuda_check.py "$@"
