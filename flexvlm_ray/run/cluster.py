"""Connect to Ray: a local cluster with N (possibly logical) GPUs, or an existing one."""
from __future__ import annotations

import os
from collections import Counter
from typing import Optional

ACCEL_PREFIX = "accelerator_type:"


def detected_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


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
        ray.init(address=address, runtime_env=env, logging_level="WARNING", log_to_driver=True)
        return
    real = detected_gpus()
    if num_gpus is None:
        num_gpus = real or 1
    if real and num_gpus > real:
        raise ValueError(f"--num-gpus {num_gpus} but this machine has {real} GPU(s); "
                         f"use at most {real}, or --address to join a larger cluster")
    ray.init(address="local", num_gpus=num_gpus, num_cpus=max(os.cpu_count() or 1, num_gpus + 1),
             include_dashboard=dashboard, dashboard_host=dashboard_host,
             logging_level="WARNING", runtime_env=env)


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
