#!/usr/bin/env bash
# Install misa-fast with its test extras and run the whole suite (tests + benchmarks with
# --benchmark-disable so that they run once as correctness checks). CPU torch and the Triton
# interpreter are enough: kernels run under TRITON_INTERPRET=1 when no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 triton==3.7.1
python3 -m pip install -q ".[test]"
# Safe path (Python >= 3.11): keep the checkout's misa_fast/ (no compiled extension when installed
# non-editable) from shadowing the installed package.
PYTHONSAFEPATH=1 python3 -m pytest --benchmark-disable -q "$@"
