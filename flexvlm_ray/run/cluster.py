"""Connect to Ray: a local cluster with N (possibly logical) GPUs, or an existing one.

A local cluster listens on loopback only: Ray's GCS, raylet, object manager, worker gRPC servers,
the dashboard agent and its Prometheus metrics endpoint all bind to 127.0.0.1 (Ray picks
loopback for every server when its node address is the local host, which
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` selects on every platform). The dashboard itself starts
only with ``--dashboard`` (on 127.0.0.1). Joining a cluster with ``--address`` uses that
cluster's own settings (see README, "Network exposure").
"""
from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

ACCEL_PREFIX = "accelerator_type:"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
WORKER_MEMORY_BYTES = 600 * 2**20   # a CPU worker holding the tiny model: ~0.5 GB measured, plus room
LOGICAL_GPUS_PER_CORE = 4           # CPU workers mostly wait on the driver; more than this only thrashes


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def logical_gpu_limit() -> int:
    """How many logical GPUs (CPU workers) this machine can hold: bounded by cores and memory."""
    cores = os.cpu_count() or 1
    return max(1, min(LOGICAL_GPUS_PER_CORE * cores, available_memory_bytes() // WORKER_MEMORY_BYTES))


def check_num_gpus(*, num_gpus: Optional[int], address: Optional[str]) -> None:
    """Refuse, before anything starts, more GPUs than this machine has (or, without GPUs, more
    CPU workers than its cores and memory hold)."""
    if address or num_gpus is None:
        return
    real = detected_gpus()
    if real and num_gpus > real:
        raise ValueError(f"--num-gpus {num_gpus} but this machine has {real} GPU(s); "
                         f"use at most {real}, or --address to join a larger cluster")
    if not real:
        limit = logical_gpu_limit()
        if num_gpus > limit:
            raise ValueError(
                f"--num-gpus {num_gpus}: this machine has no GPU, so each logical GPU is a worker process on the "
                f"CPU (about {WORKER_MEMORY_BYTES / 2**30:.1f} GiB each); with {os.cpu_count() or 1} cores and "
                f"{available_memory_bytes() / 2**30:.1f} GiB available it holds at most {limit}")


def bind_loopback() -> None:
    """Make a local Ray cluster started from this process listen on 127.0.0.1 only."""
    os.environ.update(LOOPBACK_ENV)  # read by Ray at import and by the processes it starts
    try:
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False  # when ray was imported before the variable was set
    except (ImportError, AttributeError):
        pass


def detected_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def _auto_address() -> Optional[str]:
    """What Ray's 'auto' resolves to: RAY_ADDRESS, else the address file of the cluster that
    `ray start` wrote on this machine; None when neither exists."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    temp = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        return temp.read_text().strip() or None
    except OSError:
        return None


def check_reachable(address: str, *, timeout_s: float = 5.0) -> None:
    """ValueError with one line when ``address`` names no Ray cluster that answers on its port."""
    if address == "local":
        return
    resolved = _auto_address() if address == "auto" else address
    if resolved is None:
        raise ValueError("--address auto: no Ray cluster is running on this machine (no RAY_ADDRESS, no "
                         "`ray start` address file); start one with `ray start --head` or give HOST:PORT")
    target = resolved.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    default_port = 10001 if resolved.startswith("ray://") else 6379
    host, port = (host, port) if port.isdigit() else (target, str(default_port))
    shown = address if address == resolved else f"{address} ({resolved})"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ValueError(f"--address {shown}: cannot reach a Ray cluster at {host}:{port} "
                         f"({exc.strerror or type(exc).__name__}); is `ray start --head` running there, "
                         f"and is the port open from this machine?") from None


def connect(*, num_gpus: Optional[int], address: Optional[str], dashboard: bool = False,
            dashboard_host: str = "127.0.0.1") -> None:
    """Start (or join, with ``address``) a Ray cluster. On a machine without GPUs, ``num_gpus``
    logical GPUs are declared and the workers run on the CPU. The dashboard listens on
    ``dashboard_host`` (loopback unless the user asks otherwise)."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if address:
        try:
            context = ray.init(address=address, runtime_env=env, logging_level="WARNING", log_to_driver=True)
        except ConnectionError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise ValueError(f"--address {address}: could not connect to the Ray cluster: "
                             f"{lines[0] if lines else type(exc).__name__}") from None
        if dashboard and getattr(context, "dashboard_url", None):
            print(f"dashboard (the cluster's own): http://{context.dashboard_url}", file=sys.stderr)
        return
    real = detected_gpus()
    if num_gpus is None:
        num_gpus = real or 1
    if real and num_gpus > real:
        raise ValueError(f"--num-gpus {num_gpus} but this machine has {real} GPU(s); "
                         f"use at most {real}, or --address to join a larger cluster")
    if not real:
        num_gpus = min(num_gpus, logical_gpu_limit())
    bind_loopback()
    context = ray.init(address="local", num_gpus=num_gpus, num_cpus=max(os.cpu_count() or 1, num_gpus + 1),
                       include_dashboard=dashboard, dashboard_host=dashboard_host,
                       logging_level="WARNING", runtime_env=env)
    if dashboard:
        url = getattr(context, "dashboard_url", None)
        print(f"dashboard: http://{url} (live metrics: units done/failed, samples/s, stage latencies)" if url
              else "dashboard: not started (Ray's dashboard needs `pip install ray[default]`)", file=sys.stderr)


def gpu_slots(*, gpu_types: Optional[list[str]]) -> list[Optional[str]]:
    """One slot per GPU in the cluster; with pinning, each slot carries its node's GPU type."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not gpu_types:
        return [None] * int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    slots: list[Optional[str]] = []
    for node in nodes:
        types = [k[len(ACCEL_PREFIX):] for k in node["Resources"] if k.startswith(ACCEL_PREFIX)]
        for gpu_type in types:
            if gpu_type in gpu_types:
                slots += [gpu_type] * int(node["Resources"].get("GPU", 0))
    return slots


def describe_slots(slots: list[Optional[str]]) -> str:
    counts = Counter(s or "any" for s in slots)
    return ", ".join(f"{n} x {t}" for t, n in sorted(counts.items()))
