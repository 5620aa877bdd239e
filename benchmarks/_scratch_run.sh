#!/bin/bash
# TEMPORARY device driver (delete before commit). usage: _scratch_run.sh BUDGET_S "name|ENV=..|args" ...
export PYTHONUNBUFFERED=1 PYTHONPATH=src
R=/tmp/res; mkdir -p $R/prof
budget=$1; shift
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee $R/gpu.txt
python3 -c "import torch,triton;print(torch.__version__,triton.__version__,torch.backends.cudnn.version())" | tee -a $R/gpu.txt
for spec in "$@"; do
  IFS='|' read -r name envs cargs <<< "$spec"
  el=$(( $(date +%s) - t0 )); left=$(( budget - el ))
  if [ $left -lt 40 ]; then echo "SKIP $name (budget)"; continue; fi
  echo "=== $name (t=${el}s) env=[$envs] args=[$cargs]"
  s=$(date +%s)
  env $envs timeout $left python3 benchmarks/_scratch_exp.py $cargs --json $R/$name.json --out $R/$name.md 2>&1 | grep -v -e USDT -e "^\s*warnings.warn" | tail -n 8
  echo "    [$name took $(( $(date +%s) - s ))s]"
  (cd /tmp && tar czf $OUT/res.tgz res)
done
