#!/usr/bin/env bash
# Issue 16's M2 noise target on one GPU (about 8 minutes): M2 on the fast backend with the current defaults
# (the kernel-issuing thread pinned on a GPU worker, a 10 s burn-in per worker, hooked passes after a
# sample's timed passes, gc off, one sync per pass), then the same with one change each, every run its
# own `flexvlm-ray launch` (a fresh worker, as in the 2026-12-03 references), 3 samples x 2 crop counts x
# 3 interleaved repeats x 30 passes.
#
#   bash benchmarks/h200_m2_noise.sh
#
# Environment as in benchmarks/h200_refs.sh (OUT, RUNS, LIMIT_S default 540, WHL). Comes back: gpu.txt,
# h200_m2_noise.log (ends with the median CoV per stage of every run, pooled over the repeats and within
# one repeat, beside the committed results/reference/h200-2026-12-03/m2 runs) and h200_m2_noise.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; RUNS=${RUNS:-/tmp/runs}; LIMIT_S=${LIMIT_S:-540}
mkdir -p "$OUT" "$RUNS"
started=$(date +%s)
log="$OUT/h200_m2_noise.log"
source benchmarks/gpu_env.sh
BASE=(--set model.backend=fast --set datasets.0.num_samples=3)
[ -n "${CPU_CHECK:-}" ] && BASE+=(--set model.preset=tiny --set model.dtype=float32 --set measure.runs_per_sample=4
                                  --set datasets.0.num_samples=1 --set knobs.max_new_tokens=4)
# run id, extra overrides, seconds it needs (launch ~45 s + burn-in + passes)
variants=("m2-defaults||130" "m2-no-pin|--set measure.pin_cpus=false|130" "m2-no-burn-in|--set measure.burn_in_s=0|120"
          "m2-no-hooks|--set measure.prefill_hook=false|90")
echo "=== h200_m2_noise ($(date +%T), limit ${LIMIT_S}s)" | tee "$log"
for v in "${variants[@]}"; do
  IFS='|' read -r run_id extra need <<< "$v"
  left=$(( LIMIT_S - ($(date +%s) - started) ))
  if [ "$left" -lt "$need" ]; then echo "--- $run_id skipped: ${left}s left, needs ~${need}s" | tee -a "$log"; continue; fi
  echo "--- $run_id $extra ($(date +%T), ${left}s left)" | tee -a "$log"
  # shellcheck disable=SC2086
  timeout $((left - 10)) $PY -m flexvlm_ray.cli launch sweeps/m2.yaml --num-gpus 1 --output "$RUNS" --run-id "$run_id" \
    --no-progress "${BASE[@]}" $extra < /dev/null 2>&1 | grep -v -i "warning" | tail -12 | tee -a "$log"
done
echo "=== median CoV per stage, % (pooled over repeats / within one repeat)" | tee -a "$log"
$PY benchmarks/m2_cov.py "$RUNS/m2" results/reference/h200-2026-12-03/m2 2>&1 | tee -a "$log"
echo "=== done in $(( $(date +%s) - started )) s" | tee -a "$log"
(cd "$RUNS" && tar czf "$OUT/h200_m2_noise.tgz" --exclude='.lock' m2)
ls -la "$OUT" | tee -a "$log"
