"""Causal prefill attention of molmoe-1b shapes through each SDPA backend (GPU).

For each prompt length: q, k, v (1, heads, T, head_dim) in bf16, ``F.scaled_dot_product_attention``
with ``is_causal=True`` under one backend at a time (flash, cuDNN, memory-efficient), median of CUDA
event timings; the output's max difference from the flash backend; and the causal FLOPs
(``2 * heads * head_dim * T * (T + 1)``) over the nominal peak.
    python benchmarks/attention_bench.py --out attention_bench.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.runtime_bench import time_calls  # noqa: E402

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 768, 1408, 1920])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--peak-flops", type=float, default=790e12)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for t in args.tokens:
        gen = torch.Generator(device="cuda").manual_seed(t)
        q, k, v = (torch.randn(1, args.heads, t, args.head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
                   for _ in range(3))
        flops = 2 * args.heads * args.head_dim * t * (t + 1)
        ref = None
        for name, backend in SDPA_BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    ms = statistics.median(time_calls(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                                      cuda=True, warmup=5, repeats=args.repeats))
            except RuntimeError as err:      # a backend that does not take these inputs here
                rows.append({"tokens": t, "backend": name, "error": str(err).splitlines()[0]})
                print(f"T={t:>5} {name:<10} unavailable: {str(err).splitlines()[0]}")
                continue
            ref = out if ref is None else ref
            diff = float((out.float() - ref.float()).abs().max())
            roof = flops / args.peak_flops * 1e3
            rows.append({"tokens": t, "backend": name, "ms": ms, "roofline_ms": roof, "max_abs_diff_vs_first": diff})
            print(f"T={t:>5} {name:<10} {ms * 1e3:8.1f} us  x{ms / roof:5.2f} roofline  max|diff| {diff:.2e}")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
