#!/usr/bin/env bash
# The multi-GPU measurements (docs/distributed.md) in ONE call of at most 10 minutes on a machine with 2 GPUs:
#
#   bash benchmarks/gpu_distributed.sh            # outputs under ${OUT:-/tmp/out}; needs data/default-4k (carry it)
#
# Steps, each under its own `timeout`, each logged to $OUT/<step>.log, a summary in $OUT/summary.txt:
#   w1, w2     bench_distributed.py under torchrun with 1 and then 2 processes: $SIZE (430m), batch 8 × 1024 per
#              rank, $RECIPES (bf16, quest-w4a4, dqt-int8) × DDP and FSDP2; then --compare → dist_scaling.md
#   parity     (≤ 320 s) the trainer itself (`lowbit train`, configs/tiny-cpu.toml on cuda, $PSTEPS steps, the same global
#              batch of 16): one GPU (parallel=none) vs `--nproc 2` DDP and FSDP2, for quest-w4a4 and dqt-int8
#              (bf16 mixed precision everywhere) → `lowbit report` plots of the loss curves
#   resume     a 2-GPU FSDP2 dqt-int8 checkpoint (DCP, step PSTEPS/2) resumed on one GPU; its log beside the
#              uninterrupted run's
#   w1c, w2c   the benchmark again with torch.compile per block, FSDP2 only, if ≥ 150 s are left of TOTAL (580)
# NVLink multicast stays off (the machine's NCCL_NVLS_ENABLE=0 etc. are kept and set again here).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_steps.sh  # session_env; step NAME SECONDS COMMAND...
session_env
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TOTAL=${TOTAL:-580}
SIZE=${SIZE:-430m}
RECIPES=${RECIPES:-bf16,quest-w4a4,dqt-int8}
PSTEPS=${PSTEPS:-300}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  nvidia-smi topo -m 2>/dev/null
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
  git rev-parse --short HEAD 2>/dev/null
  env | grep -E '^(NCCL|TORCH_SYMM|NVSHMEM)' | sort
} 2>&1 | tee "$OUT/machine.txt"

BENCH="benchmarks/bench_distributed.py --size $SIZE --batch 8 --seq 1024 --vocab 32000 --steps 10 --warmup 3"
TR="$PY -m torch.distributed.run --standalone"
STEPS=${STEPS:-w1 w2 parity resume compiled}  # a subset by name (e.g. STEPS="parity resume" DEV=cpu on a laptop)
has() { [[ " $STEPS " == *" $1 "* ]]; }
has w1 && step w1 "${T_W1:-170}" $TR --nproc-per-node 1 $BENCH --recipes "$RECIPES" --parallel "${PARALLEL:-ddp,fsdp2}" --out "$OUT/dist_w1.md"
has w2 && step w2 "${T_W2:-170}" $TR --nproc-per-node 2 $BENCH --recipes "$RECIPES" --parallel "${PARALLEL:-ddp,fsdp2}" --out "$OUT/dist_w2.md"
has w2 && { $PY $BENCH --compare "$OUT/dist_w1.json" "$OUT/dist_w2.json" --out "$OUT/dist_scaling.md" >/dev/null 2>&1 || true; }

L="$PY -m lowbit.cli"
TINY="--config configs/tiny-cpu.toml train.device=${DEV:-cuda} train.steps=$PSTEPS train.eval_every=100 train.eval_batches=4
      train.log_every=1 train.tensorboard=false train.progress=false"
parity() {
  for r in quest-w4a4 dqt-int8; do
    $L train $TINY quant.recipe=$r train.batch_size=16 train.ckpt_every=0 train.out_dir=$OUT/runs/$r-1gpu || return 1
    for p in ddp fsdp2; do
      $L train --nproc 2 $TINY quant.recipe=$r train.batch_size=8 train.parallel=$p \
        train.ckpt_every=$((PSTEPS / 2)) train.out_dir=$OUT/runs/$r-2gpu-$p || return 1
    done
    $L report $OUT/runs/$r-* --out $OUT/parity-$r || return 1
  done
}

resume() {  # the 2-GPU FSDP2 dqt-int8 run's mid checkpoint, resumed by ONE process; compare with the full run
  local src=$OUT/runs/dqt-int8-2gpu-fsdp2 dst=$OUT/runs/dqt-int8-2gpu-fsdp2-resumed-1gpu half
  half=$(printf 'step_%07d' $((PSTEPS / 2)))
  rm -rf "$dst" && cp -r "$src" "$dst" || return 1
  find "$dst/ckpt" -mindepth 1 -maxdepth 1 -type d ! -name "$half" -exec rm -rf {} + && echo "$half" >"$dst/ckpt/latest"
  $PY -c "import json,sys; p=sys.argv[1]+'/config.json'; c=json.load(open(p)); c['train']['out_dir']=sys.argv[1]; json.dump(c,open(p,'w'))" "$dst"
  $L train $TINY quant.recipe=dqt-int8 train.batch_size=16 train.parallel=none train.ckpt_every=$((PSTEPS / 2)) \
    train.out_dir="$dst" --resume || return 1
  $PY - "$src" "$dst" <<'EOF'
import json, sys
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(d + "/log.jsonl")) if "loss" in r and "step" in r}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(a) & set(b))
late = [s for s in steps if s > max(steps) // 2]
print(f"resume check: {len(steps)} common steps; max |Δloss| after the checkpoint {max(abs(a[s] - b[s]) for s in late):.2e}; "
      f"final {a[steps[-1]]:.4f} (2 GPUs throughout) vs {b[steps[-1]]:.4f} (resumed on 1 GPU)")
EOF
  find "$OUT/runs" -type d -name ckpt -prune -exec rm -rf {} +  # checkpoints do not come back
}
export -f parity resume
export L TINY PSTEPS PY OUT
has parity && step parity "${T_PARITY:-320}" bash -c parity
has resume && step resume "${T_RESUME:-90}" bash -c resume

left=$((TOTAL - SECONDS))
if has compiled && [ "$left" -ge 150 ]; then  # compiled per block, FSDP2 only
  half=$(((left - 20) / 2))
  step w1c "$half" $TR --nproc-per-node 1 $BENCH --recipes "$RECIPES" --parallel fsdp2 --compile --out "$OUT/dist_w1_compiled.md"
  step w2c "$half" $TR --nproc-per-node 2 $BENCH --recipes "$RECIPES" --parallel fsdp2 --compile --out "$OUT/dist_w2_compiled.md"
  $PY $BENCH --compare "$OUT/dist_w1_compiled.json" "$OUT/dist_w2_compiled.json" --out "$OUT/dist_scaling_compiled.md" >/dev/null 2>&1 || true
elif has compiled; then printf '%-10s skipped: %ss left of TOTAL=%s\n' compiled "$left" "$TOTAL" >>"$SUMMARY"; fi

echo; echo "================ summary (${SECONDS}s in all; outputs in $OUT) ================"
cat "$SUMMARY"
cat "$OUT/dist_scaling.md" 2>/dev/null
# one archive without checkpoints (the device tool brings back few, small files); the markdown reports stay beside it
find "$OUT" -type d -name ckpt -prune -exec rm -rf {} +
tar -czf /tmp/session-distributed.tgz -C "$OUT" --exclude summary.txt . && mv /tmp/session-distributed.tgz "$OUT/" &&
  find "$OUT" -mindepth 1 ! -name session-distributed.tgz ! -name summary.txt ! -name 'dist_*.md' -delete 2>/dev/null;
echo "packed into $OUT/session-distributed.tgz ($(du -h "$OUT/session-distributed.tgz" | cut -f1))"
