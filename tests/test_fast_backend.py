"""The flexmoe ``fast`` backend on the CPU (float32, graphs off): same logits and tokens as ``hf`` under
every knob, MoE paths that agree with each other and read only the chosen experts, the static cache,
graph keys, and ``model.backend: fast`` reaching the adapter from a spec."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure.engine import timed_passes
from flexvlm_ray.models import Knobs
from flexvlm_ray.models.flexmoe.fast.decoder import (experts_gather, experts_grouped, experts_loop, grouped_mm_function,
                                             key_dtype, route, sort_pairs)
from flexvlm_ray.run.worker import ModelWorker
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import check_semantics, load_spec_text
from model_support import generate as run_generate
from model_support import make_flexmoe as make
from model_support import rel_err

DECODE_STEPS = 4
REL_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("module_cache")   # importance scores in a throw-away cache


@pytest.fixture(scope="module")
def hf():
    return make()


@pytest.fixture(scope="module")
def fast():
    return make(backend="fast")


def sample(width: int = 900, height: int = 700, prompt: str = "what color is the car ?") -> Sample:
    return Sample(sample_id="s", image=Image.new("RGB", (width, height), (90, 140, 30)), prompt=prompt)


def generate(adapter, knobs: Knobs, smp: Sample, steps: int = DECODE_STEPS):
    return run_generate(adapter, knobs, smp, steps)


KNOBS = [
    Knobs(),
    Knobs(top_k=1),
    Knobs(top_k=2, max_crops=1),
    Knobs(top_k=8),                                              # every expert
    Knobs(top_k=8, max_crops=12),
    Knobs(active_blocks=2, block_policy="prefix"),
    Knobs(active_blocks=3, block_policy="random", top_k=1),
    Knobs(active_blocks=2, block_policy="importance", max_crops=1),
    Knobs(active_blocks=1, block_policy="random", top_k=8, max_crops=12),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: f"k{k.top_k}-b{k.active_blocks}{k.block_policy}-c{k.max_crops}")
def test_fast_matches_hf_logits_and_tokens(hf, fast, knobs):
    f_hf, l_hf, t_hf, p_hf = generate(hf, knobs, sample())
    f_fa, l_fa, t_fa, p_fa = generate(fast, knobs, sample())
    assert p_hf.num_total_tokens == p_fa.num_total_tokens and p_hf.num_crops == p_fa.num_crops
    assert torch.equal(f_hf, f_fa)                                    # ViT features bit for bit
    assert len(l_fa) == DECODE_STEPS + 1
    for step, (a, b) in enumerate(zip(l_fa, l_hf)):
        assert rel_err(a, b) < REL_TOL, f"step {step}"
    assert t_fa == t_hf


def test_crop_counts_reach_the_vit_in_one_batch(fast):
    for max_crops, crops in ((1, 2), (12, 13)):
        prepared = fast.prepare(sample=sample(1400, 1100), knobs=Knobs(max_crops=max_crops))
        assert prepared.num_crops == crops
        features = fast.vision_encoder(prepared)
        assert features.shape[0] == crops


@pytest.mark.parametrize("decode_moe, prefill_moe", [("grouped", "grouped"), ("gather", "grouped"), ("grouped", "loop")])
def test_every_moe_path_matches_hf(hf, decode_moe, prefill_moe):
    adapter = make(backend="fast", decode_moe=decode_moe, prefill_moe=prefill_moe)
    assert (adapter.fast.decode_moe, adapter.fast.prefill_moe) == (decode_moe, prefill_moe)
    for knobs in (Knobs(top_k=1), Knobs(top_k=3, active_blocks=2, block_policy="random")):
        _, l_hf, t_hf, _ = generate(hf, knobs, sample())
        _, l_fa, t_fa, _ = generate(adapter, knobs, sample())
        assert max(rel_err(a, b) for a, b in zip(l_fa, l_hf)) < REL_TOL
        assert t_fa == t_hf


def test_defaults_on_cpu(fast):
    assert fast.backend == "fast" and fast.fast.use_graphs is False
    assert (fast.fast.decode_moe, fast.fast.prefill_moe) == ("gather", "loop")
    assert fast.fast.cache.keys.shape == (4, 4, 4096, 32)             # blocks, heads, max_len, head_dim


# -- MoE functions ------------------------------------------------------------------------------
def random_experts(*, num_experts: int = 8, hidden: int = 16, width: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * width, hidden, generator=gen)
    down = torch.randn(num_experts, hidden, width, generator=gen)
    router = torch.randn(num_experts, hidden, generator=gen)
    return gate_up, down, router


def reference_moe(*, x, ids, weights, gate_up, down):
    """Token by token, slot by slot, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate, up = (gate_up[e].double() @ x[t].double()).chunk(2)
            out[t] += float(weights[t, slot]) * (down[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("tokens, top_k", [(1, 1), (1, 3), (1, 8), (7, 2), (30, 3)])
def test_moe_paths_agree_with_a_float64_reference(tokens, top_k):
    gate_up, down, router = random_experts(seed=tokens * 10 + top_k)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(top_k))
    weights, ids = route(x=x, weight=router, top_k=top_k, norm_topk_prob=False)
    ref = reference_moe(x=x, ids=ids, weights=weights, gate_up=gate_up, down=down)
    args = dict(x=x, ids=ids, weights=weights, gate_up=gate_up, down=down, act=torch.nn.functional.silu)
    outs = [experts_loop(**args), experts_grouped(**args, mm=grouped_mm_function())]
    if tokens == 1:
        outs.append(experts_gather(**args))
    for out in outs:
        assert out.shape == x.shape and rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("num_experts, key", [(4, torch.uint8), (64, torch.uint8), (256, torch.uint8),
                                               (257, torch.int16), (40000, torch.int32)])
@pytest.mark.parametrize("tokens, top_k", [(1, 1), (5, 3), (37, 8)])
def test_pairs_sort_on_narrow_keys_to_the_stable_int64_permutation(num_experts, key, tokens, top_k):
    """The narrow keys change neither the order (stable: ties keep pair order) nor the expert runs."""
    gen = torch.Generator().manual_seed(tokens * top_k)
    ids = torch.randint(0, num_experts, (tokens, top_k), generator=gen)
    ids[0, 0] = num_experts - 1                                  # the largest id must fit the key
    assert key_dtype(num_experts) == key
    pairs = sort_pairs(ids=ids, num_experts=num_experts)
    ref_perm = torch.sort(ids.reshape(-1), stable=True).indices
    assert pairs.perm.dtype == torch.int64 and torch.equal(pairs.perm, ref_perm)
    assert torch.equal(pairs.inverse[pairs.perm], torch.arange(tokens * top_k))
    assert pairs.offsets.dtype == torch.int32
    assert torch.equal(pairs.offsets.long(), torch.cumsum(torch.bincount(ids.reshape(-1), minlength=num_experts), 0))


def test_router_matches_olmoe(hf):
    gate = hf.model.blocks[0].mlp.gate
    x = torch.randn(5, hf.config.hidden_size)
    for k in (1, 2, 8):
        gate.top_k = k
        _, ref_w, ref_i = gate(x)
        w, i = route(x=x, weight=gate.weight, top_k=k, norm_topk_prob=gate.norm_topk_prob)
        assert torch.equal(i, ref_i) and torch.equal(w, ref_w)
    gate.top_k = hf.config.top_k


class OpShapes(TorchDispatchMode):
    """Records (op name, output shape) of every aten op run inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.calls.append((func.overloadpacket.__name__, tuple(out.shape)))
        return out


@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
def test_gather_decode_reads_only_the_chosen_experts(top_k):
    gate_up, down, router = random_experts()
    x = torch.randn(1, 16)
    weights, ids = route(x=x, weight=router, top_k=top_k, norm_topk_prob=False)
    chosen = set(ids[0].tolist())
    poisoned_gu, poisoned_down = gate_up.clone(), down.clone()
    for e in range(8):
        if e not in chosen:                      # every expert not routed to is NaN
            poisoned_gu[e], poisoned_down[e] = float("nan"), float("nan")
    args = dict(x=x, ids=ids, weights=weights, act=torch.nn.functional.silu)
    with OpShapes() as ops:
        out = experts_gather(**args, gate_up=poisoned_gu, down=poisoned_down)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, experts_gather(**args, gate_up=gate_up, down=down))
    selects = [shape for name, shape in ops.calls if name == "index_select"]
    assert selects == [(top_k, 24, 16), (top_k, 16, 12)]       # k experts' gate_up and down weights
    assert [shape for name, shape in ops.calls if name == "bmm"] == [(top_k, 24, 1), (top_k, 16, 1)]


@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_decode_step_matmul_shapes_scale_with_top_k(fast, top_k):
    knobs = Knobs(top_k=top_k, active_blocks=3, block_policy="random", max_new_tokens=2)
    fast.apply_knobs(knobs)
    try:
        prepared = fast.prepare(sample=sample(), knobs=knobs)
        state = fast.prefill(prepared, fast.projector(prepared, fast.vision_encoder(prepared)))
        with OpShapes() as ops:
            fast.decode_step(state)
    finally:
        fast.restore_knobs()
    c = fast.config
    selects = [shape for name, shape in ops.calls if name == "index_select"]
    assert selects == [(top_k, 2 * c.expert_width, c.hidden_size), (top_k, c.hidden_size, c.expert_width)] * 3
    assert [shape[0] for name, shape in ops.calls if name == "bmm"] == [top_k] * 6


# -- cache, graphs keys, state ---------------------------------------------------------------------
def test_graph_key_follows_blocks_top_k_and_kv_bucket(fast):
    dec = fast.fast
    assert dec.bucket(0) == dec.bucket(511) == 512 and dec.bucket(512) == 1024 and dec.bucket(4095) == 4096
    base = dec.graph_key(blocks=(0, 1, 2, 3), position=100)
    assert base == ((0, 1, 2, 3), (2, 2, 2, 2), 512)
    fast.apply_knobs(Knobs(top_k=1, active_blocks=2, block_policy="prefix"))
    try:
        assert dec.graph_key(blocks=fast.active_block_indices(), position=600) == ((0, 1), (1, 1), 1024)
    finally:
        fast.restore_knobs()


def test_decode_writes_one_cache_position_and_masks_the_rest(fast):
    prepared = fast.prepare(sample=sample(), knobs=Knobs())
    embeds = fast.projector(prepared, fast.vision_encoder(prepared))
    t = prepared.num_total_tokens
    cache = fast.fast.cache
    clean = fast.prefill(prepared, embeds)
    fast.decode_step(clean)
    expected = fast.fast.logits.clone()
    state = fast.prefill(prepared, embeds)
    garbage = 1e3 * torch.randn(cache.keys[:, :, t:].shape)
    cache.keys[:, :, t:] = garbage                 # positions not written yet: large finite garbage
    cache.values[:, :, t:] = garbage
    fast.decode_step(state)
    assert torch.allclose(fast.fast.logits, expected, rtol=1e-5, atol=1e-6)   # the mask hides them
    assert not torch.equal(cache.keys[:, :, t], garbage[:, :, 0])              # position t was written
    assert torch.equal(cache.keys[:, :, t + 1:], garbage[:, :, 1:])            # nothing after it
    cache.keys.zero_()
    cache.values.zero_()


def test_stale_state_after_another_prefill_is_refused(fast):
    prepared = fast.prepare(sample=sample(), knobs=Knobs())
    embeds = fast.projector(prepared, fast.vision_encoder(prepared))
    old = fast.prefill(prepared, embeds)
    fast.prefill(prepared, embeds)
    with pytest.raises(RuntimeError, match="overwritten by a later prefill"):
        fast.decode_step(old)


def test_position_beyond_the_static_cache_fails_clearly(fast):
    with pytest.raises(ValueError, match="outside the static cache of 4096"):
        fast.fast.decode(token=5, position=4096, blocks=(0,))


def test_cache_len_sizes_the_static_cache_past_the_trained_positions():
    """Rotary positions are computed per token, so a longer cache runs positions past max_positions."""
    adapter = make(backend="fast", cache_len=4160)
    assert adapter.fast.cache.max_len == 4160
    adapter.fast.decode(token=5, position=4100, blocks=(0,))  # past the preset's 4096: runs
    with pytest.raises(ValueError, match="outside the static cache of 4160"):
        adapter.fast.decode(token=5, position=4160, blocks=(0,))


# -- plumbing ---------------------------------------------------------------------------------------
SPEC = """
name: t
experiment: fast
model: {family: flexmoe, preset: tiny, dtype: float32, device: cpu, backend: fast, options: {decode_moe: gather}}
datasets: [{name: probe_grid, num_samples: 1}]
knobs: {top_k: [1], max_new_tokens: [3]}
measure: {warmup: 0, prefill_hook: true, block_parts: true}
"""


def test_spec_backend_fast_reaches_the_adapter():
    spec = load_spec_text(SPEC, source="x")
    assert check_semantics(spec) == []
    unit = expand(spec)[0]
    worker = ModelWorker(model=unit.model, seed=0, name="w")
    assert worker.adapter.backend == "fast" and worker.adapter.fast is not None
    result = worker.run(unit.to_dict(), run_id="r")
    assert result["ok"], result.get("failure")


def test_engine_hooks_time_the_fast_blocks(fast):
    unit = expand(load_spec_text(SPEC, source="x"))[0]
    fast.apply_knobs(unit.knobs)
    try:
        row, = timed_passes(adapter=fast, sample=sample(), unit=unit)
    finally:
        fast.restore_knobs()
    assert row["num_output_tokens"] == 3
    # the hooks time a separate pass; on the CPU both passes run eagerly (no CUDA graphs)
    assert row["prefill_hook_method"] == "separate_pass" and row["prefill_path"] == row["prefill_hook_path"] == "eager"
    assert row["T_LLM_prefill_hook"] is not None and row["T_LLM_prefill_hook"] > 0
    assert len(row["T_attention_per_block"]) == 4 and all(ms > 0 for ms in row["T_ffn_per_block"])


def test_setup_count_counts_the_fast_decoders_captures(fast):
    """On the CPU nothing is captured; every capture counts once, also one that the LRU bound dropped later."""
    assert fast.setup_count() == 0
    decoder = fast.fast
    bound = decoder.max_graphs
    decoder.max_graphs = 1
    try:
        decoder.graph(("prefill", "a"), object)
        decoder.graph(("prefill", "b"), object)
        assert fast.setup_count() == 2 and list(decoder.graphs) == [("prefill", "b")]
    finally:
        decoder.max_graphs = bound
        decoder.graphs.clear()
        decoder.captures = 0


def test_fast_options_need_the_fast_backend():
    with pytest.raises(ValueError, match=r"need backend 'fast'"):
        make(decode_moe="gather")
    with pytest.raises(ValueError, match="decode_moe 'dense' is not one of fused, gather, grouped"):
        make(backend="fast", decode_moe="dense")
    with pytest.raises(ValueError, match="backend 'triton' is not one of hf, fast"):
        make(backend="triton")


def test_set_backend_switches_in_place_on_the_same_weights(hf):
    adapter = make(backend="fast")
    knobs = Knobs(top_k=1)
    _, l_fast, t_fast, _ = generate(adapter, knobs, sample(), steps=2)
    adapter.set_backend(backend="hf", options={"experts_implementation": "eager"})
    assert adapter.fast is None and adapter.experts_implementation == "eager"
    _, l_hf, t_hf, _ = generate(adapter, knobs, sample(), steps=2)
    _, l_ref, t_ref, _ = generate(hf, knobs, sample(), steps=2)
    assert t_fast == t_hf == t_ref
    assert max(rel_err(a, b) for a, b in zip(l_hf, l_ref)) < REL_TOL
    first = adapter.set_backend(backend="fast") or adapter.fast
    adapter.set_backend(backend="fast", options={"decode_moe": "grouped"})
    assert adapter.fast is not first and adapter.fast.decode_moe == "grouped"
    adapter.set_backend(backend="fast")
    assert adapter.fast is first and adapter.backend == "fast"
    with pytest.raises(ValueError, match="do not apply to backend 'hf'"):
        adapter.set_backend(backend="hf", options={"cuda_graphs": False})


def _decoded(adapter, knobs: Knobs, *, overlap: bool, max_new: int, stop=None,
             smp: Sample | None = None) -> tuple[list[int], torch.Tensor]:
    """Tokens of ``adapter.decode_run`` after one prefill, the fast decoder's loop (host one step ahead)
    with ``overlap``, else step by step; and the logits the state ends with."""
    adapter.apply_knobs(knobs)
    before = adapter.overlap_decode
    adapter.overlap_decode = overlap
    try:
        prepared = adapter.prepare(sample=smp or sample(), knobs=knobs)
        state = adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))
        adapter.decode_run(state, max_new=max_new, stop=stop)
        assert state.position == prepared.num_total_tokens + len(state.tokens) - 1
        return list(state.tokens), state.extras["logits"].clone()
    finally:
        adapter.overlap_decode = before
        adapter.restore_knobs()


def test_overlap_decode_option_reaches_the_adapter():
    assert make(backend="fast").overlap_decode is True                        # the default
    assert make(backend="fast", overlap_decode=False).overlap_decode is False
    assert make().overlap_decode is False                                     # hf: step by step
    with pytest.raises(ValueError, match="overlap_decode must be true or false"):
        make(backend="fast", overlap_decode="yes")


@pytest.mark.parametrize("knobs", [Knobs(), Knobs(top_k=1, active_blocks=2, block_policy="prefix")],
                         ids=["full", "k1-b2"])
def test_overlapped_decode_gives_the_step_by_step_tokens_across_kv_buckets(fast, knobs):
    """A kv bucket of 8 positions: 30 forced steps cross four graph keys; tokens and last logits equal."""
    bucket = fast.fast.kv_bucket
    fast.fast.kv_bucket = 8
    try:
        ref, ref_logits = _decoded(fast, knobs, overlap=False, max_new=31)
        got, got_logits = _decoded(fast, knobs, overlap=True, max_new=31)
    finally:
        fast.fast.kv_bucket = bucket
    assert len(ref) == 31 and got == ref
    assert torch.equal(got_logits, ref_logits)


def test_overlapped_decode_stops_after_the_first_stop_token(fast):
    """On a caption (varied tokens), each token first seen after step 2 as the stop: both loops end on it."""
    caption = DATASETS.get("shapes_caption").load(split="validation")[0]
    ref, _ = _decoded(fast, Knobs(), overlap=False, max_new=16, smp=caption)
    stops = [t for i, t in enumerate(ref) if i >= 2 and t not in ref[:i]][:3]
    assert stops, ref
    for stop in stops:
        step_by_step, _ = _decoded(fast, Knobs(), overlap=False, max_new=16, stop=stop, smp=caption)
        overlapped, _ = _decoded(fast, Knobs(), overlap=True, max_new=16, stop=stop, smp=caption)
        assert step_by_step == overlapped == ref[:ref.index(stop) + 1]
    already, _ = _decoded(fast, Knobs(), overlap=True, max_new=16, stop=ref[0], smp=caption)
    assert already == ref[:1]                                  # prefill's token is the stop: no step runs


def test_overlapped_decode_past_the_static_cache_fails_clearly(fast):
    with pytest.raises(ValueError, match="outside the static cache of 4096"):
        fast.fast.decode_run(token=5, position=4090, blocks=(0,), steps=7)
    assert fast.fast.decode_run(token=5, position=4090, blocks=(0,), steps=0) == []
