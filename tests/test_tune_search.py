"""search: tune: spec fields, expansion of one config, and an adaptive run on a local Ray cluster."""
import json

import pytest

from flexvlm_ray.run.launch import launch, run_status
from flexvlm_ray.run.tune_search import KNOBS, config_key, full_config, search_space, units_of
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import SpecError, load_spec
from flexvlm_ray.store.reader import load_frame

SPEC = """
name: tuned
experiment: e2
model: {family: simulated, options: {decode_ms_per_token: 0.2, vision_ms_per_crop: 0.2}}
datasets: [{name: shapes_vqa, num_samples: 2}]
knobs: {max_crops: [1, 4], top_k: [1, 2, 8], active_blocks: [4, 16], max_new_tokens: 4}
measure: {warmup: 0, decode_mode: natural}
search: tune
tune: {num_samples: 5, seed: 3, searcher: tpe}
"""


@pytest.mark.parametrize("edit,message", [
    ("tune: {num_samples: 50}", "tune.num_samples: 50 is above the grid's 12 configurations; allowed 1..12"),
    ("tune: {num_samples: 0}", "tune.num_samples: Input should be greater than or equal to 1"),
    ("tune: {searcher: grid}", "tune.searcher: Input should be 'tpe', 'nsga2' or 'random'"),
    ("search: grid", "tune: settings for search: tune, but search is 'grid'"),
    ("search: bayes", "search: Input should be 'grid' or 'tune'"),
])
def test_tune_spec_errors(write_spec, edit, message):
    key = edit.split(":")[0]
    lines = [ln for ln in SPEC.strip().splitlines() if not ln.startswith(key + ":")]
    with pytest.raises(SpecError) as err:
        load_spec(write_spec("\n".join(lines + [edit])))
    assert any(message in p for p in err.value.problems), err.value.problems


def test_one_config_expands_to_the_grid_unit_ids(write_spec):
    spec = load_spec(write_spec(SPEC))
    grid_ids = {u.unit_id for u in expand(spec)}
    space = search_space(spec)
    config = full_config({"max_crops": 4, "top_k": 2}, space)
    assert config_key(config) == (4, 2, 4, "prefix", 4)
    units = units_of(spec, config=config, dataset_index=0)
    assert len(units) == 1 and units[0].unit_id in grid_ids


@pytest.mark.slow
def test_tune_search_on_local_ray_measures_fewer_configs_and_stores_units(ray_local, write_spec, tmp_path):
    run_dir, summary = launch(spec_path=str(write_spec(SPEC)), output=str(tmp_path), run_id="t", num_gpus=2,
                              progress=False)
    assert summary.failed == 0
    trials = json.loads((run_dir / "tune_trials.json").read_text())
    new = [t for t in trials if t["new_config"]]
    assert len(new) == 5 and all(t["latency"] > 0 for t in trials)
    rows = load_frame(run_dir)
    assert rows["unit_id"].nunique() == 5 and len(rows) == 10
    status = run_status(run_dir)
    assert (status["units"], status["done"], status["pending"], status["failed"]) == (5, 5, 0, 0)
    spec = load_spec(run_dir / "spec.yaml")
    assert set(rows["unit_id"]) <= {u.unit_id for u in expand(spec)}  # stable ids: the grid's
    assert {config_key(t["config"]) for t in new} == set(
        rows.groupby("unit_id")[list(KNOBS)].first().itertuples(index=False, name=None))
    with pytest.raises(SpecError, match="cannot be resumed"):
        from flexvlm_ray.run.launch import resume
        resume(run_dir=str(run_dir), progress=False)
