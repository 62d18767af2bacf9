"""Reading a finished run of many units: per-part reads against the compacted rows.parquet.

Builds a run folder of ``--units`` units (``--rows`` rows each, written by ``RunStore.write_part``
exactly as the driver writes them; no Ray), then times, best of ``--repeats``:

    before   the reader of every part through pyarrow.dataset (how load_frame read a run until
             issue 22) and the per-part status scan it went with
    parts    load_frame / run_status reading and verifying every part (a run still in progress)
    compact  writing rows.parquet (done once, when a session ends)
    after    load_frame / run_status of the compacted run (one verified file)

    python benchmarks/read_run.py --out results/reference/cpu-2core-<date>/read_run.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def build_run(root: Path, *, units: int, rows: int) -> Path:
    from flexvlm_ray.store.schema import rows_to_table
    from flexvlm_ray.store.writer import RunStore

    store = RunStore(root / "run")
    store.create(spec_text="# read_run benchmark\n", spec_hash="bench", units=[], run_id="bench")
    ids = [f"{i:016x}" for i in range(units)]
    now = dt.datetime.now(dt.timezone.utc)
    for i, unit_id in enumerate(ids):
        store.write_part(unit_id, rows_to_table([
            {"unit_id": unit_id, "sweep": "bench", "experiment": "quickstart", "run_id": "bench",
             "model_family": "flexmoe", "dataset": "shapes_vqa", "sample_id": f"s{j}", "sample_index": j,
             "shard": i, "num_shards": units, "repeat": 0, "run_index": 0, "top_k": 1 + i % 8,
             "max_new_tokens": 16, "gpu_name": "cpu", "worker": f"worker-{i % 4}", "status": "ok",
             "num_vision_tokens": 64, "T_total": 10.0 + j, "T_LLM_decode": 5.0, "score": 1.0,
             "T_decode_per_token": [0.3] * 16, "timestamp": now} for j in range(rows)]))
    store.update_manifest(unit_ids=ids, status="complete", sweep="bench", experiment="quickstart")
    return store.root


def before_load(run_dir: Path):
    import pyarrow.dataset as pads

    from flexvlm_ray.store.schema import ROW_SCHEMA
    paths = sorted((run_dir / "parts").glob("*.parquet"))
    return pads.dataset([str(p) for p in paths], schema=ROW_SCHEMA, format="parquet").to_table().to_pandas()


def before_status(run_dir: Path) -> int:
    import pyarrow.parquet as pq
    rows = 0
    for path in sorted((run_dir / "parts").glob("*.parquet")):
        rows += pq.read_table(path, columns=["gpu_name", "worker"]).num_rows
    return rows


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(min(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from flexvlm_ray.run.launch import run_status
    from flexvlm_ray.store.reader import load_frame
    from flexvlm_ray.store.writer import RunStore

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = build_run(Path(tmp), units=args.units, rows=args.rows)
        expected = args.units * args.rows
        assert len(before_load(run_dir)) == expected and len(load_frame(run_dir)) == expected
        result = {
            "units": args.units, "rows": expected, "repeats": args.repeats,
            "before_load_frame_s": best(lambda: before_load(run_dir), args.repeats),
            "before_status_s": best(lambda: before_status(run_dir), args.repeats),
            "parts_load_frame_s": best(lambda: load_frame(run_dir), args.repeats),
            "parts_status_s": best(lambda: run_status(run_dir), args.repeats),
        }
        started = time.perf_counter()
        RunStore(run_dir).compact()
        result["compact_s"] = round(time.perf_counter() - started, 4)
        assert len(load_frame(run_dir)) == expected and RunStore(run_dir).read_rows().compacted
        result["after_load_frame_s"] = best(lambda: load_frame(run_dir), args.repeats)
        result["after_status_s"] = best(lambda: run_status(run_dir), args.repeats)
    result.update(host=platform.node(), cpus=os.cpu_count(), python=platform.python_version(),
                  date=dt.date.today().isoformat(),
                  command=f"python benchmarks/read_run.py --units {args.units} --rows {args.rows} "
                          f"--repeats {args.repeats}" + (f" --out {args.out}" if args.out else ""))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
