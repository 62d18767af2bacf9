"""``simulated``: a model family with calibrated stage costs and no weights.

It answers every adapter call by waiting a known time (sleep, or busy-wait with
``wait: busy``), with the token counts a MolmoE-1B-shaped model would produce. The
orchestration benchmark and the Ray tests use it to know the ideal time of a sweep exactly;
the estimator tests use it as a GPU whose stage costs are known. Costs (options, in ms):

    vision   = vision_ms_per_crop * num_crops
    projector= projector_ms_per_crop * num_crops
    prefill  = prefill_ms_per_token * num_total_tokens * depth * moe
    decode   = decode_ms_per_token * depth * moe  (per generated token after the first)
    depth    = active_blocks / num_blocks,  moe = attn_share + (1 - attn_share) * top_k / default_top_k

``fail_when`` / ``crash_when`` / ``hang_when`` (a dict of knob values) make a unit raise, kill
the worker process, or never return, so that failure handling and timeouts can be tested.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

from flexvlm_ray.models.base import (DecodeState, Knobs, ModelAdapter, ModelInfo, Prepared,
                                     register_model)
from flexvlm_ray.models.crops import crop_grid

PRESETS: dict[str, dict[str, Any]] = {
    "molmoe-1b": dict(num_blocks=16, num_experts=64, default_top_k=8, max_crops_limit=12,
                      vision_tokens_per_crop=144, hidden_size=2048, vocab_size=50304),
    "tiny": dict(num_blocks=4, num_experts=8, default_top_k=2, max_crops_limit=12,
                 vision_tokens_per_crop=16, hidden_size=128, vocab_size=512),
}
DEFAULT_COSTS = dict(vision_ms_per_crop=2.0, projector_ms_per_crop=0.2, prefill_ms_per_token=0.01,
                     decode_ms_per_token=1.0, attn_share=0.3)
PROMPT_TOKENS = 12
EOS = 1


@register_model("simulated")
class SimulatedAdapter(ModelAdapter):
    @classmethod
    def describe(cls, *, preset: Optional[str], path: Optional[str], options: dict[str, Any]) -> ModelInfo:
        name = preset or "molmoe-1b"
        if name not in PRESETS:
            raise ValueError(f"Unknown preset '{name}' for family 'simulated'. Available: {', '.join(sorted(PRESETS))}")
        return ModelInfo(family="simulated", preset=name, **PRESETS[name])

    def __init__(self, *, preset: Optional[str], path: Optional[str], dtype: str, device: str,
                 seed: int, options: dict[str, Any]) -> None:
        self.info = self.describe(preset=preset, path=path, options=options)
        unknown = set(options) - set(DEFAULT_COSTS) - {"wait", "fail_when", "crash_when", "hang_when", "load_s"}
        if unknown:
            raise ValueError(f"unknown options for family 'simulated': {sorted(unknown)}")
        self.costs = {**DEFAULT_COSTS, **{k: float(v) for k, v in options.items() if k in DEFAULT_COSTS}}
        self.busy = options.get("wait", "sleep") == "busy"
        self.fail_when = options.get("fail_when") or {}
        self.crash_when = options.get("crash_when") or {}
        self.hang_when = options.get("hang_when") or {}
        self.device = "cpu"
        self.knobs = Knobs()
        time.sleep(float(options.get("load_s", 0.0)))

    # -- helpers -----------------------------------------------------------------------
    def _wait(self, ms: float) -> None:
        if self.busy:
            end = time.perf_counter() + ms / 1000.0
            while time.perf_counter() < end:
                pass
        elif ms > 0:
            time.sleep(ms / 1000.0)

    def _scale(self) -> float:
        info, k = self.info, self.knobs
        depth = (k.active_blocks or info.num_blocks) / info.num_blocks
        share = self.costs["attn_share"]
        moe = share + (1 - share) * (k.top_k or info.default_top_k) / info.default_top_k
        return depth * moe

    @staticmethod
    def _matches(cond: dict[str, Any], knobs: Knobs) -> bool:
        return bool(cond) and all(getattr(knobs, key) == value for key, value in cond.items())

    # -- stages --------------------------------------------------------------------------
    def prepare(self, *, sample: Any, knobs: Knobs) -> Prepared:
        if self._matches(self.crash_when, knobs):
            os._exit(17)  # the worker process dies: the scheduler must replace it
        if self._matches(self.hang_when, knobs):
            while True:  # a hung unit: only the driver's unit timeout ends it
                time.sleep(3600)
        if self._matches(self.fail_when, knobs):
            raise RuntimeError(f"simulated failure at {knobs}")
        width, height = sample.image.size
        rows, cols = crop_grid(height=height, width=width,
                               max_crops=knobs.max_crops or self.info.max_crops_limit)
        crops = rows * cols + 1
        vision = crops * self.info.vision_tokens_per_crop
        return Prepared(inputs={}, num_crops=crops, num_vision_tokens=vision,
                        num_language_tokens=PROMPT_TOKENS, num_total_tokens=vision + PROMPT_TOKENS)

    def vision_encoder(self, prepared: Prepared) -> Any:
        self._wait(self.costs["vision_ms_per_crop"] * prepared.num_crops)

    def projector(self, prepared: Prepared, features: Any) -> Any:
        self._wait(self.costs["projector_ms_per_crop"] * prepared.num_crops)

    def prefill(self, prepared: Prepared, embeds: Any) -> DecodeState:
        self._wait(self.costs["prefill_ms_per_token"] * prepared.num_total_tokens * self._scale())
        return DecodeState(next_token=2, tokens=[2], position=prepared.num_total_tokens)

    def decode_step(self, state: DecodeState) -> int:
        self._wait(self.costs["decode_ms_per_token"] * self._scale())
        token = 2 + (len(state.tokens) % 5)
        state.tokens.append(token)
        state.next_token, state.position = token, state.position + 1
        return token

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return " ".join(f"w{t}" for t in token_ids if t != EOS)

    @property
    def eos_token_id(self) -> Optional[int]:
        return EOS

    # -- knobs -----------------------------------------------------------------------------
    def apply_knobs(self, knobs: Knobs) -> None:
        self.knobs = knobs

    def restore_knobs(self) -> None:
        self.knobs = Knobs()

    def param_counts(self) -> dict[str, int]:
        return {"vision_encoder": 303_000_000, "projector": 12_000_000, "llm": 6_900_000_000,
                "llm_active": 1_200_000_000}
