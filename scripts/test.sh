#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run the test suite. The README's second command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# pytest exits 5 when it collects no tests: that must fail CI, and it does (any non-zero exit fails)
exec .venv/bin/python -m pytest "$@"
