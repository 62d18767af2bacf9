"""One MoE layer of the fast backend's prefill at MolmoE-1B shapes: the grouped-GEMM path against the fused
Triton path (``prefill_moe: fused``) for a sweep of tile configs, the steps between the grouped path's
GEMMs, and the pair sort (torch.sort on int64 / int32 / uint8 keys, the counting-sort kernel) (GPU).
``--kernel-sweep`` instead times the fused path's two GEMM kernels one at a time over a grid of tiles
(``GATE_UP_GRID`` with and without paired gate/up tiles, ``DOWN_GRID``; then GROUP_M for each BM's
fastest), and the whole layer with the fastest pair that shares a BM against the default.

For each prompt length T (by default the padded lengths the graphed prefill runs): random x (T, H) and
router over 64 experts, top_k 8; every path timed as the graphed prefill runs it (ten calls captured in
a CUDA graph, median replay time / 10); the fused path's error against the grouped
path as max |diff| / max |grouped| and as a norm ratio. Floors per layer: 6 * S * H * I FLOPs over the
nominal peak, and the weights of every expert that received a pair over the nominal HBM bandwidth.

    python benchmarks/moe_kernel_bench.py --out moe_kernel_bench.json
    python benchmarks/moe_kernel_bench.py --kernel-sweep --tokens 1408 1920 --out moe_kernel_sweep.json
    FLEXVLM_MOE_CONFIG=64,128,64,8,4,3 python benchmarks/runtime_bench.py --backends fast fast-grouped ...
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import astuple
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.runtime_bench import time_calls  # noqa: E402
from flexvlm_ray.models.flexmoe.fast import ops as fused_ops  # noqa: E402
from flexvlm_ray.models.flexmoe.fast.decoder import (experts_fused, experts_grouped, grouped_mm_function,  # noqa: E402
                                             route, sort_pairs)

SORT_LAUNCHES = ((1024, 4), (2048, 8), (4096, 8), (4096, 16))     # (pairs per step, warps) of moe_sort
SWEEP = ("64,64,64,8,4,3", "64,128,64,8,4,3", "64,128,64,8,8,3", "64,128,64,8,4,4", "128,64,64,8,4,3",
         "128,128,64,8,8,3", "128,128,64,8,8,4", "64,256,64,8,8,3", "32,128,64,8,4,4")

# BM,BN,BK,GM,warps,stages per GEMM kernel (GM swept afterwards); ``fits`` drops the ones over an H100's
# shared memory per block or with over 128 float32 accumulator values per thread (register spills)
BLOCK_MS = (64, 128, 256)
GATE_UP_GRID = tuple(f"{bm},{bn},{bk},8,{w},{st}{pair}" for bm in BLOCK_MS for bn in (64, 128) for bk in (64, 128)
                     for w in (4, 8) for st in (3, 4, 5) for pair in ("", ",paired"))
DOWN_GRID = tuple(f"{bm},{bn},{bk},8,{w},{st}" for bm in BLOCK_MS for bn in (64, 128, 256) for bk in (64, 128)
                  for w in (4, 8) for st in (3, 4, 5))
SMEM_BYTES = 227 * 1024


def fits(config: fused_ops.MoeConfig, *, weight_tiles: int) -> bool:
    """Whether a GEMM kernel with ``weight_tiles`` (BN, BK) tiles per K step (gate/up: 2) fits its
    pipeline in shared memory and its accumulators in registers (bf16 operands)."""
    c = config
    stage = 2 * c.block_k * (c.block_m + weight_tiles * c.block_n)
    return stage * c.num_stages <= SMEM_BYTES and weight_tiles * c.block_m * c.block_n <= 128 * 32 * c.num_warps


def time_ms(fn: Callable[[], Any], *, warmup: int, repeats: int, per_graph: int = 10) -> float:
    """GPU milliseconds of one call as the graphed prefill sees it: ``per_graph`` calls captured in one
    CUDA graph (after ``warmup`` eager calls on a side stream), median over ``repeats`` replays (CUDA
    events) divided by ``per_graph``, so host launch overhead is not counted."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    times = time_calls(graph.replay, cuda=True, warmup=2, repeats=repeats)
    return statistics.median(times) / per_graph


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (out.double() - ref.double())
    return {"max_rel": float(diff.abs().max() / ref.double().abs().max()),
            "norm_rel": float(diff.norm() / ref.double().norm())}


def layer(*, tokens: int, args, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Rows of one prompt length: sorts, the grouped path, and the fused path per config."""
    gate_up, down, router = weights
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, args.hidden, device="cuda", generator=gen).to(torch.bfloat16)
    wts, ids = route(x=x, weight=router, top_k=args.top_k, norm_topk_prob=False)
    pairs = tokens * args.top_k
    used = int(torch.unique(ids).numel())
    flops = 6 * pairs * args.hidden * args.inter
    weight_bytes = used * 3 * args.hidden * args.inter * gate_up.element_size()
    timing = dict(warmup=args.warmup, repeats=args.repeats)
    flat = ids.reshape(-1)
    sorts = {name: time_ms(lambda k=keys, s=stable: torch.sort(k, stable=s), **timing)
             for name, keys, stable in (("int64", flat, False), ("int32", flat.to(torch.int32), False),
                                        ("uint8_stable", flat.to(torch.uint8), True))}
    for block, warps in SORT_LAUNCHES:
        sorts[f"count_{block}_{warps}w"] = time_ms(
            lambda b=block, w=warps: fused_ops.moe_sort(ids, num_experts=args.experts, block=b, num_warps=w), **timing)
    call = dict(x=x, ids=ids, weights=wts, gate_up=gate_up, down=down)
    grouped = lambda: experts_grouped(**call, act=F.silu, mm=grouped_mm_function(), fused=True)  # noqa: E731
    ref = grouped()
    row: dict[str, Any] = {"gemm_ms": grouped_gemms(x=x, flat=flat, top_k=args.top_k, gate_up=gate_up, down=down,
                                                    timing=timing), "tokens": tokens, "pairs": pairs, "experts_used": used, "flops": flops,
                           "flop_floor_ms": flops / args.peak_flops * 1e3,
                           "weight_floor_ms": weight_bytes / args.hbm_bw * 1e3, "sort_ms": sorts,
                           "glue_ms": glue(x=x, ids=ids, wts=wts, router=router, gate_up=gate_up, args=args,
                                           timing=timing),
                           "grouped_ms": time_ms(grouped, **timing),
                           "default_config": ",".join(map(str, astuple(
                               fused_ops.moe_config(num_pairs=pairs, num_experts=args.experts)))),
                           "fused": []}
    for text in dict.fromkeys([row["default_config"], *args.configs]):
        config = fused_ops.MoeConfig.parse(text)
        # weight tiles through TMA descriptors where they apply (the default), and without for the default config
        for tma in (None, False) if text == row["default_config"] else (None,):
            fused = lambda c=config, t=tma: experts_fused(**call, config=c, tma=t)  # noqa: E731
            used = fused_ops.weight_descriptors(gate_up=gate_up, down=down, config=config, enabled=tma) is not None
            try:
                entry = {"config": text, "tma": used, **errors(fused(), ref), "ms": time_ms(fused, **timing)}
            except Exception as exc:      # a config over the GPU's shared memory or registers: recorded, sweep goes on
                entry = {"config": text, "tma": used, "error": f"{type(exc).__name__}: {exc}"[:300]}
            row["fused"].append(entry)
    return row


def glue(*, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor,
         args, timing: dict[str, int]) -> dict[str, float]:
    """The grouped path's steps around its two GEMMs, each alone: router, pair sort (torch and counting
    sort, each with offsets and inverse), row gather, SiLU-mul, weighted combine with the residual."""
    experts = gate_up.shape[0]
    pairs = sort_pairs(ids=ids, num_experts=experts, kernel=True)
    h = torch.randn(pairs.perm.numel(), gate_up.shape[1], device=x.device, dtype=x.dtype)
    y = torch.randn(pairs.perm.numel(), x.shape[1], device=x.device, dtype=x.dtype)
    steps = {"route": lambda: route(x=x, weight=router, top_k=args.top_k, norm_topk_prob=False),
             "pairs_torch": lambda: sort_pairs(ids=ids, num_experts=experts),
             "pairs_count": lambda: sort_pairs(ids=ids, num_experts=experts, kernel=True),
             "gather": lambda: x[pairs.tokens],
             "silu_mul": lambda: fused_ops.silu_mul(h),
             "combine_residual": lambda: fused_ops.moe_combine(y=y, inverse=pairs.inverse, weights=wts, residual=x)}
    return {name: time_ms(fn, **timing) for name, fn in steps.items()}


def grouped_gemms(*, x: torch.Tensor, flat: torch.Tensor, top_k: int, gate_up: torch.Tensor, down: torch.Tensor,
                  timing: dict[str, int]) -> dict[str, float]:
    """The grouped path's two GEMMs alone, with the weights as the model holds them (transposed views,
    column-major B) and copied to row-major (E, K, N) once."""
    mm = grouped_mm_function()
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    xs = x[torch.sort(flat, stable=True).indices // top_k]
    a = mm(xs, gate_up.transpose(-2, -1), offs=offs)[:, :gate_up.shape[1] // 2].contiguous()
    out = {}
    for name, lhs, w in (("gate_up", xs, gate_up), ("down", a, down)):
        col, row = w.transpose(-2, -1), w.transpose(-2, -1).contiguous()
        out[f"{name}_colmajor"] = time_ms(lambda l=lhs, b=col: mm(l, b, offs=offs), **timing)
        out[f"{name}_rowmajor"] = time_ms(lambda l=lhs, b=row: mm(l, b, offs=offs), **timing)
    return out


def kernel_sweep(*, tokens: int, args, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Each fused GEMM kernel alone over its grid at one prompt length, GROUP_M for the fastest per BM,
    then the layer with the fastest gate/up and down configs that share a BM against the default."""
    gate_up, down, router = weights
    experts, hidden, inter = down.shape
    gen = torch.Generator(device=down.device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=down.device, generator=gen).to(down.dtype)
    wts, ids = route(x=x, weight=router, top_k=args.top_k, norm_topk_prob=False)
    pairs = sort_pairs(ids=ids, num_experts=experts, kernel=True)
    num_pairs = pairs.perm.numel()
    timing = dict(warmup=args.warmup, repeats=args.repeats)
    aligned = {bm: fused_ops.moe_align(perm=pairs.perm, offsets=pairs.offsets, block_m=bm) for bm in BLOCK_MS}

    def gemm(kind: str, config: fused_ops.MoeConfig) -> Callable[[], torch.Tensor]:
        tile_expert, tile_pairs = aligned[config.block_m]
        common = dict(tile_expert=tile_expert, tile_pairs=tile_pairs, num_pairs=num_pairs)
        w_gate_up, w_down = fused_ops.weight_descriptors(gate_up=gate_up, down=down, config=config) or (gate_up, down)
        if kind == "gate_up":
            return lambda: fused_ops.moe_gate_up(x=x, **common, top_k=args.top_k, gate_up=w_gate_up, inter=inter,
                                                 config=config)
        act = fused_ops.moe_gate_up(x=x, **common, top_k=args.top_k, gate_up=gate_up, inter=inter,
                                    config=fused_ops.MoeConfig(config.block_m, 64, 64, 8, 4, 3))
        return lambda: fused_ops.moe_down(act=act, **common, down=w_down, hidden=hidden, config=config)

    def timed(kind: str, text: str) -> dict[str, Any]:
        try:
            return {"config": text, "ms": time_ms(gemm(kind, fused_ops.MoeConfig.parse(text)), **timing)}
        except Exception as exc:     # over the GPU's shared memory or registers after all: recorded, sweep goes on
            return {"config": text, "error": f"{type(exc).__name__}: {exc}"[:300]}

    flops = {"gate_up": 4 * num_pairs * hidden * inter, "down": 2 * num_pairs * hidden * inter}
    row: dict[str, Any] = {"tokens": tokens, "pairs": num_pairs, "flops": flops}
    for kind, grid, tiles in (("gate_up", GATE_UP_GRID, 2), ("down", DOWN_GRID, 1)):
        entries = [timed(kind, t) for t in grid if fits(fused_ops.MoeConfig.parse(t), weight_tiles=tiles)]
        for bm in BLOCK_MS:      # GROUP_M around the fastest of each BM
            ok = [e for e in entries if "ms" in e and e["config"].startswith(f"{bm},")]
            if ok:
                best = min(ok, key=lambda e: e["ms"])["config"].split(",")
                entries += [timed(kind, ",".join(best[:3] + [str(gm)] + best[4:])) for gm in (1, 4, 16)]
        row[kind] = sorted(entries, key=lambda e: e.get("ms", float("inf")))
    pick = {}
    for bm in BLOCK_MS:
        best = [next((e for e in row[k] if "ms" in e and e["config"].startswith(f"{bm},")), None)
                for k in ("gate_up", "down")]
        if all(best):
            pick[bm] = (best[0]["ms"] + best[1]["ms"], best[0]["config"] + "/" + best[1]["config"].split(",", 1)[1])
    call = dict(x=x, ids=ids, weights=wts, gate_up=gate_up, down=down)
    ref = experts_grouped(**call, act=F.silu, mm=grouped_mm_function(), fused=True)
    default = str(fused_ops.moe_config(num_pairs=num_pairs, num_experts=experts))
    row["layer"] = []
    for text in dict.fromkeys([default, *(t for _, t in sorted(pick.values()))]):
        fused = lambda c=fused_ops.MoeConfig.parse(text): experts_fused(**call, config=c)  # noqa: E731
        row["layer"].append({"config": text, "default": text == default, **errors(fused(), ref),
                             "ms": time_ms(fused, **timing)})
    return row


def print_sweep(row: dict[str, Any], *, top: int = 8) -> None:
    print(f"\nT={row['tokens']} pairs={row['pairs']}: each GEMM kernel alone, fastest {top}")
    for kind in ("gate_up", "down"):
        print(f"  {kind:<8}" + "   ".join(f"{e['config']} {e['ms'] * 1e3:.0f}us {row['flops'][kind] / e['ms'] / 1e9:.0f}TF"
                                       for e in row[kind][:top] if "ms" in e))
        failed = [e["config"] for e in row[kind] if "error" in e]
        if failed:
            print(f"  {kind} failed: {', '.join(failed)}")
    for e in row["layer"]:
        print(f"  layer {e['config']:<42} {e['ms']:.3f} ms{' (default)' if e['default'] else ''}  "
              f"max rel err {e['max_rel']:.1e}")


def print_row(row: dict[str, Any]) -> None:
    s = row["sort_ms"]
    print(f"\nT={row['tokens']} pairs={row['pairs']} experts used={row['experts_used']}  floors: "
          f"{row['flop_floor_ms']:.3f} ms FLOPs, {row['weight_floor_ms']:.3f} ms weights")
    print("  sort, us: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in s.items()))
    print("  glue steps, us: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row["glue_ms"].items()))
    print("  grouped GEMMs alone, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in row["gemm_ms"].items()))
    print(f"  {'path':<30}{'ms':>8}{'vs grouped':>12}{'max rel err':>13}{'norm rel err':>14}")
    print(f"  {'grouped (fused=True)':<30}{row['grouped_ms']:>8.3f}{1.0:>12.2f}")
    for entry in row["fused"]:
        name = ("fused " + entry["config"] + (" tma" if entry.get("tma") else "")
                + (" *" if entry["config"] == row["default_config"] else ""))
        if "error" in entry:
            print(f"  {name:<30}  failed: {entry['error'][:80]}")
        else:
            print(f"  {name:<30}{entry['ms']:>8.3f}{entry['ms'] / row['grouped_ms']:>12.2f}"
                  f"{entry['max_rel']:>13.2e}{entry['norm_rel']:>14.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 768, 1408, 1920])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--kernel-sweep", action="store_true", help="time each fused GEMM kernel alone over its grid")
    p.add_argument("--configs", nargs="+", default=list(SWEEP), help="BM,BN,BK,GM,warps,stages (the default is added)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--hbm-bw", type=float, default=3.0e12)
    p.add_argument("--peak-flops", type=float, default=790e12)
    p.add_argument("--out", default="moe_kernel_bench.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_kernel_bench needs CUDA")
    torch.manual_seed(0)
    bf = torch.bfloat16
    weights = (torch.randn(args.experts, 2 * args.inter, args.hidden, device="cuda", dtype=bf) / 40,
               torch.randn(args.experts, args.hidden, args.inter, device="cuda", dtype=bf) / 30,
               torch.randn(args.experts, args.hidden, device="cuda", dtype=bf) / 40)
    rows = []
    with torch.inference_mode():
        for tokens in args.tokens:
            if args.kernel_sweep:
                rows.append(kernel_sweep(tokens=tokens, args=args, weights=weights))
                print_sweep(rows[-1])
            else:
                rows.append(layer(tokens=tokens, args=args, weights=weights))
                print_row(rows[-1])
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": getattr(fused_ops.triton, "__version__", None), "shapes": {
                  "experts": args.experts, "top_k": args.top_k, "hidden": args.hidden, "inter": args.inter},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
