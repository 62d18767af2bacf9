#!/usr/bin/env bash
# Offline installs for CUDA nodes, and a check of a node's stack.
#
#   scripts/wheelhouse.sh build OUT_DIR      on a machine with PyPI access: every wheel a CUDA node needs
#                                            (CUDA torch from PyPI, the Triton *that torch build* requires,
#                                            the rest pinned as in requirements-cpu.txt) + this project's
#                                            wheel + requirements.txt + SHA256SUMS, for Linux x86_64 and
#                                            this machine's Python (override: PYTHON_VERSION=3.11 PLATFORM=...)
#   scripts/wheelhouse.sh install OUT_DIR [VENV]   on an air-gapped node: a fresh venv installed from
#                                            OUT_DIR only (--no-index), then `pip check` and `check`
#   scripts/wheelhouse.sh check              on any node: torch / CUDA / Triton / Ray versions, whether the
#                                            installed Triton is the one torch requires, pip check
#
# Copy the same OUT_DIR to every node (SHA256SUMS lets you compare), so driver and workers run the same
# package versions. `build` runs pip with --isolated, so a local pip configuration (a CPU-wheel mirror, a
# constraints file) cannot swap the CUDA torch for a CPU one; INDEX_URL replaces pip's default index (a
# company mirror), TORCH_INDEX_URL adds a torch index (e.g. PyTorch's own CUDA wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-}"

case "$cmd" in
build)
    out="${2:?usage: scripts/wheelhouse.sh build OUT_DIR}"
    mkdir -p "$out"
    pyver="${PYTHON_VERSION:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
    platform="${PLATFORM:-manylinux_2_28_x86_64}"
    # the CPU pins without Triton: a CUDA torch requires its own Triton version, which pip resolves
    grep -v -E '^\s*(#|$)|^triton==' requirements-cpu.txt > "$out/requirements.txt"
    extra=()
    if [ -n "${INDEX_URL:-}" ]; then extra+=(--index-url "$INDEX_URL"); fi
    if [ -n "${TORCH_INDEX_URL:-}" ]; then extra+=(--extra-index-url "$TORCH_INDEX_URL"); fi
    python3 -m pip --isolated wheel --no-deps -w "$out" .
    platforms=()
    for tag in "$platform" manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$tag")
    done
    python3 -m pip --isolated download -d "$out" -r "$out/requirements.txt" "${extra[@]}" \
        --only-binary=:all: --python-version "$pyver" "${platforms[@]}" --implementation cp
    (cd "$out" && sha256sum ./*.whl > SHA256SUMS)
    echo "wheelhouse: $out ($(ls "$out"/*.whl | wc -l) wheels, Python $pyver, $platform)"
    echo "on each node: scripts/wheelhouse.sh install $out"
    ;;
install)
    wh="${2:?usage: scripts/wheelhouse.sh install OUT_DIR [VENV]}"
    venv="${3:-.venv}"
    (cd "$wh" && sha256sum --quiet -c SHA256SUMS)
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --no-index --find-links "$wh" -r "$wh/requirements.txt" flexvlm-ray
    PATH="$venv/bin:$PATH" "$0" check
    ;;
check)
    python3 -m pip check || echo "(pip check found the problems above)"
    python3 - <<'PY'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

import torch

try:
    triton = md.version("triton")
except md.PackageNotFoundError:
    triton = None
wanted = [Requirement(r) for r in (md.requires("torch") or []) if r.startswith("triton")]
wanted = [r for r in wanted if r.marker is None or r.marker.evaluate()]
import flexvlm_ray
import ray
import transformers

# module versions, not distribution metadata: a source checkout on PYTHONPATH has no metadata
print(f"python {sys.version.split()[0]}; flexvlm-ray {flexvlm_ray.__version__} ({flexvlm_ray.__file__}); "
      f"ray {ray.__version__}; transformers {transformers.__version__}")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available {torch.cuda.is_available()}"
      + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
print(f"triton {triton}; torch requires {', '.join(str(r) for r in wanted) or 'none'}")
bad = [r for r in wanted if triton is None or triton not in r.specifier]
if bad:
    sys.exit(f"triton {triton} does not satisfy torch's {bad[0]}: install the Triton that torch requires "
             f"(do not install requirements-cpu.txt's triton pin on a CUDA node)")
PY
    ;;
*)
    echo "usage: scripts/wheelhouse.sh build OUT_DIR | install OUT_DIR [VENV] | check" >&2
    exit 2
    ;;
esac
