"""Where prefill time goes: torch.profiler over one molmoe-1b prefill per backend (GPU).

Prints the CUDA kernels and CPU ops by self time, and the number of host syncs, so that a flat
prefill (time independent of tokens) or a slow kernel can be traced to its cause. The prompt is
the runtime benchmark's input of about ``--tokens`` tokens (an image whose crop table lands near
it, else text), or a wide image of ``--tiles`` crops.
    python benchmarks/profile_prefill.py --tokens 1900 --backends fast-eager --rows 40
For a graphed backend (``fast``) it also splits the call's time: the adapter call, the fast decoder's
call and the prefill graph's replay alone, to tell time spent around the graph from time inside it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine_stages import wide_image
from benchmarks.runtime_bench import BACKENDS, prefill_input, time_calls
from flexvlm_ray.data.base import Sample
from flexvlm_ray.models.base import Knobs
from flexvlm_ray.models.flexmoe.adapter import FlexMoeAdapter
from flexvlm_ray.models.hf_common import greedy_token


def prompt(*, adapter: FlexMoeAdapter, tokens: int | None, tiles: int):
    """(prepared, image embeddings) of the prompt to profile."""
    if tokens:
        prepared, embeds, _ = prefill_input(adapter=adapter, target=tokens)
        return prepared, embeds
    sample = Sample(sample_id="p", image=wide_image(tiles), prompt="Describe this image.")
    prepared = adapter.prepare(sample=sample, knobs=Knobs())
    return prepared, adapter.projector(prepared, adapter.vision_encoder(prepared))


def graphed_split(*, adapter: FlexMoeAdapter, prepared, embeds, repeats: int = 30) -> dict[str, float]:
    """Median ms of a graphed fast prefill: the whole adapter call (embedding and splice, buffer copies,
    replay, the first token), its parts alone (the embedding and splice, the fast decoder's call, the
    prefill graph's replay, the first token's argmax and read), each timed with CUDA events; and the
    host time to issue the fast decoder's call and the replay (perf_counter, no synchronize), which the
    GPU waits out when nothing is queued ahead of them."""
    with torch.inference_mode():
        hidden = adapter._embed_prompt(prepared, embeds)
    graph = next(g for key, g in reversed(adapter.fast.graphs.items()) if key[0] == "prefill")
    fast_call = lambda: adapter.fast.prefill(hidden=hidden, blocks=adapter._active)  # noqa: E731
    calls = {"adapter.prefill": lambda: adapter.prefill(prepared, embeds),
             "embed+splice": lambda: adapter._embed_prompt(prepared, embeds),
             "fast.prefill": fast_call,
             "graph.replay": graph.replay,
             "first token": lambda: greedy_token(adapter.fast.prefill_logits)}
    out = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            out[name] = statistics.median(time_calls(fn, cuda=True, warmup=3, repeats=repeats))
        for name, fn in (("fast.prefill host", fast_call), ("graph.replay host", graph.replay)):
            host = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e3)
            out[name] = statistics.median(host)
    torch.cuda.synchronize()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=None, help="about this many prompt tokens (overrides --tiles)")
    parser.add_argument("--rows", type=int, default=12, help="rows of each table")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=["fast", "hf-grouped_mm"])
    args = parser.parse_args()
    adapter = FlexMoeAdapter(preset="molmoe-1b", path=None, dtype="bfloat16", device="cuda", seed=0, options={})
    for name in args.backends:
        backend, options = BACKENDS[name]
        adapter.set_backend(backend=backend, options=options)
        prepared, embeds = prompt(adapter=adapter, tokens=args.tokens, tiles=args.tiles)
        for _ in range(3):
            adapter.prefill(prepared, embeds)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            adapter.prefill(prepared, embeds)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        print(f"\n==== backend {name}: {prepared.num_total_tokens} tokens, {gpu_us / 1e3:.3f} ms of GPU time")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=90))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        syncs = sum(e.count for e in events if "Synchronize" in e.key or "synchronize" in e.key
                    or "cudaMemcpy" in e.key or "item" == e.key.split("::")[-1])
        print(f"host syncs / copies seen: {syncs}")
        if backend == "fast" and adapter.fast.use_graphs and any(k[0] == "prefill" for k in adapter.fast.graphs):
            split = graphed_split(adapter=adapter, prepared=prepared, embeds=embeds)
            print("graphed prefill, median ms: " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))


if __name__ == "__main__":
    main()
