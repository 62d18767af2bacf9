"""Shape of a ``flexmoe`` model (a MolmoE-style VLM built from transformers modules) and its tokenizer.

A ``FlexMoeConfig`` is plain data: it is written as ``config.json`` next to the weights and read
back by ``load_flexmoe``. ``PRESETS`` holds the two built-in shapes:

* ``tiny``: a CPU-sized model with Molmo's crop geometry (336 px crops, tiling decided with
  Molmo's 14 px patches and 4+4 patch margins) but a 42 px ViT patch (8x8 patches per crop), so a
  2x2 pooling gives 16 tokens per crop.
* ``molmoe-1b``: the seed model's exact shape (what ``flexmoe_checkpoint`` builds from the released
  MolmoE-1B config.json): a CLIP ViT-L/14 at 336 px cut to 23 layers (hidden 1024, no
  post-layernorm), features of layers -2 and -9 (2048 wide), ``pad_embed`` by the image mask, 2x2
  attention pooling (q/k/v from 2048 to 1024) to 144 tokens per crop, a SwiGLU projector
  1024 -> 1024 -> 2048, image features *added* to the token embeddings, and an OLMoE-1B-7B decoder
  (16 blocks, hidden 2048, 64 experts, top-8 without renormalisation, expert width 1024, 50304 + 128
  token embeddings, an untied 50304-row head); Molmo's own preprocessing and prompt
  (``flexvlm_ray.models.molmo_preprocess``) with this module's word-level tokenizer.

The fields after ``rope_theta`` (``num_kv_heads`` .. ``image_std``) default to the ``tiny`` preset's
behaviour, so configs saved before they existed load unchanged.

The tokenizer is word level (``tokenizers.models.WordLevel``): special tokens, a fixed list of
English words, then ``[unusedN]`` fillers up to the decoder's vocabulary size, so every id decodes.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

IMAGE_EMBED_MODES = ("replace", "add")
PREPROCESSORS = ("flexmoe", "molmo")

# Special tokens: the order fixes their ids.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[IMG]", "[IM_START]", "[IM_END]", "[IM_COL]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMG_ID, IM_START_ID, IM_END_ID, IM_COL_ID = range(len(SPECIAL_TOKENS))

# A small fixed word list (VQA-style questions and short answers); unknown words map to [UNK].
WORDS = tuple("""
? . , ! ' : ; - a an the is are was were be been am do does did can could will would should
what which who whom whose where when why how many much there here this that these those it its
of in on at to from by with for about into over under above below behind between near next
and or but not no yes none some any all each every both other another more most less few
one two three four five six seven eight nine ten eleven twelve zero first second third last
red orange yellow green blue purple pink brown black white gray grey silver gold color colors
colour big small large little tall short long wide round square circle triangle rectangle shape
left right top bottom middle center front back side up down inside outside
man woman men women person people boy girl child children baby player players
dog dogs cat cats horse horses cow cows sheep bird birds elephant elephants giraffe zebra bear
car cars bus truck train plane airplane boat bike bicycle motorcycle street road sign traffic light
table chair bed couch sofa tv laptop phone book clock vase cup bowl plate bottle glass knife fork
spoon pizza cake sandwich banana apple food fruit water snow grass tree trees sky cloud
clouds sun beach field room kitchen bathroom window door wall floor picture image photo
wearing holding sitting standing playing eating riding walking looking flying lying running
frisbee ball kite umbrella hat shirt bag skateboard surfboard skis tennis racket baseball bat
game sport number letter word text say written time day night outdoor indoor
question answer describe caption count show shown visible photograph scene object objects
""".split())


@dataclass(frozen=True)
class FlexMoeConfig:
    """Every hyperparameter of a flexmoe model (JSON-serializable)."""

    name: str
    # crops (Molmo geometry for the tiling decision; see flexvlm_ray.models.crops.crop_grid)
    crop_px: int = 336
    tiling_patch_px: int = 14
    tiling_margins: tuple[int, int] = (4, 4)
    max_crops: int = 12
    pool_margin: int = 2            # pooled tokens dropped on each overlapping side of a tile
    # vision encoder (transformers CLIPVisionModel)
    vit_patch_px: int = 14
    vit_hidden: int = 1024
    vit_intermediate: int = 4096
    vit_layers: int = 24
    vit_heads: int = 16
    vit_feature_layers: tuple[int, int] = (-2, -9)   # indices into CLIP's hidden_states
    # connector (2x2 attention pooling, query = mean of the window) and projector (SwiGLU MLP)
    pool_dim: int = 1024
    pool_heads: int = 16
    projector_hidden: int = 4096
    projector_out_norm: bool = False   # RMSNorm on the projector output (scale starts at the embedding std)
    # decoder (transformers OlmoeForCausalLM)
    hidden_size: int = 2048
    num_blocks: int = 16
    num_heads: int = 16
    num_experts: int = 64
    top_k: int = 8
    expert_width: int = 1024
    vocab_size: int = 50304
    max_positions: int = 4096
    rope_theta: float = 10000.0
    # MolmoE details (defaults: the tiny preset's behaviour)
    num_kv_heads: int = 0              # decoder key/value heads; 0: num_heads
    rms_norm_eps: float = 1e-5         # decoder RMSNorm epsilon
    extra_embeddings: int = 0          # token embedding rows after vocab_size (MolmoE: 128); never predicted
    vit_post_layernorm: bool = True    # CLIP's post-layernorm module (never used for the features); MolmoE has none
    pad_embed: bool = False            # MolmoE 'pad_and_partial_pad': two embeddings added to ViT features by image mask
    image_embed_mode: str = "replace"  # 'replace': features replace the [IMG] embeddings; 'add': added to them (MolmoE)
    preprocess: str = "flexmoe"        # 'flexmoe' (flexmoe_preprocess) | 'molmo' (molmo_preprocess, the checkpoint's own)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)   # CLIP
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        if self.crop_px % self.vit_patch_px:
            raise ValueError(f"crop_px {self.crop_px} is not a multiple of vit_patch_px {self.vit_patch_px}")
        if self.patches_per_side % 2:
            raise ValueError(f"2x2 pooling needs an even patch grid, got {self.patches_per_side}")
        if not 0 <= 2 * self.pool_margin < self.pooled_per_side:
            raise ValueError(f"pool_margin {self.pool_margin} leaves no window in {self.pooled_per_side} pooled tokens")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} is not in 1..{self.num_experts}")
        if self.image_embed_mode not in IMAGE_EMBED_MODES:
            raise ValueError(f"image_embed_mode '{self.image_embed_mode}' is not one of {', '.join(IMAGE_EMBED_MODES)}")
        if self.preprocess not in PREPROCESSORS:
            raise ValueError(f"preprocess '{self.preprocess}' is not one of {', '.join(PREPROCESSORS)}")
        if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if self.extra_embeddings < 0:
            raise ValueError(f"extra_embeddings must be >= 0, got {self.extra_embeddings}")
        if self.preprocess == "flexmoe" and self.vocab_size < len(SPECIAL_TOKENS) + len(WORDS):
            raise ValueError(f"vocab_size {self.vocab_size} < {len(SPECIAL_TOKENS) + len(WORDS)} (specials + words)")
        for layer in self.vit_feature_layers:
            if not -self.vit_layers <= layer <= self.vit_layers or layer == 0:
                raise ValueError(f"vit_feature_layers {self.vit_feature_layers} out of range for {self.vit_layers} layers")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.crop_px // self.vit_patch_px

    @property
    def pooled_per_side(self) -> int:
        return self.patches_per_side // 2

    @property
    def tokens_per_crop(self) -> int:
        return self.pooled_per_side ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FlexMoeConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown flexmoe config keys: {sorted(unknown)}")
        tuples = {"tiling_margins", "vit_feature_layers", "image_mean", "image_std"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def scaled_feature_layers(*, num_layers: int, reference: tuple[int, ...] = (-2, -9),
                          reference_layers: int = 24) -> tuple[int, ...]:
    """Molmo's ViT feature layers ([-2, -9] of 24) scaled to a ViT of ``num_layers`` layers.

    ``hidden_states`` of CLIP has ``num_layers + 1`` entries (embeddings, then every layer); layer
    -2 of 24 is the output of layer 23, -9 that of layer 16. The scaled layer keeps the same depth
    fraction (rounded, at least 1) and is returned as a negative index.
    """
    out = []
    for ref in reference:
        depth = reference_layers + 1 + ref          # 1-based layer whose output is used
        scaled = max(1, min(num_layers, round(depth * num_layers / reference_layers)))
        out.append(scaled - num_layers - 1)
    return tuple(out)


PRESETS: dict[str, FlexMoeConfig] = {
    "tiny": FlexMoeConfig(
        name="tiny", pool_margin=0, vit_patch_px=42, vit_hidden=64, vit_intermediate=256, vit_layers=3,
        vit_heads=4, vit_feature_layers=scaled_feature_layers(num_layers=3), pool_dim=64, pool_heads=4,
        projector_hidden=256, projector_out_norm=True, hidden_size=128, num_blocks=4, num_heads=4, num_experts=8, top_k=2,
        expert_width=192, vocab_size=512, max_positions=4096),
    # the released MolmoE-1B config.json through flexmoe_checkpoint.molmo_config (tests check they agree)
    "molmoe-1b": FlexMoeConfig(name="molmoe-1b", vit_layers=23, projector_hidden=1024, extra_embeddings=128,
                               vit_post_layernorm=False, pad_embed=True, image_embed_mode="add", preprocess="molmo"),
}
# ``tiny``'s architecture with the shipped elastic weights (assets/tiny_elastic: ``tiny`` fine-tuned with reduced
# blocks and experts, docs/TINY_MODEL.md)
PRESETS["tiny-elastic"] = replace(PRESETS["tiny"], name="tiny-elastic")


def build_tokenizer(*, vocab_size: int, extra_words: Sequence[str] = ()) -> Tokenizer:
    """Word-level tokenizer: specials, ``WORDS``, the ``extra_words`` not already in ``WORDS`` (in
    their order), then ``[unusedN]`` fillers up to ``vocab_size``."""
    tokens = list(SPECIAL_TOKENS) + list(WORDS)
    tokens += [w for w in dict.fromkeys(extra_words) if w not in set(tokens)]
    if len(tokens) > vocab_size:
        raise ValueError(f"{len(tokens)} tokens do not fit vocab_size {vocab_size}")
    if len(set(tokens)) != len(tokens):
        raise ValueError("duplicate entries in the tokenizer word list")
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    return word_level_tokenizer(tokens=tokens, special_tokens=SPECIAL_TOKENS)


def word_level_tokenizer(*, tokens: Sequence[str], special_tokens: Sequence[str]) -> Tokenizer:
    """Lowercasing, whitespace-splitting word-level tokenizer: ``tokens[i]`` has id ``i``, unknown words
    map to ``[UNK]``, ``special_tokens`` are added as special tokens (the tiny presets' tokenizers)."""
    tok = Tokenizer(WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(special_tokens))
    return tok


# -- folders, options and the spec-time description (no torch) -------------------------------------
ASSETS_TINY = Path(__file__).resolve().parents[2] / "assets" / "tiny"
ASSETS_TINY_ELASTIC = ASSETS_TINY.parent / "tiny_elastic"
DEFAULT_PRESET = "tiny"
CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE = "config.json", "tokenizer.json", "model.safetensors"
BACKENDS = ("hf", "fast")
OPTIONS = ("experts_implementation", "attn_implementation", "decode_moe", "prefill_moe", "kernels", "cuda_graphs",
           "max_graphs", "fused_decode", "cache_len", "overlap_decode")
FAST_OPTIONS = ("decode_moe", "prefill_moe", "kernels", "cuda_graphs", "max_graphs", "fused_decode", "cache_len",
                "overlap_decode")
MAX_CACHE_LEN = 65_536   # positions of the fast backend's static KV cache (prompt + output), at most
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DECODE_MOE = ("fused", "gather", "grouped")     # the fast backend's decode MoE paths
PREFILL_MOE = ("grouped", "loop", "fused")      # ... and its prefill MoE paths
KERNELS = ("triton", "torch")


def read_flexmoe_config(directory: str | os.PathLike) -> FlexMoeConfig:
    """The config of a saved flexmoe folder; a clear error when the folder or its files are missing."""
    folder = Path(directory)
    missing = [name for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if not folder.is_dir() or missing:
        raise FileNotFoundError(f"flexmoe model folder '{folder}' is missing "
                                f"{', '.join(missing) if folder.is_dir() else 'entirely'}; "
                                f"expected {CONFIG_FILE}, {TOKENIZER_FILE}, {WEIGHTS_FILE} (see save_flexmoe)")
    return FlexMoeConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))


def preset_config(preset: Optional[str]) -> tuple[FlexMoeConfig, Optional[Path]]:
    """A preset's config and its weights folder (the shipped trained ``tiny`` and ``tiny-elastic``; None:
    random weights)."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"Unknown preset '{name}' for family 'flexmoe'. Available: {', '.join(sorted(PRESETS))}")
    folder = {"tiny": ASSETS_TINY, "tiny-elastic": ASSETS_TINY_ELASTIC}.get(name)   # read here: tests patch them
    if folder is not None and (folder / WEIGHTS_FILE).is_file():
        return replace(read_flexmoe_config(folder), name=name), folder
    return PRESETS[name], None


def check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options for family 'flexmoe': {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
    for name, allowed in (("experts_implementation", EXPERTS_IMPLEMENTATIONS),
                          ("attn_implementation", ATTN_IMPLEMENTATIONS), ("decode_moe", DECODE_MOE),
                          ("prefill_moe", PREFILL_MOE), ("kernels", KERNELS)):
        if options.get(name) is not None and options[name] not in allowed:
            raise ValueError(f"{name} '{options[name]}' is not one of {', '.join(allowed)}")
    for flag in ("cuda_graphs", "fused_decode", "overlap_decode"):
        if options.get(flag) is not None and not isinstance(options[flag], bool):
            raise ValueError(f"{flag} must be true or false, got {options[flag]!r}")
    graphs = options.get("max_graphs")
    if graphs is not None and (isinstance(graphs, bool) or not isinstance(graphs, int) or graphs < 1):
        raise ValueError(f"max_graphs must be a whole number >= 1 (captured graphs a worker keeps), got {graphs!r}")
    cache = options.get("cache_len")
    if cache is not None and (isinstance(cache, bool) or not isinstance(cache, int) or not 1 <= cache <= MAX_CACHE_LEN):
        raise ValueError(f"cache_len must be a whole number in 1..{MAX_CACHE_LEN} (positions of the fast backend's "
                         f"static KV cache, prompt included), got {cache!r}")


def describe(*, preset: Optional[str], path: Optional[str], options: dict[str, Any]):
    """The family's ``ModelInfo`` for spec validation: a preset reads JSON and Python only (no torch); a
    MolmoE checkpoint folder is checked by the checkpoint module."""
    from flexvlm_ray.models.base import ModelInfo

    check_options(options)
    if path is None:
        config, _ = preset_config(preset)
    else:
        from flexvlm_ray.models.flexmoe.checkpoint import checkpoint_kind, open_molmo_checkpoint

        config = (open_molmo_checkpoint(path).config if checkpoint_kind(path) == "molmo"
                  else read_flexmoe_config(path))
    return ModelInfo(family="flexmoe", preset=config.name if path is None else str(path),
                     num_blocks=config.num_blocks, num_experts=config.num_experts, default_top_k=config.top_k,
                     max_crops_limit=config.max_crops, vision_tokens_per_crop=config.tokens_per_crop,
                     hidden_size=config.hidden_size, vocab_size=config.vocab_size, backends=BACKENDS,
                     trained_context=config.max_positions,
                     context_limits={"fast": options.get("cache_len") or config.max_positions})
