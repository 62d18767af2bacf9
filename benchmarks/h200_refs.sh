#!/usr/bin/env bash
# Issue 16's GPU references on one GPU in one call of about 8 minutes: Motivation Exp 1-4 (and Exp 5 from
# Exp 3 + 4), Profiling Exp 2-4, E1 and M1 on the fast backend, in one process (benchmarks/run_sweeps.py:
# one model load, one burn-in), then one archive of the run folders.
#
#   bash benchmarks/h200_refs.sh [LIST]          LIST defaults to benchmarks/reference/h200_refs.txt
#
# Environment: OUT (default /tmp/out): what comes back, three files: gpu.txt, h200_refs.log and
# h200_refs.tgz (the run folders with their analyses, < 16 MiB: figures are left out if it would be larger);
# RUNS (default /tmp/runs): where the runs are written; LIMIT_S (default 480): the wall time the list may
# take, after which no unit starts (cut runs stay resumable with `flexvlm-ray launch --resume RUN_DIR`);
# EXP5_ID (default h200-refs): the run id of the list's Exp 3 and Exp 4 runs, combined into Exp 5; WHL (default .whl): wheels installed first where that folder has any (as benchmarks/gpu_run.sh does).
# On a CPU-only machine `CPU_CHECK=1 bash benchmarks/h200_refs.sh` runs the same list on the tiny model.
set -uo pipefail
OUT=${OUT:-/tmp/out}; RUNS=${RUNS:-/tmp/runs}; LIMIT_S=${LIMIT_S:-480}; EXP5_ID=${EXP5_ID:-h200-refs}
LIST=${1:-benchmarks/reference/h200_refs.txt}
mkdir -p "$OUT" "$RUNS"
started=$(date +%s)
log="$OUT/h200_refs.log"
source benchmarks/gpu_env.sh
echo "=== h200_refs $LIST ($(date +%T), limit ${LIMIT_S}s)" | tee "$log"
extra=()
[ -n "${CPU_CHECK:-}" ] && extra=(--cpu-check)
# units stop starting 40 s before the limit: the last unit, Exp 5's analysis and the archive fit in that
timeout $((LIMIT_S + 30)) $PY benchmarks/run_sweeps.py "$LIST" --output "$RUNS" --deadline-s $((LIMIT_S - 40)) \
  --set model.backend=fast "${extra[@]}" 2>&1 | grep -v -i "warning" | tee -a "$log"
echo "=== motivation_exp5 (Exp 3 + Exp 4 of this call) ($(date +%T))" | tee -a "$log"
if [ -d "$RUNS/motivation_exp3/$EXP5_ID" ] && [ -d "$RUNS/motivation_exp4/$EXP5_ID" ]; then
  $PY -m flexvlm_ray.cli analyze "$RUNS/motivation_exp3/$EXP5_ID" "$RUNS/motivation_exp4/$EXP5_ID" \
    --combine motivation_exp5 --out "$RUNS/motivation_exp5/$EXP5_ID" 2>&1 | grep -v -i "warning" | tee -a "$log"
fi
echo "=== done in $(( $(date +%s) - started )) s; packing" | tee -a "$log"
(cd "$RUNS" && tar czf "$OUT/h200_refs.tgz" --exclude='.lock' .)
if [ "$(stat -c %s "$OUT/h200_refs.tgz")" -gt $((15 * 1024 * 1024)) ]; then
  echo "archive over 15 MiB: figures left out (flexvlm-ray analyze RUN_DIR redraws them)" | tee -a "$log"
  (cd "$RUNS" && tar czf "$OUT/h200_refs.tgz" --exclude='.lock' --exclude='*.png' --exclude='report.html' .)
fi
ls -la "$OUT" | tee -a "$log"
