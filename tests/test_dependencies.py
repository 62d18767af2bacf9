"""Every import is declared: the package's in setup.cfg (install_requires or an extra for a
guarded optional import), the tests' in requirements-cpu.txt.

Two checks. A subprocess imports every module of the package (``flexvlm_ray`` and ``analysis``),
so in CI's fresh virtual environment (.ci/run) an import of a package that nothing installs
fails. And the source's third-party imports are mapped to their distributions and compared with
the declared requirements, so an undeclared import fails even where it happens to be installed.
"""
from __future__ import annotations

import ast
import configparser
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN = {"flexvlm_ray", "analysis", "benchmarks", "tests", "model_support", "analysis_support",
       "fake_molmo_remote", "conftest"}


def _names(requirements: list[str]) -> set[str]:
    names = set()
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def declared_for_package() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():   # optional imports (guarded) of the package
        lines += extra.splitlines()
    return _names(lines)


def declared_for_tests() -> set[str]:
    return declared_for_package() | _names((ROOT / "requirements-cpu.txt").read_text().splitlines())


def third_party_imports(folder: Path) -> dict[str, set[str]]:
    """Top-level module name -> files importing it, for imports outside the stdlib and this repo."""
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top not in OWN:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in md.packages_distributions().get(module, [])}


@pytest.mark.parametrize("folders, declared", [
    (("flexvlm_ray", "analysis"), declared_for_package),
    (("tests", "benchmarks"), declared_for_tests),
], ids=["package->setup.cfg", "tests->requirements-cpu.txt"])
def test_every_third_party_import_is_declared(folders, declared):
    allowed = declared()
    undeclared = {}
    for folder in folders:
        for module, files in third_party_imports(ROOT / folder).items():
            dists = _distributions(module)
            if not dists & allowed:
                undeclared[module] = sorted(files)[:3]
    assert not undeclared, f"imports not declared as requirements: {undeclared}"


def test_a_missing_requirement_is_caught():
    """The check itself: scipy is imported by the package; without its declaration it is flagged."""
    imports = third_party_imports(ROOT / "flexvlm_ray")
    assert "scipy" in imports
    assert not _distributions("scipy") & (declared_for_package() - {"scipy"})


def test_every_module_imports_in_a_fresh_interpreter():
    code = """
import importlib, json, pkgutil, sys
failed = {}
for package in ("flexvlm_ray",):  # flexvlm_ray.analysis is the analysis/ folder
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed[info.name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(failed))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
