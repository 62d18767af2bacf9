"""Where prefill time goes: torch.profiler over one molmoe-1b prefill per backend (GPU).

Prints the top CUDA kernels and CPU ops by self time, and the number of host syncs, so that a
flat prefill (time independent of tokens) can be traced to its cause.
    python benchmarks/profile_prefill.py --tiles 12
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine_stages import wide_image
from benchmarks.runtime_bench import BACKENDS
from flexvlm_ray.data.base import Sample
from flexvlm_ray.models.base import Knobs
from flexvlm_ray.models.flexmoe import FlexMoeAdapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=12)
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=["fast", "hf-grouped_mm"])
    args = parser.parse_args()
    adapter = FlexMoeAdapter(preset="molmoe-1b", path=None, dtype="bfloat16", device="cuda", seed=0, options={})
    sample = Sample(sample_id="p", image=wide_image(args.tiles), prompt="Describe this image.")
    for name in args.backends:
        backend, options = BACKENDS[name]
        adapter.set_backend(backend=backend, options=options)
        prepared = adapter.prepare(sample=sample, knobs=Knobs())
        embeds = adapter.projector(prepared, adapter.vision_encoder(prepared))
        for _ in range(3):
            adapter.prefill(prepared, embeds)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            adapter.prefill(prepared, embeds)
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(f"\n==== backend {name}: {prepared.num_total_tokens} tokens")
        print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        syncs = sum(e.count for e in events if "Synchronize" in e.key or "synchronize" in e.key
                    or "cudaMemcpy" in e.key or "item" == e.key.split("::")[-1])
        print(f"host syncs / copies seen: {syncs}")


if __name__ == "__main__":
    main()
