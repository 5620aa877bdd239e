# Sourced by the GPU session scripts (gpu_session.sh, gpu_prefill.sh, gpu_distributed.sh) from the repository root.

# session_env — the scripts' common setup: outputs under $OUT (default /tmp/out), src/ on PYTHONPATH, unbuffered
# Python, $PY (${PYTHON:-python3}), and an empty $OUT/summary.txt as $SUMMARY (step appends to it)
session_env() {
  OUT=${OUT:-/tmp/out}
  mkdir -p "$OUT"
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
  PY=${PYTHON:-python3}
  SUMMARY="$OUT/summary.txt"
  : >"$SUMMARY"
}
# step NAME SECONDS COMMAND... — run under timeout, log to $OUT/NAME.log (appended), record rc and time in $SUMMARY
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== [$name] (timeout ${limit}s, at ${SECONDS}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%-10s rc=%-4s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >>"$SUMMARY"
  echo "=== [$name] exit $rc after $((SECONDS - t0))s"
}

# machine_info — date, GPU, torch/triton versions and the tree's commit, to stdout and $OUT/machine.txt
machine_info() {
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    ${PY:-python3} -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    git rev-parse --short HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
  } 2>&1 | tee "$OUT/machine.txt"
}
