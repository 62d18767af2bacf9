"""ModelWorker: holds one model on one GPU (or the CPU) and measures work units on it.

A plain class, so tests can drive it without Ray; the scheduler wraps it with
``ray.remote(num_gpus=1)``. The model is loaded once in ``__init__``; knobs change in place
per unit. A unit that raises (CUDA out-of-memory included) comes back as a failure record and
the worker stays usable.

The worker keeps, across its units, the shapes and knob settings it has warmed up (so a later unit
warms up only what is new to the worker) and a ``WallClock`` of where its time went (model build,
dataset loading, preprocessing, graph captures, warm-up, timed and hooked passes, other host work,
idle between units); every result carries the clock's snapshot (``walltime``), which the driver writes
to the run folder (``walltime.json``).
"""
from __future__ import annotations

import os
import platform
import socket
import time
import traceback
from typing import Any, Optional

from flexvlm_ray.data import DATASETS, shard_indices
from flexvlm_ray.measure.engine import run_unit
from flexvlm_ray.measure.walltime import WallClock
from flexvlm_ray.metrics import METRICS
from flexvlm_ray.models import MODELS
from flexvlm_ray.models.base import adapter_options
from flexvlm_ray.spec.expand import WorkUnit
from flexvlm_ray.spec.schema import ModelSpec
from flexvlm_ray.store.schema import rows_to_table


def resolve_device(requested: str) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise RuntimeError("the spec asks for device 'cuda' but this worker sees no CUDA GPU "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    return requested


def resolve_dtype(*, requested: str, device: str, device_choice: str) -> str:
    """Half precision on a CPU fallback (device 'auto' without a GPU) runs as float32."""
    if device == "cpu" and device_choice == "auto" and requested != "float32":
        return "float32"
    return requested


def gpu_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"gpu_name": "cpu", "gpu_memory_gib": None, "cuda": None, "driver": None}
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        import subprocess
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = None
    return {"gpu_name": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "driver": driver, "sm_count": props.multi_processor_count}


class ModelWorker:
    def __init__(self, *, model: ModelSpec, seed: int, name: str,
                 cpu_threads: Optional[int] = None) -> None:
        self.clock = WallClock(phase="build")
        import torch

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.name = name
        self.device = resolve_device(model.device)
        self.dtype = resolve_dtype(requested=model.dtype, device=self.device, device_choice=model.device)
        self.gpu = gpu_info() if self.device.startswith("cuda") else {"gpu_name": "cpu"}
        started = time.perf_counter()
        family = MODELS.get(model.family)
        # only families that list a backend other than 'hf' take the argument (the spec checks membership)
        extra = {} if model.backend == "hf" else {"backend": model.backend}
        self.adapter = family(preset=model.preset, path=model.path, dtype=self.dtype,
                              device=self.device, seed=seed, **extra,
                              options=adapter_options(options=model.options,
                                                      trust_remote_code=model.trust_remote_code))
        self.adapter.synchronize()
        self.load_s = time.perf_counter() - started
        self._selections: dict[tuple, tuple[list, Any]] = {}
        self.warmed_shapes: set[tuple] = set()    # engine.shape_key of every shape warmed up on this worker
        self.clock.switch("idle")
        self.context = {"worker": name, "hostname": socket.gethostname(),
                        "gpu_name": self.gpu["gpu_name"], "dtype": self.dtype}

    def env(self) -> dict[str, Any]:
        import torch
        import transformers

        return {"worker": self.name, "hostname": socket.gethostname(), "pid": os.getpid(),
                "node_id": _ray_node_id(),
                "device": self.device, "dtype": self.dtype, "load_s": round(self.load_s, 3),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **self.gpu}

    def walltime(self) -> dict[str, Any]:
        """Where this worker's time went so far (``WallClock.snapshot``), with its name."""
        return {**self.clock.snapshot(), "worker": self.name}

    def _selection(self, unit: WorkUnit) -> tuple[list, Any]:
        """The dataset selection (all shards) and its fitted metric, cached per worker."""
        key = (unit.dataset, unit.split, unit.path, unit.num_samples, unit.seed)
        if key not in self._selections:
            with self.clock.phase("data"):
                self._selections[key] = self._load_selection(unit)
        return self._selections[key]

    @staticmethod
    def _load_selection(unit: WorkUnit) -> tuple[list, Any]:
        entry = DATASETS.get(unit.dataset)
        samples = entry.load(split=unit.split, num_samples=unit.num_samples, seed=unit.seed,
                             path=unit.path)
        metric = METRICS.get(entry.metric)().fit(samples) if entry.metric != "none" else None
        return samples, metric

    def run(self, unit_data: dict[str, Any], run_id: str) -> dict[str, Any]:
        self.clock.switch("host")
        try:
            return self._run(unit_data, run_id)
        finally:
            self.clock.count("units")
            self.clock.switch("idle")

    def _run(self, unit_data: dict[str, Any], run_id: str) -> dict[str, Any]:
        unit = WorkUnit.from_dict(unit_data)
        started = time.perf_counter()
        try:
            samples, metric = self._selection(unit)
            indices = shard_indices(total=len(samples), shard=unit.shard, num_shards=unit.num_shards)
            with self.clock.active():
                rows = self.unit_rows(unit=unit, samples=[(i, samples[i]) for i in indices], metric=metric,
                                      context={**self.context, "run_id": run_id})
            for row in rows:
                row["dtype"] = self.dtype
            table = rows_to_table(rows)
            return {"unit_id": unit.unit_id, "ok": True, "table": table,
                    "busy_s": time.perf_counter() - started, "worker": self.name,
                    "walltime": self.walltime()}
        except Exception as exc:  # every failure becomes a record; the worker stays up
            self._recover(exc)
            return {"unit_id": unit.unit_id, "ok": False, "busy_s": time.perf_counter() - started,
                    "worker": self.name, "failure": failure_record(exc, worker=self.name),
                    "walltime": self.walltime()}

    def unit_rows(self, *, unit: WorkUnit, samples: list, metric: Any, context: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of one unit (subclasses measure other kinds of units: run.closed_loop)."""
        return run_unit(adapter=self.adapter, unit=unit, samples=samples, metric=metric, context=context,
                        warmed_shapes=self.warmed_shapes)

    def _recover(self, exc: BaseException) -> None:
        import torch

        self.warmed_shapes.clear()    # the failure may have left the model's state (graphs, caches) anywhere

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _ray_node_id() -> Optional[str]:
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


def failure_record(exc: BaseException, *, worker: Optional[str]) -> dict[str, Any]:
    return {"error_type": type(exc).__name__, "message": str(exc)[:2000],
            "traceback": "".join(traceback.format_exception(exc))[-8000:], "worker": worker,
            "hostname": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
