"""Spec validation (one line per problem, naming file, key, value and what is allowed) and expansion."""
import json
import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from flexvlm_ray.spec.expand import LEGACY_MEASURE, WorkUnit, expand, knob_grid, unit_id_of
from flexvlm_ray.spec.load import SpecError, load_spec, load_spec_text
from flexvlm_ray.spec.schema import MeasureSpec, ModelSpec

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
name: t
experiment: quickstart
model: {family: simulated}
datasets: [{name: probe_grid, num_samples: 4}]
knobs: {top_k: [1, 8]}
"""

MALFORMED = [
    # (label, spec text, substrings the error line must contain)
    ("yaml syntax", "name: [t\nexperiment: x", ["spec.yaml:", "YAML syntax error"]),
    ("not a mapping", "- a\n- b", ["must be a mapping"]),
    ("missing name", GOOD.replace("name: t\n", ""), ["name: required key is missing"]),
    ("unknown top key", GOOD + "colour: red\n", ["colour: unknown key", "allowed keys here: name, experiment"]),
    ("unknown knob", GOOD.replace("top_k: [1, 8]", "top_k: [1, 8], temperature: 1"),
     ["knobs.temperature: unknown key", "max_crops, top_k, active_blocks"]),
    ("wrong type", GOOD.replace("top_k: [1, 8]", "top_k: many"),
     ["knobs.top_k", "expected an integer, a list of integers, or a range", "'many'"]),
    ("empty grid", GOOD.replace("top_k: [1, 8]", "top_k: []"), ["knobs.top_k", "empty grid"]),
    ("negative value", GOOD.replace("top_k: [1, 8]", "active_blocks: [-2, 4]"),
     ["knobs.active_blocks", "values must be >= 1", "[-2]"]),
    ("bad range", GOOD.replace("top_k: [1, 8]", "top_k: {start: 8, stop: 1}"),
     ["knobs.top_k", "start <= stop"]),
    ("unknown model", GOOD.replace("family: simulated", "family: gpt9"),
     ["model.family", "unknown model 'gpt9'", "allowed:", "simulated"]),
    ("unknown preset", GOOD.replace("family: simulated", "family: simulated, preset: huge"),
     ["model:", "Unknown preset 'huge'", "Available: molmoe-1b, tiny"]),
    ("unknown dataset", GOOD.replace("probe_grid", "imagenet"),
     ["datasets.0.name", "unknown dataset 'imagenet'", "allowed:", "probe_grid"]),
    ("unknown split", GOOD.replace("num_samples: 4", "num_samples: 4, split: dev"),
     ["datasets.0.split", "'dev' is not a split of probe_grid", "allowed: validation"]),
    ("top_k above experts", GOOD.replace("top_k: [1, 8]", "top_k: [8, 65]"),
     ["knobs.top_k", "[65] above the model's 64 experts", "allowed 1..64"]),
    ("blocks above depth", GOOD.replace("top_k: [1, 8]", "active_blocks: {start: 1, stop: 20}"),
     ["knobs.active_blocks", "[17, 18, 19, 20] above the model's 16 blocks", "allowed 1..16"]),
    ("crops above limit", GOOD.replace("top_k: [1, 8]", "max_crops: 13"),
     ["knobs.max_crops", "[13] above the preprocessing limit of 12 crops"]),
    ("bad policy", GOOD.replace("top_k: [1, 8]", "block_policy: [prefix, middle]"),
     ["knobs.block_policy.1", "'prefix', 'importance' or 'random'", "'middle'"]),
    ("bad decode mode", GOOD + "measure: {decode_mode: sampled}\n",
     ["measure.decode_mode", "'forced' or 'natural'", "'sampled'"]),
    ("zero samples", GOOD.replace("num_samples: 4", "num_samples: 0"),
     ["datasets.0.num_samples", "greater than or equal to 1", "0"]),
    ("shards above samples", GOOD.replace("num_samples: 4", "num_samples: 2, shards: 3"),
     ["datasets.0.shards", "3 shards for 2 samples", "allowed 1..2"]),
    ("no datasets", GOOD.replace("datasets: [{name: probe_grid, num_samples: 4}]", "datasets: []"),
     ["datasets:", "at least 1 item"]),
    ("bad backend", GOOD.replace("family: simulated", "family: simulated, backend: fast"),
     ["model.backend", "'fast' is not available for family 'simulated'", "allowed: hf"]),
    ("bad sweep name", GOOD.replace("name: t", "name: 'my sweep/1'"),
     ["name:", "should match pattern"]),
    ("negative repeats", GOOD + "repeats: 0\n", ["repeats", "greater than or equal to 1"]),
]


@pytest.mark.parametrize("label,text,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_spec_names_key_value_and_allowed(tmp_path, label, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{label}: {part!r} not in {message!r}"
    assert all(line.startswith(str(path)) for line in info.value.problems)


def test_several_problems_give_one_line_each(tmp_path):
    text = GOOD.replace("top_k: [1, 8]", "top_k: [80], max_crops: 13")
    with pytest.raises(SpecError) as info:
        load_spec_text(text, source="x.yaml")
    assert len(info.value.problems) == 2


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("overrides,check", [
    (["datasets.0.num_samples=2"], lambda s: s.datasets[0].num_samples == 2),
    (["knobs.top_k=[2, 4]"], lambda s: s.knobs.top_k == [2, 4]),
    (["measure.decode_mode=natural"], lambda s: s.measure.decode_mode == "natural"),
    (["knobs.active_blocks={start: 2, stop: 6, step: 2}"], lambda s: s.knobs.active_blocks == [2, 4, 6]),
])
def test_overrides(overrides, check):
    assert check(load_spec_text(GOOD, source="x.yaml", overrides=overrides))


@pytest.mark.parametrize("override,message", [
    ("datasets.5.num_samples=2", "no such key path"),
    ("novalue", "expected KEY.PATH=VALUE"),
])
def test_bad_overrides(override, message):
    with pytest.raises(SpecError, match=message):
        load_spec_text(GOOD, source="x.yaml", overrides=[override])


EXPANSION = [
    # (knobs yaml, dataset yaml, extra, expected unit count, expected configs)
    ("{top_k: [1, 8]}", "{name: probe_grid, num_samples: 4}", "", 2, 2),
    ("{top_k: [1, 8]}", "{name: probe_grid, num_samples: 4, shards: 2}", "", 4, 2),
    ("{top_k: [1, 8]}", "{name: probe_grid, num_samples: 4}", "repeats: 3\n", 6, 2),
    ("{top_k: [1, 8], active_blocks: [4, 16], block_policy: [prefix, random]}",
     "{name: probe_grid}", "", 8, 8),
    ("{max_crops: {start: 1, stop: 12}}", "{name: probe_grid}", "", 12, 12),
    ("{}", "{name: probe_grid}", "gpu_types: [H100, H200]\n", 2, 1),
    ("{max_new_tokens: [0, 8, 64]}", "{name: probe_grid, shards: 3}", "repeats: 2\n", 18, 3),
]


@pytest.mark.parametrize("knobs,dataset,extra,count,configs", EXPANSION)
def test_expansion_counts(knobs, dataset, extra, count, configs):
    text = f"name: t\nexperiment: x\nmodel: {{family: simulated}}\ndatasets: [{dataset}]\nknobs: {knobs}\n{extra}"
    units = expand(load_spec_text(text, source="x.yaml"))
    assert len(units) == count
    assert len({u.config_key for u in units}) == configs
    assert len({u.unit_id for u in units}) == count
    assert [u.index for u in units] == list(range(count))


def test_block_policy_only_multiplies_active_blocks():
    spec = load_spec_text(GOOD.replace("top_k: [1, 8]", "block_policy: [prefix, random]"), source="x")
    assert len(knob_grid(spec)) == 1


def test_unit_ids_are_stable_and_order_independent():
    a = expand(load_spec_text(GOOD, source="x"))
    b = expand(load_spec_text(GOOD, source="y"))
    assert [u.unit_id for u in a] == [u.unit_id for u in b]
    inter = expand(load_spec_text(GOOD + "order: interleave\n", source="x"))
    assert sorted(u.unit_id for u in inter) == sorted(u.unit_id for u in a)
    # a knob value change changes exactly the affected ids
    c = expand(load_spec_text(GOOD.replace("[1, 8]", "[1, 4]"), source="x"))
    assert c[0].unit_id == a[0].unit_id and c[1].unit_id != a[1].unit_id
    # pinned: an accidental change of the hashing would orphan every stored run (changed on purpose with
    # measure.burn_in_s and the GPU default of pin_cpus: runs of the earlier measurement are not resumed)
    assert a[0].unit_id == "96e901320e736f1c"


def test_unit_id_depends_on_schema_version(monkeypatch):
    import flexvlm_ray.spec.expand as ex

    before = expand(load_spec_text(GOOD, source="x"))[0].unit_id
    monkeypatch.setattr(ex, "SCHEMA_VERSION", 999)
    assert expand(load_spec_text(GOOD, source="x"))[0].unit_id != before


E4_SMALL = ["model.preset=tiny", "model.dtype=float32", "knobs.active_blocks=[3,4]", "knobs.top_k=[1,2]",
            "knobs.max_crops=[1,12]", "knobs.max_new_tokens=4", "datasets.0.num_samples=4",
            "datasets.1.num_samples=2", "control.train_samples=4", "control.budgets=[0.5,1.0]"]
NOT_CONTENT = ("unit_id", "index", "sweep", "experiment")   # the unit fields its id does not hash


def _expanded(kind: str) -> list[WorkUnit]:
    if kind == "grid":
        return expand(load_spec_text(GOOD + "measure: {target_ci: 0.1, max_runs: 4, cpu_threads: 2, sync: stage}\n"
                                     "gpu_types: [A100, H100]\n", source="x"))
    return expand(load_spec(ROOT / "sweeps" / "e4_end_to_end.yaml", overrides=E4_SMALL))


@pytest.mark.parametrize("kind", ["grid", "closed_loop"])
def test_a_unit_holds_the_typed_frozen_spec_and_round_trips(kind):
    """model and measure are the spec's validated ModelSpec / MeasureSpec; to_dict -> JSON -> from_dict gives
    the same unit and the same line; pickling (Ray) keeps it; the id hashes the unit's plain content."""
    units = _expanded(kind)
    for unit in units:
        assert isinstance(unit.model, ModelSpec) and isinstance(unit.measure, MeasureSpec)
        data = unit.to_dict()
        line = json.dumps(data, sort_keys=True)
        back = WorkUnit.from_dict(json.loads(line))
        assert back == unit and json.dumps(back.to_dict(), sort_keys=True) == line
        assert pickle.loads(pickle.dumps(unit)) == unit
        content = {k: v for k, v in data.items() if k not in NOT_CONTENT and not (k == "control" and v is None)}
        assert unit_id_of(content) == unit.unit_id
    with pytest.raises(ValidationError, match="frozen"):
        units[0].measure.warmup = 5


@pytest.mark.parametrize("path", sorted((ROOT / "results" / "reference").glob("*/*/*/units.jsonl")),
                         ids=lambda p: "/".join(p.parts[-4:-1]))
def test_units_written_by_older_code_read_back_into_typed_units(path):
    """Every committed run's units.jsonl (written by the dict-based units, some before the newer measure
    settings existed) reads back: model and measure as written, settings the line lacks at the values the
    old code's dict.get gave them (LEGACY_MEASURE), and a line with every field is written back unchanged."""
    lines = path.read_text().splitlines()
    assert lines
    for line in lines:
        data = json.loads(line)
        unit = WorkUnit.from_dict(data)
        assert unit.unit_id == data["unit_id"] and unit.model.model_dump() == data["model"]
        measure = unit.measure.model_dump()
        assert {k: measure[k] for k in data["measure"]} == data["measure"]
        assert {k: measure[k] for k in set(measure) - set(data["measure"])} == \
            {k: LEGACY_MEASURE[k] for k in set(measure) - set(data["measure"])}
        if set(data) == set(unit.to_dict()) and set(data["measure"]) == set(measure):
            assert json.dumps(unit.to_dict(), sort_keys=True) == line


def test_interleave_alternates_configs():
    text = GOOD.replace("num_samples: 4}", "num_samples: 4, shards: 2}") + "repeats: 2\norder: interleave\n"
    units = expand(load_spec_text(text, source="x"))
    keys = [u.config_key for u in units]
    assert all(a != b for a, b in zip(keys, keys[1:]))
    grid = expand(load_spec_text(text.replace("interleave", "grid"), source="x"))
    assert [u.config_key for u in grid][:2] == [grid[0].config_key] * 2
