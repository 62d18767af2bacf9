"""``molmo2``: transformers' native Molmo2 (``Molmo2ForConditionalGeneration``) with live knobs.

Needs a transformers release that ships ``transformers.models.molmo2`` (written against 5.23.0);
without it, ``describe`` and loading raise ``Molmo2Unavailable`` naming the version.

Presets: ``tiny`` (the default): a random CPU-sized config built from the seed (2 ViT layers of width
32 on 168 px crops of 14 px patches, a 2x2 attention-pooling adapter, 4 dense decoder blocks of width
64, vocab 512 + 16 additional image tokens) with a word-level tokenizer made in code whose image
tokens (``<im_start>``, ``<im_patch>``, ``<im_col>`` ...) sit at the config's ids. ``path`` loads a
local checkpoint folder (``from_pretrained`` with ``local_files_only``; tokenizer and
``preprocessor_config.json`` from the same folder); a missing folder raises ``FileNotFoundError``.
``Molmo2Adapter.save_pretrained`` writes such a folder (model, tokenizer, image settings). Of a
checkpoint's ``preprocessor_config.json`` the transformers-format keys are read (``size``,
``patch_size``, ``max_crops``, ``overlap_margins``, ``pooling_size``, ``image_mean``, ``image_std``,
``rescale_factor``; absent keys: ``Molmo2ImageProcessor``'s defaults); ``processor_config.json`` is
not read: column tokens and the low-resolution start token follow ``Molmo2Processor``'s defaults.

Vision tokens: the ``max_crops`` knob (default: the image processor's ``max_crops``, 8). Images go
through ``molmo2_preprocess`` (a port of ``Molmo2ImageProcessor``, which needs torchvision): overlapping
crops chosen by Molmo's tiling plus one low-resolution crop, 2x2 pooling windows. ``num_crops`` counts
the crops the ViT sees (tiles + 1); ``num_vision_tokens`` the ``<im_patch>`` positions (one pooled
feature each). The prompt is ``BOS`` + image tokens + the prompt's words: no chat template is applied
(a released checkpoint is prompted through its chat template; answer quality of a real checkpoint
measured here is therefore not the model card's).

Stages: ``vision_encoder`` runs the ViT over every crop and returns the concatenated features of
``adapter_config.vision_feature_layer``; ``projector`` is the adapter (attention pooling over each
window + SwiGLU MLP); ``prefill`` *adds* the pooled features to the ``<im_patch>`` embeddings (as the
model does) and runs the decoder with the model's prefill mask (causal, plus bidirectional attention
among all image tokens); ``decode_step`` feeds one token. The decoder loop is the adapter's own over
the chosen blocks with a per-block KV cache (``BlockKVCache``); each block gets the scaled or unscaled
rotary embedding that the model assigns to it (``rope_scaling_layers``).

Knobs: ``active_blocks`` (policies prefix / importance / random); the decoder is dense, so ``top_k``
is rejected (``ModelInfo.num_experts = 0``). ``flops`` gives analytic FLOPs per stage
(``molmo2_flops``).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tokenizers import Tokenizer

from flexvlm_ray.data.base import Sample
from flexvlm_ray.knobs.blocks import block_influence, cached_importance, select_blocks, validate_active_blocks
from flexvlm_ray.knobs.moe import validate_top_k
from flexvlm_ray.models.base import (DecodeState, Knobs, ModelAdapter, ModelInfo, Prepared,
                                     register_model)
from flexvlm_ray.models.common import BlockKVCache, calibration_samples
from flexvlm_ray.models.flexmoe.config import WORDS, word_level_tokenizer
from flexvlm_ray.models.hf_common import (check_blocks_unchanged, check_has_image, check_max_crops, device_and_dtype,
                                          greedy_token, max_crops_for, model_identity, numel, prefill_state,
                                          record_token, resolve_hf_config, weights_source)
from flexvlm_ray.models.molmo2.preprocess import (IMAGE_TOKEN_NAMES, Molmo2ImageSettings, image_token_ids,
                                                  preprocess_image)

FAMILY = "molmo2"
PRESETS = ("tiny",)
OPTIONS = ()
NEEDED_TRANSFORMERS = "5.23.0"
MAX_CROPS_LIMIT = 24
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "<|endoftext|>")
PAD_ID, UNK_ID, EOS_ID = range(len(SPECIAL_TOKENS))
TINY_VOCAB, TINY_ADDITIONAL = 512, 16
# additional-vocabulary tokens in the order of Molmo2Config's default ids (image_start = vocab + 0, ...)
ADDITIONAL_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>",
                     "<im_low>", "<frame_start>", "<frame_end>")
TINY_IMAGE = Molmo2ImageSettings(crop_px=168, patch_size=14, max_crops=8)


class Molmo2Unavailable(ImportError, ValueError):
    """The installed transformers has no ``transformers.models.molmo2``."""


def molmo2_module():
    """``transformers.models.molmo2``, or ``Molmo2Unavailable`` naming the transformers version needed."""
    try:
        return importlib.import_module("transformers.models.molmo2")
    except ImportError:
        import transformers

        raise Molmo2Unavailable(
            f"family '{FAMILY}' needs transformers>={NEEDED_TRANSFORMERS} (transformers.models.molmo2); "
            f"installed: transformers {transformers.__version__}") from None


def tiny_config():
    """The ``tiny`` preset: small random shapes with the real architecture."""
    m = molmo2_module()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, image_size=[TINY_IMAGE.crop_px] * 2,
                  patch_size=TINY_IMAGE.patch_size)
    adapter = dict(vision_feature_layer=[-1, -2], hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=16, intermediate_size=96, text_hidden_size=64)
    text = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=TINY_VOCAB,
                additional_vocab_size=TINY_ADDITIONAL, num_hidden_layers=4, intermediate_size=128,
                max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ids = {name: TINY_VOCAB + i for i, name in enumerate(ADDITIONAL_TOKENS)}
    return m.Molmo2Config(vision_config=vision, adapter_config=adapter, text_config=text,
                          image_start_token_id=ids["<im_start>"], image_end_token_id=ids["<im_end>"],
                          image_patch_id=ids["<im_patch>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
                          frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"])


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer: specials, flexmoe's ``WORDS``, fillers to 512, then the 16 additional tokens."""
    tokens = list(SPECIAL_TOKENS) + list(WORDS)
    tokens += [f"[unused{i}]" for i in range(TINY_VOCAB - len(tokens))]
    tokens += list(ADDITIONAL_TOKENS) + [f"[extra{i}]" for i in range(TINY_ADDITIONAL - len(ADDITIONAL_TOKENS))]
    return word_level_tokenizer(tokens=tokens, special_tokens=list(SPECIAL_TOKENS) + list(ADDITIONAL_TOKENS))


def _check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options for family '{FAMILY}': {sorted(unknown)}; allowed: none")


def _resolve_config(*, preset: Optional[str], path: Optional[str]):
    """(config, checkpoint folder or None for random weights)."""
    molmo2_module()
    return resolve_hf_config(family=FAMILY, preset=preset, path=path, presets=dict.fromkeys(PRESETS, tiny_config))


def image_settings_from(folder: Optional[Path]) -> Molmo2ImageSettings:
    """The tiny preset's settings, or a checkpoint's ``preprocessor_config.json`` over the defaults."""
    if folder is None:
        return TINY_IMAGE
    file = folder / "preprocessor_config.json"
    data = json.loads(file.read_text()) if file.is_file() else {}
    base = Molmo2ImageSettings()
    size = data.get("size") or {}
    return Molmo2ImageSettings(
        crop_px=int(size.get("height", base.crop_px)), patch_size=int(data.get("patch_size", base.patch_size)),
        max_crops=int(data.get("max_crops", base.max_crops)),
        overlap_margins=tuple(data.get("overlap_margins", base.overlap_margins)),
        pooling_size=tuple(data.get("pooling_size", base.pooling_size)),
        image_mean=tuple(data.get("image_mean", base.image_mean)), image_std=tuple(data.get("image_std", base.image_std)),
        rescale_factor=float(data.get("rescale_factor", base.rescale_factor)))


@register_model(FAMILY)
class Molmo2Adapter(ModelAdapter):
    """Molmo2 with max_crops and active_blocks."""

    @classmethod
    def describe(cls, *, preset: Optional[str], path: Optional[str], options: dict[str, Any]) -> ModelInfo:
        _check_options(options)
        config, folder = _resolve_config(preset=preset, path=path)
        text, image = config.text_config, image_settings_from(folder)
        per_side = -(-(image.crop_px // image.patch_size) // image.pooling_size[0])
        return ModelInfo(family=FAMILY, preset=preset or "tiny" if path is None else str(path),
                         num_blocks=text.num_hidden_layers, num_experts=0, default_top_k=0,
                         max_crops_limit=MAX_CROPS_LIMIT, vision_tokens_per_crop=per_side * per_side,
                         hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                         trained_context=int(getattr(text, "max_position_embeddings", 0) or 0))

    def __init__(self, *, preset: Optional[str], path: Optional[str], dtype: str, device: str,
                 seed: int, options: dict[str, Any]) -> None:
        self.info = self.describe(preset=preset, path=path, options=options)
        m = molmo2_module()
        self.device, self.dtype = device_and_dtype(device=device, dtype=dtype)
        self.seed = int(seed)
        self.config, self.folder = _resolve_config(preset=preset, path=path)
        self.config._attn_implementation = "sdpa"
        if self.folder is None:
            torch.manual_seed(self.seed)
            self.model = m.Molmo2ForConditionalGeneration(self.config).to(device=self.device, dtype=self.dtype)
            self.tokenizer = build_tokenizer()
            self._eos, self._bos = EOS_ID, EOS_ID
        else:
            from transformers import AutoTokenizer
            self.model = m.Molmo2ForConditionalGeneration.from_pretrained(
                self.folder, local_files_only=True, trust_remote_code=False, dtype=self.dtype).to(self.device)
            auto = AutoTokenizer.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
            self.tokenizer = auto.backend_tokenizer
            self._eos = auto.eos_token_id
            self._bos = auto.bos_token_id if auto.bos_token_id is not None else auto.eos_token_id
        self.model.eval()
        self.image_settings = image_settings_from(self.folder)
        self.token_ids = {name: self.tokenizer.token_to_id(name) for name in IMAGE_TOKEN_NAMES}
        missing = [n for n in ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<im_end>")
                   if self.token_ids[n] is None]
        if missing:
            raise ValueError(f"family '{FAMILY}': the tokenizer has no {missing} tokens")
        if self.token_ids["<im_patch>"] != self.config.image_patch_id:
            raise ValueError(f"family '{FAMILY}': tokenizer '<im_patch>' is {self.token_ids['<im_patch>']}, "
                             f"config image_patch_id is {self.config.image_patch_id}")
        self.knobs = Knobs()
        self._active: tuple[int, ...] = tuple(range(self.info.num_blocks))
        self._importance: Optional[list[float]] = None

    # -- module access ---------------------------------------------------------------------
    @property
    def vision(self):
        return self.model.model.vision_tower

    @property
    def connector(self):
        return self.model.model.multi_modal_projector

    @property
    def text_model(self):
        return self.model.model.language_model

    def identity(self) -> dict[str, Any]:
        """What determines the weights (for the importance cache)."""
        return model_identity(family=FAMILY, config=self.config, dtype=self.dtype,
                              weights=weights_source(seed=self.seed, folder=self.folder))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a checkpoint folder that ``path:`` loads: model, tokenizer, image settings."""
        from transformers import PreTrainedTokenizerFast

        folder = Path(folder)
        self.model.save_pretrained(folder)
        eos = self.tokenizer.id_to_token(self._eos)
        PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, eos_token=eos, bos_token=eos,
                                pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
        s = self.image_settings
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Molmo2ImageProcessor", "size": {"height": s.crop_px, "width": s.crop_px},
            "patch_size": s.patch_size, "max_crops": s.max_crops, "overlap_margins": list(s.overlap_margins),
            "pooling_size": list(s.pooling_size), "image_mean": list(s.image_mean), "image_std": list(s.image_std),
            "rescale_factor": s.rescale_factor}, indent=1))
        return folder

    # -- stages ------------------------------------------------------------------------
    def prepare(self, *, sample: Any, knobs: Knobs) -> Prepared:
        check_has_image(sample=sample)
        max_crops = max_crops_for(knobs=knobs, default=self.image_settings.max_crops, limit=MAX_CROPS_LIMIT)
        image = preprocess_image(image=sample.image, settings=self.image_settings, max_crops=max_crops)
        prompt_ids = self.tokenizer.encode(sample.prompt or "", add_special_tokens=False).ids
        ids = [self._bos] + image_token_ids(grid=image.grid, ids=self.token_ids) + list(prompt_ids)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        image_types = [v for v in self.token_ids.values() if v is not None]
        is_image = torch.isin(input_ids[0], torch.tensor(image_types, device=self.device))
        patch_mask = input_ids[0] == self.config.image_patch_id
        num_vision = int(patch_mask.sum())
        if num_vision != image.num_vision_tokens:
            raise AssertionError(f"{num_vision} <im_patch> tokens for {image.num_vision_tokens} pooled features")
        inputs = {"pixel_values": image.pixel_values.to(device=self.device, dtype=self.dtype),
                  "image_token_pooling": image.token_pooling.to(self.device), "input_ids": input_ids,
                  "patch_mask": patch_mask, "mm_token_type_ids": is_image.long()[None],
                  "image_grids": torch.tensor([image.grid], dtype=torch.long, device=self.device)}
        return Prepared(inputs=inputs, num_crops=image.num_crops, num_vision_tokens=num_vision,
                        num_language_tokens=len(ids) - num_vision, num_total_tokens=len(ids),
                        extras={"tiling": list(image.tiling), "image_grid": image.grid, "max_crops": max_crops,
                                "num_patches": int(image.pixel_values.shape[0] * image.pixel_values.shape[1])})

    @torch.inference_mode()
    def vision_encoder(self, prepared: Prepared) -> torch.Tensor:
        """(crops, patches, vit_hidden * len(vision_feature_layer)): patch embedding, position
        embedding and every ViT layer; the outputs of the configured layers concatenated."""
        vision = self.vision
        hidden = vision.patch_embedding(prepared.inputs["pixel_values"].to(vision.dtype))
        hidden = hidden + vision.positional_embedding[None].to(hidden)
        outputs = []
        for layer in vision.layers:
            hidden = layer(hidden, None)
            outputs.append(hidden)
        num = len(outputs)
        return torch.cat([outputs[i if i >= 0 else num + i] for i in
                          self.config.adapter_config.vision_feature_layer], dim=-1)

    @torch.inference_mode()
    def projector(self, prepared: Prepared, features: torch.Tensor) -> torch.Tensor:
        """(vision tokens, hidden): attention pooling over each window, then the SwiGLU projector."""
        return self.connector(features, prepared.inputs["image_token_pooling"]).last_hidden_state

    @torch.inference_mode()
    def prefill(self, prepared: Prepared, embeds: torch.Tensor) -> DecodeState:
        inputs = prepared.inputs
        hidden = self._embed_prompt(prepared, embeds)
        cache = BlockKVCache()
        logits = self._forward(hidden=hidden, start=0, cache=cache, mask=self._prefill_mask(prepared))
        return prefill_state(logits=logits, cache=cache, position=hidden.shape[1], blocks=self._active,
                             num_prompt_tokens=int(inputs["input_ids"].shape[1]))

    @torch.inference_mode()
    def decode_step(self, state: DecodeState) -> int:
        check_blocks_unchanged(state=state, active=self._active)
        ids = torch.tensor([[state.next_token]], dtype=torch.long, device=self.device)
        hidden = self.text_model.embed_tokens(ids)
        logits = self._forward(hidden=hidden, start=state.position, cache=state.cache, mask=None)
        return record_token(state=state, token=greedy_token(logits), logits=logits)

    def _embed_prompt(self, prepared: Prepared, embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the pooled features added at the ``<im_patch>`` positions (as the model does)."""
        hidden = self.text_model.embed_tokens(prepared.inputs["input_ids"])
        mask = prepared.inputs["patch_mask"]
        hidden[0, mask] = hidden[0, mask] + embeds.to(hidden.dtype)
        return hidden

    @staticmethod
    def _prefill_mask(prepared: Prepared, extra: int = 0) -> torch.Tensor:
        """(1, 1, T, T) bool, True = attend: causal, plus image tokens among themselves (the model's
        ``block_sequence_ids`` overlay); ``extra`` text positions appended after the prompt."""
        image = prepared.inputs["mm_token_type_ids"][0].bool()
        if extra:
            image = torch.cat([image, torch.zeros(extra, dtype=torch.bool, device=image.device)])
        n = image.shape[0]
        causal = torch.ones(n, n, dtype=torch.bool, device=image.device).tril()
        return (causal | (image[:, None] & image[None, :]))[None, None]

    def _forward(self, *, hidden: torch.Tensor, start: int, cache: Optional[BlockKVCache],
                 mask: Optional[torch.Tensor], blocks: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run the chosen blocks on positions ``start ..``; logits of the last position.

        A single-token query (decode) attends to the whole cache and needs no mask."""
        text = self.text_model
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
        rotary = {"scaled": text.rotary_emb(hidden, positions), "unscaled": text.rotary_emb_unscaled(hidden, positions)}
        for index in (self._active if blocks is None else blocks):
            hidden = text.layers[index](hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                        use_cache=cache is not None, position_embeddings=rotary[text.rope_types[index]])
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.model.lm_head(text.norm(hidden[:, -1]))[0]

    def decode_text(self, token_ids: Sequence[int]) -> str:
        if self.folder is not None:
            return self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=True)
        words = []
        for tid in token_ids:
            tok = self.tokenizer.id_to_token(int(tid))
            if tok is not None and len(SPECIAL_TOKENS) <= int(tid) < TINY_VOCAB:
                words.append(tok)
        return " ".join(words)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._eos

    # -- knobs -------------------------------------------------------------------------
    def apply_knobs(self, knobs: Knobs) -> None:
        validate_top_k(top_k=knobs.top_k, num_experts=0)
        validate_active_blocks(active_blocks=knobs.active_blocks, num_blocks=self.info.num_blocks,
                               policy=knobs.block_policy)
        check_max_crops(max_crops=knobs.max_crops, limit=MAX_CROPS_LIMIT)
        if knobs.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={knobs.max_new_tokens} is out of range: allowed >= 0")
        self._active = select_blocks(active_blocks=knobs.active_blocks, num_blocks=self.info.num_blocks,
                                     policy=knobs.block_policy, seed=self.seed, scores=self.block_importance)
        self.knobs = knobs

    def restore_knobs(self) -> None:
        self._active = tuple(range(self.info.num_blocks))
        self.knobs = Knobs()

    def crop_geometry(self) -> dict[str, Any]:
        """``crop_grid`` arguments of this model's tiling (for ``verify_knobs``)."""
        s = self.image_settings
        return {"crop_px": s.crop_px, "patch_px": s.patch_size, "margins": tuple(s.overlap_margins)}

    def active_block_indices(self) -> tuple[int, ...]:
        return self._active

    def moe_routers(self) -> list[torch.nn.Module]:
        return []

    def block_importance(self) -> list[float]:
        """Block influence per block (1 - cos(block input, output), calibration images); cached on disk."""
        if self._importance is None:
            self._importance = cached_importance(identity=self.identity(), compute=self._compute_importance)
        return self._importance

    def _compute_importance(self) -> list[float]:
        """Block influence over the calibration set (a dense decoder: no routers to hold at top_k)."""
        return block_influence(blocks=self.text_model.layers, samples=calibration_samples(), run=self._calibration_pass)

    def _calibration_pass(self, sample: Sample) -> None:
        """One forward over every block for importance scores (at most 4 crops)."""
        prepared = self.prepare(sample=sample, knobs=Knobs(max_crops=4))
        hidden = self._embed_prompt(prepared, self.projector(prepared, self.vision_encoder(prepared)))
        self._forward(hidden=hidden, start=0, cache=None, mask=self._prefill_mask(prepared),
                      blocks=range(self.info.num_blocks))

    # -- introspection -------------------------------------------------------------------
    def decoder_blocks(self) -> Sequence[Any]:
        return [self.text_model.layers[i] for i in self._active]

    def block_parts(self, block: Any) -> dict[str, Any]:
        return {"attention": block.self_attn, "ffn": block.mlp}

    def param_counts(self) -> dict[str, int]:
        """vision_encoder (ViT), projector (pooling attention + MLP), llm (language model + lm_head;
        the embedding table includes the additional image-token rows) and llm_active (skipped blocks left out)."""
        llm = numel(self.text_model) + numel(self.model.lm_head)
        active = llm - sum(numel(layer) for i, layer in enumerate(self.text_model.layers) if i not in self._active)
        return {"vision_encoder": numel(self.vision), "projector": numel(self.connector), "llm": llm,
                "llm_active": active}

    def flops(self, *, prepared: Prepared, num_output_tokens: int, knobs: Knobs) -> dict[str, float]:
        """Analytic FLOPs per stage (``molmo2_flops``) over the blocks that run now."""
        from flexvlm_ray.models.molmo2.flops import molmo2_flops

        inputs = prepared.inputs
        return molmo2_flops(config=self.config, num_crops=prepared.num_crops,
                            patches_per_crop=int(inputs["pixel_values"].shape[1]),
                            num_vision_tokens=prepared.num_vision_tokens,
                            window=int(inputs["image_token_pooling"].shape[1]),
                            num_prompt_tokens=prepared.num_total_tokens,
                            num_image_tokens=int(inputs["mm_token_type_ids"].sum()),
                            num_output_tokens=num_output_tokens, num_active_blocks=len(self._active))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
