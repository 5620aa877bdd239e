#!/usr/bin/env bash
# Set up a virtual environment (if needed), then train and evaluate a small low-bit model on the built-in
# corpus and print a short report. The README's first command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e .
exec .venv/bin/lowbit train --config configs/tiny-cpu.toml --overwrite "$@"
