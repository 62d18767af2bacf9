"""Per-request estimates for every configuration of the space, and the E3 guardrail.

``CandidateModel`` is fitted on training rows (one profiling grid over training requests). For a
request it builds, per configuration, the estimator's inputs without running anything:

    num_crops          the crop count of the config's max_crops for this image (Featurizer)
    num_total_tokens   vision tokens (a line in num_crops) + language tokens (a line in prompt words)
    num_output_tokens  the median output length of the config on training rows of the same task
    active_blocks_effective, top_k_effective   the config's resolved knobs (median of its rows)

and from them the stage estimator's ``T_total`` (``flexvlm_ray.estimator.StageEstimator``, fitted on
the same rows) and the seeds' FLOPs formula (vision FLOPs per crop, projector FLOPs, LLM FLOPs per
token of the config, all medians of the rows' ``flops_*`` columns).

``Guardrail`` admits a configuration iff its estimated ``T_total`` <= budget x margin; a calibrated
guardrail first multiplies each configuration's estimate by its ``spread``: the ``spread_quantile``
(0.95 by default) of measured / estimated T_total over the training rows of that configuration
(``CandidateModel.calibrate``), so it admits what fits at that quantile of the host's measured latency
(its noise and the estimator's error), not at the median.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from flexvlm_ray.control.features import RequestFeatures
from flexvlm_ray.control.space import ConfigSpace, knobs_key
from flexvlm_ray.estimator import StageEstimator, usable_rows

NO_SPREAD = ("a calibrated guardrail needs a controller fitted with a latency spread (control.guard_quantile); "
             "this one has none")


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of y on x; a constant ratio through 0 when x takes one value."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0:
        return 0.0, 0.0
    if np.unique(x).size < 2:
        return (float(np.median(y / x)) if np.all(x > 0) else 0.0), (0.0 if np.all(x > 0) else float(np.median(y)))
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


@dataclass
class CandidateModel:
    space: ConfigSpace
    estimator: StageEstimator
    vision_tokens: tuple[float, float]                 # per crop, constant
    language_tokens: tuple[float, float]               # per prompt word, constant
    output_tokens: dict[str, list[float]]              # task -> per config (index order of the space)
    blocks: list[float]
    top_k: list[float]
    flops: Optional[dict[str, Any]] = None             # vision_per_crop, projector, llm_per_token[], ms_per_flop
    spread: Optional[dict[str, list[float]]] = None    # task -> per config: quantile of measured / estimated T_total
    spread_quantile: Optional[float] = None
    _cache: dict = field(default_factory=dict, repr=False)

    # -- fit ----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, rows: pd.DataFrame, *, space: ConfigSpace) -> "CandidateModel":
        """``rows``: ok training rows with a ``config`` column (knobs_key) and ``prompt_words``."""
        rows = usable_rows(rows)
        if rows.empty:
            raise ValueError("no usable training rows to fit the controller's estimates on")
        keys = space.keys
        by_config = rows.groupby("config")
        vision = _line(rows["num_crops"].to_numpy(), rows["num_vision_tokens"].to_numpy())
        language = _line(rows["prompt_words"].to_numpy(), rows["num_language_tokens"].to_numpy())

        def per_config(column: str, fallback: list[float], frame=by_config) -> list[float]:
            med = frame[column].median()
            return [float(med[k]) if k in med and pd.notna(med[k]) else fallback[i] for i, k in enumerate(keys)]

        max_new = [float(k.max_new_tokens) for k in space.configs]
        overall_out = per_config("num_output_tokens", max_new)
        output = {task: per_config("num_output_tokens", overall_out, frame=part.groupby("config"))
                  for task, part in rows.groupby("task")}
        output["*"] = overall_out
        blocks_default = float(rows["active_blocks_effective"].max())
        topk_default = float(rows["top_k_effective"].max()) if rows["top_k_effective"].notna().any() else 1.0
        blocks = per_config("active_blocks_effective", [float(k.active_blocks or blocks_default) for k in space.configs])
        top_k = per_config("top_k_effective", [float(k.top_k or topk_default) for k in space.configs])
        flops = None
        if "flops_total" in rows and rows["flops_total"].notna().all() and (rows["flops_total"] > 0).all():
            llm = (rows["flops_llm_prefill"] / rows["num_total_tokens"]).groupby(rows["config"]).median()
            fallback = float(llm.median())
            flops = {"vision_per_crop": float((rows["flops_vision"] / rows["num_crops"]).median()),
                     "projector": float(rows["flops_projector"].median()),
                     "llm_per_token": [float(llm[k]) if k in llm else fallback for k in keys],
                     "ms_per_flop": float((rows["T_total"] / rows["flops_total"]).median())}
        return cls(space=space, estimator=StageEstimator.fit(rows), vision_tokens=vision, language_tokens=language,
                   output_tokens=output, blocks=blocks, top_k=top_k, flops=flops)

    def calibrate(self, rows: pd.DataFrame, *, features: dict[tuple[str, str], RequestFeatures],
                  quantile: float = 0.95, per: str = "config", min_rows: int = 20) -> "CandidateModel":
        """Set ``spread``: per task (and '*' for any other), one factor per configuration: the ``quantile`` of
        measured / estimated T_total over ``rows`` (training rows with a ``config`` column; every row,
        repeated passes included, so it holds the host's pass-to-pass noise and the estimator's error).
        ``per`` 'task': one quantile over all configurations of the task (a configuration's own rows come
        from one unit, measured in one stretch of time, so on a host whose load varies their spread says
        more about when they ran than about the configuration); 'config': each configuration's own rows
        where it has ``min_rows``, else the task's."""
        if not 0 < quantile <= 1:
            raise ValueError(f"spread quantile must be in (0, 1], got {quantile}")
        if per not in ("task", "config"):
            raise ValueError(f"spread per 'task' or 'config', got {per!r}")
        keys = self.space.keys
        slot = {k: i for i, k in enumerate(keys)}
        estimates: dict[tuple[str, str], np.ndarray] = {}
        ratios: dict[str, list[list[float]]] = {}
        for d, s, config, measured in zip(rows["dataset"], rows["sample_id"], rows["config"], rows["T_total"]):
            f = features.get((d, s))
            if f is None or config not in slot or not np.isfinite(measured):
                continue
            if (d, s) not in estimates:
                estimates[(d, s)] = self.latency(f)
            estimate = estimates[(d, s)][slot[config]]
            if estimate > 0:
                for task in (f.request.task, "*"):
                    ratios.setdefault(task, [[] for _ in keys])[slot[config]].append(float(measured) / float(estimate))
        if "*" not in ratios:
            raise ValueError("no training row to calibrate the guardrail's spread on")
        spread = {}
        for task, per_config in ratios.items():
            pooled = float(np.quantile([r for part in per_config for r in part], quantile))
            spread[task] = [max(float(np.quantile(r, quantile)) if per == "config" and len(r) >= min_rows else pooled,
                                0.0) for r in per_config]
        self.spread, self.spread_quantile = spread, float(quantile)
        return self

    def spread_of(self, task: str) -> list[float]:
        if self.spread is None:
            raise ValueError(NO_SPREAD)
        return self.spread.get(task, self.spread["*"])

    # -- per request --------------------------------------------------------------------------
    def inputs(self, features: RequestFeatures) -> dict[str, np.ndarray]:
        """The estimator's input columns, one value per configuration of the space."""
        crops = np.array([features.crops[k.max_crops] for k in self.space.configs], float)
        vision = np.maximum(self.vision_tokens[0] * crops + self.vision_tokens[1], 0.0)
        language = max(self.language_tokens[0] * features.prompt_words + self.language_tokens[1], 1.0)
        out = self.output_tokens.get(features.request.task, self.output_tokens["*"])
        return {"num_crops": crops, "num_total_tokens": vision + language,
                "num_output_tokens": np.asarray(out, float),
                "active_blocks_effective": np.asarray(self.blocks, float), "top_k_effective": np.asarray(self.top_k, float)}

    def latency(self, features: RequestFeatures) -> np.ndarray:
        """Estimated T_total (ms) of every configuration for this request: the stage estimator's sum,
        folded per task into K0 + K1 * crops + K2 * T + K3 * T^2 per configuration (T: input tokens),
        so a decision costs three vector operations (``latency_reference`` is the unfolded form)."""
        k0, k1, k2, k3, crops_index = self._folded(features.request.task)
        crops = np.array([features.crops[m] for m in crops_index], float)[self._crop_slot]
        tokens = np.maximum(self.vision_tokens[0] * crops + self.vision_tokens[1], 0.0) + max(
            self.language_tokens[0] * features.prompt_words + self.language_tokens[1], 1.0)
        return k0 + k1 * crops + (k2 + k3 * tokens) * tokens

    def latency_reference(self, features: RequestFeatures) -> np.ndarray:
        """``StageEstimator.predict`` on ``inputs``: what ``latency`` computes, the slow way."""
        return np.asarray(self.estimator.predict(self.inputs(features))["T_total"], float)

    # -- the decision fast path ---------------------------------------------------------------
    def terms(self, task: str, crops: np.ndarray) -> "RequestTerms":
        """Everything of ``latency`` and ``seed_flops`` that depends on the task and the per-configuration
        crop counts only (not on the prompt), as Python lists: a decision adds the prompt's language
        tokens (``language_tokens_of``) per configuration in plain float arithmetic, the same IEEE
        operations as ``latency`` and ``seed_flops`` (so the same numbers), without a numpy call."""
        k0, k1, k2, k3, _ = self._folded(task)
        crops = np.asarray(crops, float)
        vision = np.maximum(self.vision_tokens[0] * crops + self.vision_tokens[1], 0.0)
        out = np.asarray(self.output_tokens.get(task, self.output_tokens["*"]), float)
        flops_head = llm = None
        if self.flops is not None:
            flops_head = (self.flops["vision_per_crop"] * crops + self.flops["projector"]).tolist()
            llm = np.asarray(self.flops["llm_per_token"], float).tolist()
        return RequestTerms(base=(k0 + k1 * crops).tolist(), vision=vision.tolist(), k2=np.asarray(k2, float).tolist(),
                            k3=np.asarray(k3, float).tolist(), flops_head=flops_head, llm=llm, output=out.tolist(),
                            ms_per_flop=self.flops["ms_per_flop"] if self.flops else None)

    def language_tokens_of(self, prompt_words: int) -> float:
        return max(self.language_tokens[0] * prompt_words + self.language_tokens[1], 1.0)

    def _folded(self, task: str):
        if task not in self._cache:
            values = sorted({k.max_crops for k in self.space.configs}, key=lambda v: float("inf") if v is None else v)
            self._crop_slot = np.array([values.index(k.max_crops) for k in self.space.configs])
            coef = {s: {f: self.estimator.coef[s].get(f, 0.0) * self.estimator.scales.get(s, 1.0)
                        for f in self.estimator.coef[s]} for s in self.estimator.coef}
            b, k = np.asarray(self.blocks, float), np.asarray(self.top_k, float)
            out = np.asarray(self.output_tokens.get(task, self.output_tokens["*"]), float)
            n = np.maximum(out - 1.0, 0.0)
            v, p, f, d = (coef[s] for s in ("T_vision_encoder", "T_projector", "T_LLM_prefill", "T_LLM_decode"))
            # decode: d0 + d1 n + d2 n b + d3 n b k + d4 n (T + out/2) b
            k0 = (v["const"] + p["const"] + f["const"] + f["blocks"] * b + d["const"] + d["steps"] * n
                  + d["steps_blocks"] * n * b + d["steps_blocks_topk"] * n * b * k + d["steps_ctx_blocks"] * n * out / 2 * b)
            k1 = np.full(len(b), v["crops"] + p["crops"])
            k2 = f["tokens"] + f["tokens_blocks"] * b + f["tokens_blocks_topk"] * b * k + d["steps_ctx_blocks"] * n * b
            k3 = f["tokens2_blocks"] * b
            self._cache[task] = (k0, k1, k2, k3, values)
        return self._cache[task]

    def guarded(self, estimates: np.ndarray, guardrail: "Guardrail", *, task: str) -> np.ndarray:
        """What ``guardrail`` compares with budget x margin: the estimates, x the task's spread when calibrated."""
        if not guardrail.calibrated:
            return estimates
        return np.asarray(estimates, float) * np.asarray(self.spread_of(task), float)

    def seed_flops(self, features: RequestFeatures) -> Optional[np.ndarray]:
        """The seeds' FLOPs formula of every configuration for this request (None without FLOPs rows)."""
        if self.flops is None:
            return None
        _, _, _, _, crops_index = self._folded(features.request.task)
        crops = np.array([features.crops[m] for m in crops_index], float)[self._crop_slot]
        tokens = np.maximum(self.vision_tokens[0] * crops + self.vision_tokens[1], 0.0) + max(
            self.language_tokens[0] * features.prompt_words + self.language_tokens[1], 1.0)
        f = self.flops
        out = self.output_tokens.get(features.request.task, self.output_tokens["*"])
        return (f["vision_per_crop"] * crops + f["projector"]
                + np.asarray(f["llm_per_token"]) * (tokens + np.asarray(out, float)))

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {"estimator": self.estimator.to_dict(), "vision_tokens": list(self.vision_tokens),
               "language_tokens": list(self.language_tokens), "output_tokens": self.output_tokens,
               "blocks": self.blocks, "top_k": self.top_k, "flops": self.flops}
        if self.spread is not None:
            out["spread"], out["spread_quantile"] = self.spread, self.spread_quantile
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, space: ConfigSpace) -> "CandidateModel":
        return cls(space=space, estimator=StageEstimator.from_dict(data["estimator"]),
                   vision_tokens=tuple(data["vision_tokens"]), language_tokens=tuple(data["language_tokens"]),
                   output_tokens={k: list(v) for k, v in data["output_tokens"].items()},
                   blocks=list(data["blocks"]), top_k=list(data["top_k"]), flops=data.get("flops"),
                   spread=data.get("spread"), spread_quantile=data.get("spread_quantile"))


@dataclass(frozen=True)
class RequestTerms:
    """``CandidateModel.terms``: per configuration, for one task and image. With ``T = vision + L`` (L the
    prompt's language tokens), T_total = base + (k2 + k3 T) T and FLOPs = flops_head + llm (T + output)."""

    base: list[float]
    vision: list[float]
    k2: list[float]
    k3: list[float]
    flops_head: Optional[list[float]]
    llm: Optional[list[float]]
    output: list[float]
    ms_per_flop: Optional[float]

    def latency(self, language: float) -> list[float]:
        """Estimated T_total (ms) per configuration: ``CandidateModel.latency``'s numbers."""
        out = []
        for base, vision, k2, k3 in zip(self.base, self.vision, self.k2, self.k3):
            t = vision + language
            out.append(base + (k2 + k3 * t) * t)
        return out

    def flops(self, language: float) -> list[float]:
        """The seeds' FLOPs per configuration: ``CandidateModel.seed_flops``'s numbers."""
        return [head + llm * ((vision + language) + out)
                for head, llm, vision, out in zip(self.flops_head, self.llm, self.vision, self.output)]


@dataclass(frozen=True)
class Guardrail:
    """E3 as a filter: admit configurations whose estimated T_total <= budget x margin; ``calibrated``:
    whose estimate x its configuration's spread (``CandidateModel.spread``) <= budget x margin."""

    margin: float = 1.0
    calibrated: bool = False

    def __post_init__(self) -> None:
        if not self.margin > 0:
            raise ValueError(f"guardrail margin must be > 0, got {self.margin}")

    def admit(self, *, estimates: np.ndarray, budget_ms: float) -> np.ndarray:
        """Boolean mask over configurations; may be all False (nothing is estimated to fit). ``estimates``:
        the guarded ones (x the spread when calibrated: ``CandidateModel.guarded``)."""
        return np.asarray(estimates, float) <= self.limit(budget_ms)

    def limit(self, budget_ms: float) -> float:
        """The largest estimate admitted under ``budget_ms``."""
        return budget_ms * self.margin


def config_column(rows: pd.DataFrame) -> pd.Series:
    """The knobs_key of every row (requested knob values, as the space names them)."""
    from flexvlm_ray.models.base import Knobs

    def key(r) -> str:
        def val(v):
            return None if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)
        return knobs_key(Knobs(max_crops=val(r.max_crops), top_k=val(r.top_k), active_blocks=val(r.active_blocks),
                               block_policy=r.block_policy, max_new_tokens=int(r.max_new_tokens)))
    return pd.Series([key(r) for r in rows.itertuples()], index=rows.index, dtype=object)
