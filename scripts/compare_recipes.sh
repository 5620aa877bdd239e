#!/usr/bin/env bash
# Train several recipes on the same data, model, schedule and tokens, then compare them in one report.
#   scripts/compare_recipes.sh [CONFIG] [OUT] [RECIPE ...]
# Defaults: configs/tiny-cpu.toml, runs/cmp, and the issue's comparison set. Overrides for every run via $OVERRIDES
# (docs/results.md: OVERRIDES="train.steps=200 train.log_every=10").
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/tiny-cpu.toml}
out=${2:-runs/cmp}
shift $(( $# > 2 ? 2 : $# ))
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(bf16 bitnet-b1.58 quest-w4a4 ste-w4a4 quest-w1a1)
lowbit=${LOWBIT:-.venv/bin/lowbit}
for r in "${recipes[@]}"; do
  $lowbit train --config "$config" --overwrite quant.recipe="$r" train.out_dir="$out/$r" train.progress=false ${OVERRIDES:-}
done
runs=()
for r in "${recipes[@]}"; do runs+=("$out/$r"); done
if [ -d "$out/bf16" ]; then
  $lowbit convert "$out/bf16" --ptq quest-w4a4 --out "$out/bf16-ptq-quest-w4a4"
  runs+=("$out/bf16-ptq-quest-w4a4")
fi
$lowbit report "${runs[@]}" --out "$out/report"
