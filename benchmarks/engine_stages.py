"""Stage latencies of a model through the measurement engine, with roofline ratios.

For the molmoe-1b preset on a GPU (issues 2 and 3): model build time; T_vision at 2/4/8/13
crops (1xk tilings + the global crop); prefill at the token counts those crops produce;
decode ms per token at top_k x active blocks; for each the ratio to its roofline:
  decode   = (active weight bytes read per token + KV-cache bytes) / measured HBM bandwidth
  prefill  = analytic FLOPs / measured bf16 matmul FLOP/s   (vision likewise)
The experts implementation (transformers' eager / grouped_mm) is compared as asked.

    python benchmarks/engine_stages.py --preset molmoe-1b --device cuda --out stages.json
    python benchmarks/engine_stages.py --preset tiny --device cpu --dtype float32   # smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from PIL import Image

from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure.engine import measure_pass
from flexvlm_ray.models.flexmoe.adapter import FlexMoeAdapter
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import load_spec_text

TILES = (1, 3, 7, 12)          # 1xk tilings -> k + 1 crops
TOP_KS = (1, 8, 32)
BLOCKS = (4, 8, 16)


def measure_ceilings(*, device: str) -> dict[str, float]:
    """HBM bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, measured."""
    if device != "cuda":
        return {"hbm_bytes_per_s": float("nan"), "bf16_flops_per_s": float("nan")}
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")

    def timed(fn, reps=10):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / reps

    copy_s = timed(lambda: y.copy_(x))
    mm_s = timed(lambda: a @ b)
    del x, y, a, b
    torch.cuda.empty_cache()
    return {"hbm_bytes_per_s": 2 * 2**30 / copy_s, "bf16_flops_per_s": 2 * 8192**3 / mm_s}


def wide_image(tiles: int, seed: int = 0) -> Image.Image:
    """336 x (224*tiles + 112) noise: Molmo's tiling picks exactly 1 x tiles."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (336, 224 * tiles + 112, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def unit_for(*, preset: str, max_new: int, top_k=None, blocks=None, per_token: bool):
    knobs = {"max_new_tokens": max_new}
    if top_k:
        knobs["top_k"] = top_k
    if blocks:
        knobs["active_blocks"] = blocks
    text = (f"name: bench\nexperiment: bench\nmodel: {{family: flexmoe, preset: {preset}}}\n"
            f"datasets: [{{name: probe_grid}}]\nknobs: {json.dumps(knobs)}\n"
            f"measure: {{warmup: 0, per_token_decode: {str(per_token).lower()}, prefill_hook: true}}\n")
    return expand(load_spec_text(text, source="bench"))[0]


def run_pass(adapter, unit, sample, *, repeats: int) -> list[dict]:
    adapter.apply_knobs(unit.knobs)
    try:
        measure_pass(adapter=adapter, sample=sample, unit=unit)  # warmup
        return [measure_pass(adapter=adapter, sample=sample, unit=unit) for _ in range(repeats)]
    finally:
        adapter.restore_knobs()


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def decode_bytes_per_token(adapter, *, top_k: int, blocks: int, context: int) -> float:
    """Weights one decode step reads (active params minus the embedding table plus one row) and the KV cache."""
    from flexvlm_ray.models.flexmoe.adapter import flexmoe_param_counts

    model, cfg = adapter.model, adapter.model.decoder.config
    active = flexmoe_param_counts(model=model, top_k=top_k, active_blocks=range(blocks))["llm_active"]
    embed = cfg.vocab_size * cfg.hidden_size
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    kv = 2 * blocks * context * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return elem * (active - embed + cfg.hidden_size + kv)


def bench(*, preset: str, device: str, dtype: str, experts: str, ceilings: dict, repeats: int,
          decode_tokens: int) -> dict:
    started = time.perf_counter()
    adapter = FlexMoeAdapter(preset=preset, path=None, dtype=dtype, device=device, seed=0,
                             options={"experts_implementation": experts})
    adapter.synchronize()
    out = {"experts_implementation": experts, "build_s": time.perf_counter() - started,
           "vision_prefill": [], "decode": []}
    info = adapter.info
    # vision and prefill vs crops (prefill only: max_new_tokens 0)
    for tiles in TILES:
        sample = Sample(sample_id=f"1x{tiles}", image=wide_image(tiles), prompt="Describe this image.")
        rows = run_pass(adapter, unit_for(preset=preset, max_new=0, per_token=False), sample, repeats=repeats)
        r0 = rows[0]
        entry = {"num_crops": r0["num_crops"], "num_vision_tokens": r0["num_vision_tokens"],
                 "num_total_tokens": r0["num_total_tokens"],
                 "T_vision_encoder": med(rows, "T_vision_encoder"), "T_projector": med(rows, "T_projector"),
                 "T_LLM_prefill": med(rows, "T_LLM_prefill"), "T_LLM_prefill_hook": med(rows, "T_LLM_prefill_hook"),
                 "flops_vision": r0.get("flops_vision_analytic"), "flops_prefill": r0.get("flops_llm_prefill_analytic")}
        peak = ceilings["bf16_flops_per_s"]
        entry["vision_roofline_ms"] = 1000 * entry["flops_vision"] / peak
        entry["prefill_roofline_ms"] = 1000 * entry["flops_prefill"] / peak
        out["vision_prefill"].append(entry)
    # decode per token vs top_k and blocks (forced length, per-token events)
    sample = Sample(sample_id="1x3", image=wide_image(3), prompt="Describe this image.")
    for top_k in [k for k in TOP_KS if k <= info.num_experts]:
        for blocks in [b for b in BLOCKS if b <= info.num_blocks]:
            rows = run_pass(adapter, unit_for(preset=preset, max_new=decode_tokens, top_k=top_k, blocks=blocks,
                                              per_token=True), sample, repeats=max(1, repeats // 2))
            per_token = statistics.median(t for r in rows for t in r["T_decode_per_token"][2:])
            context = rows[0]["num_total_tokens"] + decode_tokens // 2
            nbytes = decode_bytes_per_token(adapter, top_k=top_k, blocks=blocks, context=context)
            out["decode"].append({"top_k": top_k, "active_blocks": blocks, "ms_per_token": per_token,
                                  "bytes_per_token": nbytes,
                                  "roofline_ms": 1000 * nbytes / ceilings["hbm_bytes_per_s"]})
    del adapter
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def print_table(result: dict) -> None:
    print(f"\n== {result['experts_implementation']}: build {result['build_s']:.1f} s")
    print(f"{'crops':>5} {'vis_tok':>7} {'tokens':>6} {'T_vis':>7} {'x_roof':>6} {'T_proj':>6} "
          f"{'T_prefill':>9} {'hook':>7} {'x_roof':>6}")
    for e in result["vision_prefill"]:
        print(f"{e['num_crops']:>5} {e['num_vision_tokens']:>7} {e['num_total_tokens']:>6} "
              f"{e['T_vision_encoder']:>7.2f} {e['T_vision_encoder'] / e['vision_roofline_ms']:>6.1f} "
              f"{e['T_projector']:>6.2f} {e['T_LLM_prefill']:>9.2f} {e['T_LLM_prefill_hook']:>7.2f} "
              f"{e['T_LLM_prefill'] / e['prefill_roofline_ms']:>6.1f}")
    print(f"{'top_k':>5} {'blocks':>6} {'ms/tok':>7} {'roof_ms':>7} {'x_roof':>6}")
    for e in result["decode"]:
        print(f"{e['top_k']:>5} {e['active_blocks']:>6} {e['ms_per_token']:>7.2f} {e['roofline_ms']:>7.3f} "
              f"{e['ms_per_token'] / e['roofline_ms']:>6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="molmoe-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--experts", nargs="+", default=["grouped_mm", "eager"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ceilings = measure_ceilings(device=args.device)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {gpu}; measured HBM {ceilings['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceilings['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
    results = {"gpu": gpu, "preset": args.preset, "dtype": args.dtype, "ceilings": ceilings,
               "torch": torch.__version__, "runs": []}
    for experts in args.experts:
        result = bench(preset=args.preset, device=args.device, dtype=args.dtype, experts=experts,
                       ceilings=ceilings, repeats=args.repeats, decode_tokens=args.decode_tokens)
        print_table(result)
        results["runs"].append(result)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
