"""The native Molmo2 family on CPU (``molmo2:tiny`` and a saved local checkpoint): crops -> vision
tokens, parity with the model's own forward/generate, active blocks with a consistent KV cache,
restore, forced output length, the dense decoder's top_k errors, a missing transformers module,
parameter counts and ``verify_knobs``."""
from __future__ import annotations

import sys
import pytest
import torch
from model_support import decode_counting_block_calls, run_stages, sample

from flexvlm_ray.data.base import Sample
from flexvlm_ray.commands.verify_knobs import verify_knobs
from flexvlm_ray.measure.engine import measure_pass
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.molmo2.adapter import Molmo2Adapter, Molmo2Unavailable
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import SpecError, load_spec_text

SPEC = """
name: m
experiment: quickstart
model: {family: molmo2, preset: tiny}
datasets: [{name: probe_grid, num_samples: 1}]
knobs: {max_crops: [1, 4], active_blocks: [2, 4], max_new_tokens: 5}
"""


def run(adapter, smp: Sample, knobs: Knobs = Knobs(max_crops=2)):
    return run_stages(adapter, smp, knobs)


def model_kwargs(prepared) -> dict:
    inputs = prepared.inputs
    return dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                image_token_pooling=inputs["image_token_pooling"], image_grids=inputs["image_grids"],
                mm_token_type_ids=inputs["mm_token_type_ids"])


@pytest.fixture(scope="module")
def tiny() -> Molmo2Adapter:
    return MODELS.get("molmo2")(preset="tiny", path=None, dtype="float32", device="cpu", seed=0, options={})


def test_describe_without_building_and_bad_inputs(tmp_path):
    info = Molmo2Adapter.describe(preset="tiny", path=None, options={})
    assert (info.family, info.num_blocks, info.num_experts, info.default_top_k, info.max_crops_limit,
            info.vision_tokens_per_crop, info.hidden_size, info.vocab_size) == ("molmo2", 4, 0, 0, 24, 36, 64, 512)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Molmo2Adapter.describe(preset=None, path=str(tmp_path / "missing"), options={})
    with pytest.raises(ValueError, match="unknown options for family 'molmo2'"):
        Molmo2Adapter.describe(preset="tiny", path=None, options={"max_pixels": 3})
    with pytest.raises(ValueError, match="Unknown preset 'big'"):
        Molmo2Adapter.describe(preset="big", path=None, options={})


# 640x480 on 168 px crops of 14 px patches, margins 4+4 patches: tiles are 56 px windows, the tiling is
# chosen for (480-112) x (640-112); the low-res crop gives 6x6 tokens, the canvas (rows*56+112) x
# (cols*56+112) gives ceil(patches/2) tokens per side; 9 image special tokens + BOS + 6 prompt tokens
@pytest.mark.parametrize("max_crops, tiling, crops, grid, vision_tokens", [
    (1, [1, 1], 2, [6, 6, 6, 6], 72),
    (2, [1, 2], 3, [6, 6, 6, 8], 84),
    (4, [2, 2], 5, [6, 6, 8, 8], 100),
    (8, [2, 3], 7, [6, 6, 8, 10], 116),
])
def test_max_crops_sets_crops_and_vision_tokens(tiny, max_crops, tiling, crops, grid, vision_tokens):
    prepared = tiny.prepare(sample=sample(), knobs=Knobs(max_crops=max_crops))
    assert prepared.extras["tiling"] == tiling and prepared.extras["image_grid"] == grid
    assert (prepared.num_crops, prepared.num_vision_tokens) == (crops, vision_tokens)
    assert tuple(prepared.inputs["pixel_values"].shape) == (crops, 144, 14 * 14 * 3)
    columns = grid[0] + grid[2]   # one <im_col> per token row
    assert prepared.num_language_tokens == 1 + 4 + columns + 6
    assert prepared.num_total_tokens == prepared.num_vision_tokens + prepared.num_language_tokens
    features = tiny.projector(prepared, tiny.vision_encoder(prepared))
    assert tuple(features.shape) == (vision_tokens, 64)


def test_matches_the_models_own_forward_and_generate(tiny):
    tiny.restore_knobs()
    prepared, state = run(tiny, sample(), Knobs(max_crops=4))
    with torch.inference_mode():
        logits = tiny.model(**model_kwargs(prepared)).logits[0, -1]
        generated = tiny.model.generate(**model_kwargs(prepared), max_new_tokens=5, do_sample=False)
    assert torch.allclose(logits, state.extras["logits"], atol=1e-5)
    for _ in range(4):
        tiny.decode_step(state)
    assert state.tokens == generated[0, prepared.num_total_tokens:].tolist()


def test_engine_pass_counts_and_forced_length(tiny):
    unit = expand(load_spec_text(SPEC, source="x"))[0]
    assert (unit.knobs.max_crops, unit.knobs.max_new_tokens) == (1, 5)
    row = measure_pass(adapter=tiny, sample=sample(), unit=unit)
    tiny.restore_knobs()
    assert (row["num_crops"], row["num_vision_tokens"], row["num_output_tokens"]) == (2, 72, 5)
    assert row["num_total_tokens"] == row["num_vision_tokens"] + row["num_language_tokens"]


@pytest.mark.parametrize("policy, n", [("prefix", 2), ("random", 2), ("importance", 3), ("prefix", 1)])
def test_active_blocks_run_exactly_the_chosen_blocks_with_a_consistent_cache(tiny, policy, n, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXVLM_CACHE", str(tmp_path))
    chosen, prepared, state, calls = decode_counting_block_calls(
        tiny, blocks=list(tiny.text_model.layers), knobs=Knobs(active_blocks=n, block_policy=policy),
        run=lambda: run(tiny, sample()))
    assert len(chosen) == n and dict(calls) == {i: 4 for i in chosen}
    if policy == "prefix":
        assert chosen == tuple(range(n))
    # the last step again without a cache: prompt + generated tokens in one forward, prefill mask extended
    with torch.inference_mode():
        embeds = tiny.projector(prepared, tiny.vision_encoder(prepared))
        hidden = tiny._embed_prompt(prepared, embeds)
        hidden = torch.cat([hidden, tiny.text_model.embed_tokens(torch.tensor([state.tokens[:-1]]))], dim=1)
        logits = tiny._forward(hidden=hidden, start=0, cache=None,
                               mask=tiny._prefill_mask(prepared, extra=len(state.tokens) - 1))
    tiny.restore_knobs()
    assert torch.allclose(logits, state.extras["logits"], atol=1e-5)
    assert int(torch.argmax(logits)) == state.tokens[-1]


def test_restore_gives_identical_logits(tiny):
    tiny.restore_knobs()
    _, fresh = run(tiny, sample())
    tiny.apply_knobs(Knobs(active_blocks=2, block_policy="random"))
    _, changed = run(tiny, sample())
    tiny.restore_knobs()
    _, restored = run(tiny, sample())
    assert not torch.equal(changed.extras["logits"], fresh.extras["logits"])
    assert torch.equal(restored.extras["logits"], fresh.extras["logits"])


def test_top_k_on_the_dense_decoder_is_an_error(tiny):
    with pytest.raises(SpecError, match=r"knobs.top_k: \[2\]: the model is dense"):
        load_spec_text(SPEC.replace("max_new_tokens: 5", "max_new_tokens: 5, top_k: [2]"), source="x")
    with pytest.raises(ValueError, match="dense decoder"):
        tiny.apply_knobs(Knobs(top_k=2))
    with pytest.raises(SpecError, match=r"knobs.max_crops: \[30\] above the preprocessing limit of 24"):
        load_spec_text(SPEC.replace("max_crops: [1, 4]", "max_crops: [30]"), source="x")
    tiny.restore_knobs()


def test_a_transformers_without_molmo2_is_named(monkeypatch):
    import transformers

    monkeypatch.setitem(sys.modules, "transformers.models.molmo2", None)   # import now raises ImportError
    with pytest.raises(Molmo2Unavailable, match=rf"needs transformers>=5.23.0 .*installed: transformers "
                                                rf"{transformers.__version__}"):
        Molmo2Adapter.describe(preset="tiny", path=None, options={})
    with pytest.raises(SpecError, match=r"x: model: family 'molmo2' needs transformers>=5.23.0"):
        load_spec_text(SPEC, source="x")


def test_saved_checkpoint_loads_back_with_identical_logits(tiny, tmp_path):
    tiny.restore_knobs()
    folder = tiny.save_pretrained(tmp_path / "ckpt")
    loaded = MODELS.get("molmo2")(preset=None, path=str(folder), dtype="float32", device="cpu", seed=1, options={})
    assert loaded.info.num_blocks == 4 and loaded.image_settings == tiny.image_settings
    p1, s1 = run(tiny, sample())
    p2, s2 = run(loaded, sample())
    assert torch.equal(p1.inputs["input_ids"], p2.inputs["input_ids"])
    assert torch.allclose(s1.extras["logits"], s2.extras["logits"], atol=1e-6)
    assert loaded.eos_token_id == tiny.eos_token_id


def test_param_counts_sum_to_the_model(tiny):
    tiny.restore_knobs()
    counts = tiny.param_counts()
    total = sum(p.numel() for p in tiny.model.parameters())
    assert counts["vision_encoder"] + counts["projector"] + counts["llm"] == total
    assert counts["llm_active"] == counts["llm"]
    tiny.apply_knobs(Knobs(active_blocks=3))
    skipped = sum(p.numel() for p in tiny.text_model.layers[3].parameters())
    assert tiny.param_counts()["llm_active"] == counts["llm"] - skipped
    tiny.restore_knobs()


def test_verify_knobs_passes_on_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXVLM_CACHE", str(tmp_path))
    rows = verify_knobs(family="molmo2", preset="tiny")
    assert {r["knob"] for r in rows} >= {"active_blocks", "max_crops", "max_crops_vision_tokens", "max_new_tokens",
                                         "restore"}
    assert "top_k" not in {r["knob"] for r in rows}
    assert [r for r in rows if not r["ok"]] == []


def test_verify_knobs_cli_on_molmo2_tiny(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from flexvlm_ray.cli import main

    monkeypatch.setenv("FLEXVLM_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["verify-knobs", "--model", "molmo2:tiny"])
    assert result.exit_code == 0, result.output
    passed, total = result.output.splitlines()[-1].split()[0].split("/")
    assert passed == total and int(total) > 20
    bad = CliRunner().invoke(main, ["verify-knobs", "--model", "molmo2:big"])
    assert bad.exit_code == 2 and "Unknown preset 'big' for family 'molmo2'" in bad.output


def _library_helpers() -> dict:
    """The module-level helpers of transformers' image_processing_molmo2 (the file cannot be imported
    without torchvision; its functions before the processor class need only torch)."""
    import os

    import transformers.models.molmo2 as package

    file = os.path.join(os.path.dirname(package.__file__), "image_processing_molmo2.py")
    source = open(file).read()
    prefix = source[: source.index("@auto_docstring\nclass Molmo2ImageProcessor")]
    namespace = {"__name__": "transformers.models.molmo2._helpers", "__package__": "transformers.models.molmo2"}
    exec(compile(prefix, file, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("height, width", [(480, 640), (336, 1008), (1000, 300), (90, 120), (378, 378), (2000, 1500)])
@pytest.mark.parametrize("max_crops", [1, 2, 5, 8, 12])
def test_port_agrees_with_the_librarys_geometry_and_pooling(height, width, max_crops):
    from flexvlm_ray.models.molmo2.preprocess import Molmo2ImageSettings, crop_geometry, pooling_windows

    lib = _library_helpers()
    settings = Molmo2ImageSettings()   # the released defaults: 378 px crops, 14 px patches, margins 4+4
    ours = crop_geometry(height=height, width=width, settings=settings, max_crops=max_crops)
    assert ours == lib["compute_crop_geometry"](height, width, max_crops, [4, 4], 378, 14)
    grid = torch.arange(ours[2] // 14 * (ours[3] // 14)).reshape(ours[2] // 14, ours[3] // 14)
    windows, rows, cols = pooling_windows(index_grid=grid, pool_h=2, pool_w=2)
    expected, exp_rows, exp_cols = lib["arange_for_pooling"](grid, 2, 2)
    assert (rows, cols) == (exp_rows, exp_cols) and torch.equal(windows, expected)


def test_port_patches_like_the_library():
    from flexvlm_ray.models.molmo2.preprocess import _to_patches

    crops = torch.randn(3, 28, 42, 3)
    assert torch.equal(_to_patches(crops, 14), _library_helpers()["batch_pixels_to_patches"](crops, 14))


# -- analytic FLOPs ----------------------------------------------------------------------------
# tiny, 640x480, max_crops=1: 2 crops of N=144 patches (588 values each), 72 vision tokens,
# T = 72 + 23 = 95 prompt tokens of which m = 72 + 4 + 12 = 88 are image tokens (patches, col, start/end)
#   vision    = 2 * (2*144*588*32 + 2 layers * (4*144*32*16*(2+2) + 4*144^2*2*16 + 4*144*32*64))
#             = 2 * (5_419_008 + 2*(1_179_648 + 2_654_208 + 1_179_648))              = 30_892_032
#   projector = 72 * (2*64*32 + 2*2*4*64*32 + 4*4*32 + 2*32*32 + 4*32*96 + 2*96*64)
#             = 72 * (4_096 + 32_768 + 512 + 2_048 + 12_288 + 12_288)               = 4_608_000
#   per token and block: 4*64*16*(4+2) + 6*64*128 = 73_728; attention 4*4*16 = 256 per key
#   prefill (4 blocks) = 95*4*73_728 + 4*256*(95*96/2 + 88*87/2) + 2*64*512
#                      = 28_016_640 + 4*256*8_388 + 65_536                          = 36_671_488
#   decode (5 tokens: 4 steps at 96..99 keys) = 4*(4*73_728 + 65_536) + 4*256*390  = 1_841_152
#   with 2 active blocks: prefill = 95*2*73_728 + 2*256*8_388 + 65_536              = 18_368_512
#                         decode  = 4*(2*73_728 + 65_536) + 2*256*390               = 1_051_648
@pytest.mark.parametrize("knobs, expected", [
    (Knobs(max_crops=1), {"vision": 30_892_032, "projector": 4_608_000, "llm_prefill": 36_671_488,
                          "llm_decode": 1_841_152}),
    (Knobs(max_crops=1, active_blocks=2), {"vision": 30_892_032, "projector": 4_608_000, "llm_prefill": 18_368_512,
                                           "llm_decode": 1_051_648}),
])
def test_analytic_flops_match_the_hand_computed_table(tiny, knobs, expected):
    tiny.apply_knobs(knobs)
    try:
        prepared = tiny.prepare(sample=sample(), knobs=knobs)
        assert (prepared.num_crops, prepared.num_vision_tokens, prepared.num_total_tokens) == (2, 72, 95)
        assert tiny.flops(prepared=prepared, num_output_tokens=5, knobs=knobs) == expected
    finally:
        tiny.restore_knobs()


def test_prefill_mask_keys_match_the_flops_count(tiny):
    prepared = tiny.prepare(sample=sample(), knobs=Knobs(max_crops=1))
    assert int(tiny._prefill_mask(prepared).sum()) == 95 * 96 // 2 + 88 * 87 // 2
