"""benchmarks/run_sweeps.py: a list of sweeps in one process on one worker, with the run folders
`launch` writes (resumable, analysed), a deadline that leaves the rest resumable."""
from __future__ import annotations

import importlib.util
import json

import pytest

from analysis_support import REPO, SIMULATED

spec = importlib.util.spec_from_file_location("run_sweeps", REPO / "benchmarks" / "run_sweeps.py")
run_sweeps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_sweeps)


def _list(tmp_path, text):
    path = tmp_path / "list.txt"
    path.write_text(text)
    return path


def test_list_lines_and_errors(tmp_path):
    good = _list(tmp_path, "# comment\nsweeps/m2.yaml  r1  --set a=1 --set 'b=[1, 2]'  # note\n\nsweeps/m1.yaml r2\n")
    assert run_sweeps.parse_list(good) == [("sweeps/m2.yaml", "r1", ["a=1", "b=[1, 2]"]), ("sweeps/m1.yaml", "r2", [])]
    with pytest.raises(SystemExit, match="only '--set KEY=VALUE' pairs"):
        run_sweeps.parse_list(_list(tmp_path, "sweeps/m2.yaml r1 --num-gpus 1\n"))


def test_sweeps_share_one_worker_and_runs_continue(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    listing = _list(tmp_path, "sweeps/m2.yaml a --set datasets.0.num_samples=1 --set measure.runs_per_sample=2\n"
                              "sweeps/profiling_exp4.yaml b --set datasets.0.num_samples=1 "
                              "--set knobs.max_new_tokens=[1,4]\n")
    args = [str(listing), "--output", str(tmp_path / "runs"), *[f"--set={o}" for o in SIMULATED]]
    assert run_sweeps.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("worker ready") == 1                       # one model load for the list
    for sweep, run_id, figure in (("m2", "a", "m2_repeatability.json"), ("profiling_exp4", "b",
                                                                            "exp4_output_tokens_scaling_results.json")):
        run = tmp_path / "runs" / sweep / run_id
        assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
        env = json.loads((run / "env.json").read_text())
        assert env["driver"].startswith("benchmarks/run_sweeps.py") and env["sessions"][0]["failed"] == 0
        assert (run / "analysis" / figure).is_file()
    assert run_sweeps.main(args) == 0                           # again: every unit is done, none runs
    assert "0 failed" in capsys.readouterr().out
    env = json.loads((tmp_path / "runs" / "m2" / "a" / "env.json").read_text())
    assert env["sessions"][-1]["started_units"] == 0


def test_a_passed_deadline_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    listing = _list(tmp_path, "sweeps/m2.yaml a\n")
    assert run_sweeps.main([str(listing), "--output", str(tmp_path / "runs"), "--deadline-s", "-1"]) == 1
    assert "not started" in capsys.readouterr().out and not (tmp_path / "runs").exists()
