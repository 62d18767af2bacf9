"""The model adapter contract between the measurement engine and a model family.

The engine drives one sample through four named stages, each a call on the adapter, and times
the gaps between them (see flexvlm_ray.measure.engine):

    prepared = adapter.prepare(sample=..., knobs=...)        # preprocessing (not timed)
    feats    = adapter.vision_encoder(prepared)              # stage vision_encoder (ViT only)
    embeds   = adapter.projector(prepared, feats)            # stage projector (pooling + MLP)
    state    = adapter.prefill(prepared, embeds)             # stage llm_prefill (first token)
    token    = adapter.decode_step(state)  # repeated        # stage llm_decode

Knobs are set in place between units with ``apply_knobs`` and undone with ``restore_knobs``;
the model is loaded once per worker. ``describe`` answers shape questions (block and expert
counts) without loading weights, so that a spec can be validated at the edge.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from flexvlm_ray.knobs.base import BLOCK_POLICIES, Knobs  # noqa: F401  (re-exported for the families)
from flexvlm_ray.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """What a spec needs to know about a model before loading it."""

    family: str
    preset: str
    num_blocks: int
    num_experts: int            # 0 for a dense decoder
    default_top_k: int          # 0 for a dense decoder
    max_crops_limit: int        # largest max_crops the preprocessing accepts; 0: no crop knob
    vision_tokens_per_crop: int
    hidden_size: int
    vocab_size: int
    backends: tuple[str, ...] = ("hf",)   # the `model.backend` values the family runs
    # positions the model was trained on (0: not known). Not a hard limit: every shipped family
    # computes its rotary positions per token, so longer sequences run (latency stays valid; the
    # answers past this length are out of distribution).
    trained_context: int = 0
    # per backend, the longest sequence (prompt + output) it can run at all, e.g. a static KV cache;
    # a backend not named has no such limit
    context_limits: dict[str, int] = field(default_factory=dict)


@dataclass
class Prepared:
    """A preprocessed sample on the adapter's device, with the token counts it produces."""

    inputs: dict[str, Any]
    num_crops: int
    num_vision_tokens: int
    num_language_tokens: int    # prompt tokens that are not image tokens
    num_total_tokens: int       # sequence length entering the decoder at prefill
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecodeState:
    """Greedy decoding state kept by the adapter between decode steps (batch size 1)."""

    next_token: int                       # the token chosen by the last step (or by prefill)
    tokens: list[int] = field(default_factory=list)  # every generated token so far
    cache: Any = None                     # the adapter's KV cache
    position: int = 0                     # sequence length so far
    extras: dict[str, Any] = field(default_factory=dict)

    def unfinished(self, *, max_new: int, stop: Optional[int]) -> bool:
        """Whether greedy decoding goes on: fewer than ``max_new`` tokens, and the last one is not ``stop``
        (None: no stop token)."""
        return 0 < len(self.tokens) < max_new and not (stop is not None and self.tokens[-1] == stop)


class ModelAdapter(ABC):
    """One model family. Subclasses register with ``@register_model("name")``."""

    info: ModelInfo
    device: Any = "cpu"
    burned_in_s: Optional[float] = None   # seconds of untimed burn-in passes this process ran (measure.engine.burn_in)
    # spec `model.backend` values this family implements; a family that lists more than 'hf' takes
    # a `backend` keyword in __init__ (ModelWorker passes it only when it is not 'hf')
    backends: tuple[str, ...] = ("hf",)

    @classmethod
    @abstractmethod
    def describe(cls, *, preset: Optional[str], path: Optional[str],
                 options: dict[str, Any]) -> ModelInfo:
        """Shape of the model for validation, without loading weights."""

    @abstractmethod
    def __init__(self, *, preset: Optional[str], path: Optional[str], dtype: str, device: str,
                 seed: int, options: dict[str, Any]) -> None:
        """Load (or build) the model once on ``device``."""

    # -- stages ------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, *, sample: Any, knobs: Knobs) -> Prepared:
        """Preprocess one sample (crops, tokenized prompt) and move it to the device."""

    @abstractmethod
    def vision_encoder(self, prepared: Prepared) -> Any:
        """Run the vision backbone only (ViT features of every crop)."""

    @abstractmethod
    def projector(self, prepared: Prepared, features: Any) -> Any:
        """Connector and projector: ViT features -> decoder-space image embeddings."""

    @abstractmethod
    def prefill(self, prepared: Prepared, embeds: Any) -> DecodeState:
        """Run the decoder over the full prompt; choose the first output token (greedy)."""

    @abstractmethod
    def decode_step(self, state: DecodeState) -> int:
        """One greedy decode step from ``state``; updates it and returns the new token."""

    def decode_run(self, state: DecodeState, *, max_new: int, stop: Optional[int]) -> Optional[Any]:
        """Greedy steps until ``state`` holds ``max_new`` tokens or its last token is ``stop`` (None: never
        stop early): the stage ``llm_decode``. A family may run it faster than step by step, with the same
        tokens (the flexmoe fast backend overlaps host and device); where it leaves device work running
        past the stop token it returns the CUDA timing event at which the output was complete (the stage
        ends there), else None."""
        while state.unfinished(max_new=max_new, stop=stop):
            self.decode_step(state)
        return None

    @abstractmethod
    def decode_text(self, token_ids: Sequence[int]) -> str:
        """Detokenize generated tokens (special tokens dropped)."""

    @property
    @abstractmethod
    def eos_token_id(self) -> Optional[int]:
        """End of sequence token; natural decoding stops there, forced decoding ignores it."""

    # -- knobs -------------------------------------------------------------------------
    @abstractmethod
    def apply_knobs(self, knobs: Knobs) -> None:
        """Set top_k / active blocks in place; crops take effect in ``prepare``."""

    @abstractmethod
    def restore_knobs(self) -> None:
        """Return to the model's defaults (identical logits to a fresh model)."""

    # -- introspection -------------------------------------------------------------------
    def decoder_blocks(self) -> Sequence[Any]:
        """The decoder blocks that run under the current knobs, in order (for timing hooks)."""
        return []

    def block_parts(self, block: Any) -> dict[str, Any]:
        """{'attention': module, 'ffn': module} of one block, for per-part timing hooks."""
        return {}

    def param_counts(self) -> dict[str, int]:
        """Parameters per component: vision_encoder, projector, llm (and llm_active for MoE)."""
        return {}

    @classmethod
    def count_params(cls, *, preset: Optional[str], path: Optional[str],
                     options: dict[str, Any]) -> dict[str, int]:
        """``param_counts`` of the model a spec names, for analyses: by default the adapter is built
        on the CPU; a family that can count without weights (a 'meta' device build) overrides this."""
        opts = {k: v for k, v in options.items() if k != "load_s"}
        return cls(preset=preset, path=path, dtype="float32", device="cpu", seed=0,
                   options=opts).param_counts()

    def flops(self, *, prepared: Prepared, num_output_tokens: int, knobs: Knobs) -> dict[str, float]:
        """Analytic FLOPs per stage: vision, projector, llm_prefill, llm_decode."""
        return {}

    def synchronize(self) -> None:
        """Wait for queued device work (CUDA); a no-op on the CPU."""

    def prefill_path(self) -> str:
        """How the last ``prefill`` ran: 'graphed' (one captured CUDA graph replayed) or 'eager' (kernels
        issued from Python, block by block); rows record it (``prefill_path``)."""
        return "eager"

    def setup_count(self) -> int:
        """One-time setups done so far that a later pass of the same shapes skips (a CUDA graph captured
        for a new shape); a pass during which it grows timed that setup as well (the engine runs it again)."""
        return 0


MODELS: Registry[type[ModelAdapter]] = Registry("model", group="flexvlm_ray.models", base=ModelAdapter)
# every `model.backend` a family may implement ('hf': the model's own modules); a family lists its
# own in ModelAdapter.backends and spec.load checks the choice against it
BACKENDS = ("hf", "fast")


def adapter_options(*, options: dict[str, Any], trust_remote_code: bool) -> dict[str, Any]:
    """A family's options from a model spec: ``model.trust_remote_code: true`` is passed on as the
    option of the same name (only families that run a checkpoint's own code accept it)."""
    merged = dict(options)
    if trust_remote_code:
        merged.setdefault("trust_remote_code", True)
    return merged


def register_model(name: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    return MODELS.register(name)
