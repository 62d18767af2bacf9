"""Measurements that do not time their own artefacts: warm-up per shape and knob setting, timing
hooks in their own pass, adaptive repeats, noise controls, the probe grid's tilings."""
import gc

import pytest
import torch
from PIL import Image

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure import engine, noise
from flexvlm_ray.measure.engine import ci_rel_half_width, run_unit
from flexvlm_ray.models.crops import crop_grid
from flexvlm_ray.models.simulated import SimulatedAdapter
from flexvlm_ray.spec.schema import MeasureSpec
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import SpecError, load_spec_text
from flexvlm_ray.store.schema import rows_to_table

SPEC = """
name: t
experiment: x
model: {family: simulated, options: {decode_ms_per_token: 0.0, vision_ms_per_crop: 0.0, prefill_ms_per_token: 0.0}}
datasets: [{name: probe_grid, num_samples: 2}]
knobs: {max_new_tokens: 2, top_k: [1, 2]}
measure: {MEASURE}
"""


def _units(measure="{warmup: 1, runs_per_sample: 2, prefill_hook: false}"):
    return expand(load_spec_text(SPEC.replace("{MEASURE}", measure), source="x"))


class ColdFirstCall(SimulatedAdapter):
    """The first call of every (crop count, top_k) is 'slow': the pass's prediction says 'cold'."""

    def __init__(self):
        super().__init__(preset=None, path=None, dtype="float32", device="cpu", seed=0, options={})
        self.seen, self.cold = set(), False

    def vision_encoder(self, prepared):
        key = (prepared.num_crops, self.knobs.top_k)
        self.cold = key not in self.seen
        self.seen.add(key)
        return super().vision_encoder(prepared)

    def decode_text(self, token_ids):
        return "cold" if self.cold else "warm"


def _sample(width, name="s"):
    return Sample(sample_id=name, image=Image.new("RGB", (width, 336)), prompt="q")


@pytest.mark.parametrize("widths", [(336, 560, 336, 784), (784,), (560, 560, 560)])
def test_no_timed_pass_is_the_first_call_of_its_shape_or_knob_setting(widths):
    adapter = ColdFirstCall()
    samples = [(i, _sample(w, f"s{i}")) for i, w in enumerate(widths)]
    rows = []
    for unit in _units():          # two top_k settings on one adapter: each needs its own warm-up
        rows += run_unit(adapter=adapter, unit=unit, samples=samples, metric=None, context={})
    assert len(rows) == 2 * 2 * len(widths)
    assert {r["prediction"] for r in rows} == {"warm"}
    distinct = len(set(widths))
    assert sum(r["warmup_passes"] for r in rows) == 2 * distinct      # one warm-up pass per shape and setting


def test_without_warmup_the_cold_pass_is_timed():
    """The check above can fail: with warmup 0 the first pass of every shape is the cold one."""
    rows = run_unit(adapter=ColdFirstCall(), unit=_units("{warmup: 0, runs_per_sample: 2, prefill_hook: false}")[0],
                    samples=[(0, _sample(336)), (1, _sample(560))], metric=None, context={})
    assert [r["prediction"] for r in rows] == ["cold", "warm", "cold", "warm"]


class Hooked(SimulatedAdapter):
    """Two decoder blocks; like the fast backend, prefill runs 'graphed' only when no hook is registered."""

    def __init__(self):
        super().__init__(preset=None, path=None, dtype="float32", device="cpu", seed=0, options={})
        self.blocks = [torch.nn.Identity(), torch.nn.Identity()]
        self.path = None

    def decoder_blocks(self):
        return self.blocks

    def prefill(self, prepared, embeds):
        hooked = any(b._forward_hooks or b._forward_pre_hooks for b in self.blocks)
        for block in self.blocks:
            block(embeds)
        self.path = "eager" if hooked else "graphed"
        return super().prefill(prepared, embeds)

    def prefill_path(self):
        return self.path


def test_hook_timing_runs_in_its_own_pass_and_the_timed_pass_keeps_the_deployed_path():
    unit = _units("{warmup: 1, runs_per_sample: 3, prefill_hook: true}")[0]
    rows = run_unit(adapter=Hooked(), unit=unit, samples=[(0, _sample(560))], metric=None, context={})
    assert [r["prefill_path"] for r in rows] == ["graphed"] * 3
    assert {r["prefill_hook_path"] for r in rows} == {"eager"}
    assert {r["prefill_hook_method"] for r in rows} == {"separate_pass"}
    assert all(r["T_LLM_prefill_hook"] is not None and r["T_LLM_prefill_hook"] >= 0 for r in rows)
    table = rows_to_table(rows)
    assert table.column("prefill_path").to_pylist() == ["graphed"] * 3


class Sequenced(Hooked):
    """Records every pass in order: 'hook' (a hooked prefill) or 'path' (a pass that decodes)."""

    def __init__(self):
        super().__init__()
        self.log = []

    def prefill(self, prepared, embeds):
        state = super().prefill(prepared, embeds)
        self.log.append("hook" if self.path == "eager" else "path")
        return state


def test_hooked_passes_never_run_between_timed_passes():
    """Warm-up: hooked passes first, then timed-path passes; the hooked pass of each timed pass follows the
    sample's last timed pass, so every timed pass comes right after a pass of the same path."""
    adapter = Sequenced()
    unit = _units("{warmup: 2, runs_per_sample: 3, prefill_hook: true}")[0]
    rows = run_unit(adapter=adapter, unit=unit, samples=[(0, _sample(560)), (1, _sample(784))], metric=None,
                    context={})
    per_sample = ["hook"] * 2 + ["path"] * 2 + ["path"] * 3 + ["hook"] * 3
    assert adapter.log == per_sample * 2
    assert all(r["T_LLM_prefill_hook"] is not None for r in rows) and len(rows) == 6


class Counting(SimulatedAdapter):
    def __init__(self, device="cpu"):
        super().__init__(preset=None, path=None, dtype="float32", device="cpu", seed=0, options={})
        self.device, self.passes = device, 0

    def vision_encoder(self, prepared):
        self.passes += 1
        return super().vision_encoder(prepared)


@pytest.mark.parametrize("measure, burned", [("{prefill_hook: false}", False),
                                             ("{prefill_hook: false, burn_in_s: 0.02}", True)])
def test_burn_in_runs_once_per_worker_before_its_first_timed_pass(measure, burned):
    """burn_in_s defaults to 0 on the CPU; set, the worker runs untimed passes once, in its first unit only."""
    adapter = Counting()
    units = _units(measure.replace("}", ", warmup: 0, runs_per_sample: 1}"))
    first = run_unit(adapter=adapter, unit=units[0], samples=[(0, _sample(336))], metric=None, context={})
    untimed = adapter.passes - 1
    second = run_unit(adapter=adapter, unit=units[1], samples=[(0, _sample(336))], metric=None, context={})
    assert adapter.passes == untimed + 2                         # the second unit burns in no more
    assert (untimed > 0) is burned
    assert first[0]["burn_in_s"] == second[0]["burn_in_s"] == adapter.burned_in_s
    assert (adapter.burned_in_s >= 0.02) if burned else adapter.burned_in_s == 0.0


@pytest.mark.parametrize("pin_cpus, cuda, pinned", [(None, True, True), (None, False, False), (False, True, False),
                                                    (True, False, True)])
def test_pinning_is_on_by_default_only_on_a_gpu_worker(pin_cpus, cuda, pinned):
    """The host thread of a GPU worker only issues kernels, so it is pinned by default; on the CPU the
    threads are the device and are left alone unless the spec asks."""
    measure = MeasureSpec(pin_cpus=pin_cpus, gc_off=True, sync="pass")
    assert noise.pins(measure, cuda=cuda) is pinned
    assert ("pin_cpus=" in noise.controls_label(measure, cuda=cuda)) is pinned


def test_without_hooks_no_hook_pass_runs():
    rows = run_unit(adapter=Hooked(), unit=_units()[0], samples=[(0, _sample(560))], metric=None, context={})
    assert {r["prefill_path"] for r in rows} == {"graphed"}
    assert all("T_LLM_prefill_hook" not in r and "prefill_hook_path" not in r for r in rows)


class ScriptedTimer:
    """A StageTimer whose passes take scripted T_total values (ms), split evenly over the stages."""

    script: list = []

    def __init__(self, *, cuda, sync_each=False):
        self.names = []

    def start(self):
        self.names = []

    def mark(self, name, *, at=None):
        self.names.append(name)

    def finish(self):
        total = ScriptedTimer.script.pop(0)
        return [(name, total / len(self.names)) for name in self.names]


@pytest.mark.parametrize("script, minimum, max_runs, expected", [
    ([10.0, 10.0, 10.0, 10.0], 2, 10, 2),                       # no spread: the CI is 0 after 2 passes
    ([10.0, 12.0, 10.0, 11.0, 11.0, 11.0, 11.0, 11.0] + [11.0] * 40, 2, 48, None),   # stops when the CI fits
    ([10.0, 20.0] * 10, 2, 6, 6),                               # never fits: max_runs
    ([10.0, 10.0, 10.0, 10.0, 10.0], 4, 10, 4),                 # runs_per_sample is the minimum
])
def test_adaptive_repeats_stop_at_the_target_ci_or_max_runs(monkeypatch, script, minimum, max_runs, expected):
    monkeypatch.setattr(engine, "StageTimer", ScriptedTimer)
    ScriptedTimer.script = list(script)
    unit = _units(f"{{warmup: 0, runs_per_sample: {minimum}, prefill_hook: false, target_ci: 0.02, "
                  f"max_runs: {max_runs}}}")[0]
    rows = run_unit(adapter=Hooked(), unit=unit, samples=[(0, _sample(336))], metric=None, context={})
    if expected is None:   # the first n whose CI half-width is within 2%, computed independently
        expected = next(n for n in range(minimum, max_runs + 1) if ci_rel_half_width(script[:n]) <= 0.02)
        assert 2 < expected < max_runs
    assert len(rows) == expected and {r["sample_passes"] for r in rows} == {expected}
    assert [r["T_total"] for r in rows] == pytest.approx(script[:expected])
    half = ci_rel_half_width(script[:expected])
    assert rows[0]["sample_ci_rel"] == pytest.approx(half)
    if expected < max_runs:
        assert half <= 0.02
    if expected > minimum:   # the pass before the last one had not reached the target
        assert ci_rel_half_width(script[:expected - 1]) > 0.02


@pytest.mark.parametrize("measure, message", [
    ("{target_ci: 0.02}", "target_ci needs max_runs"),
    ("{max_runs: 10}", "max_runs needs target_ci"),
    ("{target_ci: 0.02, max_runs: 3, runs_per_sample: 5}", "must be >= runs_per_sample"),
    ("{target_ci: 1.5, max_runs: 5}", "target_ci"),
    ("{sync: always}", "sync"),
])
def test_bad_adaptive_or_noise_settings_are_refused_at_the_edge(measure, message):
    with pytest.raises(SpecError, match=message):
        _units(measure)


class Observer(SimulatedAdapter):
    def __init__(self):
        super().__init__(preset=None, path=None, dtype="float32", device="cpu", seed=0, options={})
        self.gc_states, self.threads = set(), set()

    def vision_encoder(self, prepared):
        self.gc_states.add(gc.isenabled())
        self.threads.add(torch.get_num_threads())
        return super().vision_encoder(prepared)


@pytest.mark.parametrize("gc_off, threads", [(True, 1), (False, None)])
def test_noise_controls_hold_during_the_passes_and_are_restored(gc_off, threads):
    before_threads, adapter = torch.get_num_threads(), Observer()
    gc.unfreeze()
    measure = f"{{gc_off: {str(gc_off).lower()}, runs_per_sample: 2, prefill_hook: false"
    measure += f", cpu_threads: {threads}}}" if threads else "}"
    rows = run_unit(adapter=adapter, unit=_units(measure)[0], samples=[(0, _sample(336))], metric=None, context={})
    assert adapter.gc_states == {not gc_off}
    assert adapter.threads == {threads or before_threads}
    assert gc.isenabled() and torch.get_num_threads() == before_threads
    assert rows[0]["noise_controls"] == noise.controls_label(_units(measure)[0].measure)
    assert ("gc_off" in rows[0]["noise_controls"]) == gc_off
    assert (gc.get_freeze_count() > 0) == gc_off      # the unit's survivors frozen, out of later collections
    gc.unfreeze()


@pytest.mark.parametrize("allowed, threads, slot, expected", [
    (range(16), 4, 0, [0, 1, 2, 3]),
    (range(16), 4, 1, [4, 5, 6, 7]),
    (range(16), 4, 5, [4, 5, 6, 7]),        # more GPUs than slices: wraps around
    ([8, 9, 2, 3], 2, 1, [8, 9]),
    (range(2), 4, 0, [0, 1]),               # fewer cores than threads: all of them
])
def test_pinned_cores_are_disjoint_slices_per_gpu(allowed, threads, slot, expected):
    assert noise.pinned_cores(allowed=list(allowed), threads=threads, slot=slot) == expected


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_pinning_restores_the_affinity():
    import os
    before = os.sched_getaffinity(0)
    seen = []

    class Pinned(Observer):
        def vision_encoder(self, prepared):
            seen.append(os.sched_getaffinity(0))
            return super().vision_encoder(prepared)

    run_unit(adapter=Pinned(), unit=_units("{pin_cpus: true, cpu_threads: 1, prefill_hook: false}")[0],
             samples=[(0, _sample(336))], metric=None, context={})
    assert all(len(s) == 1 for s in seen) and os.sched_getaffinity(0) == before


def test_probe_grid_tiles_as_exactly_1x1_to_1x12():
    samples = DATASETS.get("probe_grid").load(split="validation", num_samples=12, seed=0, path=None)
    tilings = [crop_grid(height=s.image.height, width=s.image.width, max_crops=12) for s in samples]
    assert tilings == [(1, j) for j in range(1, 13)]
    crops = [SimulatedAdapter(preset=None, path=None, dtype="float32", device="cpu", seed=0, options={})
             .prepare(sample=s, knobs=_units()[0].knobs).num_crops for s in samples]
    assert len(set(crops)) == 12 and crops == [j + 1 for j in range(1, 13)]   # tiles + the global crop
