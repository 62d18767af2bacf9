"""`flexvlm-ray report`: one self-contained HTML page, checked in real headless Chromium.

The browser must render the page with every <img> decoded (naturalWidth > 0) and no script
error, and a screenshot must be a non-empty PNG with more than one colour. Chromium is installed
by tests/tools/ensure_chromium.sh when missing; when that fails the test fails (it never skips).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from analysis_support import SIMULATED, make_run
from flexvlm_ray.cli import main

ENSURE = Path(__file__).resolve().parent / "tools" / "ensure_chromium.sh"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# Marks the page once loaded: image count, images not decoded, script and resource-load errors.
PROBE = """<script>window.__errors=[];
window.addEventListener('error',function(e){window.__errors.push(String(e.message||e.type));},true);
window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);}).length;
var m=document.createElement('div');m.id='render-check';
m.textContent='images='+imgs.length+' broken='+bad+' errors='+window.__errors.length;
document.body.appendChild(m);});</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    result = subprocess.run(["bash", str(ENSURE)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"headless Chromium is required for the report test and could not be installed "
                    f"(tests/tools/ensure_chromium.sh): {result.stderr.strip()[-800:]}")
    return result.stdout.strip().splitlines()[-1]


def browse(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = {name: make_run(sweep=name, overrides=[*SIMULATED, *extra], root=root) for name, extra in (
        ("motivation_exp1", ["datasets.0.num_samples=12", "datasets.0.shards=1"]),
        ("motivation_exp3", ["datasets.0.num_samples=3", "measure.runs_per_sample=2"]),
        ("motivation_exp4", ["datasets.0.num_samples=2", "knobs.max_new_tokens=[2,4]"]),
        ("m2", ["datasets.0.num_samples=1", "measure.runs_per_sample=4"]))}
    combined = root / "exp5"
    result = CliRunner().invoke(main, ["analyze", str(runs["motivation_exp3"]), str(runs["motivation_exp4"]),
                                       "--combine", "motivation_exp5", "--out", str(combined)])
    assert result.exit_code == 0, result.output
    return runs, combined


@pytest.fixture(scope="module")
def report_file(report_inputs, tmp_path_factory):
    runs, combined = report_inputs
    out = tmp_path_factory.mktemp("html") / "report.html"
    folders = [str(runs["motivation_exp1"]), str(runs["m2"]), str(combined)]
    result = CliRunner().invoke(main, ["report", *folders, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_report_is_self_contained(report_file, report_inputs):
    runs, _ = report_inputs
    page = report_file.read_text()
    sources = re.findall(r'(?:src|href)="([^"#][^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(re.findall(r"<img ", page)) == 4  # exp1 (1), m2 (2), exp5 (1)
    assert "Frozen spec" in page and "Environment (env.json)" in page
    assert (runs["m2"] / "spec.yaml").read_text().splitlines()[1] in page
    assert "results: " in page  # the per-sample list is counted, not printed
    stats = json.loads((runs["motivation_exp1"] / "analysis" / "exp1_latency_distribution.json").read_text())
    p99 = stats["statistics"]["T_total"]["p99"]
    assert f"<th>statistics.T_total.p99</th><td>{p99:.4g}</td>" in page  # key numbers as a table


def test_report_renders_in_headless_chromium(report_file, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(report_file.read_text().replace("<head>", "<head>" + PROBE, 1))
    result = browse("--virtual-time-budget=15000", "--dump-dom", probed.as_uri(), profile=tmp_path / "p1")
    assert result.returncode == 0, result.stderr[-2000:]
    marker = re.search(r'id="render-check">([^<]*)<', result.stdout)
    assert marker, f"the page did not finish loading in Chromium: {result.stderr[-1500:]}"
    assert marker.group(1) == "images=4 broken=0 errors=0"
    assert "flexvlm-ray report" in result.stdout


def test_report_screenshot_is_not_blank(report_file, tmp_path):
    shot = tmp_path / "shot.png"
    result = browse("--window-size=1280,1800", f"--screenshot={shot}", report_file.as_uri(), profile=tmp_path / "p2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 0
    with Image.open(shot) as image:
        assert image.format == "PNG"
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 1


def test_report_of_one_run_defaults_to_its_folder_and_analyzes_it(report_inputs):
    runs, _ = report_inputs
    run = runs["motivation_exp4"]
    shutil.rmtree(run / "analysis", ignore_errors=True)
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()) == run / "report.html"
    assert (run / "analysis" / "exp4_language_tokens_vs_latency.json").is_file()
    assert "data:image/png;base64," in (run / "report.html").read_text()


def test_the_render_probe_notices_a_broken_image(tmp_path):
    """The capture-phase error listener also counts resource load failures (the bad image)."""
    page = tmp_path / "broken.html"
    page.write_text(f"<!DOCTYPE html><html><head>{PROBE}</head><body>"
                    "<img src='data:image/png;base64,bm90IGEgcG5n' alt='x'></body></html>")
    result = browse("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), profile=tmp_path / "p")
    assert re.search(r'id="render-check">([^<]*)<', result.stdout).group(1) == "images=1 broken=1 errors=1"
