"""Test support for the analysis tests: run a sweep in-process (no Ray) into a run folder, find
committed reference runs, and check figures.

``make_run`` drives ``ModelWorker.run`` on every unit of the expanded spec and writes the rows
with ``RunStore`` exactly like the Ray scheduler does, so the folder has the normal layout
(spec.yaml, manifest.json, units.jsonl, env.json, parts/).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "sweeps"
REFERENCE = REPO / "results" / "reference"

# The simulated family with small costs: a sweep of a few hundred passes runs in a second or two.
SIMULATED = ("model.family=simulated", "model.preset=molmoe-1b", "model.dtype=float32",
             "model.options={vision_ms_per_crop: 0.05, projector_ms_per_crop: 0.01, "
             "prefill_ms_per_token: 0.0005, decode_ms_per_token: 0.02}")


def cpu_overrides(sweep: str) -> list[str]:
    """The overrides documented in the sweep's '# cpu:' header line."""
    for line in (SWEEPS / f"{sweep}.yaml").read_text().splitlines():
        if line.startswith("# cpu:"):
            return [part.strip() for part in line.removeprefix("# cpu:").split("--set") if part.strip()]
    raise AssertionError(f"sweeps/{sweep}.yaml has no '# cpu:' line")


def make_run(*, sweep: str, overrides: Sequence[str], root: Path, run_id: str = "r") -> Path:
    """Run sweeps/<sweep>.yaml with ``overrides`` in this process; returns the run folder."""
    from flexvlm_ray.run.launch import frozen_spec_text, spec_hash
    from flexvlm_ray.run.worker import ModelWorker
    from flexvlm_ray.spec.expand import expand
    from flexvlm_ray.spec.load import load_spec
    from flexvlm_ray.store.writer import RunStore

    source = SWEEPS / f"{sweep}.yaml"
    spec = load_spec(source, overrides=overrides)
    units = expand(spec)
    store = RunStore(root / spec.name / run_id)
    store.create(spec_text=frozen_spec_text(spec, source=str(source), overrides=overrides),
                 spec_hash=spec_hash(spec), units=units, run_id=run_id)
    worker = ModelWorker(model=units[0].model, seed=spec.seed, name="w0", cpu_threads=1)
    store.write_env({"driver": "in-process test", "workers": [worker.env()]})
    for unit in units:
        result = worker.run(unit.to_dict(), run_id)
        assert result["ok"], result.get("failure")
        store.write_part(unit.unit_id, result["table"])
    store.update_manifest(status="complete")
    return store.root


def reference_runs(experiment: str) -> list[Path]:
    """Committed GPU runs of ``experiment`` under results/reference/<gpu>-<date>/<sweep>/<run_id>/."""
    import json

    found = []
    for manifest in sorted(REFERENCE.glob("*/*/*/manifest.json")):
        if json.loads(manifest.read_text()).get("experiment") == experiment:
            found.append(manifest.parent)
    return found


def assert_png_300dpi(path: Path) -> None:
    """A non-empty PNG saved at 300 DPI whose pixels are not all one colour."""
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        dpi = image.info.get("dpi")
        assert dpi is not None and round(dpi[0]) == 300 and round(dpi[1]) == 300, (path, dpi)
        lo, hi = image.convert("L").getextrema()
        assert hi > lo, f"{path} is one flat colour"


def analyze_to(run_dir: Path, out_dir: Path) -> list[Path]:
    """Run the analysis registered for the run's experiment, writing into ``out_dir`` (so that
    committed reference runs stay untouched)."""
    import json

    from flexvlm_ray.analysis.registry import ANALYSES, _import_all
    from flexvlm_ray.store.reader import load_frame

    _import_all()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    return ANALYSES.get(manifest["experiment"])(rows=load_frame(run_dir), out_dir=out_dir,
                                                 manifest={**manifest, "run_dir": str(run_dir)})


def ok_frame(run_dir: Path):
    from flexvlm_ray.store.reader import load_frame

    rows = load_frame(run_dir)
    return rows[rows["status"] == "ok"].reset_index(drop=True)


def run_cases(experiment: str) -> list[str]:
    """'cpu' (a run made by the test) plus every committed reference run of ``experiment``."""
    return ["cpu"] + [str(p) for p in reference_runs(experiment)]
