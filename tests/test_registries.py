"""Plug-in registries (decorator, lazy 'module:object' names, entry points, base-class checks), and
the shipped ones: every dataset names a registered metric, the shapes datasets' true answers score 1.0."""
from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint

import pytest

import flexvlm_ray.registry as registry_mod
from flexvlm_ray.registry import PluginError, Registry, UnknownName, load_object

from flexvlm_ray.data import DATASETS
from flexvlm_ray.metrics import METRICS


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_metric_is_registered(name):
    entry = DATASETS.get(name)
    assert entry.metric == "none" or entry.metric in METRICS
    assert entry.synthetic or entry.hub_id


def test_all_seed_datasets_and_metrics_are_registered():
    assert {"coco_2014_vqa", "coco_caption", "tally_qa", "doc_qa", "okvqa", "text_vqa", "science_qa_img",
            "st_qa", "mmmu", "shapes_vqa", "shapes_caption", "shapes_mc", "shapes_count",
            "probe_grid"} <= set(DATASETS.names())
    assert {"vqa_accuracy", "cider_d", "anls", "mc_accuracy", "count_accuracy"} <= set(METRICS.names())


@pytest.mark.parametrize("name", ["shapes_vqa", "shapes_mc", "shapes_count"])
def test_true_answers_score_full_marks(name):
    entry = DATASETS.get(name)
    samples = list(entry.load(split="validation", num_samples=60, seed=0, path=None))
    metric = METRICS.get(entry.metric)().fit(samples)
    assert all(metric.score(s.meta["answer"], s) == 1.0 for s in samples)


def test_shapes_caption_reference_outscores_a_wrong_caption():
    samples = list(DATASETS.get("shapes_caption").load(split="validation", num_samples=40, seed=0, path=None))
    metric = METRICS.get("cider_d")().fit(samples)
    for s in samples[:10]:
        assert metric.score(s.references[0], s) > metric.score("a purple square on a white background", s)


class Base:
    pass


class Good(Base):
    pass


class Bad:
    pass


@pytest.fixture
def plugin_module(monkeypatch):
    """A throwaway module 'fake_plugin' holding Good and Bad, importable by name."""
    module = types.ModuleType("fake_plugin")
    module.Good, module.Bad = Good, Bad
    monkeypatch.setitem(sys.modules, "fake_plugin", module)
    return module


def test_decorator_and_unknown_name_lists_what_is_available():
    reg: Registry = Registry("thing")
    reg.register("a")(Good)
    assert reg.get("a") is Good
    with pytest.raises(UnknownName, match="Unknown thing 'b'. Available: a"):
        reg.get("b")


def test_lazy_name_is_listed_before_import_and_loaded_on_get(plugin_module):
    reg: Registry = Registry("thing", base=Base)
    reg.register_lazy("good", "fake_plugin:Good")
    assert reg.names() == ["good"] and "good" in reg
    assert reg.target("good") == "fake_plugin:Good"
    assert reg.get("good") is Good


@pytest.mark.parametrize("target, message", [
    ("fake_plugin:Bad", "is not a Base"),
    ("fake_plugin:Missing", "has no 'Missing'"),
    ("fake_plugin", "is not of the form"),
])
def test_bad_lazy_targets_fail_with_a_named_error(plugin_module, target, message):
    reg: Registry = Registry("thing", base=Base)
    reg.register_lazy("x", target)
    with pytest.raises(PluginError, match=message):
        reg.get("x")


def test_entry_points_of_the_group_register_lazily(plugin_module, monkeypatch):
    eps = [EntryPoint(name="ext", value="fake_plugin:Good", group="flexvlm_ray.things")]
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: [e for e in eps if e.group == group])
    reg: Registry = Registry("thing", group="flexvlm_ray.things", base=Base)
    reg.register("builtin")(Good)
    assert reg.names() == ["builtin", "ext"]
    assert reg.get("ext") is Good


def test_registering_a_name_twice_with_another_object_is_an_error():
    reg: Registry = Registry("thing")
    reg.register("a")(Good)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(Bad)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register_lazy("a", "fake_plugin:Bad")


def test_load_object_follows_dotted_attributes():
    assert load_object("os.path:join.__name__") == "join"


def test_model_families_are_lazy_names_and_load_their_adapter():
    from flexvlm_ray.models import MODELS, ModelAdapter

    assert {"simulated", "flexmoe", "qwen3_vl_moe", "molmo2", "molmo_remote"} <= set(MODELS.names())
    assert issubclass(MODELS.get("simulated"), ModelAdapter)


def test_every_search_a_spec_can_name_is_a_registered_strategy():
    from typing import get_args

    from flexvlm_ray.run.strategies import STRATEGIES
    from flexvlm_ray.spec.schema import SweepSpec

    assert set(get_args(SweepSpec.model_fields["search"].annotation)) | {"closed_loop"} <= set(STRATEGIES.names())
    assert [STRATEGIES.get(n).resumable for n in ("grid", "tune", "closed_loop")] == [True, False, True]
