"""Connect to Ray: a local cluster with N (possibly logical) GPUs, or an existing one."""
from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

ACCEL_PREFIX = "accelerator_type:"


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
