#!/usr/bin/env bash
# The fast-low-bit-training GPU session in ONE call of at most 10 minutes (an H100; 16 CPU cores):
#
#   bash benchmarks/gpu_session.sh                # everything under ${OUT:-/tmp/out}
#
# Steps, each under its own `timeout` (seconds), each logged to $OUT/<step>.log; a failing or timed-out step does
# not stop the next one, and a summary (step, exit code, seconds) is printed at the end and written to
# $OUT/summary.txt. Exit code 124 = the step ran past its timeout (what it wrote before is kept: the benchmarks
# rewrite their reports after every row / bench).
#
#   tests       150 s  pytest -m needs_cuda: the training kernels at real shapes (LOWBIT_AUTOTUNE=0 via conftest)
#   dqt_fused    40 s  pytest tests/optim/test_dqt_fused.py (own process: it runs Triton's interpreter)
#   kernels     140 s  bench_kernels.py, every bench, bounded (--quick --max-configs 4 --time-budget 110)
#   profile      70 s  profile_layers.py at the 130m and 430m up-projection shapes (host vs device time)
#   train130    220 s  bench_train.py: $RECIPES at 130m, batch 16 × seq 1024, compiled, kernels on and off
#   parity      100 s  loss_parity.py: 200 steps kernels on vs off (tiny model, quest-w4a4, bitnet-b1.58, dqt-int8)
#   train430   rest    the same at 430m (batch 8), only if ≥ 60 s are left of TOTAL (default 580)
#   train130ro  220 s  bench_train at 130m with CUDA graphs (reduce-overhead) and per-block compile, kernels on/off
#                      ($RECIPES_RO, $KERNELS_RO)
#   train430ro rest    the same at 430m, batch 8, only if ≥ 60 s are left
#   gemv_tests   90 s  pytest -m needs_cuda: the decode GEMV and prefill kernels
#   decode     rest    bench_decode.py (GEMV, end-to-end decode, prefill), only if ≥ 90 s are left
#   int8_tests   60 s  pytest -m needs_cuda tests/kernels/test_int8_rows.py (the BitNet activation quantizer kernel)
#   gen_tests    90 s  pytest -m needs_cuda tests/test_generate.py (CUDA-graph and compiled decode vs eager)
#   sweep       280 s  sweep_gemv.py: the decode GEMV per configuration of its tables (+ autotuned) vs bf16
#   gemv        120 s  bench_decode.py --only gemv: the GEMV rows of the issue (autotuned)
#   e2e_c      rest    bench_decode.py --only e2e --compile: 800m decode, eager vs torch.compile'd step (both
#                      CUDA-graphed), bf16 and ternary A16 ($E2E_VARIANTS; more options in $E2E_OPTS, e.g.
#                      "--fuse both --profile"), only if ≥ 90 s are left
#
# PART=train: tests dqt_fused kernels profile train130 parity train430; PART=inference: gemv_tests decode;
# PART=diag: profile tests dqt_fused gemv_tests decode; PART=next: tests profile train130ro decode; PART=all (default): all of them. STEPS="a b" picks
# steps by name; T_<STEP>=seconds overrides a timeout (T_TESTS, T_GEMV, T_TRAIN130, …), TOTAL the whole budget.
# The ${T_PER_TEST:-90} s per-test timeout needs pytest-timeout (on the GPU image). At the end every output is
# packed into $OUT/session-$PART.tgz (the device tool brings back few files), with summary.txt beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${PART:-all}
source benchmarks/gpu_steps.sh  # session_env; step NAME SECONDS COMMAND...
session_env
TOTAL=${TOTAL:-580}

machine_info

RECIPES=${RECIPES:-bf16,quest-w4a4,bitnet-b1.58,dqt-int8,quest-w8a8,dqt-ternary}
case "$PART" in  # which steps run, in order (STEPS="a b c" overrides)
  train) DEFAULT="tests dqt_fused kernels profile train130 parity train430" ;;
  inference) DEFAULT="gemv_tests decode" ;;
  diag) DEFAULT="profile tests dqt_fused gemv_tests decode" ;;
  next) DEFAULT="tests profile train130ro decode" ;;
  *) DEFAULT="tests dqt_fused kernels profile train130 parity train430 gemv_tests decode" ;;
esac
STEPS=${STEPS:-$DEFAULT}
TESTOPTS="-q -p no:cacheprovider --timeout ${T_PER_TEST:-90} --durations 15"

for s in $STEPS; do
  left=$((TOTAL - SECONDS))
  case $s in
  tests) step tests "${T_TESTS:-150}" env LOWBIT_AUTOTUNE=0 $PY -m pytest $TESTOPTS -m needs_cuda --junitxml="$OUT/tests.xml" \
      tests/kernels tests/nn/test_kernel_dispatch.py --ignore tests/kernels/test_lowbit_gemv.py \
      --ignore tests/kernels/test_packed_prefill.py ;;
  dqt_fused) step dqt_fused "${T_DQT:-40}" $PY -m pytest $TESTOPTS tests/optim/test_dqt_fused.py ;;
  kernels) step kernels "${T_KERNELS:-140}" $PY benchmarks/bench_kernels.py --quick --max-configs 4 \
      --time-budget 110 --out "$OUT/bench_kernels.md" ;;
  profile) step profile "${T_PROFILE:-70}" bash -c "$PY benchmarks/profile_layers.py --shape 16384,768,2048 \
      --out $OUT/profile_130m_up.md && $PY benchmarks/profile_layers.py --shape 8192,1664,4608 \
      --out $OUT/profile_430m_up.md" ;;
  train130) step train130 "${T_TRAIN130:-220}" $PY benchmarks/bench_train.py --recipes "$RECIPES" --sizes 130m \
      --batch 16 --seq 1024 --vocab 32000 --steps 10 --warmup 3 --kernels on,off \
      --time-budget "${B_TRAIN130:-175}" --out "$OUT/bench_train_130m.md" ;;
  train130ro) step train130ro "${T_TRAIN130RO:-220}" $PY benchmarks/bench_train.py --recipes "${RECIPES_RO:-bf16,quest-w4a4,bitnet-b1.58,dqt-int8}" \
      --sizes 130m --batch 16 --seq 1024 --vocab 32000 --steps 10 --warmup 3 --kernels "${KERNELS_RO:-on,off}" \
      --compile-scope block --compile-mode reduce-overhead --time-budget "${B_TRAIN130RO:-180}" \
      --out "$OUT/bench_train_130m_ro_block.md" ;;
  train430ro) if [ "$left" -ge 60 ]; then
      step train430ro "$left" $PY benchmarks/bench_train.py --recipes "${RECIPES_RO:-bf16,quest-w4a4,bitnet-b1.58,dqt-int8}" \
        --sizes 430m --batch 8 --seq 1024 --vocab 32000 --steps 10 --warmup 3 --kernels "${KERNELS_RO:-on,off}" \
        --compile-scope block --compile-mode reduce-overhead --time-budget $((left - 40)) \
        --out "$OUT/bench_train_430m_ro_block.md"
    else printf '%-10s skipped: %ss left of TOTAL=%s\n' train430ro "$left" "$TOTAL" >>"$SUMMARY"; fi ;;
  parity) step parity "${T_PARITY:-100}" $PY benchmarks/loss_parity.py --recipes quest-w4a4,bitnet-b1.58,dqt-int8 \
      --steps 200 --out "$OUT/loss_parity" ;;
  train430) if [ "$left" -ge 60 ]; then
      step train430 "$left" $PY benchmarks/bench_train.py --recipes "$RECIPES" --sizes 430m --batch 8 --seq 1024 \
        --vocab 32000 --steps 10 --warmup 3 --kernels on,off --time-budget $((left - 45)) \
        --out "$OUT/bench_train_430m.md"
    else printf '%-10s skipped: %ss left of TOTAL=%s\n' train430 "$left" "$TOTAL" >>"$SUMMARY"; fi ;;
  sweep) step sweep "${T_SWEEP:-280}" $PY benchmarks/sweep_gemv.py --formats "${SWEEP_FORMATS:-ternary,w4,w8}" \
      --time-budget $((${T_SWEEP:-280} - 30)) --out "$OUT/sweep_gemv.md" ;;
  gemv) step gemv "${T_GEMVB:-120}" $PY benchmarks/bench_decode.py --only gemv --out "$OUT/bench_decode_gemv.md" ;;
  gemv_tests) step gemv_tests "${T_GEMV:-90}" $PY -m pytest $TESTOPTS -m needs_cuda \
      tests/kernels/test_lowbit_gemv.py tests/kernels/test_packed_prefill.py ;;
  int8_tests) step int8_tests "${T_INT8:-60}" env LOWBIT_AUTOTUNE=0 $PY -m pytest $TESTOPTS -m needs_cuda \
      tests/kernels/test_int8_rows.py ;;
  gen_tests) step gen_tests "${T_GEN:-90}" $PY -m pytest $TESTOPTS -m needs_cuda tests/test_generate.py ;;
  e2e_c) if [ "$left" -ge 90 ]; then
      step e2e_c "$left" $PY benchmarks/bench_decode.py --only e2e --compile ${E2E_OPTS:-} \
        --e2e-variants "${E2E_VARIANTS:-bf16,bitnet-b1.58}" --time-budget $((left - 45)) --out "$OUT/bench_decode_e2e.md"
    else printf '%-10s skipped: %ss left of TOTAL=%s\n' e2e_c "$left" "$TOTAL" >>"$SUMMARY"; fi ;;
  decode) if [ "$left" -ge 90 ]; then  # GEMV + 800m decode tokens/s + prefill (≤ 4 min on an H100)
      step decode "$left" $PY benchmarks/bench_decode.py --time-budget $((left - 60)) --out "$OUT/bench_decode.md"
    else printf '%-10s skipped: %ss left of TOTAL=%s\n' decode "$left" "$TOTAL" >>"$SUMMARY"; fi ;;
  *) echo "unknown step $s"; exit 2 ;;
  esac
done

echo
echo "================ summary (${SECONDS}s in all; outputs in $OUT) ================"
cat "$SUMMARY"
grep -h -E "passed|failed|error" "$OUT"/tests.log "$OUT"/dqt_fused.log "$OUT"/gemv_tests.log "$OUT"/int8_tests.log \
  "$OUT"/gen_tests.log 2>/dev/null | tail -6
ls -la "$OUT"
( cd "$OUT" && find . -maxdepth 1 -type f ! -name summary.txt ! -name 'session-*.tgz' -printf '%P\0' |
  tar -czf "session-$PART.tgz" --null -T - --remove-files ) && echo "packed into $OUT/session-$PART.tgz"
