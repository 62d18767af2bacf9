#!/usr/bin/env bash
# Run steps of a GPU session on a machine without network: install the carried wheels
# (${WHL:-.whl}, built with ../shared/tools/gpu-wheelhouse.py), then each named step, logging to $OUT.
#   bash benchmarks/gpu_run.sh tests knobs stages quickstart
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site ${WHL:-.whl}/*.whl > /tmp/pip.log 2>&1 || { cat /tmp/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TQDM_DISABLE=1
cli() { python3 -m flexvlm_ray.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)" | tee -a "$OUT/gpu.txt"
for step in "$@"; do
  echo "=== step $step ($(date +%T))"
  case "$step" in
    tests) python3 -m pytest $(ls tests/test_*gpu*.py) -q -m gpu -p no:cacheprovider 2>&1 | tail -25 ;;
    knobs) cli verify-knobs --model flexmoe:molmoe-1b --device cuda --dtype bfloat16 2>&1 | tail -40 ;;
    runtime) python3 benchmarks/runtime_bench.py --out "$OUT/runtime_bench.json" ${RUNTIME_ARGS:-} 2>&1 | grep -v Warning ;;
    stages) python3 benchmarks/engine_stages.py --preset molmoe-1b --device cuda --out "$OUT/stages.json" 2>&1 | grep -v Warning ;;
    quickstart) cli launch sweeps/quickstart.yaml --output /tmp/runs --run-id gpu --no-progress \
        --set model.preset=molmoe-1b --set model.dtype=bfloat16 \
        --set datasets.0.num_samples=4 --set datasets.1.num_samples=2 2>&1 | grep -v -i "warning" | tail -30
        (cd /tmp/runs && tar czf "$OUT/quickstart_run.tgz" quickstart) ;;
    profile) python3 benchmarks/profile_prefill.py ${PROFILE_ARGS:-} 2>&1 | grep -v Warning ;;
    decide) # M3 outside the worker, on this host's CPU (no GPU used): warm, then cold caches (~2 minutes)
        python3 benchmarks/decision_bench.py --rounds 2 --json "$OUT/decision_bench_warm.json"
        python3 benchmarks/decision_bench.py --between trash --rounds 1 --samples 48 --json "$OUT/decision_bench_cold.json" ;;
    refs:*) # each line of the list: SPEC RUN_ID [--set ...]; runs land in /tmp/runs/<sweep>/<run-id>
        grep -v '^#' "${step#refs:}" | while read -r spec run_id overrides; do
          [ -n "$spec" ] || continue
          echo "--- $spec $run_id $overrides ($(date +%T))"
          cli launch "$spec" --output /tmp/runs --run-id "$run_id" --no-progress $overrides < /dev/null 2>&1 \
            | grep -v -i "warning" | tail -6
        done ;;
    pack) (cd /tmp/runs && tar czf "$OUT/runs.tgz" --exclude='*.png' .) ; ls -la "$OUT" ;;
    *) echo "unknown step $step" ;;
  esac
done
