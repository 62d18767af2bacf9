# Sourced by the H200 scripts (h200_refs.sh, h200_m2_noise.sh) after they set OUT: installs the carried wheels
# (${WHL:-.whl}, built with ../shared/tools/gpu-wheelhouse.py) into /tmp/site where that folder has any, sets
# the environment the runs need and PY (${PYTHON:-python3}), and writes $OUT/gpu.txt: nvidia-smi's line where
# there is one, torch and transformers versions, the commit.
if ls "${WHL:-.whl}"/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "${WHL:-.whl}"/*.whl \
    > /tmp/pip.log 2>&1 || { cat /tmp/pip.log; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
: > "$OUT/gpu.txt"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  >> "$OUT/gpu.txt" 2>&1
git rev-parse HEAD >> "$OUT/gpu.txt" 2>/dev/null || true
