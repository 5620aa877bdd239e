#!/usr/bin/env bash
# The prefill-speed measurements (issue #9: quest-w4a4 per layer ≥ 1.6× bf16) in ONE call of about 4 minutes on
# an H100 or H200:
#
#   bash benchmarks/gpu_prefill.sh                # outputs under ${OUT:-/tmp/out}
#
# Steps, each under its own `timeout` (seconds), each logged to $OUT/<step>.log, a summary (step, exit code,
# seconds) in $OUT/summary.txt; a failing or timed-out step (exit 124) does not stop the next one:
#
#   tests     130 s  pytest -m needs_cuda on the kernels this work touched — hadamard_quant (the forward at real
#                    shapes, every GPU_CONFIGS entry and the autotuned launch giving the same bits, the FMA
#                    quotient against torch's division), scaled_mm (torch's row-wise FP8 GEMM against the
#                    reference, auto's choice; not the Triton-only GEMM tests this work left alone: autotuned,
#                    adversarial accumulation, INT8), packed_prefill, quest_linear — with LOWBIT_AUTOTUNE=0
#                    except where a test sets it (tests/kernels/conftest.py). Its compilations stay in Triton's
#                    cache for the bench.
#   prefill  rest    (≥ 100 s) bench_decode.py --only prefill: per layer at the 800m shapes (the quantizer alone
#                    with GB/s and % of copy bandwidth, the GEMM alone per backend, the totals; eager and CUDA
#                    graph), then the end-to-end 512-token prefill while --time-budget lasts; the quantizer
#                    autotunes at its first call per K (about 12 compilations)
#
# T_TESTS / T_PREFILL override the timeouts, TOTAL (240) the whole budget.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_steps.sh  # session_env; step NAME SECONDS COMMAND...
session_env
TOTAL=${TOTAL:-240}

machine_info

step tests "${T_TESTS:-130}" $PY -m pytest -q -p no:cacheprovider -m needs_cuda --durations 10 \
  -k "not (gpu_autotuned or accumulation_adversarial or int8_exact)" --junitxml="$OUT/tests.xml" \
  tests/kernels/test_hadamard_quant.py tests/kernels/test_scaled_mm.py tests/kernels/test_packed_prefill.py \
  tests/kernels/test_quest_linear.py tests/kernels/test_direct_call.py

left=$((TOTAL - SECONDS))
step prefill "${T_PREFILL:-$((left > 100 ? left : 100))}" $PY benchmarks/bench_decode.py --only prefill \
  --time-budget $((left > 100 ? left - 60 : 40)) --out "$OUT/bench_decode_prefill.md"

echo
echo "================ summary (${SECONDS}s in all; outputs in $OUT) ================"
cat "$SUMMARY"
grep -h -E "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -2
