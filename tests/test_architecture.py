"""The import direction of docs/ARCHITECTURE.md, enforced: each part of the package imports only the
parts below it (function-level imports included), and nothing imports a top-level ``analysis``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flexvlm_ray"

BASE = {"registry"}  # usable by every part
# part -> the parts it may import (besides BASE and itself); "*" = anything
ALLOWED: dict[str, set[str] | str] = {
    "__main__": "*", "cli": "*", "commands": "*",
    "analysis": {"store", "knobs", "estimator", "searchers", "models", "spec"},
    "run": {"control", "measure", "spec", "models", "knobs", "data", "metrics", "store", "searchers", "flexvlm_ray"},
    "control": {"measure", "estimator", "models", "knobs", "data", "metrics", "store"},
    "tiny": {"measure", "models", "knobs", "data", "metrics"},
    "measure": {"spec", "models", "knobs", "data", "metrics", "store"},
    "spec": {"models", "knobs", "data", "metrics", "store", "searchers"},
    "synthetic": {"models", "knobs", "store"},
    "estimator": {"knobs", "store"},
    "searchers": {"knobs"},
    "models": {"knobs", "data", "metrics"},
    "knobs": {"data", "metrics"},
    "data": set(),
    "metrics": {"data"},
    "store": set(),
    "registry": set(),
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "flexvlm_ray"


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "sweeps":
            continue
        yield path, ("analysis" if rel.parts[0] == "analysis" else _part(path))


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno


def test_every_part_is_in_the_table():
    parts = {part for _, part in _sources()} - {"flexvlm_ray"}
    assert parts <= set(ALLOWED), f"parts with no import rule: {sorted(parts - set(ALLOWED))}"


@pytest.mark.parametrize("path, part", list(_sources()), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else None)
def test_imports_follow_the_direction(path, part):
    allowed = ALLOWED.get(part, set())
    bad = []
    for module, line in _imports(path):
        top = module.split(".")
        if top[0] == "analysis":
            bad.append(f"line {line}: {module} (the analyses are flexvlm_ray.analysis)")
        if top[0] != "flexvlm_ray" or allowed == "*":
            continue
        target = top[1] if len(top) > 1 else "flexvlm_ray"
        if target not in allowed and target not in BASE and target != part:
            bad.append(f"line {line}: {module} ({part} may import {sorted(allowed)})")
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_the_table_has_no_cycles():
    graph = {part: (set() if deps == "*" else set(deps)) for part, deps in ALLOWED.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in graph.get(node, ()):
            visit(nxt, trail + [node])
        state[node] = 2

    for part in graph:
        visit(part, [])


def test_help_and_validate_import_no_torch():
    """Registering commands and validating a spec stay light: no torch, transformers or Ray."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from flexvlm_ray.cli import main\n"
            "runner = CliRunner()\n"
            "assert runner.invoke(main, ['--help']).exit_code == 0\n"
            "result = runner.invoke(main, ['validate', 'sweeps/quickstart.yaml'])\n"
            "assert result.exit_code == 0, result.output\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'ray'}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
