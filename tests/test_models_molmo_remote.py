"""The remote-code Molmo family on CPU, on a fake remote-code checkpoint written into tmp_path
(``fake_molmo_remote``): opt-in and folder errors, describe without running remote code, crops ->
vision tokens, parity with the model's own forward and its own cached greedy loop, top_k on the
discovered routers, active blocks with a consistent cache, restore, parameter counts, the spec
path (top-level ``trust_remote_code``) and ``verify-knobs --path``."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from fake_molmo_remote import write_fake_molmo
from model_support import decode_counting_block_calls, routed_experts_per_token, run_stages, sample

from flexvlm_ray.cli import main
from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure.engine import measure_pass
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.molmo_remote.adapter import MolmoRemoteAdapter
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import SpecError, load_spec_text

TRUST = {"trust_remote_code": True}


def spec(folder, extra: str = "", model_extra: str = ", trust_remote_code: true") -> str:
    return f"""
name: r
experiment: quickstart
model: {{family: molmo_remote, path: '{folder}'{model_extra}}}
datasets: [{{name: probe_grid, num_samples: 1}}]
knobs: {{max_crops: [1, 4], top_k: [1, 2], active_blocks: [2, 4], max_new_tokens: 5{extra}}}
"""


def run(adapter, smp: Sample, knobs: Knobs = Knobs(max_crops=2)):
    return run_stages(adapter, smp, knobs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fake_molmo(tmp_path_factory.mktemp("fake_molmo") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def remote(folder) -> MolmoRemoteAdapter:
    return MODELS.get("molmo_remote")(preset=None, path=str(folder), dtype="float32", device="cpu", seed=0,
                                      options=dict(TRUST))


def test_describe_reads_json_only_and_errors_are_clear(folder, tmp_path):
    info = MolmoRemoteAdapter.describe(preset=None, path=str(folder), options=TRUST)
    assert (info.num_blocks, info.num_experts, info.default_top_k, info.max_crops_limit, info.vision_tokens_per_crop,
            info.hidden_size, info.vocab_size) == (4, 8, 2, 24, 36, 64, 512)
    # a folder whose remote code would fail on import still describes: no code runs at the edge
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "modeling_fakemolmo.py").write_text("raise RuntimeError('remote code ran')\n")
    assert MolmoRemoteAdapter.describe(preset=None, path=str(broken), options=TRUST).num_blocks == 4
    cases = [
        (dict(preset=None, path=str(folder), options={}), ValueError, "opt in with model.options.trust_remote_code: true"),
        (dict(preset=None, path=str(folder), options={"trust_remote_code": "yes"}), ValueError, "opt in"),
        (dict(preset=None, path=str(tmp_path / "missing"), options=TRUST), FileNotFoundError,
         "no checkpoint at .*nothing is downloaded"),
        (dict(preset="molmoe-1b", path=None, options=TRUST), ValueError, "has no presets"),
        (dict(preset=None, path=None, options=TRUST), ValueError, "set model.path"),
        (dict(preset=None, path=str(folder), options={**TRUST, "max_pixels": 1}), ValueError, "unknown options"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            MolmoRemoteAdapter.describe(**kwargs)
    config = json.loads((broken / "config.json").read_text())
    del config["auto_map"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no auto_map entry for AutoModelForCausalLM"):
        MolmoRemoteAdapter.describe(preset=None, path=str(broken), options=TRUST)


def test_loading_checks_the_routers_against_config_json(folder, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    config = json.loads((changed / "config.json").read_text())
    del config["moe_top_k"]    # the remote code's own default (2) builds the routers; describe sees no top_k
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"routers have top_k \[2\], config.json says 0"):
        MolmoRemoteAdapter(preset=None, path=str(changed), dtype="float32", device="cpu", seed=0, options=TRUST)


def test_spec_opt_in_and_knob_ranges(folder):
    assert load_spec_text(spec(folder), source="x").model.trust_remote_code is True
    with pytest.raises(SpecError, match="x: model: family 'molmo_remote' runs the checkpoint's own Python code"):
        load_spec_text(spec(folder, model_extra=""), source="x")
    with pytest.raises(SpecError, match=r"knobs.top_k: \[9\] above the model's 8 experts"):
        load_spec_text(spec(folder).replace("top_k: [1, 2]", "top_k: [9]"), source="x")
    with pytest.raises(SpecError, match="unknown options for family 'qwen3_vl_moe'.*trust_remote_code"):
        load_spec_text(spec(folder).replace("family: molmo_remote, path: '" + str(folder) + "'",
                                            "family: qwen3_vl_moe, preset: tiny"), source="x")


def test_discovery_finds_the_remote_models_knob_targets(remote):
    found = remote.structure
    assert (found.vision_name, found.blocks_name) == ("model.vision_backbone", "model.transformer.blocks")
    assert found.router_names == [f"model.transformer.blocks.{i}.ffn.gate" for i in range(4)]


# Molmo v1 layout on 168 px crops (12x12 patches, 6x6 pooled tokens, 2 pooled tokens dropped on
# every overlapping tile side): 36 global tokens + (kept rows) x (kept cols) of the stitched tiles
@pytest.mark.parametrize("max_crops, tiling, crops, vision_tokens", [
    (1, [1, 1], 2, 36 + 6 * 6),
    (2, [1, 2], 3, 36 + 6 * 8),
    (4, [2, 2], 5, 36 + 8 * 8),
    (8, [2, 3], 7, 36 + 8 * 10),
])
def test_max_crops_sets_crops_and_vision_tokens(remote, max_crops, tiling, crops, vision_tokens):
    prepared = remote.prepare(sample=sample(), knobs=Knobs(max_crops=max_crops))
    assert prepared.extras["tiling"] == tiling
    assert (prepared.num_crops, prepared.num_vision_tokens) == (crops, vision_tokens)
    assert tuple(prepared.inputs["images"].shape) == (1, crops, 144, 14 * 14 * 3)
    index = prepared.inputs["image_input_idx"]
    assert int((index >= 0).sum()) == vision_tokens
    patch_id = remote.tokenizer.token_to_id("<im_patch>")
    ids = prepared.inputs["input_ids"][0]
    assert torch.equal(ids[index[index >= 0]], torch.full((vision_tokens,), patch_id))
    assert prepared.num_total_tokens == prepared.num_vision_tokens + prepared.num_language_tokens


def test_matches_the_models_own_forward_and_cached_greedy_loop(remote):
    remote.restore_knobs()
    prepared, state = run(remote, sample(), Knobs(max_crops=4))
    inputs = prepared.inputs
    vocab = remote.info.vocab_size
    with torch.inference_mode():
        out = remote.model(input_ids=inputs["input_ids"], images=inputs["images"], image_masks=inputs["image_masks"],
                           image_input_idx=inputs["image_input_idx"], use_cache=True)
        tokens, past = [int(out.logits[0, -1, :vocab].argmax())], out.past_key_values
        for _ in range(4):
            out = remote.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            tokens.append(int(out.logits[0, -1, :vocab].argmax()))
            past = out.past_key_values
    first = remote.model(input_ids=inputs["input_ids"], images=inputs["images"], image_masks=inputs["image_masks"],
                         image_input_idx=inputs["image_input_idx"]).logits[0, -1, :vocab]
    assert torch.allclose(first, state.extras["logits"], atol=1e-5)
    for _ in range(4):
        remote.decode_step(state)
    assert state.tokens == tokens


def test_top_k_sets_distinct_routed_experts_and_restore_is_exact(remote):
    remote.restore_knobs()
    _, fresh = run(remote, sample())
    for k in (1, 3, 8):
        seen, changed = routed_experts_per_token(remote, knobs=Knobs(top_k=k), run=lambda: run(remote, sample()))
        assert sorted(seen) == [k]
        assert not torch.equal(changed.extras["logits"], fresh.extras["logits"])
    remote.restore_knobs()
    assert [r.top_k for r in remote.moe_routers()] == [2] * 4
    _, restored = run(remote, sample())
    assert torch.equal(restored.extras["logits"], fresh.extras["logits"])


@pytest.mark.parametrize("policy, n", [("prefix", 2), ("random", 3), ("importance", 2)])
def test_active_blocks_run_exactly_the_chosen_blocks_with_a_consistent_cache(remote, policy, n, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXVLM_CACHE", str(tmp_path))
    chosen, prepared, state, calls = decode_counting_block_calls(
        remote, blocks=list(remote.structure.blocks), knobs=Knobs(active_blocks=n, block_policy=policy),
        run=lambda: run(remote, sample()))
    assert len(chosen) == n and dict(calls) == {i: 4 for i in chosen}
    if policy == "prefix":
        assert chosen == tuple(range(n))
    with torch.inference_mode():
        hidden = remote._embed_prompt(prepared, remote.projector(prepared, remote.vision_encoder(prepared)))
        hidden = torch.cat([hidden, remote.transformer.wte(torch.tensor([state.tokens[:-1]]))], dim=1)
        logits = remote._forward(hidden=hidden, start=0, cache=None)
    remote.restore_knobs()
    assert torch.allclose(logits, state.extras["logits"], atol=1e-5)


def test_engine_pass_forced_length_and_param_counts(remote, folder):
    unit = expand(load_spec_text(spec(folder), source="x"))[0]
    assert (unit.knobs.max_crops, unit.knobs.top_k, unit.knobs.active_blocks) == (1, 1, 2)
    remote.apply_knobs(unit.knobs)
    row = measure_pass(adapter=remote, sample=sample(), unit=unit)
    assert (row["num_crops"], row["num_vision_tokens"], row["num_output_tokens"]) == (2, 72, 5)
    counts = remote.param_counts()
    total = sum(p.numel() for p in remote.model.parameters())
    assert counts["vision_encoder"] + counts["projector"] + counts["llm"] == total
    # top_k=1 of 8 experts in all 4 blocks (unit 0: top_k 1, active_blocks 2: two blocks skipped)
    block = sum(p.numel() for p in remote.structure.blocks[0].parameters())
    experts = sum(p.numel() for n, p in remote.structure.blocks[0].named_parameters() if "expert" in n)
    assert counts["llm_active"] == counts["llm"] - 2 * block - 2 * (experts - experts // 8)
    remote.restore_knobs()
    assert remote.param_counts()["llm_active"] == counts["llm"] - 4 * (experts - experts // 8 * 2)


def test_verify_knobs_cli_on_a_local_path(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXVLM_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["verify-knobs", "--model", "molmo_remote", "--path", str(folder),
                                       "--option", "trust_remote_code=true"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert {line.split()[0] for line in lines[1:-1]} >= {"top_k", "active_blocks", "max_crops", "max_new_tokens",
                                                        "restore"}
    assert lines[-1].endswith("checks passed") and lines[-1].split()[0].split("/")[0] == lines[-1].split()[0].split("/")[1]
    refused = CliRunner().invoke(main, ["verify-knobs", "--model", "molmo_remote", "--path", str(folder)])
    assert refused.exit_code == 2 and "opt in with model.options.trust_remote_code: true" in refused.output


def test_worker_passes_the_specs_top_level_opt_in(folder):
    from flexvlm_ray.run.worker import ModelWorker

    model = load_spec_text(spec(folder), source="x").model
    assert model.options == {} and model.trust_remote_code is True
    worker = ModelWorker(model=model, seed=0, name="w0")
    assert worker.adapter.info.family == "molmo_remote" and worker.adapter.info.num_experts == 8


def test_released_moe_blocks_are_found_and_top_k_works(tmp_path):
    """The released modeling_molmoe.py builds each MoE as one module reading ``self.top_k`` at every
    forward (not megablocks): discovery finds those modules and the top_k knob changes how many
    experts every token runs through."""
    folder = write_fake_molmo(tmp_path / "released", seed=1, moe_impl="released")
    adapter = MODELS.get("molmo_remote")(preset=None, path=str(folder), dtype="float32", device="cpu", seed=0,
                                         options=dict(TRUST))
    assert adapter.structure.router_names == [f"model.transformer.blocks.{i}.mlp" for i in range(4)]
    rows = []
    experts = [e for block in adapter.structure.blocks for e in block.mlp.experts]
    handles = [e.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0])) for e in experts]
    try:
        for k in (1, 2, 5):
            rows.clear()
            adapter.apply_knobs(Knobs(top_k=k, max_crops=1))
            prepared, _ = run(adapter, sample(), Knobs(top_k=k, max_crops=1))
            assert sum(rows) == k * prepared.num_total_tokens * 4          # k experts per token in all 4 blocks
    finally:
        for h in handles:
            h.remove()
    adapter.restore_knobs()
    assert [m.top_k for m in adapter.moe_routers()] == [2] * 4
