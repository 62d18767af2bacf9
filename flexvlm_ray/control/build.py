"""A Controller from profiled training rows: the requests they measured (loaded again from the
dataset registry, for their image sizes and prompts), the row-built environment, the per-request
estimates and every policy asked for."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import pandas as pd

from flexvlm_ray.control.env import RowEnvironment
from flexvlm_ray.control.estimate import CandidateModel, config_column
from flexvlm_ray.control.features import Featurizer, Request, RequestFeatures
from flexvlm_ray.control.policies import Controller
from flexvlm_ray.control.space import ConfigSpace


def training_requests(*, datasets: Iterable[dict[str, Any]], seed: int) -> list[Request]:
    """The requests of each training selection: ``datasets`` items hold name, split, num_samples, path."""
    from flexvlm_ray.data import DATASETS

    out = []
    for ds in datasets:
        samples = DATASETS.get(ds["name"]).load(split=ds["split"], num_samples=ds["num_samples"], seed=seed,
                                                path=ds.get("path"))
        out += [Request.of_sample(s, dataset=ds["name"]) for s in samples if s.error is None]
    return out


def build_controller(*, rows: pd.DataFrame, requests: list[Request], space: ConfigSpace, policies: list[str],
                     seed: int = 0, geometry: Optional[dict[str, Any]] = None,
                     options: Optional[dict[str, dict[str, Any]]] = None,
                     guard_quantile: Optional[float] = 0.95, spread_per: str = "config") -> tuple[Controller, RowEnvironment]:
    """Fit on ``rows`` (profiling rows of the space's configurations over ``requests``); ``guard_quantile``:
    the quantile of measured / estimated latency a calibrated guardrail scales estimates by (None: no spread)."""
    tasks = tuple(sorted({r.task for r in requests}))
    featurizer = Featurizer(max_crops_values=tuple(space.max_crops_values), geometry=dict(geometry or {}), tasks=tasks)
    features: dict[tuple[str, str], RequestFeatures] = {(r.dataset, r.request_id): featurizer.features(r)
                                                        for r in requests}
    rows = rows[rows["status"] == "ok"].copy()
    rows["config"] = config_column(rows)
    rows["prompt_words"] = [features[(d, s)].prompt_words if (d, s) in features else None
                            for d, s in zip(rows["dataset"], rows["sample_id"])]
    rows = rows[rows["prompt_words"].notna() & rows["config"].isin(space.keys)]
    env = RowEnvironment.from_rows(rows, requests=features, space=space)
    model = CandidateModel.fit(rows, space=space)
    if guard_quantile is not None:
        model.calibrate(rows, features=features, quantile=guard_quantile, per=spread_per)
    controller = Controller.fit(env=env, model=model, featurizer=featurizer, policies=policies, seed=seed,
                                options=options)
    return controller, env
