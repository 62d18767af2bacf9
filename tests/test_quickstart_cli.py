"""The README's quickstart through the real CLI in a subprocess, with one analysis step made to
fail (its plotting package is missing): the rows, the summary and the report survive, the
failure is one line naming the analysis and its cause, and launch exits 3."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexvlm_ray.run.launch import run_status

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

# matplotlib is hidden from the driver only (Ray's workers are other processes and do not need it)
DRIVER = """
import sys
sys.modules["matplotlib"] = None
from flexvlm_ray.cli import main
sys.argv = ["flexvlm-ray"] + sys.argv[1:]
main()
"""


def test_quickstart_keeps_rows_and_other_steps_when_an_analysis_fails(tmp_path):
    out = tmp_path / "results"
    args = ["launch", str(ROOT / "sweeps" / "quickstart.yaml"), "--num-gpus", "2", "--output", str(out),
            "--run-id", "q", "--no-progress", "--set", "datasets.0.num_samples=2", "--set", "datasets.1.num_samples=1",
            "--set", "knobs.max_new_tokens=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    run_dir = out / "quickstart" / "q"
    assert proc.returncode == 3, proc.stderr[-3000:]
    status = run_status(run_dir)
    assert (status["done"], status["failed"], status["pending"]) == (36, 0, 0)
    failures = [line for line in proc.stderr.splitlines() if "failed" in line]
    assert len(failures) == 1 and failures[0].startswith("analysis quickstart failed: ModuleNotFoundError"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "total ms" in proc.stdout and "VQA acc" in proc.stdout and "CIDEr-D" in proc.stdout  # the summary
    assert max(len(line) for line in proc.stdout.splitlines()) <= 120
    assert f"report: {run_dir / 'report.html'}" in proc.stdout and (run_dir / "report.html").is_file()
    assert "analysis quickstart failed" in (run_dir / "report.html").read_text()
