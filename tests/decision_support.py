"""A fixed table of requests, budgets and guardrail margins on which the committed E4 controllers
(results/reference/*/e4*/**/control) are asked to decide: tests/data/e4_decisions.json holds the
decisions the controller code made at commit fa3e930 (before the decision fast path), and
tests/test_control.py checks that today's code decides the same on every row."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTROLLERS = {"cpu-tiny": REPO / "results/reference/cpu-2core-2026-12-03/e4/tiny/control",
               "h200": REPO / "results/reference/h200-2026-12-03/e4_end_to_end/h200-e4/control"}
GOLDEN = Path(__file__).resolve().parent / "data" / "e4_decisions.json"
FRACTIONS = (0.05, 0.2, 0.35, 0.5, 0.6, 0.7, 0.85, 1.0, 1.3, 3.0)
MARGINS = (None, 0.9, 1.2)
SIZES = ((336, 336), (500, 375), (640, 480), (480, 640), (1000, 700), (1337, 999), (2000, 300), (20, 20), (0, 0),
         (800, 800))
PROMPTS = ("What color is the circle?", "How many squares are there?",
           "Describe the image.", "Is the red triangle left of the blue square? Answer yes or no.",
           "", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, "Caption: ... (short) !?")


def requests():
    """(Request, reference P50 ms) rows: every size with prompts and tasks in turn, plus unseen tasks."""
    from flexvlm_ray.control import Request

    datasets = (("shapes_vqa", "vqa"), ("shapes_caption", "caption"), ("other", "count"))
    out = []
    for i, (w, h) in enumerate(SIZES):
        for j, (dataset, task) in enumerate(datasets):
            prompt = PROMPTS[(i + 2 * j) % len(PROMPTS)]
            out.append(Request(request_id=f"r{i}-{j}", width=w, height=h, prompt=prompt, task=task, dataset=dataset))
    return out


def decisions(controller, reference_p50: dict) -> list[list[int]]:
    """Per request, per budget fraction, per margin (None: no guardrail), per fitted policy: the index."""
    from flexvlm_ray.control import Guardrail

    table = []
    for r in requests():
        p50 = reference_p50.get(r.dataset, min(reference_p50.values()))
        row = []
        for fraction in FRACTIONS:
            for margin in MARGINS:
                guard = Guardrail(margin) if margin else None
                row.append([controller.decide(r, fraction * p50, policy=p, guardrail=guard).index
                            for p in sorted(controller.policies)])
        table.append(row)
    return table


def compute_all() -> dict:
    from flexvlm_ray.control import Controller

    out = {}
    for name, folder in CONTROLLERS.items():
        controller = Controller.load(folder)
        p50 = json.loads((folder / "reference.json").read_text())["p50_ms"]
        out[name] = {"policies": sorted(controller.policies), "decisions": decisions(controller, p50)}
    return out


if __name__ == "__main__":      # only to regenerate the golden file on purpose
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    GOLDEN.write_text(json.dumps({"generated_at": commit, "controllers": compute_all()}, separators=(",", ":")) + "\n")
