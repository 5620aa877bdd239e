#!/usr/bin/env bash
# One stage of an experiment on the GPU machine, inside its 10-minute command limit:
#   bash experiments/gpu_stage.sh EXPERIMENT.toml SECONDS [--only GLOB ...]
# 1. unpack the text (a zstd tar of data/corpus, carried in .carry/) and prepare the dataset, unless a previous
#    stage on the same machine already did; 2. run `lowbit sweep` (its runs spread over every visible GPU) until SECONDS have passed since the start
#    (runs still going are checkpointed and resume in the next stage); 3. pack the small results (summaries,
#    configs, JSONL logs, sweep logs; no checkpoints) into $OUT/results.tgz.
# Source: $LOWBIT_SRC (default src) is put on PYTHONPATH, so a frozen copy of the code can be used.
set -uo pipefail
cd "$(dirname "$0")/.."
exp=$1; budget=$2; shift 2
export PYTHONPATH=${LOWBIT_SRC:-$PWD/src} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
L="python3 -m lowbit.cli"
base=$(python3 -c "import tomllib,sys,os; e=tomllib.load(open('$exp','rb'))['experiment']; print(os.path.normpath(os.path.join(os.path.dirname('$exp'), e['base'])))")
out=$(python3 -c "import tomllib; print(tomllib.load(open('$exp','rb'))['experiment'].get('out'))")
if [ ! -d data/corpus/dict ]; then
  mkdir -p data/corpus
  if command -v zstd >/dev/null; then zstd -dc --long=27 .carry/corpus.tar.zst | tar -C data/corpus -xf - || exit 1
  else  # no zstd binary: the python zstandard wheel carried in .carry/whl
    python3 -m pip install -q --no-index --no-deps --target /tmp/zst .carry/whl/zstandard-*.whl || exit 1
    PYTHONPATH=/tmp/zst python3 -c "import sys, zstandard; zstandard.ZstdDecompressor(max_window_size=1<<31).copy_stream(open('.carry/corpus.tar.zst','rb'), sys.stdout.buffer)" | tar -C data/corpus -xf - || exit 1
  fi
fi
$L data --config "$base" || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
left=$(( budget - SECONDS - 45 ))
echo "stage: $SECONDS s of setup, sweeping for $left s"
$L sweep "$exp" --set train.device=cuda --gpus auto --time-limit "$left" --no-progress "$@"
rc=$?
mkdir -p "${OUT:-/tmp/out}"
find "$out" \( -name summary.json -o -name config.json -o -name log.jsonl -o -name sweep.json -o -name '*.log' \
  -o -name tasks.json \) -print0 | tar -czf "${OUT:-/tmp/out}/results.tgz" --null -T - data/mix-16k/manifest.json
echo "sweep exit $rc; packed $(du -h ${OUT:-/tmp/out}/results.tgz | cut -f1)"
exit $rc
