"""``qwen3_vl_moe``: transformers' Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``) with live knobs.

Presets: ``tiny`` (the default): a random CPU-sized config (2 vision blocks of width 32, one
DeepStack layer, 4 decoder blocks of width 64, 8 experts, top-2, vocab 512) built from the seed,
with a word-level tokenizer made in code whose special-token ids are the config's
``image_token_id`` / ``vision_start_token_id`` / ``vision_end_token_id``. ``path`` loads a local
checkpoint folder (``from_pretrained`` with ``local_files_only``; its tokenizer and image processor
come from the same folder); a missing folder raises ``FileNotFoundError``.

Vision tokens: this family has no crops (``ModelInfo.max_crops_limit = 0``, so a spec with
``max_crops`` is rejected at validation). The image is resized by the image processor so that it
holds at most ``max_pixels`` pixels (Qwen's ``smart_resize``: sides rounded to multiples of
``patch_size * merge_size``); each ``merge_size x merge_size`` patch window becomes one vision token,
and ``Prepared.num_vision_tokens`` is the count that the processor's ``image_grid_thw`` gives.

Options:
    max_pixels: int   pixel budget of the resized image (default 16384 for ``tiny``, the
                      processor's own ``longest_edge`` for a checkpoint).

Stages: ``vision_encoder`` runs the visual tower's patch embedding, position embedding and blocks
and returns the last hidden states plus the hidden states after each DeepStack layer;
``projector`` runs the patch merger (2x2 merge + MLP) and the DeepStack mergers; ``prefill`` splices
the merged features into the image-pad positions and runs the decoder; ``decode_step`` feeds one
token. The decoder loop is the adapter's own over the chosen blocks with a per-block KV cache
(``BlockKVCache``). M-RoPE positions for the prompt come from the model's own ``get_rope_index``;
generated token ``i`` (0-based sequence index) gets position ``i + rope_delta`` on all three axes,
as in the model's ``compute_3d_position_ids``. DeepStack features are added to the image positions
after decoder block ``j`` for ``j < len(deepstack)``, when block ``j`` is among the chosen blocks.

Knobs: ``top_k`` is set on every ``Qwen3VLMoeTextTopKRouter`` (``mlp.gate.top_k``; the router
renormalizes the kept probabilities); ``active_blocks`` picks decoder blocks by policy
(``flexvlm_ray.knobs.blocks``).

FLOPs: ``flops`` gives analytic FLOPs per stage from ``qwen3_vl_moe_flops`` (active blocks and the
``top_k`` routed experts only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tokenizers import Tokenizer

from flexvlm_ray.data.base import Sample
from flexvlm_ray.knobs.blocks import apply_moe_block_knobs, block_influence, cached_importance
from flexvlm_ray.knobs.moe import set_top_k, temporary_top_k
from flexvlm_ray.models.base import (DecodeState, Knobs, ModelAdapter, ModelInfo, Prepared,
                                     register_model)
from flexvlm_ray.models.common import BlockKVCache, calibration_samples
from flexvlm_ray.models.flexmoe.config import WORDS, word_level_tokenizer
from flexvlm_ray.models.hf_common import (active_llm_params, check_blocks_unchanged, check_has_image,
                                          device_and_dtype, greedy_token, model_identity, numel, prefill_state,
                                          record_token, resolve_hf_config, weights_source)

FAMILY = "qwen3_vl_moe"
PRESETS = ("tiny",)
OPTIONS = ("max_pixels",)
TINY_MAX_PIXELS = 128 * 128
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = range(len(SPECIAL_TOKENS))


def tiny_config():
    """The ``tiny`` preset: small random shapes with the real architecture (M-RoPE, DeepStack, MoE)."""
    from transformers import Qwen3VLMoeConfig

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    return Qwen3VLMoeConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_PAD_ID,
                            video_token_id=VIDEO_PAD_ID, vision_start_token_id=VISION_START_ID,
                            vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)


def build_tokenizer(*, vocab_size: int) -> Tokenizer:
    """Word-level tokenizer: the Qwen special tokens above, flexmoe's ``WORDS``, ``[unusedN]`` fillers."""
    tokens = list(SPECIAL_TOKENS) + list(WORDS)
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    return word_level_tokenizer(tokens=tokens, special_tokens=SPECIAL_TOKENS)


def _image_processor_class():
    """``Qwen2VLImageProcessorPil`` where it exists (no torchvision needed), else ``Qwen2VLImageProcessor``."""
    try:
        from transformers import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    except ImportError:
        from transformers import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor


def _check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options for family '{FAMILY}': {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
    pixels = options.get("max_pixels")
    if pixels is not None and (not isinstance(pixels, int) or pixels < 32 * 32):
        raise ValueError(f"max_pixels must be an integer >= 1024, got {pixels!r}")


def _resolve_config(*, preset: Optional[str], path: Optional[str]):
    """(config, checkpoint folder or None for random weights)."""
    return resolve_hf_config(family=FAMILY, preset=preset, path=path, presets=dict.fromkeys(PRESETS, tiny_config))


@register_model(FAMILY)
class Qwen3VLMoeAdapter(ModelAdapter):
    """Qwen3-VL-MoE with top_k, active_blocks and a max_pixels vision-token option."""

    @classmethod
    def describe(cls, *, preset: Optional[str], path: Optional[str], options: dict[str, Any]) -> ModelInfo:
        _check_options(options)
        config, _ = _resolve_config(preset=preset, path=path)
        text = config.text_config
        return ModelInfo(family=FAMILY, preset=preset or "tiny" if path is None else str(path),
                         num_blocks=text.num_hidden_layers, num_experts=text.num_experts,
                         default_top_k=text.num_experts_per_tok, max_crops_limit=0,
                         vision_tokens_per_crop=0, hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                         trained_context=int(getattr(text, "max_position_embeddings", 0) or 0))

    def __init__(self, *, preset: Optional[str], path: Optional[str], dtype: str, device: str,
                 seed: int, options: dict[str, Any]) -> None:
        from transformers import Qwen3VLMoeForConditionalGeneration

        self.info = self.describe(preset=preset, path=path, options=options)
        self.device, self.dtype = device_and_dtype(device=device, dtype=dtype)
        self.seed = int(seed)
        self.config, folder = _resolve_config(preset=preset, path=path)
        self.folder = folder
        self.config._attn_implementation = "sdpa"
        if folder is None:
            torch.manual_seed(self.seed)
            self.model = Qwen3VLMoeForConditionalGeneration(self.config).to(device=self.device, dtype=self.dtype)
            self.tokenizer = build_tokenizer(vocab_size=self.config.text_config.vocab_size)
            self._eos = EOS_ID
            default_pixels = TINY_MAX_PIXELS
            processor_args = {}
        else:
            from transformers import AutoTokenizer
            self.model = Qwen3VLMoeForConditionalGeneration.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False, dtype=self.dtype).to(self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                           trust_remote_code=False).backend_tokenizer
            self._eos = self.config.text_config.eos_token_id
            default_pixels = None
            processor_args = _processor_args_from(folder)
        self.model.eval()
        v = self.config.vision_config
        processor_args.update(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                              merge_size=v.spatial_merge_size)
        self.image_processor = _image_processor_class()(**processor_args)
        self.max_pixels = options.get("max_pixels", default_pixels)
        self.knobs = Knobs()
        self._active: tuple[int, ...] = tuple(range(self.info.num_blocks))
        self._importance: Optional[list[float]] = None

    # -- module access ---------------------------------------------------------------------
    @property
    def visual(self):
        return self.model.model.visual

    @property
    def text_model(self):
        return self.model.model.language_model

    def identity(self) -> dict[str, Any]:
        """What determines the weights (for the importance cache): config, dtype, and the seed or the
        checkpoint folder's resolved path."""
        return model_identity(family=FAMILY, config=self.config, dtype=self.dtype,
                              weights=weights_source(seed=self.seed, folder=self.folder))

    # -- stages ------------------------------------------------------------------------
    def prepare(self, *, sample: Any, knobs: Knobs) -> Prepared:
        if knobs.max_crops is not None:
            raise ValueError(f"max_crops={knobs.max_crops}: family '{FAMILY}' has no crop knob "
                             f"(it sets vision tokens by the max_pixels option)")
        check_has_image(sample=sample)
        kwargs = {}
        if self.max_pixels is not None:
            shortest = self.image_processor.size.shortest_edge or 1024
            kwargs["size"] = {"shortest_edge": min(shortest, self.max_pixels), "longest_edge": self.max_pixels}
        image = sample.image.convert("RGB")
        out = self.image_processor(images=[image], return_tensors="pt", **kwargs)
        grid = out["image_grid_thw"]
        merge = self.config.vision_config.spatial_merge_size
        num_vision = int(grid.prod()) // (merge * merge)
        prompt_ids = self.tokenizer.encode(sample.prompt, add_special_tokens=False).ids
        ids = [self.config.vision_start_token_id]
        ids += [self.config.image_token_id] * num_vision
        ids += [self.config.vision_end_token_id] + list(prompt_ids)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        token_types = (input_ids == self.config.image_token_id).int()
        position_ids, rope_delta = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=grid.to(self.device))
        inputs = {"pixel_values": out["pixel_values"].to(device=self.device, dtype=self.dtype),
                  "image_grid_thw": grid.to(self.device), "input_ids": input_ids,
                  "image_mask": input_ids[0] == self.config.image_token_id,
                  "position_ids": position_ids, "rope_delta": int(rope_delta.reshape(-1)[0])}
        return Prepared(inputs=inputs, num_crops=1, num_vision_tokens=num_vision,
                        num_language_tokens=len(ids) - num_vision, num_total_tokens=len(ids),
                        extras={"image_grid_thw": grid[0].tolist(), "max_pixels": self.max_pixels,
                                "num_patches": int(grid.prod())})

    @property
    def _tiny(self) -> bool:
        return self.config.vision_start_token_id == VISION_START_ID

    @torch.inference_mode()
    def vision_encoder(self, prepared: Prepared) -> dict[str, Any]:
        """{'hidden': (patches, vit_hidden), 'deepstack': [per DeepStack layer (patches, vit_hidden)]}.

        The visual tower's own forward with its merger calls left out: patch embedding, the
        interpolated learned position embedding, vision rotary embedding and every vision block."""
        from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

        visual, grid = self.visual, prepared.inputs["image_grid_thw"]
        kwargs: dict[str, Any] = {}
        idx, weights = m.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=visual.config.spatial_merge_size, kwargs=kwargs)
        position_ids = m.get_vision_position_ids(grid, visual.spatial_merge_size, kwargs=kwargs)
        cu_seqlens, max_seqlen = m.get_vision_attention_seqlens(grid, visual.config, kwargs=kwargs)
        hidden = visual.patch_embed(prepared.inputs["pixel_values"])
        hidden = hidden + (visual.pos_embed(idx) * weights[:, :, None]).sum(1).to(hidden.dtype)
        rotary = visual.rotary_pos_emb(hidden, position_ids)
        deepstack = []
        for layer, block in enumerate(visual.blocks):
            hidden = block(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rotary)
            if layer in visual.deepstack_visual_indexes:
                deepstack.append(hidden)
        return {"hidden": hidden, "deepstack": deepstack}

    @torch.inference_mode()
    def projector(self, prepared: Prepared, features: dict[str, Any]) -> dict[str, Any]:
        """{'image': (vision tokens, hidden), 'deepstack': [(vision tokens, hidden)]}: the patch
        merger (2x2 spatial merge + MLP) and the DeepStack mergers."""
        visual = self.visual
        return {"image": visual.merger(features["hidden"]),
                "deepstack": [merger(h) for merger, h in zip(visual.deepstack_merger_list, features["deepstack"])]}

    @torch.inference_mode()
    def prefill(self, prepared: Prepared, embeds: dict[str, Any]) -> DecodeState:
        inputs = prepared.inputs
        hidden = self._embed_prompt(prepared, embeds)
        cache = BlockKVCache()
        logits = self._forward(hidden=hidden, position_ids=inputs["position_ids"], cache=cache,
                               deepstack=(inputs["image_mask"], embeds["deepstack"]))
        return prefill_state(logits=logits, cache=cache, position=hidden.shape[1], blocks=self._active,
                             rope_delta=inputs["rope_delta"])

    @torch.inference_mode()
    def decode_step(self, state: DecodeState) -> int:
        check_blocks_unchanged(state=state, active=self._active)
        ids = torch.tensor([[state.next_token]], dtype=torch.long, device=self.device)
        hidden = self.text_model.embed_tokens(ids)
        pos = torch.full((3, 1, 1), state.position + state.extras["rope_delta"], dtype=torch.long, device=self.device)
        logits = self._forward(hidden=hidden, position_ids=pos, cache=state.cache, deepstack=None)
        return record_token(state=state, token=greedy_token(logits), logits=logits)

    def _embed_prompt(self, prepared: Prepared, embeds: dict[str, Any]) -> torch.Tensor:
        """Token embeddings with the merged image features written into the image-pad positions."""
        hidden = self.text_model.embed_tokens(prepared.inputs["input_ids"])
        hidden[0, prepared.inputs["image_mask"]] = embeds["image"].to(hidden.dtype)
        return hidden

    def _forward(self, *, hidden: torch.Tensor, position_ids: torch.Tensor, cache: Optional[BlockKVCache],
                 deepstack: Optional[tuple[torch.Tensor, list]], blocks: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run the chosen blocks with M-RoPE ``position_ids`` (3, 1, T); logits of the last position.

        SDPA applies causality itself for a multi-token query starting at cache length 0 (prefill)
        and a single-token query needs no mask, so no mask tensor is built."""
        text = self.text_model
        rotary = text.rotary_emb(hidden, position_ids)
        for index in (self._active if blocks is None else blocks):
            hidden = text.layers[index](hidden, attention_mask=None, position_ids=position_ids[0],
                                        past_key_values=cache, use_cache=cache is not None,
                                        position_embeddings=rotary)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            if deepstack is not None and index < len(deepstack[1]):
                mask, feats = deepstack
                hidden = hidden.clone()
                hidden[0, mask] = hidden[0, mask] + feats[index].to(hidden.dtype)
        return self.model.lm_head(text.norm(hidden[:, -1]))[0]

    def decode_text(self, token_ids: Sequence[int]) -> str:
        if not self._tiny:
            return self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=True)
        words = []
        for tid in token_ids:
            tok = self.tokenizer.id_to_token(int(tid))
            if tok is not None and int(tid) >= len(SPECIAL_TOKENS):
                words.append(tok)
        return " ".join(words)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._eos

    # -- knobs -------------------------------------------------------------------------
    def apply_knobs(self, knobs: Knobs) -> None:
        info = self.info
        if knobs.max_crops is not None:
            raise ValueError(f"max_crops={knobs.max_crops}: family '{FAMILY}' has no crop knob "
                             f"(it sets vision tokens by the max_pixels option)")
        self._active = apply_moe_block_knobs(knobs=knobs, routers=self.moe_routers(), num_experts=info.num_experts,
                                             num_blocks=info.num_blocks, default_top_k=info.default_top_k,
                                             seed=self.seed, scores=self.block_importance)
        self.knobs = knobs

    def restore_knobs(self) -> None:
        set_top_k(routers=self.moe_routers(), top_k=self.info.default_top_k)
        self._active = tuple(range(self.info.num_blocks))
        self.knobs = Knobs()

    def active_block_indices(self) -> tuple[int, ...]:
        return self._active

    def moe_routers(self) -> list[torch.nn.Module]:
        """``mlp.gate`` of every sparse decoder block (dense ``mlp_only_layers`` have none)."""
        return [layer.mlp.gate for layer in self.text_model.layers if hasattr(layer.mlp, "gate")]

    def block_importance(self) -> list[float]:
        """Block influence per block (1 - cos(block input, output), calibration images); cached on disk."""
        if self._importance is None:
            self._importance = cached_importance(identity=self.identity(), compute=self._compute_importance)
        return self._importance

    def _compute_importance(self) -> list[float]:
        """Block influence over the calibration set, routers at the default top_k while it runs."""
        with temporary_top_k(routers=self.moe_routers(), top_k=self.info.default_top_k):
            return block_influence(blocks=self.text_model.layers, samples=calibration_samples(),
                                   run=self._calibration_pass)

    def _calibration_pass(self, sample: Sample) -> None:
        """One forward over every block for importance scores (the default max_pixels)."""
        prepared = self.prepare(sample=sample, knobs=Knobs())
        embeds = self.projector(prepared, self.vision_encoder(prepared))
        self._forward(hidden=self._embed_prompt(prepared, embeds), position_ids=prepared.inputs["position_ids"],
                      cache=None, deepstack=(prepared.inputs["image_mask"], embeds["deepstack"]),
                      blocks=range(self.info.num_blocks))

    # -- introspection -------------------------------------------------------------------
    def decoder_blocks(self) -> Sequence[Any]:
        return [self.text_model.layers[i] for i in self._active]

    def block_parts(self, block: Any) -> dict[str, Any]:
        return {"attention": block.self_attn, "ffn": block.mlp}

    def param_counts(self) -> dict[str, int]:
        """vision_encoder (tower without mergers), projector (merger + DeepStack mergers), llm
        (language model + lm_head) and llm_active (one token: active blocks, top_k experts each)."""
        visual = self.visual
        projector = numel(visual.merger) + numel(visual.deepstack_merger_list)
        llm = numel(self.text_model) + numel(self.model.lm_head)
        active = active_llm_params(
            llm=llm, blocks=self.text_model.layers, active=self._active, num_experts=self.info.num_experts,
            top_k=self.knobs.top_k or self.info.default_top_k,
            expert_params=lambda layer: numel(layer.mlp.experts) if hasattr(layer.mlp, "experts") else 0)   # dense: 0
        return {"vision_encoder": numel(visual) - projector, "projector": projector, "llm": llm, "llm_active": active}

    def flops(self, *, prepared: Prepared, num_output_tokens: int, knobs: Knobs) -> dict[str, float]:
        """Analytic FLOPs per stage (``qwen3_vl_moe_flops``) under the knobs applied now."""
        from flexvlm_ray.models.qwen3_vl_moe.flops import qwen3_vl_moe_flops

        top_k = self.info.default_top_k if knobs.top_k is None else knobs.top_k
        return qwen3_vl_moe_flops(config=self.config, grid_thw=prepared.extras["image_grid_thw"],
                                  num_prompt_tokens=prepared.num_total_tokens, num_output_tokens=num_output_tokens,
                                  top_k=top_k, blocks=self._active)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _processor_args_from(folder: Path) -> dict[str, Any]:
    """The image processor's saved arguments (``preprocessor_config.json``), if the folder has them."""
    import json

    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    keys = ("size", "image_mean", "image_std", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
    return {k: data[k] for k in keys if k in data}
