"""Software-side noise control around a unit's timed passes (never GPU clocks or settings).

Each measure has its own switch in the spec's ``measure`` section, so a run can measure what each
one buys:

* ``gc_off``: Python's garbage collector is collected once, then disabled while the unit's passes
  run (a collection in the middle of a pass stalls the host that issues the kernels), and restored.
* ``pin_cpus``: the thread that issues the kernels (and the threads it starts) is pinned
  (``os.sched_setaffinity``) to ``cpu_threads`` cores of the cores it may use, a disjoint slice per GPU
  index (CUDA_VISIBLE_DEVICES), and torch's intra-op threads are set to that many; both are restored
  after the unit. Default (``None``): on for a GPU worker, whose host only issues kernels and waits for
  them (the H200 ablation of 2026-12-03, ``results/reference/h200-2026-12-03/m2/ablate-pinned`` against
  ``ablate-default``: median CoV of T_total 1.03% against 1.37%, of T_LLM_prefill 0.41% against 0.92%);
  off on the CPU, where the threads are the device and pinning would change the computation.
* ``cpu_threads`` alone (without ``pin_cpus``): only ``torch.set_num_threads``.
* ``check_gpu_idle``: the compute processes on the worker's GPU other than this one are counted
  (``nvidia-smi --query-compute-apps``) and written into every row (``gpu_other_processes``), so a
  run that shared its GPU is visible; None where nvidia-smi is not there. One call takes 0.1 s or more,
  so a worker asks at most every ``GPU_CHECK_MAX_AGE_S`` seconds and its units in between reuse the answer.

The controls' own setup (the collection, the nvidia-smi call) is filed as 'noise' wall time.

``sync`` (``pass`` or ``stage``) is applied by the StageTimer: one host synchronisation per pass,
or one after every stage (the comparison).
"""
from __future__ import annotations

import gc
import os
import subprocess
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from flexvlm_ray.spec.schema import MeasureSpec

DEFAULT_PINNED_THREADS = 4
GPU_CHECK_MAX_AGE_S = 30.0
_gpu_check: Optional[tuple[float, Optional[int]]] = None     # (when, answer) of this process's last call


def pins(measure: MeasureSpec, *, cuda: bool) -> bool:
    """Whether the unit's passes run pinned: ``pin_cpus`` where the spec sets it, else on a GPU worker."""
    value = measure.pin_cpus
    return cuda if value is None else bool(value)


def controls_label(measure: MeasureSpec, *, cuda: bool = False, pinned: Optional[int] = None) -> str:
    """What a row records about the noise controls that were on, e.g. 'gc_off,pin_cpus=4,sync=pass'
    (``pinned``: the number of cores actually pinned, where known)."""
    parts = []
    if measure.gc_off:
        parts.append("gc_off")
    threads = measure.cpu_threads
    if pins(measure, cuda=cuda):
        parts.append(f"pin_cpus={pinned or threads or DEFAULT_PINNED_THREADS}")
    elif threads:
        parts.append(f"threads={threads}")
    parts.append(f"sync={measure.sync}")
    return ",".join(parts)


def pinned_cores(*, allowed: list[int], threads: int, slot: int) -> list[int]:
    """``threads`` cores of ``allowed`` (sorted) for worker slot ``slot``: disjoint slices while they fit,
    wrapping around when there are more slots than slices."""
    allowed = sorted(allowed)
    threads = max(1, min(threads, len(allowed)))
    slices = max(1, len(allowed) // threads)
    start = (slot % slices) * threads
    return allowed[start:start + threads]


def gpu_slot() -> int:
    """This worker's GPU index (the first id in CUDA_VISIBLE_DEVICES), 0 when there is none."""
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def other_gpu_processes() -> Optional[int]:
    """Compute processes on the visible GPU other than this one; None where nvidia-smi cannot tell."""
    visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",")[0].strip()
    cmd = ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"]
    if visible:
        cmd.insert(1, f"--id={visible}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    pids = {line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()}
    return len(pids - {str(os.getpid())})


def recent_other_gpu_processes(*, max_age_s: float = GPU_CHECK_MAX_AGE_S) -> Optional[int]:
    """``other_gpu_processes``, asked again only when this process's last answer is older than ``max_age_s``."""
    global _gpu_check
    now = time.monotonic()
    if _gpu_check is None or now - _gpu_check[0] > max_age_s:
        _gpu_check = (now, other_gpu_processes())
    return _gpu_check[1]


@contextmanager
def noise_control(measure: MeasureSpec, *, cuda: bool = False) -> Iterator[dict[str, Any]]:
    """Apply the unit's noise controls for the duration of its passes (``cuda``: the worker's device is a
    GPU, which turns pinning on by default); yields the row fields they add."""
    from flexvlm_ray.measure.walltime import clock

    with clock().phase("noise"):
        fields, restore = _apply(measure, cuda=cuda)
    try:
        yield fields
    finally:
        restore()


def _apply(measure: MeasureSpec, *, cuda: bool):
    import torch

    pin = pins(measure, cuda=cuda)
    fields: dict[str, Any] = {"noise_controls": controls_label(measure, cuda=cuda)}
    if measure.check_gpu_idle and torch.cuda.is_available():
        fields["gpu_other_processes"] = recent_other_gpu_processes()
    threads_before = torch.get_num_threads()
    affinity_before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = measure.cpu_threads
    gc_was_on = gc.isenabled()

    def restore() -> None:
        if gc_was_on:
            gc.enable()
        if threads:
            torch.set_num_threads(threads_before)
        if pin and affinity_before is not None:
            os.sched_setaffinity(0, affinity_before)

    try:
        if pin and affinity_before is not None:
            cores = pinned_cores(allowed=list(affinity_before), threads=threads or DEFAULT_PINNED_THREADS,
                                 slot=gpu_slot())
            os.sched_setaffinity(0, cores)
            threads = len(cores)      # never more torch threads than the cores they may run on
            fields["noise_controls"] = controls_label(measure, cuda=cuda, pinned=len(cores))
        if threads:
            torch.set_num_threads(int(threads))
        if measure.gc_off:
            gc.collect()
            gc.freeze()     # the survivors leave the collector's view: the next unit's collect scans only what
            gc.disable()    # this one creates (a full collect took 0.19 s per unit with torch loaded)
    except BaseException:
        restore()
        raise
    return fields, restore
