"""``molmo_remote``: a Molmo / MolmoE checkpoint with its own remote code, from a LOCAL folder.

The folder's ``config.json`` names its Python classes in ``auto_map``; loading runs that code
(``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True)``), so
the family refuses to load unless the spec opts in: ``model.options.trust_remote_code: true`` (or the
spec's top-level ``model.trust_remote_code: true``, which is passed on as that option). Nothing is
downloaded: ``path`` must be a local folder with ``config.json``; there are no presets.

``describe`` reads ``config.json`` and ``preprocessor_config.json`` as JSON and runs no remote code:
blocks from ``n_layers`` (or ``num_hidden_layers``), experts and top-k from ``moe_num_experts`` /
``moe_top_k`` (or ``num_experts`` / ``num_experts_per_tok``; absent: a dense decoder), width from
``d_model`` (or ``hidden_size``).

Knob targets are found structurally (``discover_structure``) on the loaded model: routers (modules
with an integer ``top_k``, set in place), the ``nn.ModuleList`` of decoder blocks and the vision
backbone. MolmoE's released remote code (``modeling_molmoe.py``) builds every MoE layer as one plain
module (``MolmoeSparseMoeBlock``: ``gate``, ``experts``, ``ff_norm``) that reads ``self.top_k`` at
every forward, so those modules are the routers and the top_k knob works on them (softmax then
top-k without renormalisation, as that code does). A config with experts but no module with an
integer ``top_k`` (an MoE whose k is fixed when it is built) is refused.

Call conventions this adapter relies on (those of Molmo's remote code): the module holding the
blocks also holds ``wte`` (embedding), ``ln_f`` (final norm) and ``ff_out`` (LM head; weight-tied
heads are not supported); a block is called ``block(x, attention_bias=..., position_ids=...,
layer_past=(k, v) | None, use_cache=...) -> (x, (k, v))`` with the full additive causal bias, which it
slices itself; the vision backbone has ``encode_image(images) -> (features, cls)`` and
``forward(images, image_masks) -> (features, cls)`` (pooling + projector included); image features
are *added* to the token embeddings at ``image_input_idx``.

Stages: ``vision_encoder`` = ``encode_image``; ``projector`` = the backbone's own ``forward`` with
``encode_image`` answered from the vision stage's output (so pooling and projection are the
checkpoint's code and the ViT does not run twice); ``prefill`` / ``decode_step`` = the adapter's loop
over the chosen blocks, with each block's ``(k, v)`` kept per block index.

Preprocessing is NOT the checkpoint's own ``MolmoProcessor``: images go through this project's
Molmo-style layout (``flexmoe_preprocess.layout_image``: Molmo's tiling and overlapping crops, a
global crop first, pooled tokens of overlapping tile margins dropped, ``<im_col>`` after every row),
with the geometry from ``preprocessor_config.json`` (``base_image_input_size``, ``image_patch_size``,
``max_crops``, ``overlap_margins``, ``image_pooling_h``). It differs from a released Molmo
processor in: resize and padding (aspect kept, centered on black, PIL bilinear) and CLIP
normalization constants, ``image_masks`` (all ones here; Molmo marks padded patches, which its
``image_padding_embed`` uses), the prompt (``BOS`` + image tokens + the prompt's words; Molmo's
processor writes ``User: ... Assistant:`` and may place the image tokens differently), and token
ids taken from the folder's tokenizer by name (``<im_start>``, ``<im_end>``, ``<im_patch>``,
``<im_col>``). Latency shapes follow Molmo's; answer quality of a real checkpoint is not its own.
For a MolmoE checkpoint, ``model: {family: flexmoe, path: DIR}`` runs the same weights with the
checkpoint's own preprocessing and prompt (``flexvlm_ray.models.molmo_preprocess``) and the fast backend.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from flexvlm_ray.data.base import Sample
from flexvlm_ray.knobs.blocks import apply_moe_block_knobs, block_influence, cached_importance
from flexvlm_ray.knobs.moe import set_top_k, temporary_top_k
from flexvlm_ray.models.base import (DecodeState, Knobs, ModelAdapter, ModelInfo, Prepared,
                                     register_model)
from flexvlm_ray.models.discover import discover_structure
from flexvlm_ray.models.common import calibration_samples
from flexvlm_ray.models.flexmoe.config import IM_COL_ID, IM_END_ID, IM_START_ID, IMG_ID, FlexMoeConfig
from flexvlm_ray.models.flexmoe.preprocess import layout_image
from flexvlm_ray.models.hf_common import (active_llm_params, check_blocks_unchanged, check_has_image, check_max_crops,
                                          device_and_dtype, greedy_token, max_crops_for, model_identity, numel,
                                          prefill_state, record_token, weights_source)

FAMILY = "molmo_remote"
OPTIONS = ("trust_remote_code",)
MAX_CROPS_LIMIT = 24
IMAGE_TOKENS = {IM_START_ID: "<im_start>", IM_END_ID: "<im_end>", IMG_ID: "<im_patch>", IM_COL_ID: "<im_col>"}


def _first(data: dict[str, Any], *keys: str, default: Any = None) -> Any:
    return next((data[k] for k in keys if data.get(k) is not None), default)


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text()) if file.is_file() else {}


def _folder(*, preset: Optional[str], path: Optional[str], options: dict[str, Any]) -> Path:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options for family '{FAMILY}': {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
    if preset is not None:
        raise ValueError(f"family '{FAMILY}' has no presets (got '{preset}'); set model.path to a local checkpoint folder")
    if path is None:
        raise ValueError(f"family '{FAMILY}' loads a local checkpoint folder: set model.path")
    if options.get("trust_remote_code") is not True:
        raise ValueError(f"family '{FAMILY}' runs the checkpoint's own Python code (config.json auto_map); "
                         f"opt in with model.options.trust_remote_code: true")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"family '{FAMILY}': no checkpoint at '{path}' (expected a local folder with "
                                f"config.json; nothing is downloaded)")
    if "AutoModelForCausalLM" not in (_read_json(folder / "config.json").get("auto_map") or {}):
        raise ValueError(f"family '{FAMILY}': '{path}/config.json' has no auto_map entry for AutoModelForCausalLM")
    return folder


def image_geometry(folder: Path) -> FlexMoeConfig:
    """Molmo's crop geometry from ``preprocessor_config.json`` (Molmo's defaults where a key is absent)."""
    data = _read_json(folder / "preprocessor_config.json")
    crop_px = int((_first(data, "base_image_input_size", default=[336, 336]))[0])
    patch = int(_first(data, "image_patch_size", default=14))
    margins = tuple(int(m) for m in _first(data, "overlap_margins", default=[4, 4]))
    pool = int(_first(data, "image_pooling_h", default=2))
    return FlexMoeConfig(name=FAMILY, crop_px=crop_px, tiling_patch_px=patch, tiling_margins=margins,
                         max_crops=int(_first(data, "max_crops", default=12)), pool_margin=margins[0] // pool,
                         vit_patch_px=patch)


@register_model(FAMILY)
class MolmoRemoteAdapter(ModelAdapter):
    """A remote-code Molmo / MolmoE with max_crops, top_k (plain-PyTorch routers) and active_blocks."""

    @classmethod
    def describe(cls, *, preset: Optional[str], path: Optional[str], options: dict[str, Any]) -> ModelInfo:
        folder = _folder(preset=preset, path=path, options=options)
        config = _read_json(folder / "config.json")
        blocks = _first(config, "n_layers", "num_hidden_layers")
        if blocks is None:
            raise ValueError(f"family '{FAMILY}': '{path}/config.json' has neither n_layers nor num_hidden_layers")
        experts = int(_first(config, "moe_num_experts", "num_experts", default=0))
        geometry = image_geometry(folder)
        return ModelInfo(family=FAMILY, preset=str(path), num_blocks=int(blocks), num_experts=experts,
                         default_top_k=int(_first(config, "moe_top_k", "num_experts_per_tok", default=0)) if experts else 0,
                         max_crops_limit=MAX_CROPS_LIMIT, vision_tokens_per_crop=geometry.tokens_per_crop,
                         hidden_size=int(_first(config, "d_model", "hidden_size", default=0)),
                         vocab_size=int(_first(config, "vocab_size", default=0)),
                         trained_context=int(_first(config, "max_sequence_length", "max_position_embeddings",
                                                     default=0)))

    def __init__(self, *, preset: Optional[str], path: Optional[str], dtype: str, device: str,
                 seed: int, options: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.info = self.describe(preset=preset, path=path, options=options)
        self.device, self.dtype = device_and_dtype(device=device, dtype=dtype)
        self.seed = int(seed)
        self.folder = Path(path)
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, trust_remote_code=True, local_files_only=True,
                                                          dtype=self.dtype).to(self.device)
        self.model.eval()
        self.structure = discover_structure(self.model)
        if self.info.num_experts and not self.structure.routers:
            raise ValueError(f"family '{FAMILY}': config.json has {self.info.num_experts} experts but no module with an "
                             f"integer top_k was found (an MoE that fixes top_k when it is built)")
        router_k = sorted({r.top_k for r in self.structure.routers})
        if self.info.num_experts and router_k != [self.info.default_top_k]:
            raise ValueError(f"family '{FAMILY}': routers have top_k {router_k}, config.json says "
                             f"{self.info.default_top_k} (moe_top_k / num_experts_per_tok)")
        if len(self.structure.blocks) != self.info.num_blocks:
            raise ValueError(f"family '{FAMILY}': found {len(self.structure.blocks)} blocks at "
                             f"'{self.structure.blocks_name}', config.json says {self.info.num_blocks}")
        parent = self.structure.blocks_name.rsplit(".", 1)[0]
        self.transformer = self.model.get_submodule(parent) if "." in self.structure.blocks_name else self.model
        missing = [n for n in ("wte", "ln_f", "ff_out") if not hasattr(self.transformer, n)]
        if self.structure.vision_name is None:
            missing.append("a vision backbone")
        if missing:
            raise ValueError(f"family '{FAMILY}': '{parent}' lacks {', '.join(missing)} (Molmo's remote-code layout)")
        self.vision = self.model.get_submodule(self.structure.vision_name)
        if not hasattr(self.vision, "encode_image"):
            raise ValueError(f"family '{FAMILY}': the vision backbone '{self.structure.vision_name}' has no encode_image")
        auto = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=True, local_files_only=True)
        self.tokenizer = auto.backend_tokenizer
        self._eos = auto.eos_token_id
        self._bos = auto.bos_token_id if auto.bos_token_id is not None else auto.eos_token_id
        self.token_map = {ours: self.tokenizer.token_to_id(name) for ours, name in IMAGE_TOKENS.items()}
        absent = [IMAGE_TOKENS[k] for k, v in self.token_map.items() if v is None]
        if absent:
            raise ValueError(f"family '{FAMILY}': the tokenizer has no {absent} tokens")
        self.geometry = image_geometry(self.folder)
        self.knobs = Knobs()
        self._active: tuple[int, ...] = tuple(range(self.info.num_blocks))
        self._importance: Optional[list[float]] = None

    def identity(self) -> dict[str, Any]:
        """What determines the weights (for the importance cache): config, dtype and the checkpoint folder."""
        return model_identity(family=FAMILY, config=self.model.config, dtype=self.dtype,
                              weights=weights_source(seed=self.seed, folder=self.folder))

    # -- stages ------------------------------------------------------------------------
    def prepare(self, *, sample: Any, knobs: Knobs) -> Prepared:
        check_has_image(sample=sample)
        max_crops = max_crops_for(knobs=knobs, default=self.geometry.max_crops, limit=MAX_CROPS_LIMIT)
        layout = layout_image(image=sample.image, config=self.geometry, max_crops=max_crops)
        image_ids = [self.token_map.get(t, t) for t in layout.image_tokens]
        prompt_ids = self.tokenizer.encode(sample.prompt or "", add_special_tokens=False).ids
        ids = [self._bos] + image_ids + list(prompt_ids)
        positions = np.flatnonzero(np.array(ids) == self.token_map[IMG_ID])
        per_crop = self.geometry.tokens_per_crop
        index = np.full(layout.num_crops * per_crop, -1, dtype=np.int64)
        index[layout.feature_index] = positions
        p = self.geometry.vit_patch_px
        crops = torch.from_numpy(layout.pixels).permute(0, 2, 3, 1)            # (n, H, W, 3)
        n, height, width, _ = crops.shape
        patches = crops.reshape(n, height // p, p, width // p, p, 3).permute(0, 1, 3, 2, 4, 5)
        images = patches.reshape(1, n, (height // p) * (width // p), p * p * 3)   # Molmo: n (dy dx) (h w c)
        inputs = {"images": images.to(device=self.device, dtype=self.dtype),
                  "image_masks": torch.ones(images.shape[:3], device=self.device, dtype=self.dtype),
                  "image_input_idx": torch.from_numpy(index).view(1, n, per_crop).to(self.device),
                  "input_ids": torch.tensor([ids], dtype=torch.long, device=self.device)}
        return Prepared(inputs=inputs, num_crops=n, num_vision_tokens=len(positions),
                        num_language_tokens=len(ids) - len(positions), num_total_tokens=len(ids),
                        extras={"tiling": list(layout.tiling), "max_crops": max_crops,
                                "num_patches": int(images.shape[1] * images.shape[2])})

    @torch.inference_mode()
    def vision_encoder(self, prepared: Prepared) -> Any:
        return self.vision.encode_image(prepared.inputs["images"])

    @torch.inference_mode()
    def projector(self, prepared: Prepared, features: Any) -> dict[str, torch.Tensor]:
        """{'features': (vision tokens, hidden), 'positions': their sequence positions}."""
        inputs = prepared.inputs
        self.vision.encode_image = lambda images: features       # the backbone's forward reuses the ViT output
        try:
            pooled = self.vision(inputs["images"], inputs["image_masks"])
        finally:
            del self.vision.encode_image
        pooled = pooled[0] if isinstance(pooled, tuple) else pooled
        index = inputs["image_input_idx"].reshape(-1)
        valid = index >= 0
        return {"features": pooled.reshape(-1, pooled.shape[-1])[valid], "positions": index[valid]}

    @torch.inference_mode()
    def prefill(self, prepared: Prepared, embeds: dict[str, torch.Tensor]) -> DecodeState:
        hidden = self._embed_prompt(prepared, embeds)
        cache: dict[int, Any] = {}
        logits = self._forward(hidden=hidden, start=0, cache=cache)
        return prefill_state(logits=logits, cache=cache, position=hidden.shape[1], blocks=self._active)

    @torch.inference_mode()
    def decode_step(self, state: DecodeState) -> int:
        check_blocks_unchanged(state=state, active=self._active)
        hidden = self.transformer.wte(torch.tensor([[state.next_token]], dtype=torch.long, device=self.device))
        logits = self._forward(hidden=hidden, start=state.position, cache=state.cache)
        return record_token(state=state, token=greedy_token(logits), logits=logits)

    def _embed_prompt(self, prepared: Prepared, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.transformer.wte(prepared.inputs["input_ids"]).clone()
        hidden[0, embeds["positions"]] += embeds["features"].to(hidden.dtype)
        return hidden

    def _forward(self, *, hidden: torch.Tensor, start: int, cache: Optional[dict[int, Any]],
                 blocks: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run the chosen blocks on positions ``start ..`` with Molmo's call convention; last-position logits."""
        total = start + hidden.shape[1]
        bias = self._causal_bias(total, hidden.device)
        positions = torch.arange(start, total, device=hidden.device)[None]
        for index in (self._active if blocks is None else blocks):
            hidden, present = self.structure.blocks[index](
                hidden, attention_bias=bias, position_ids=positions,
                layer_past=None if cache is None else cache.get(index), use_cache=cache is not None)
            if cache is not None:
                cache[index] = present
        logits = self.transformer.ff_out(self.transformer.ln_f(hidden[:, -1]))[0]
        return logits[: self.info.vocab_size] if self.info.vocab_size else logits

    def _causal_bias(self, total: int, device: torch.device) -> torch.Tensor:
        """(1, 1, L, L) additive causal bias with L >= total, kept between calls (as Molmo's own
        ``get_causal_attention_bias`` keeps it), so decode steps do not rebuild an L x L tensor."""
        cached = getattr(self, "_bias", None)
        if cached is None or cached.shape[-1] < total or cached.device != device:
            size = max(total, 2 * (0 if cached is None else cached.shape[-1]), 256)
            cached = torch.triu(torch.full((size, size), torch.finfo(torch.float32).min, device=device),
                                diagonal=1)[None, None]
            self._bias = cached
        return cached

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=True)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._eos

    # -- knobs -------------------------------------------------------------------------
    def apply_knobs(self, knobs: Knobs) -> None:
        check_max_crops(max_crops=knobs.max_crops, limit=MAX_CROPS_LIMIT)
        info = self.info
        self._active = apply_moe_block_knobs(knobs=knobs, routers=self.structure.routers, num_experts=info.num_experts,
                                             num_blocks=info.num_blocks, default_top_k=info.default_top_k,
                                             seed=self.seed, scores=self.block_importance)
        self.knobs = knobs

    def restore_knobs(self) -> None:
        if self.structure.routers:
            set_top_k(routers=self.structure.routers, top_k=self.info.default_top_k)
        self._active = tuple(range(self.info.num_blocks))
        self.knobs = Knobs()

    def active_block_indices(self) -> tuple[int, ...]:
        return self._active

    def moe_routers(self) -> list[torch.nn.Module]:
        return list(self.structure.routers)

    def block_importance(self) -> list[float]:
        if self._importance is None:
            self._importance = cached_importance(identity=self.identity(), compute=self._compute_importance)
        return self._importance

    def _compute_importance(self) -> list[float]:
        """Block influence over the calibration set, routers (if any) at the default top_k while it runs."""
        with temporary_top_k(routers=self.structure.routers, top_k=self.info.default_top_k):
            return block_influence(blocks=self.structure.blocks, samples=calibration_samples(),
                                   run=self._calibration_pass)

    def _calibration_pass(self, sample: Sample) -> None:
        """One forward over every block for importance scores (at most 4 crops)."""
        prepared = self.prepare(sample=sample, knobs=Knobs(max_crops=4))
        hidden = self._embed_prompt(prepared, self.projector(prepared, self.vision_encoder(prepared)))
        self._forward(hidden=hidden, start=0, cache=None, blocks=range(self.info.num_blocks))

    # -- introspection -------------------------------------------------------------------
    def crop_geometry(self) -> dict[str, Any]:
        g = self.geometry
        return {"crop_px": g.crop_px, "patch_px": g.tiling_patch_px, "margins": tuple(g.tiling_margins)}

    def decoder_blocks(self) -> Sequence[Any]:
        return [self.structure.blocks[i] for i in self._active]

    def param_counts(self) -> dict[str, int]:
        """vision_encoder (the backbone without its pooling/projector children), projector (children of
        the backbone whose name contains 'pool' or 'projector'), llm (everything else) and llm_active:
        skipped blocks left out and, per active block, only top_k / num_experts of its parameters whose
        name contains 'expert' (a structural rule: experts stored under other names count as dense)."""
        total = numel(self.model)
        vision = numel(self.vision)
        projector = sum(numel(m) for n, m in self.vision.named_children() if "pool" in n or "projector" in n)
        llm = total - vision
        active = active_llm_params(
            llm=llm, blocks=self.structure.blocks, active=self._active, num_experts=self.info.num_experts,
            top_k=self.knobs.top_k or self.info.default_top_k,
            expert_params=lambda block: sum(p.numel() for n, p in block.named_parameters() if "expert" in n))
        return {"vision_encoder": vision - projector, "projector": projector, "llm": llm, "llm_active": active}

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
