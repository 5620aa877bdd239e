# Sourced by the GPU session scripts (gpu_session.sh, gpu_distributed.sh): needs $OUT and $SUMMARY set.
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
