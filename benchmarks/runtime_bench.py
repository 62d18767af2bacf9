"""Per-stage latency of the flexmoe backends against their rooflines (one model, switched in place).

Backends (``--backends``): ``hf-eager`` and ``hf-grouped_mm`` (transformers' experts kernels), ``fast``
(the fast backend's defaults: on CUDA the Triton kernels, the fused decode MoE, CUDA graphs for decode and
for prefill), ``fast-torch`` (plain PyTorch ops and the grouped-GEMM decode MoE), ``fast-gather`` and
``fast-eager`` (the defaults without CUDA graphs, as the engine's prefill runs when block hooks time it),
``fast-grouped`` (the defaults with ``prefill_moe: grouped``, the grouped-GEMM prefill MoE; prefill only).
Points:

* decode ms/token at top_k 1/2/4/8/16/32 (all blocks) and at blocks 4/8/16 (default top_k), after a
  prompt of about 700 tokens; roofline = bytes read per token (attention, norms, router and top_k
  experts of every active block, one embedding row, final norm, LM head, and the KV cache of the
  active blocks) / HBM bandwidth;
* prefill ms at about 150/700/1900 prompt tokens (an image and max_crops from the crop table when one
  lands within 20% of the target, else a text-only prompt of exactly that length); roofline =
  analytic FLOPs (flexmoe_flops) / peak matmul rate, with the weight-read floor beside it;
* vision ms at 1/4/8/13 crops (random pixels); roofline = analytic FLOPs / peak.

Every roofline is given twice: with the nominal ceilings (--hbm-bw, --peak-flops) and with the ones
measured here (a large device-to-device copy; a large matmul). Times are CUDA events around each call
(wall clock on the CPU), after warm-up, median of the repeats.

GPU:   python benchmarks/runtime_bench.py --out runtime_bench.json
Smoke: python benchmarks/runtime_bench.py --preset tiny --device cpu --dtype float32 --repeats 2 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexvlm_ray.data.base import Sample  # noqa: E402
from flexvlm_ray.models import MODELS, Knobs, Prepared  # noqa: E402
from flexvlm_ray.models.flexmoe.config import BOS_ID, WORDS, SPECIAL_TOKENS, FlexMoeConfig  # noqa: E402
from flexvlm_ray.models.flexmoe.flops import flexmoe_flops  # noqa: E402
from flexvlm_ray.models.flexmoe.preprocess import layout_image  # noqa: E402

TOP_KS = (1, 2, 4, 8, 16, 32)
BLOCKS = (4, 8, 16)
PREFILL_TOKENS = (150, 700, 1900)
VISION_CROPS = (1, 4, 8, 13)
DECODE_PROMPT_TOKENS = 700
IMAGE_SIZES = ((336, 336), (640, 480), (640, 512), (900, 700), (1024, 768), (1280, 960), (1400, 1100))


# -- timing ------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], *, cuda: bool, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times: list[float]) -> dict[str, float]:
    q = np.percentile(times, [10, 90])
    return {"ms": statistics.median(times), "ms_p10": float(q[0]), "ms_p90": float(q[1]), "repeats": len(times)}


# -- ceilings ----------------------------------------------------------------------------------
def measure_bandwidth(*, device: torch.device, cuda: bool, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (bytes read + bytes written), median of several copies."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), cuda=cuda, warmup=3, repeats=10)
    return 2 * src.numel() * src.element_size() / (statistics.median(times) / 1e3)


def measure_matmul(*, device: torch.device, cuda: bool, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (random inputs), median of several."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = time_calls(lambda: a @ b, cuda=cuda, warmup=3, repeats=10)
    return 2 * n ** 3 / (statistics.median(times) / 1e3)


# -- rooflines ---------------------------------------------------------------------------------
def decode_bytes(*, adapter, top_k: int, blocks: tuple[int, ...], context: int) -> int:
    """Bytes one decode token must read: per active block attention, norms, router and ``top_k`` of
    its experts, plus one embedding row, the final norm, the LM head and the active blocks' KV cache."""
    model, c = adapter.model, adapter.config
    elem = next(model.parameters()).element_size()
    numel = 0
    for i in blocks:
        block = model.blocks[i]
        experts = sum(p.numel() for p in block.mlp.experts.parameters())
        numel += sum(p.numel() for p in block.parameters()) - experts + experts * top_k // c.num_experts
    dec = model.decoder
    numel += c.hidden_size + dec.model.norm.weight.numel() + dec.lm_head.weight.numel()
    cfg = dec.config
    head_dim = c.hidden_size // cfg.num_attention_heads
    kv = len(blocks) * 2 * cfg.num_key_value_heads * head_dim * context
    return (numel + kv) * elem


def prefill_weight_bytes(*, adapter, blocks: tuple[int, ...]) -> int:
    """Bytes of every weight a long prompt touches (all experts of the active blocks, LM head)."""
    model = adapter.model
    elem = next(model.parameters()).element_size()
    numel = sum(p.numel() for i in blocks for p in model.blocks[i].parameters())
    return (numel + model.decoder.lm_head.weight.numel()) * elem


def with_roofline(row: dict[str, Any], *, floor_ms: float, floor_ms_measured: float) -> dict[str, Any]:
    row["roofline_ms"], row["roofline_ms_measured"] = floor_ms, floor_ms_measured
    row["x_roofline"] = row["ms"] / floor_ms if floor_ms else None
    row["x_roofline_measured"] = row["ms"] / floor_ms_measured if floor_ms_measured else None
    return row


# -- inputs ------------------------------------------------------------------------------------
def image_prepared(*, adapter, width: int, height: int, max_crops: int) -> Prepared:
    smp = Sample(sample_id="bench", image=random_image(width=width, height=height), prompt="what color is the car ?")
    return adapter.prepare(sample=smp, knobs=Knobs(max_crops=max_crops))


def random_image(*, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 10007 + height)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def image_token_count(*, config: FlexMoeConfig, width: int, height: int, max_crops: int) -> int:
    """Prompt length of an image at ``max_crops`` with the benchmark's question (6 words)."""
    layout = layout_image(image=Image.new("RGB", (width, height)), config=config, max_crops=max_crops)
    return 1 + len(layout.image_tokens) + 6


def closest_image(*, config: FlexMoeConfig, target: int) -> tuple[int, int, int, int]:
    """(width, height, max_crops, tokens) of the candidate image whose prompt length is nearest ``target``."""
    best = None
    for width, height in IMAGE_SIZES:
        for max_crops in range(1, config.max_crops + 1):
            tokens = image_token_count(config=config, width=width, height=height, max_crops=max_crops)
            if best is None or abs(tokens - target) < abs(best[3] - target):
                best = (width, height, max_crops, tokens)
    return best


def prefill_input(*, adapter, target: int) -> tuple[Prepared, torch.Tensor, str]:
    """A prompt of about ``target`` tokens and its image embeddings, and where it came from."""
    width, height, max_crops, tokens = closest_image(config=adapter.config, target=target)
    if abs(tokens - target) <= 0.2 * target:
        prepared = image_prepared(adapter=adapter, width=width, height=height, max_crops=max_crops)
        embeds = adapter.projector(prepared, adapter.vision_encoder(prepared))
        return prepared, embeds, f"image {width}x{height} max_crops={max_crops}"
    word_ids = len(SPECIAL_TOKENS) + np.random.default_rng(target).integers(0, len(WORDS), size=target - 1)
    ids = torch.tensor([[BOS_ID, *word_ids.tolist()]], device=adapter.device)
    empty = torch.zeros(0, dtype=torch.long, device=adapter.device)
    prepared = Prepared(inputs={"input_ids": ids, "image_positions": empty, "feature_index": empty}, num_crops=0,
                        num_vision_tokens=0, num_language_tokens=target, num_total_tokens=target)
    return prepared, torch.zeros(0, adapter.config.hidden_size, device=adapter.device, dtype=adapter.dtype), "text"


def vision_prepared(*, adapter, crops: int) -> Prepared:
    c = adapter.config
    pixels = torch.randn(crops, 3, c.crop_px, c.crop_px, generator=torch.Generator().manual_seed(crops))
    return Prepared(inputs={"pixel_values": pixels.to(device=adapter.device, dtype=adapter.dtype)}, num_crops=crops,
                    num_vision_tokens=crops * c.tokens_per_crop, num_language_tokens=0, num_total_tokens=0)


# -- stages ------------------------------------------------------------------------------------
BACKENDS = {
    "hf-eager": ("hf", {"experts_implementation": "eager"}),
    "hf-grouped_mm": ("hf", {"experts_implementation": "grouped_mm"}),
    "fast": ("fast", {}),
    "fast-torch": ("fast", {"kernels": "torch", "decode_moe": "grouped"}),
    "fast-gather": ("fast", {"kernels": "torch", "decode_moe": "gather"}),
    "fast-eager": ("fast", {"cuda_graphs": False}),
    "fast-grouped": ("fast", {"prefill_moe": "grouped"}),
    "fast-fused-decode": ("fast", {"fused_decode": True}),   # decode only: the prefill is the defaults'
    "fast-overlap": ("fast", {"overlap_decode": True}),      # decode only: the defaults, host one step ahead
}
PREFILL_BACKENDS = ("hf-eager", "hf-grouped_mm", "fast", "fast-torch", "fast-eager",   # gather: decode only
                    "fast-grouped")
PREFILL_ONLY = ("fast-grouped",)       # its decode is the defaults' (fused decode MoE)
VISION_BACKENDS = ("hf-grouped_mm", "fast")     # the ViT does not depend on the experts kernel


def bench_decode(*, adapter, name: str, knobs: Knobs, prepared: Prepared, embeds: torch.Tensor, args,
                 ceilings: dict[str, float]) -> dict[str, Any]:
    adapter.apply_knobs(knobs)
    try:
        state = adapter.prefill(prepared, embeds)
        times = time_calls(lambda: adapter.decode_step(state), cuda=args.cuda, warmup=args.warmup,
                           repeats=args.decode_repeats)
        context = state.position
        blocks = adapter.active_block_indices()
    finally:
        adapter.restore_knobs()
    return decode_row(adapter=adapter, stage="decode", name=name, knobs=knobs, blocks=blocks, context=context,
                      times=times, args=args, ceilings=ceilings)


def decode_row(*, adapter, stage: str, name: str, knobs: Knobs, blocks, context: int, times: list[float], args,
               ceilings: dict[str, float]) -> dict[str, Any]:
    top_k = knobs.top_k or adapter.config.top_k
    nbytes = decode_bytes(adapter=adapter, top_k=top_k, blocks=blocks, context=context)
    row = {"stage": stage, "backend": name, "top_k": top_k, "blocks": len(blocks), "tokens": context,
           "bytes": nbytes, **summary(times)}
    return with_roofline(row, floor_ms=nbytes / args.hbm_bw * 1e3, floor_ms_measured=nbytes / ceilings["hbm_bw"] * 1e3)


def bench_decode_run(*, adapter, name: str, knobs: Knobs, prepared: Prepared, embeds: torch.Tensor, args,
                     ceilings: dict[str, float]) -> dict[str, Any]:
    """ms per token of the engine's decode loop (``decode_run``, forced length): ``--run-steps`` steps from a
    fresh prefill per repeat, wall clock from the prefill's end (synchronized) to the last token on the host;
    the host's work between steps is inside, as in a row's T_LLM_decode."""
    adapter.apply_knobs(knobs)
    steps = args.run_steps
    try:
        def run() -> float:
            state = adapter.prefill(prepared, embeds)
            adapter.synchronize()
            t0 = time.perf_counter()
            adapter.decode_run(state, max_new=steps + 1, stop=None)
            adapter.synchronize()
            return (time.perf_counter() - t0) * 1e3 / steps
        for _ in range(args.warmup):
            run()
        times = [run() for _ in range(args.run_repeats)]
        context = prepared.num_total_tokens + steps // 2
        blocks = adapter.active_block_indices()
    finally:
        adapter.restore_knobs()
    return decode_row(adapter=adapter, stage="decode_run", name=name, knobs=knobs, blocks=blocks, context=context,
                      times=times, args=args, ceilings=ceilings)


def bench_prefill(*, adapter, name: str, prepared: Prepared, embeds: torch.Tensor, source: str, args,
                  ceilings: dict[str, float]) -> dict[str, Any]:
    c = adapter.config
    times = time_calls(lambda: adapter.prefill(prepared, embeds), cuda=args.cuda, warmup=args.warmup,
                       repeats=args.repeats)
    flops = flexmoe_flops(config=c, num_crops=prepared.num_crops, num_prompt_tokens=prepared.num_total_tokens,
                          num_output_tokens=1, top_k=c.top_k, num_active_blocks=c.num_blocks)["llm_prefill"]
    weights = prefill_weight_bytes(adapter=adapter, blocks=tuple(range(c.num_blocks)))
    row = {"stage": "prefill", "backend": name, "top_k": c.top_k, "blocks": c.num_blocks,
           "tokens": prepared.num_total_tokens, "source": source, "flops": flops, "weight_bytes": weights,
           "weight_floor_ms": weights / args.hbm_bw * 1e3, **summary(times)}
    return with_roofline(row, floor_ms=flops / args.peak_flops * 1e3,
                         floor_ms_measured=flops / ceilings["matmul_flops"] * 1e3)


def bench_vision(*, adapter, name: str, crops: int, args, ceilings: dict[str, float]) -> dict[str, Any]:
    prepared = vision_prepared(adapter=adapter, crops=crops)
    times = time_calls(lambda: adapter.vision_encoder(prepared), cuda=args.cuda, warmup=args.warmup,
                       repeats=args.repeats)
    flops = flexmoe_flops(config=adapter.config, num_crops=crops, num_prompt_tokens=1, num_output_tokens=1,
                          top_k=1, num_active_blocks=1)["vision"]
    row = {"stage": "vision", "backend": name, "crops": crops, "flops": flops, **summary(times)}
    return with_roofline(row, floor_ms=flops / args.peak_flops * 1e3,
                         floor_ms_measured=flops / ceilings["matmul_flops"] * 1e3)


def decode_knobs(config: FlexMoeConfig) -> list[Knobs]:
    top_ks = [k for k in TOP_KS if k <= config.num_experts]
    blocks = sorted({max(1, round(b * config.num_blocks / 16)) for b in BLOCKS})
    return ([Knobs(top_k=k) for k in top_ks]
            + [Knobs(active_blocks=b, block_policy="prefix") for b in blocks if b < config.num_blocks])


def run(args) -> dict[str, Any]:
    device = torch.device(args.device)
    args.cuda = device.type == "cuda"
    started = time.perf_counter()
    adapter = MODELS.get("flexmoe")(preset=args.preset, path=None, dtype=args.dtype, device=args.device, seed=0,
                                    options={}, backend="fast")
    adapter.synchronize()
    build_s = time.perf_counter() - started
    ceilings = {"hbm_bw": measure_bandwidth(device=device, cuda=args.cuda, nbytes=args.copy_bytes),
                "matmul_flops": measure_matmul(device=device, cuda=args.cuda, dtype=adapter.dtype, n=args.matmul_n)}
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        _, _, max_crops, _ = closest_image(config=adapter.config, target=DECODE_PROMPT_TOKENS)
        width, height = closest_image(config=adapter.config, target=DECODE_PROMPT_TOKENS)[:2]
        decode_prompt = image_prepared(adapter=adapter, width=width, height=height, max_crops=max_crops)
        decode_embeds = adapter.projector(decode_prompt, adapter.vision_encoder(decode_prompt))
        prefill_inputs = [prefill_input(adapter=adapter, target=t) for t in args.prefill_tokens]
        for name in args.backends:
            backend, options = BACKENDS[name]
            adapter.set_backend(backend=backend, options=options)
            for knobs in () if name in PREFILL_ONLY or "decode" not in args.stages else decode_knobs(adapter.config):
                benches = (bench_decode_run,) if name == "fast-overlap" else (bench_decode, bench_decode_run)
                for bench in benches if name.startswith("fast") else (bench_decode,):
                    rows.append(bench(adapter=adapter, name=name, knobs=knobs, prepared=decode_prompt,
                                      embeds=decode_embeds, args=args, ceilings=ceilings))
                    print(_line(rows[-1]), flush=True)
            if name in PREFILL_BACKENDS and "prefill" in args.stages:
                for prepared, embeds, source in prefill_inputs:
                    rows.append(bench_prefill(adapter=adapter, name=name, prepared=prepared, embeds=embeds,
                                              source=source, args=args, ceilings=ceilings))
                    print(_line(rows[-1]), flush=True)
            if name in VISION_BACKENDS and "vision" in args.stages:
                for crops in VISION_CROPS:
                    rows.append(bench_vision(adapter=adapter, name=name, crops=crops, args=args, ceilings=ceilings))
                    print(_line(rows[-1]), flush=True)
    return {"preset": args.preset, "device": _device_name(device), "dtype": args.dtype, "torch": torch.__version__,
            "python": platform.python_version(), "build_s": build_s, "nominal": {"hbm_bw": args.hbm_bw,
            "peak_flops": args.peak_flops}, "measured": ceilings, "total_s": time.perf_counter() - started,
            "rows": rows}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def _knob(row: dict[str, Any]) -> str:
    if row["stage"] == "vision":
        return f"crops={row['crops']}"
    if row["stage"] == "prefill":
        return f"T={row['tokens']}"
    return f"k={row['top_k']} b={row['blocks']}"


def _line(row: dict[str, Any]) -> str:
    ratio = row["x_roofline"]
    return (f"{row['stage']:<8} {row['backend']:<14} {_knob(row):<14} {row['ms']:>9.3f} ms  "
            f"roof {row['roofline_ms']:>8.3f} ms  x{ratio:>7.1f}  (measured ceilings x{row['x_roofline_measured']:.1f})")


def print_table(result: dict[str, Any]) -> None:
    m = result["measured"]
    print(f"\n{result['device']} {result['dtype']} torch {result['torch']}  build {result['build_s']:.1f}s  "
          f"total {result['total_s']:.1f}s")
    print(f"ceilings: HBM {m['hbm_bw'] / 1e12:.2f} TB/s measured ({result['nominal']['hbm_bw'] / 1e12:.2f} nominal), "
          f"matmul {m['matmul_flops'] / 1e12:.0f} TFLOP/s measured ({result['nominal']['peak_flops'] / 1e12:.0f} nominal)")
    for stage in ("decode", "decode_run", "prefill", "vision"):
        rows = [r for r in result["rows"] if r["stage"] == stage]
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        knobs = list(dict.fromkeys(_knob(r) for r in rows))
        print(f"\n{stage} ms (x nominal roofline)")
        print(f"{'':<14}" + "".join(f"{b:>22}" for b in backends) + f"{'roofline ms':>14}")
        for knob in knobs:
            cells, roof = [], None
            for b in backends:
                match = [r for r in rows if r["backend"] == b and _knob(r) == knob]
                cells.append(f"{match[0]['ms']:>12.3f} (x{match[0]['x_roofline']:>6.1f})" if match else f"{'-':>22}")
                roof = match[0]["roofline_ms"] if match else roof
            print(f"{knob:<14}" + "".join(f"{c:>22}" for c in cells) + f"{roof:>14.3f}")


def parse_args(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="molmoe-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--hbm-bw", type=float, default=3.0e12, help="nominal HBM bytes/s (H100 SXM: ~3.0e12 usable)")
    p.add_argument("--peak-flops", type=float, default=790e12, help="nominal dense bf16 FLOP/s")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per prefill / vision point")
    p.add_argument("--decode-repeats", type=int, default=30, help="timed decode steps per decode point")
    p.add_argument("--run-steps", type=int, default=32, help="steps of each timed decode run (stage decode_run)")
    p.add_argument("--run-repeats", type=int, default=10, help="timed decode runs per decode_run point")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="bytes of the bandwidth probe's copy source")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS),
                   help="in this order; a backend named twice is measured twice (its rows appear twice)")
    p.add_argument("--stages", nargs="+", choices=("decode", "prefill", "vision"), default=["decode", "prefill", "vision"])
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=list(PREFILL_TOKENS),
                   help="about this many prompt tokens per prefill point")
    p.add_argument("--out", default="runtime_bench.json")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
