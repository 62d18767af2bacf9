"""Every bad input is one clear line and exit 2 before anything starts: no traceback, no Ray,
no run folder. And the exit codes of status, report and analyze (cli.py's docstring)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from flexvlm_ray.cli import main

SIMULATED = """
name: t
experiment: quickstart
model: {family: simulated}
datasets: [{name: probe_grid, num_samples: 4}]
knobs: {top_k: [1, 8]}
measure: {warmup: 0}
"""


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _spec(tmp_path, case: str) -> str:
    """Writes the case's spec into tmp_path/specs and returns its path."""
    folder = tmp_path / "specs"
    folder.mkdir(exist_ok=True)
    path = folder / "spec.yaml"
    texts = {
        "ok": SIMULATED,
        "dataset path missing": SIMULATED.replace("{name: probe_grid, num_samples: 4}",
                                                  f"{{name: text_vqa, num_samples: 4, path: {tmp_path}/no-such-dir}}"),
        "model path missing": SIMULATED.replace("{family: simulated}", f"{{family: flexmoe, path: {tmp_path}/no-ckpt}}"),
        "synthetic with path": SIMULATED.replace("num_samples: 4}", f"num_samples: 4, path: {folder}}}"),
        "device cuda": SIMULATED.replace("{family: simulated}", "{family: simulated, device: cuda}"),
    }
    if case == "not utf-8":
        path.write_bytes(b"name: t\nexperiment: \xff\xfe\n")
    else:
        path.write_text(texts[case])
    return str(path)


# (case, spec, extra args, a piece of the one-line message)
LAUNCH_CASES = [
    ("dataset path missing", "dataset path missing", [], "datasets.0.path: "),
    ("model path missing", "model path missing", [], "model.path: "),
    ("synthetic dataset with path", "synthetic with path", [], "probe_grid is synthetic"),
    ("cuda without CUDA", "device cuda", ["--num-gpus", "1"], "model.device: cuda, but this machine has no usable CUDA"),
    ("unreachable address", "ok", ["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: cannot reach a Ray cluster"),
    ("num-gpus with address", "ok", ["--address", "127.0.0.1:1", "--num-gpus", "2"], "drop --num-gpus"),
    ("spec not UTF-8", "not utf-8", [], "not UTF-8 text (byte 0xff"),
    ("unknown key via --set", "ok", ["--set", "knobs.topk=[1]"], "--set knobs.topk=[1]: knobs.topk: unknown key (did you mean top_k?)"),
    ("bad value via --set", "ok", ["--set", "knobs.top_k=[0]"], "--set knobs.top_k=[0]: knobs.top_k: values must be >= 1, got [0]"),
]


def _one_clean_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("case, spec, args, message", LAUNCH_CASES, ids=[c[0] for c in LAUNCH_CASES])
def test_launch_refuses_bad_input_with_one_line_and_writes_nothing(case, spec, args, message, tmp_path, monkeypatch):
    if case == "cuda without CUDA" and _cuda():
        pytest.skip("this machine has CUDA")
    import ray

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["launch", _spec(tmp_path, spec), "--output", str(out), "--no-progress", *args])
    assert message in _one_clean_line(result)
    assert not out.exists()                       # no run folder, nothing written
    assert not ray.is_initialized()               # refused before Ray started


def test_address_auto_without_a_cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))      # no `ray start` address file there
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["launch", _spec(tmp_path, "ok"), "--address", "auto", "--output", str(out)])
    assert "--address auto: no Ray cluster is running" in _one_clean_line(result)
    assert not out.exists()


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_validate_and_plan_name_a_spec_that_is_not_utf8(command, tmp_path):
    path = _spec(tmp_path, "not utf-8")
    line = _one_clean_line(CliRunner().invoke(main, [command, path]))
    assert line.startswith(f"{path}: not UTF-8 text")


def test_a_range_error_says_got_once(tmp_path):
    line = _one_clean_line(CliRunner().invoke(main, ["validate", _spec(tmp_path, "ok"), "--set", "knobs.top_k=[0]"]))
    assert line.count("got") == 1


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    line = _one_clean_line(CliRunner().invoke(main, ["report", str(tmp_path)]))
    assert "is not a run folder" in line
    assert not (tmp_path / "report.html").exists()


def _run_folder(tmp_path, *, done: int, failed: int):
    """A run of the simulated spec's 2 units: ``done`` stored, ``failed`` with failure records."""
    from flexvlm_ray.run.worker import ModelWorker
    from flexvlm_ray.spec.expand import expand
    from flexvlm_ray.spec.load import load_spec
    from flexvlm_ray.store.writer import RunStore

    spec = load_spec(_spec(tmp_path, "ok"))
    units = expand(spec)
    store = RunStore(tmp_path / "run")
    store.create(spec_text=SIMULATED, spec_hash="x", units=units, run_id="r")
    worker = ModelWorker(model=spec.model, seed=0, name="w0")
    for unit in units[:done]:
        store.write_part(unit.unit_id, worker.run(unit.to_dict(), "r")["table"])
    for unit in units[done:done + failed]:
        store.write_failure(unit.unit_id, {"unit_id": unit.unit_id, "error_type": "Timeout", "message": "slow"})
    return store.root


@pytest.mark.parametrize("done, failed, code", [(2, 0, 0), (1, 1, 1), (1, 0, 4), (0, 0, 4)],
                         ids=["complete", "failed", "pending", "nothing-run"])
def test_status_exit_codes(done, failed, code, tmp_path):
    run = _run_folder(tmp_path, done=done, failed=failed)
    result = CliRunner().invoke(main, ["status", str(run)])
    assert result.exit_code == code, result.output


def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    assert "is not a run folder" in _one_clean_line(CliRunner().invoke(main, ["status", str(tmp_path)]))


def test_analyze_exits_3_and_names_the_failing_analysis(tmp_path, monkeypatch):
    import flexvlm_ray.analysis.registry as registry

    run = _run_folder(tmp_path, done=2, failed=0)
    registry.load_analysis("quickstart")

    def broken(**_):
        raise KeyError("no column 'score_x'")

    monkeypatch.setitem(registry.ANALYSES._items, "quickstart", broken)
    result = CliRunner().invoke(main, ["analyze", str(run)])
    assert result.exit_code == 3
    assert "analysis quickstart failed: KeyError" in result.output and "Traceback" not in result.output
