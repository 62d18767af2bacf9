"""``flexmoe``: a MolmoE-style VLM assembled from transformers modules, with every knob live.

Presets (``flexvlm_ray.models.flexmoe.config.PRESETS``): ``tiny`` (the default; CPU-sized, loads
``flexvlm_ray/assets/tiny/`` when that folder holds a saved model, else random weights from the
seed) and ``molmoe-1b`` (the seed model's shape, random weights built directly on the device).
``path`` loads a folder written by ``save_flexmoe``, or a MolmoE checkpoint folder (config.json with
``model_type`` "molmo": the released MolmoE-1B or a fine-tune; ``flexvlm_ray.models.flexmoe.checkpoint``
maps its weights, ``flexvlm_ray.models.molmo_preprocess`` is its own preprocessing and prompt).

Backends (spec ``model.backend``): ``hf`` runs transformers' modules block by block; ``fast``
runs the same weights through ``flexvlm_ray.models.flexmoe.fast.decoder`` (static KV cache, MoE cost that
follows top_k, CUDA graphs for decode; see docs/FAST_RUNTIME.md). Knob semantics are shared.

Options:
    experts_implementation: 'grouped_mm' (default where it runs, else 'eager') | 'batched_mm' | 'eager'
        transformers' MoE experts kernel (``config._experts_implementation``; the hf backend's MoE).
    attn_implementation: 'sdpa' (default) | 'eager'.
    decode_moe (fast only): 'fused' (default on CUDA with Triton: two GEMV kernels over the chosen experts)
        | 'grouped' (default on CUDA without Triton) | 'gather' (default elsewhere)   MoE of one decode token.
    prefill_moe (fast only): 'fused' (default on CUDA with Triton: Triton GEMMs that gather token rows
        and apply SiLU-mul in their epilogue, weight tiles through TMA on Hopper) | 'grouped' (default where
        the grouped GEMM runs without Triton) | 'loop' (default elsewhere).
    kernels (fast only): 'triton' (default on CUDA with Triton: fused norms, q/k norm + RoPE, SiLU-mul,
        MoE combine) | 'torch' (default elsewhere: the same math as chains of PyTorch ops).
    cuda_graphs (fast only): true (default) | false   decode steps as CUDA graphs (CUDA only).
    max_graphs (fast only): captured graphs kept per decoder, least recently used dropped beyond (default 512).
    fused_decode (fast only): false (default) | true   a decode step's block in fewer Triton kernels (needs
        kernels 'triton' and decode_moe 'fused'; docs/FAST_RUNTIME.md).
    overlap_decode (fast only): true (default) | false   on CUDA the host enqueues each decode step before it
        reads the previous step's token (``FastDecoder.decode_run``): the device does not wait on the host.

Stages: ``vision_encoder`` runs CLIP and concatenates two layers' patch features (CLS dropped);
``projector`` adds the padding embeddings (MolmoE), pools every 2x2 window and projects it;
``prefill`` embeds the prompt, splices the pooled features into the ``[IMG]`` positions (MolmoE:
adds them to the ``<im_patch>`` embeddings) and runs the decoder; ``decode_step`` feeds one token.
The decoder loop is the adapter's own (embeddings -> chosen blocks -> norm -> lm_head) with its own
per-block KV cache and position counter, so skipped blocks simply have no cache entries.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from flexvlm_ray.data.base import Sample
from flexvlm_ray.knobs.blocks import apply_moe_block_knobs, block_influence, cached_importance
from flexvlm_ray.knobs.moe import set_top_k, temporary_top_k
from flexvlm_ray.models.common import BlockKVCache, calibration_samples  # noqa: F401  (used below)
from flexvlm_ray.models.base import (DecodeState, Knobs, ModelAdapter, ModelInfo, Prepared,
                                     register_model)
from flexvlm_ray.models.flexmoe.fast import ops as fused_ops
from flexvlm_ray.models.flexmoe.fast.decoder import MAX_GRAPHS, FastDecoder, grouped_mm_runs
from flexvlm_ray.models.flexmoe.checkpoint import (MolmoCheckpoint, checkpoint_kind, load_molmo_checkpoint,
                                                   open_molmo_checkpoint, weights_digest)
from flexvlm_ray.models.flexmoe.config import (BACKENDS, EOS_ID, FAST_OPTIONS, SPECIAL_TOKENS, FlexMoeConfig,
                                               build_tokenizer, check_options, describe, preset_config)
from flexvlm_ray.models.flexmoe.flops import flexmoe_flops
from flexvlm_ray.models.flexmoe.model import (WEIGHTS_FILE, FlexMoeModel, add_image_embeds, build_flexmoe,
                                              load_flexmoe, read_flexmoe_config, splice_image_embeds)
from flexvlm_ray.models.flexmoe.preprocess import build_sequence, layout_image
from flexvlm_ray.models.molmo_preprocess import PromptTokens, molmo_layout, molmo_sequence
from flexvlm_ray.models.hf_common import (active_llm_params, check_blocks_unchanged, check_has_image, check_max_crops,
                                          device_and_dtype, greedy_token, max_crops_for, model_identity, numel,
                                          prefill_state, record_token, weights_source)

CALIBRATION_VERSION = 1
def _resolve_config(*, preset: Optional[str], path: Optional[str]) -> tuple[FlexMoeConfig, Optional[Path]]:
    """The config and the weights folder (None: random weights) for a preset or a path."""
    config, folder, _ = _resolve_source(preset=preset, path=path)
    return config, folder


def _resolve_source(*, preset: Optional[str],
                    path: Optional[str]) -> tuple[FlexMoeConfig, Optional[Path], Optional[MolmoCheckpoint]]:
    """The config, the weights folder (None: random weights) and, for a MolmoE folder, the checked
    checkpoint, for a preset or a path."""
    if path is not None:
        if checkpoint_kind(path) == "molmo":
            checkpoint = open_molmo_checkpoint(path)
            return checkpoint.config, Path(path), checkpoint
        return read_flexmoe_config(path), Path(path), None
    config, weights_dir = preset_config(preset)
    return config, weights_dir, None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@register_model("flexmoe")
class FlexMoeAdapter(ModelAdapter):
    backends = BACKENDS
    overlap_decode = False   # set_backend (fast: true by default): FastDecoder.decode_run for llm_decode

    @classmethod
    def describe(cls, *, preset: Optional[str], path: Optional[str], options: dict[str, Any]) -> ModelInfo:
        return describe(preset=preset, path=path, options=options)

    def __init__(self, *, preset: Optional[str], path: Optional[str], dtype: str, device: str,
                 seed: int, options: dict[str, Any], backend: str = "hf") -> None:
        self.info = self.describe(preset=preset, path=path, options=options)
        if backend not in BACKENDS:
            raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
        if backend != "fast" and set(options) & set(FAST_OPTIONS):
            raise ValueError(f"options {sorted(set(options) & set(FAST_OPTIONS))} need backend 'fast'")
        self.device, self.dtype = device_and_dtype(device=device, dtype=dtype)
        self.seed = int(seed)
        self.config, self.weights_dir, self.checkpoint = _resolve_source(preset=preset, path=path)
        attn = options.get("attn_implementation", "sdpa")
        experts = options.get("experts_implementation") or "grouped_mm"
        self.model, self.tokenizer = self._load(attn=attn, experts=experts)
        self.prompt_tokens: Optional[PromptTokens] = (PromptTokens.from_tokenizer(self.tokenizer)
                                                      if self.config.preprocess == "molmo" else None)
        if "experts_implementation" not in options and not self._experts_run():
            self.model.decoder.set_experts_implementation("eager")
        self.attn_implementation = attn
        self.experts_implementation = self.model.decoder.config._experts_implementation
        self.knobs = Knobs()
        self._active: tuple[int, ...] = tuple(range(self.config.num_blocks))
        self._importance: Optional[list[float]] = None
        self.importance_computations = 0   # how often this adapter computed (not read) importance scores
        self.backend = "hf"
        self.fast: Optional[FastDecoder] = None
        self._fast_decoders: dict[tuple, FastDecoder] = {}
        if backend == "fast":
            self.set_backend(backend="fast", options={k: v for k, v in options.items() if k in FAST_OPTIONS})

    def set_backend(self, *, backend: str, options: Optional[dict[str, Any]] = None) -> None:
        """Switch between 'hf' and 'fast' in place, on the same weights and knobs.

        ``options``: for 'hf' only ``experts_implementation``; for 'fast' the fast options. A fast
        decoder (with its static KV cache and captured graphs) is built once per option set and kept.
        """
        options = dict(options or {})
        check_options(options)
        allowed = {"hf": {"experts_implementation"}, "fast": set(FAST_OPTIONS)}
        if backend not in allowed:
            raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
        if set(options) - allowed[backend]:
            raise ValueError(f"options {sorted(set(options) - allowed[backend])} do not apply to backend '{backend}'")
        if backend == "hf":
            if "experts_implementation" in options:
                self.model.decoder.set_experts_implementation(options["experts_implementation"])
                self.experts_implementation = self.model.decoder.config._experts_implementation
            self.fast = None
        else:
            key = tuple(sorted((k, v) for k, v in options.items() if k != "overlap_decode"))   # a loop, not a build
            if key not in self._fast_decoders:
                self._fast_decoders[key] = self._build_fast(options)
            self.fast = self._fast_decoders[key]
        self.overlap_decode = backend == "fast" and bool(options.get("overlap_decode", True))
        self.backend = backend

    def _build_fast(self, options: dict[str, Any]) -> FastDecoder:
        """The fast decoder on the hf model's own parameters (the static KV cache is its only allocation)."""
        grouped_ok = self.device.type == "cuda" and grouped_mm_runs(device=self.device, dtype=self.dtype)
        triton_ok = self.device.type == "cuda" and fused_ops.runs_on(self.device)
        # the fused Triton MoE measured as fast as the grouped GEMMs or faster from 256 to 3072 tokens on an
        # H100, and faster end to end (fewer launches; docs/FAST_RUNTIME.md)
        prefill_moe = options.get("prefill_moe") or ("fused" if triton_ok else "grouped" if grouped_ok else "loop")
        # grouped decode measured faster than gather on an H100 (4.2 vs 6.6 ms/token at top_k 8,
        # results/reference/h100-2026-11-22/runtime_bench.txt); the fused Triton GEMVs beat both (docs/FAST_RUNTIME.md)
        decode_moe = options.get("decode_moe") or ("fused" if triton_ok else "grouped" if grouped_ok else "gather")
        kernels = options.get("kernels") or ("triton" if triton_ok else "torch")
        if "grouped" in (prefill_moe, decode_moe) and not grouped_mm_runs(device=self.device, dtype=self.dtype):
            raise RuntimeError(f"the grouped GEMM does not run on {self.device} in {self.dtype}; "
                               f"use prefill_moe 'loop' and decode_moe 'gather'")
        max_len = options.get("cache_len") or self.config.max_positions   # rotary positions are per token
        return FastDecoder(causal_lm=self.model.decoder, max_len=max_len, decode_moe=decode_moe,
                           prefill_moe=prefill_moe, cuda_graphs=options.get("cuda_graphs", True), kernels=kernels,
                           max_graphs=options.get("max_graphs") or MAX_GRAPHS,
                           fused_decode=bool(options.get("fused_decode", False)))

    def _load(self, *, attn: str, experts: str) -> tuple[FlexMoeModel, Any]:
        if self.checkpoint is not None:
            return load_molmo_checkpoint(self.checkpoint, device=self.device, dtype=self.dtype,
                                         attn_implementation=attn, experts_implementation=experts)
        if self.weights_dir is not None:
            return load_flexmoe(self.weights_dir, device=self.device, dtype=self.dtype,
                                attn_implementation=attn, experts_implementation=experts)
        model = build_flexmoe(self.config, device=self.device, dtype=self.dtype, seed=self.seed,
                              attn_implementation=attn, experts_implementation=experts)
        return model, build_tokenizer(vocab_size=self.config.vocab_size)

    @torch.inference_mode()
    def _experts_run(self) -> bool:
        """Whether the configured experts kernel runs here (one block's MoE on two tokens)."""
        moe = self.model.blocks[0].mlp
        try:
            moe(torch.zeros(1, 2, self.config.hidden_size, device=self.device, dtype=self.dtype))
            return True
        except (RuntimeError, NotImplementedError, TypeError):
            return False

    # -- identity ----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What determines the weights: config, dtype and the seed or the weights file's hash."""
        if self.checkpoint is not None:
            weights = weights_digest(self.checkpoint)
        elif self.weights_dir is not None:
            weights = f"sha256:{_file_sha256(self.weights_dir / WEIGHTS_FILE)}"
        else:
            weights = weights_source(seed=self.seed, folder=None)
        return model_identity(family="flexmoe", config=self.config, dtype=self.dtype, weights=weights,
                              calibration=CALIBRATION_VERSION)

    # -- stages ------------------------------------------------------------------------
    def prepare(self, *, sample: Any, knobs: Knobs) -> Prepared:
        max_crops = max_crops_for(knobs=knobs, default=self.config.max_crops, limit=self.config.max_crops)
        check_has_image(sample=sample)
        dev = self.device
        if self.prompt_tokens is not None:
            layout = molmo_layout(image=sample.image, config=self.config, max_crops=max_crops,
                                  tokens=self.prompt_tokens)
            ids, positions = molmo_sequence(layout=layout, prompt=sample.prompt, tokenizer=self.tokenizer,
                                            tokens=self.prompt_tokens)
        else:
            layout = layout_image(image=sample.image, config=self.config, max_crops=max_crops)
            ids, positions = build_sequence(layout=layout, prompt=sample.prompt, tokenizer=self.tokenizer)
        inputs = {
            "pixel_values": torch.from_numpy(layout.pixels).to(device=dev, dtype=self.dtype),
            "input_ids": torch.tensor([ids], dtype=torch.long, device=dev),
            "image_positions": torch.from_numpy(positions).to(device=dev, dtype=torch.long),
            "feature_index": torch.from_numpy(layout.feature_index).to(device=dev),
        }
        if self.prompt_tokens is not None:
            inputs["image_masks"] = torch.from_numpy(layout.image_masks).to(device=dev)
            inputs["crop_valid"] = torch.from_numpy(layout.crop_valid).to(device=dev)
        return Prepared(inputs=inputs, num_crops=layout.num_crops, num_vision_tokens=len(positions),
                        num_language_tokens=len(ids) - len(positions), num_total_tokens=len(ids),
                        extras={"tiling": layout.tiling, "max_crops": max_crops,
                                "num_patches": layout.num_crops * self.config.patches_per_side ** 2})

    @torch.inference_mode()
    def vision_encoder(self, prepared: Prepared) -> torch.Tensor:
        """(num_crops, patches, vit_hidden * 2): two ViT layers' patch features, CLS dropped.

        Every crop goes through the ViT in one batch (SDPA attention). The fast backend stops at the
        deepest feature layer instead of running every layer and recording all hidden states, and with
        CUDA graphs replays one graph per crop count."""
        if self.fast is not None:
            return self.fast.vision(vision=self.model.vision, pixel_values=prepared.inputs["pixel_values"],
                                    layers=self.config.vit_feature_layers)
        return self.model.encode_crops(prepared.inputs["pixel_values"])

    @torch.inference_mode()
    def projector(self, prepared: Prepared, features: torch.Tensor) -> torch.Tensor:
        """(num_crops * tokens_per_crop, hidden): 2x2 attention pooling, then the MLP projector."""
        inputs = prepared.inputs
        return self.model.pool_and_project(features, image_masks=inputs.get("image_masks"),
                                           crop_valid=inputs.get("crop_valid"))

    def _embed_prompt(self, prepared: Prepared, embeds: torch.Tensor) -> torch.Tensor:
        """(1, T, H): token embeddings with the image features spliced into the [IMG] positions
        (``image_embed_mode`` 'add', MolmoE: added to the embeddings of those positions)."""
        inputs = prepared.inputs
        hidden = self.model.decoder.model.embed_tokens(inputs["input_ids"])
        place = add_image_embeds if self.config.image_embed_mode == "add" else splice_image_embeds
        place(hidden=hidden, row=0, embeds=embeds, positions=inputs["image_positions"],
              feature_index=inputs["feature_index"])
        return hidden

    @torch.inference_mode()
    def prefill(self, prepared: Prepared, embeds: torch.Tensor) -> DecodeState:
        hidden = self._embed_prompt(prepared, embeds)
        if self.fast is not None:
            logits = self.fast.prefill(hidden=hidden, blocks=self._active)
            return prefill_state(logits=logits, cache=self.fast.cache, position=hidden.shape[1], blocks=self._active,
                                 epoch=self.fast.cache.epoch)
        cache = BlockKVCache()
        logits = self._forward(hidden=hidden, start=0, cache=cache)
        return prefill_state(logits=logits, cache=cache, position=hidden.shape[1], blocks=self._active)

    @torch.inference_mode()
    def decode_step(self, state: DecodeState) -> int:
        check_blocks_unchanged(state=state, active=self._active)
        if self.fast is not None:
            return self._fast_decode_step(state)
        ids = torch.tensor([[state.next_token]], dtype=torch.long, device=self.device)
        hidden = self.model.decoder.model.embed_tokens(ids)
        logits = self._forward(hidden=hidden, start=state.position, cache=state.cache)
        return record_token(state=state, token=greedy_token(logits), logits=logits)

    @torch.inference_mode()
    def decode_run(self, state: DecodeState, *, max_new: int, stop: Optional[int]) -> Optional[Any]:
        """With the fast backend and ``overlap_decode`` (the default), ``FastDecoder.decode_run``: on CUDA the
        host one step ahead of the device; the CUDA event where a stop token left the device is returned
        (the step enqueued past it still runs). Else step by step. ``extras['logits']`` is the decoder's
        static buffer."""
        if self.fast is None or not self.overlap_decode:
            return super().decode_run(state, max_new=max_new, stop=stop)
        check_blocks_unchanged(state=state, active=self._active)
        self._check_fast_cache(state)
        if not state.unfinished(max_new=max_new, stop=stop):
            return None
        for token in self.fast.decode_run(token=state.next_token, position=state.position, blocks=self._active,
                                          steps=max_new - len(state.tokens), stop=stop):
            record_token(state=state, token=token, logits=self.fast.logits)
        return self.fast.stop_event

    def _check_fast_cache(self, state: DecodeState) -> None:
        if state.extras.get("epoch") != self.fast.cache.epoch:
            raise RuntimeError("this decode state's KV cache was overwritten by a later prefill")

    def _fast_decode_step(self, state: DecodeState) -> int:
        """One step of the fast decoder; ``extras['logits']`` is its static buffer (valid until the next step)."""
        self._check_fast_cache(state)
        token = self.fast.decode(token=state.next_token, position=state.position, blocks=self._active)
        return record_token(state=state, token=token, logits=self.fast.logits)

    def _forward(self, *, hidden: torch.Tensor, start: int, cache: Optional[BlockKVCache],
                 blocks: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run the chosen blocks over ``hidden`` at positions ``start ..``; logits of the last position."""
        decoder = self.model.decoder.model
        length = hidden.shape[1]
        position_ids = torch.arange(start, start + length, device=hidden.device).unsqueeze(0)
        position_embeddings = decoder.rotary_emb(hidden, position_ids)
        mask = self._causal_mask(queries=length, keys=start + length, dtype=hidden.dtype)
        for index in (self._active if blocks is None else blocks):
            out = decoder.layers[index](hidden, attention_mask=mask, position_ids=position_ids,
                                        past_key_values=cache, use_cache=cache is not None,
                                        position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.model.decoder.lm_head(decoder.norm(hidden[:, -1]))[0]

    def _causal_mask(self, *, queries: int, keys: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """None for SDPA (it applies causality itself) and for single-token steps; else an additive mask."""
        if queries == 1 or self.attn_implementation == "sdpa":
            return None
        offset = keys - queries
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=self.device).tril(diagonal=offset)
        mask = torch.zeros(queries, keys, dtype=dtype, device=self.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    def decode_text(self, token_ids: Sequence[int]) -> str:
        if self.prompt_tokens is not None and not self.prompt_tokens.word_level:
            return self.prompt_tokens.decode(self.tokenizer, token_ids)
        words = []
        for tid in token_ids:
            tok = self.tokenizer.id_to_token(int(tid))
            if tok is not None and int(tid) >= len(SPECIAL_TOKENS):
                words.append(tok)
        return " ".join(words)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.prompt_tokens.eos if self.prompt_tokens is not None else EOS_ID

    # -- knobs -------------------------------------------------------------------------
    def apply_knobs(self, knobs: Knobs) -> None:
        c = self.config
        check_max_crops(max_crops=knobs.max_crops, limit=c.max_crops)
        self._active = apply_moe_block_knobs(knobs=knobs, routers=self.moe_routers(), num_experts=c.num_experts,
                                             num_blocks=c.num_blocks, default_top_k=c.top_k, seed=self.seed,
                                             scores=self.block_importance)
        self.knobs = knobs

    def restore_knobs(self) -> None:
        set_top_k(routers=self.moe_routers(), top_k=self.config.top_k)
        self._active = tuple(range(self.config.num_blocks))
        self.knobs = Knobs()

    def active_block_indices(self) -> tuple[int, ...]:
        return self._active

    def moe_routers(self) -> list[torch.nn.Module]:
        """The router of every decoder block (``OlmoeTopKRouter``), whether the block runs or not."""
        return [block.mlp.gate for block in self.model.blocks]

    # -- importance ----------------------------------------------------------------------
    def block_importance(self) -> list[float]:
        """Block influence per block (higher: the block changes its input more); cached on disk."""
        if self._importance is None:
            self._importance = cached_importance(identity=self.identity(), compute=self._compute_importance)
        return self._importance

    def _compute_importance(self) -> list[float]:
        """Block influence over the calibration set, routers at the default top_k while it runs."""
        self.importance_computations += 1
        with temporary_top_k(routers=self.moe_routers(), top_k=self.config.top_k):
            return block_influence(blocks=self.model.blocks, samples=calibration_samples(), run=self._calibration_pass)

    def _calibration_pass(self, sample: Sample) -> None:
        """One forward over every block for importance scores (at most 4 crops)."""
        prepared = self.prepare(sample=sample, knobs=Knobs(max_crops=4))
        hidden = self._embed_prompt(prepared, self.projector(prepared, self.vision_encoder(prepared)))
        self._forward(hidden=hidden, start=0, cache=None, blocks=range(self.config.num_blocks))

    # -- introspection -------------------------------------------------------------------
    def decoder_blocks(self) -> Sequence[Any]:
        """The modules that run: hf decoder layers, or the fast backend's ``FastBlock`` modules."""
        if self.fast is not None:
            return [self.fast.blocks[i] for i in self._active]
        return [self.model.blocks[i] for i in self._active]

    def block_parts(self, block: Any) -> dict[str, Any]:
        if self.fast is not None:
            return {"attention": block.attention, "ffn": block.ffn}
        return {"attention": block.self_attn, "ffn": block.mlp}

    @classmethod
    def count_params(cls, *, preset: Optional[str], path: Optional[str],
                     options: dict[str, Any]) -> dict[str, int]:
        """Counted on a 'meta' device build from the config: no weights, no memory."""
        config, _ = _resolve_config(preset=preset, path=path)
        with torch.device("meta"):
            model = FlexMoeModel(config)
        return flexmoe_param_counts(model=model, top_k=config.top_k, active_blocks=range(config.num_blocks))

    def param_counts(self) -> dict[str, int]:
        return flexmoe_param_counts(model=self.model, top_k=self.knobs.top_k or self.config.top_k,
                                    active_blocks=self._active)

    def flops(self, *, prepared: Prepared, num_output_tokens: int, knobs: Knobs) -> dict[str, float]:
        c = self.config
        n_blocks = c.num_blocks if knobs.active_blocks is None else knobs.active_blocks
        return flexmoe_flops(config=c, num_crops=prepared.num_crops, num_prompt_tokens=prepared.num_total_tokens,
                             num_output_tokens=num_output_tokens, top_k=knobs.top_k or c.top_k,
                             num_active_blocks=n_blocks)

    def prefill_path(self) -> str:
        """'graphed' where the fast backend replayed a captured prefill graph, else 'eager'."""
        return self.fast.last_prefill_path if self.fast is not None else "eager"

    def setup_count(self) -> int:
        """CUDA graphs captured so far by every fast decoder of this model (vision, prefill, decode; a graph
        dropped by a decoder's least-recently-used bound and captured again counts again)."""
        return sum(decoder.captures for decoder in self._fast_decoders.values())

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def flexmoe_param_counts(*, model: FlexMoeModel, top_k: int, active_blocks: Sequence[int]) -> dict[str, int]:
    """vision_encoder, projector (pooling + MLP), llm (whole decoder with embeddings and lm_head) and
    llm_active (what one token touches: embeddings, lm_head, final norm, and in each active block
    attention, norms, router and ``top_k`` of the experts). Works on the 'meta' device."""
    vision = numel(model.vision)
    projector = sum(numel(m) for m in model.connector_modules())
    llm = numel(model.decoder)
    active = active_llm_params(llm=llm, blocks=model.blocks, active=active_blocks, num_experts=model.config.num_experts,
                               top_k=top_k, expert_params=lambda block: numel(block.mlp.experts))
    return {"vision_encoder": vision, "projector": projector, "llm": llm, "llm_active": active}
