"""Decode ms/token vs top_k per backend from runtime_bench.json files (one per GPU).

    python benchmarks/plot_runtime.py results/reference/h100-2026-11-22/runtime_bench.json \
        results/reference/h200-2026-11-22/runtime_bench.json --out docs/figures/decode_vs_topk.png
"""
from __future__ import annotations

import argparse
import json
import re
import statistics

from flexvlm_ray.analysis.plots import plt, save


# one colour per backend in every panel
COLORS = {"hf-eager": "tab:gray", "hf-grouped_mm": "tab:blue", "fast-torch": "tab:orange", "fast-gather": "tab:brown",
          "fast-eager": "tab:purple", "fast": "tab:green"}


def decode_rows(bench: dict) -> dict[str, list[tuple[int, float]]]:
    """{backend: [(top_k, ms)]} for the 16-block decode rows; a backend measured in several passes
    gives the median of its passes at each top_k."""
    out: dict[str, dict[int, list[float]]] = {}
    for row in bench["rows"] if "rows" in bench else bench["results"]:
        if row.get("stage") != "decode" or row.get("blocks", 16) != 16:
            continue
        out.setdefault(row["backend"], {}).setdefault(int(row["top_k"]), []).append(float(row["ms"]))
    return {b: [(k, statistics.median(v)) for k, v in sorted(by_k.items())] for b, by_k in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("benches", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(args.benches), figsize=(5.5 * len(args.benches), 4), sharey=True, squeeze=False)
    for ax, path in zip(axes[0], args.benches):
        bench = json.load(open(path))
        for backend, points in decode_rows(bench).items():
            ax.plot([k for k, _ in points], [ms for _, ms in points], marker="o", label=backend,
                    color=COLORS.get(backend))
        roof = {r["top_k"]: r["roofline_ms"] for r in bench.get("rows", bench.get("results", []))
                if r.get("stage") == "decode" and r.get("blocks", 16) == 16 and r["backend"] == "fast"}
        if roof:
            bw = bench.get("nominal", {}).get("hbm_bw", 3.0e12)
            ax.plot(*zip(*sorted(roof.items())), "k--", label=f"memory roofline ({bw / 1e12:.1f} TB/s nominal)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("MoE top_k (experts per token)")
        date = re.search(r"\d{4}-\d{2}-\d{2}", path)
        ax.set_title(f"{bench.get('device', '')} {date.group(0) if date else ''}".strip(), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("decode latency (ms per token), 16 blocks")
    save(fig, args.out)


if __name__ == "__main__":
    main()
