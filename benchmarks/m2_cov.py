"""Median CoV per stage of M2 run folders, pooled over the interleaved repeats and within one repeat (%).

    python benchmarks/m2_cov.py ROOT [ROOT ...]      # ROOT: a folder of run folders (e.g. RUNS/m2) or one run

What analysis/m2.py computes (``stage_repeatability``, ``within_repeats``), one line per run, so that GPU
scripts can print the noise target beside earlier runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from flexvlm_ray.analysis.m2 import series, stage_repeatability, within_repeats
from flexvlm_ray.store.reader import load_frame

STAGES = ("T_vision_encoder", "T_LLM_prefill", "T_LLM_decode", "T_total")


def runs(root: Path) -> list[Path]:
    return [root] if (root / "manifest.json").is_file() else sorted(p.parent for p in root.glob("*/manifest.json"))


def main(argv: list[str]) -> None:
    print(f"{'run':44s}" + "".join(f"{s:>22s}" for s in STAGES))
    for root in map(Path, argv):
        for run in runs(root):
            rows = load_frame(run)
            ok = rows[rows["status"] == "ok"]
            if ok.empty:
                continue
            every = series(ok)
            cells = []
            for stage in STAGES:
                pooled, within = stage_repeatability(every, stage), within_repeats(every, stage)
                cells.append(f"{100 * pooled['cov_median']:.2f} / {100 * within:.2f}"
                             if pooled and within is not None else "-")
            print(f"{str(run)[-44:]:44s}" + "".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
