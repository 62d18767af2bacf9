"""Prove by effect that every knob of a model family does what it says.

``verify_knobs`` loads the model once and checks, on a synthetic sample:

* top_k: a forward hook on every MoE router sees exactly ``top_k`` distinct experts per token;
* active_blocks: forward hooks on every decoder block count calls; exactly the chosen blocks run,
  for each block policy;
* max_crops: ``num_crops`` follows Molmo's tiling and ``num_vision_tokens`` grows with the crops
  (crop geometry from the adapter's ``crop_geometry()`` when it has one, else MolmoE's 336 px crops);
* output length: prefill plus ``N - 1`` decode steps give exactly ``N`` tokens (EOS ignored);
* restore: after applying non-default knobs and restoring, the prefill logits are bit-identical
  (``torch.equal``) to those of the freshly loaded model.

Each row is ``{'knob', 'setting', 'expected', 'observed', 'ok'}``.
"""
from __future__ import annotations

import sys
from collections import Counter
from typing import Any, Optional

import click
import numpy as np
from PIL import Image

from flexvlm_ray.data.base import Sample
from flexvlm_ray.models import MODELS
from flexvlm_ray.models.base import BLOCK_POLICIES, Knobs, ModelAdapter
from flexvlm_ray.models.crops import crop_grid


def probe_sample(*, width: int = 1008, height: int = 336) -> Sample:
    """A deterministic wide image with texture (so tilings differ with max_crops)."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Sample(sample_id="verify", image=Image.fromarray(arr, "RGB"), prompt="what color is the car ?")


def _row(knob: str, setting: Any, expected: Any, observed: Any) -> dict[str, Any]:
    return {"knob": knob, "setting": setting, "expected": expected, "observed": observed,
            "ok": expected == observed}


def _prefill(adapter: ModelAdapter, sample: Sample, knobs: Knobs):
    prepared = adapter.prepare(sample=sample, knobs=knobs)
    embeds = adapter.projector(prepared, adapter.vision_encoder(prepared))
    return prepared, adapter.prefill(prepared, embeds)


def _check_top_k(adapter: ModelAdapter, sample: Sample) -> list[dict[str, Any]]:
    info = adapter.info
    routers = getattr(adapter, "moe_routers", lambda: [])()
    if info.num_experts == 0 or not routers:
        return []
    rows = []
    for k in sorted({1, max(1, info.default_top_k // 2), info.default_top_k, info.num_experts}):
        seen: Counter = Counter()

        def hook(module, args, output):
            indices = output[-1].reshape(-1, output[-1].shape[-1])
            for n in (indices.sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1) + 1:
                seen[int(n)] += 1

        adapter.apply_knobs(Knobs(top_k=k))
        handles = [r.register_forward_hook(hook) for r in routers]
        try:
            _prefill(adapter, sample, Knobs(top_k=k, max_crops=1 if info.max_crops_limit else None))
        finally:
            for h in handles:
                h.remove()
            adapter.restore_knobs()
        rows.append(_row("top_k", k, [k], sorted(seen)))
    return rows


def _check_blocks(adapter: ModelAdapter, sample: Sample) -> list[dict[str, Any]]:
    adapter.restore_knobs()
    all_blocks = list(adapter.decoder_blocks())
    num = len(all_blocks)
    rows = []
    settings = [(policy, n) for policy in BLOCK_POLICIES for n in sorted({1, max(1, num // 2), num - 1}) if n >= 1]
    for policy, n in settings:
        calls: Counter = Counter()
        # apply first: the 'importance' policy may run calibration forwards, which must not be counted
        adapter.apply_knobs(Knobs(active_blocks=n, block_policy=policy))
        chosen = [next(i for i, b in enumerate(all_blocks) if b is blk) for blk in adapter.decoder_blocks()]
        handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.update([i])) for i, b in enumerate(all_blocks)]
        try:
            _, state = _prefill(adapter, sample, Knobs(max_crops=1 if adapter.info.max_crops_limit else None))
            adapter.decode_step(state)
        finally:
            for h in handles:
                h.remove()
            adapter.restore_knobs()
        # every chosen block runs once at prefill and once per decode step; no other block runs
        rows.append(_row("active_blocks", f"{policy}:{n}", {i: 2 for i in chosen}, dict(sorted(calls.items()))))
        rows.append(_row("active_blocks_count", f"{policy}:{n}", n, len(chosen)))
    return rows


def _check_crops(adapter: ModelAdapter, sample: Sample) -> list[dict[str, Any]]:
    limit = adapter.info.max_crops_limit
    if not limit:
        return []
    rows, tokens = [], []
    width, height = sample.image.size
    geometry = getattr(adapter, "crop_geometry", dict)()
    for max_crops in sorted({1, 2, min(3, limit), limit}):
        prepared = adapter.prepare(sample=sample, knobs=Knobs(max_crops=max_crops))
        rows_cols = crop_grid(height=height, width=width, max_crops=max_crops, **geometry)
        rows.append(_row("max_crops", max_crops, rows_cols[0] * rows_cols[1] + 1, prepared.num_crops))
        tokens.append((prepared.num_crops, prepared.num_vision_tokens))
    distinct = sorted(set(tokens))
    increasing = all(a[1] < b[1] for a, b in zip(distinct, distinct[1:]))
    rows.append(_row("max_crops_vision_tokens", "more crops -> more vision tokens", True, increasing))
    return rows


def _check_output_length(adapter: ModelAdapter, sample: Sample) -> list[dict[str, Any]]:
    rows = []
    knobs = Knobs(max_crops=1 if adapter.info.max_crops_limit else None)
    for n in (1, 4, 9):
        _, state = _prefill(adapter, sample, knobs)
        for _ in range(n - 1):
            adapter.decode_step(state)
        rows.append(_row("max_new_tokens", n, n, len(state.tokens)))
    return rows


def _check_restore(adapter: ModelAdapter, sample: Sample, fresh_logits) -> list[dict[str, Any]]:
    import torch

    info = adapter.info
    knobs = Knobs(top_k=1 if info.num_experts else None, active_blocks=max(1, info.num_blocks // 2),
                  block_policy="random")
    adapter.apply_knobs(knobs)
    _, changed = _prefill(adapter, sample, Knobs(max_crops=1 if info.max_crops_limit else None))
    adapter.restore_knobs()
    _, restored = _prefill(adapter, sample, Knobs(max_crops=1 if info.max_crops_limit else None))
    return [
        _row("restore", "knobs changed the logits", True,
             not torch.equal(changed.extras["logits"], fresh_logits)),
        _row("restore", "identical logits after restore", True,
             bool(torch.equal(restored.extras["logits"], fresh_logits))),
    ]


def verify_knobs(*, family: str, preset: Optional[str], device: str = "cpu", seed: int = 0,
                 dtype: str = "float32", options: Optional[dict[str, Any]] = None,
                 path: Optional[str] = None) -> list[dict[str, Any]]:
    """Load ``family[:preset]`` (or the checkpoint folder ``path``) once and return one row per knob check."""
    adapter = MODELS.get(family)(preset=preset, path=path, dtype=dtype, device=device, seed=seed,
                                 options=dict(options or {}))
    sample = probe_sample()
    adapter.restore_knobs()
    _, fresh = _prefill(adapter, sample, Knobs(max_crops=1 if adapter.info.max_crops_limit else None))
    fresh_logits = fresh.extras["logits"].clone()
    rows: list[dict[str, Any]] = []
    rows += _check_top_k(adapter, sample)
    rows += _check_blocks(adapter, sample)
    rows += _check_crops(adapter, sample)
    rows += _check_output_length(adapter, sample)
    rows += _check_restore(adapter, sample, fresh_logits)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    headers = ("knob", "setting", "expected", "observed", "ok")
    table = [[str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


@click.command("verify-knobs")
@click.option("--model", "model", required=True, metavar="FAMILY[:PRESET]",
              help="Model family and optional preset, e.g. flexmoe:tiny.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--path", "path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Local checkpoint folder (instead of a preset), e.g. --model molmo_remote --path ckpt/.")
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE",
              help="Family option, value parsed as YAML (repeatable), e.g. --option trust_remote_code=true.")
def verify_knobs_command(model: str, device: str, dtype: str, path: Optional[str],
                         option_items: tuple[str, ...]) -> None:
    """Check by effect that every knob of a model changes what it should; exit 1 if any check fails."""
    import yaml

    family, _, preset = model.partition(":")
    options = {}
    for item in option_items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--option")
        options[key] = yaml.safe_load(value)
    try:
        rows = verify_knobs(family=family, preset=preset or None, device=device, dtype=dtype, path=path,
                            options=options)
    except (ValueError, FileNotFoundError, KeyError) as exc:   # bad family, preset, path or options
        click.echo(f"verify-knobs: {exc}", err=True)
        sys.exit(2)
    click.echo(format_rows(rows))
    failed = [r for r in rows if not r["ok"]]
    click.echo(f"{len(rows) - len(failed)}/{len(rows)} checks passed")
    if failed:
        sys.exit(1)
