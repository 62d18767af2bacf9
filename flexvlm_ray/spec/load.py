"""YAML -> validated SweepSpec, with one error line per problem and no side effects.

Every line names the file, the key path, the bad value and what is allowed, e.g.
``sweeps/x.yaml: knobs.top_k: 80 is above the model's 64 experts; allowed 1..64``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from flexvlm_ray.spec.schema import SweepSpec, grid_values


class SpecError(ValueError):
    """A spec that cannot run; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_spec(path: str | Path, *, overrides: Sequence[str] = ()) -> SweepSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"{path}: cannot read the spec: {exc.strerror or exc}"]) from None
    return load_spec_text(text, source=str(path), overrides=overrides)


def load_spec_text(text: str, *, source: str, overrides: Sequence[str] = ()) -> SweepSpec:
    raw = parse_yaml(text, source=source)
    raw = apply_overrides(raw, overrides, source=source)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([_pydantic_line(err, source=source) for err in exc.errors()]) from None
    problems = [f"{source}: {loc}: {msg}" for loc, msg in check_semantics(spec)]
    if problems:
        raise SpecError(problems)
    return spec


def parse_yaml(text: str, *, source: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{source}{where}: YAML syntax error: {problem}"]) from None
    if not isinstance(raw, dict):
        raise SpecError([f"{source}: the spec must be a mapping of keys (name, experiment, model, ...), "
                         f"got {type(raw).__name__}"])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], *, source: str) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML); list items by index."""
    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, value_text = item.partition("=")
        if not sep or not key:
            problems.append(f"{source}: --set {item!r}: expected KEY.PATH=VALUE")
            continue
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError:
            value = value_text
        parts = key.split(".")
        node: Any = raw
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(parts[-1])] = value
            else:
                node[parts[-1]] = value
        except (IndexError, ValueError, TypeError, AttributeError):
            problems.append(f"{source}: --set {item!r}: no such key path {key!r} in the spec")
    if problems:
        raise SpecError(problems)
    return raw


def _loc(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _model_at(loc: Sequence[Any]) -> Optional[type[BaseModel]]:
    """The pydantic model that owns the last key of ``loc`` (for 'allowed keys' hints)."""
    model: Any = SweepSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        while get_origin(ann) is not None and not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            args = [a for a in get_args(ann) if a is not type(None)]
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), args[0] if args else None)
        model = ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _pydantic_line(err: dict[str, Any], *, source: str) -> str:
    loc, kind = err["loc"], err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc)
        allowed = ", ".join(owner.model_fields) if owner else "see the docs"
        return f"{source}: {_loc(loc)}: unknown key; allowed keys here: {allowed}"
    if kind == "missing":
        return f"{source}: {_loc(loc)}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {_loc(loc)}: {msg} (got {err.get('input')!r})"


def check_semantics(spec: SweepSpec) -> list[tuple[str, str]]:
    """Checks that need the registries: names exist, knob values fit the model's shape."""
    from flexvlm_ray.data import DATASETS
    from flexvlm_ray.metrics import METRICS
    from flexvlm_ray.models import MODELS
    from flexvlm_ray.models.base import adapter_options

    problems: list[tuple[str, str]] = []
    if spec.model.family not in MODELS:
        return [("model.family", f"unknown model {spec.model.family!r}; allowed: {', '.join(MODELS.names())}")]
    family = MODELS.get(spec.model.family)
    if spec.model.backend not in family.backends:
        problems.append(("model.backend", f"backend {spec.model.backend!r} is not available for family "
                         f"{spec.model.family!r}; allowed: {', '.join(family.backends)}"))
    try:
        options = adapter_options(options=spec.model.options, trust_remote_code=spec.model.trust_remote_code)
        info = family.describe(preset=spec.model.preset, path=spec.model.path, options=options)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        problems.append(("model", str(exc)))
        info = None

    for i, ds in enumerate(spec.datasets):
        if ds.name not in DATASETS:
            problems.append((f"datasets.{i}.name", f"unknown dataset {ds.name!r}; allowed: {', '.join(DATASETS.names())}"))
            continue
        entry = DATASETS.get(ds.name)
        if ds.split not in entry.splits:
            problems.append((f"datasets.{i}.split", f"{ds.split!r} is not a split of {ds.name}; allowed: {', '.join(entry.splits)}"))
        if entry.metric != "none" and entry.metric not in METRICS:
            problems.append((f"datasets.{i}.name", f"{ds.name} names metric {entry.metric!r}, which is not registered"))
        if ds.num_samples is not None and ds.shards > ds.num_samples:
            problems.append((f"datasets.{i}.shards", f"{ds.shards} shards for {ds.num_samples} samples; allowed 1..{ds.num_samples}"))

    if info is not None:
        problems += _check_knob_ranges(spec, info)
    problems += _check_search(spec)
    problems += _check_control(spec)
    return problems


def _check_control(spec: SweepSpec) -> list[tuple[str, str]]:
    """A closed-loop run: registered policies, one entry per label, a training split every dataset has."""
    if spec.control is None:
        return []
    from flexvlm_ray.control.policies import POLICIES, policy_label
    from flexvlm_ray.data import DATASETS

    problems: list[tuple[str, str]] = []
    if spec.search != "grid":
        problems.append(("search", "a control run takes its configurations from the knob grid; use search: grid"))
    if spec.gpu_types and len(spec.gpu_types) > 1:
        problems.append(("gpu_types", f"a control run fits one controller on one GPU type; got {spec.gpu_types}"))
    labels = []
    for i, policy in enumerate(spec.control.policies):
        if policy.name not in POLICIES:
            problems.append((f"control.policies.{i}.name",
                             f"unknown policy {policy.name!r}; allowed: {', '.join(POLICIES.names())}"))
        if policy.name == "full" and policy.guardrail:
            problems.append((f"control.policies.{i}.guardrail", "the full policy runs no reduced knobs; no guardrail"))
        labels.append(policy_label(policy.name, policy.guardrail))
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        problems.append(("control.policies", f"listed twice: {', '.join(repeated)}"))
    for i, ds in enumerate(spec.datasets):
        if ds.name in DATASETS and spec.control.train_split not in DATASETS.get(ds.name).splits:
            problems.append(("control.train_split", f"{spec.control.train_split!r} is not a split of {ds.name}; "
                             f"allowed: {', '.join(DATASETS.get(ds.name).splits)}"))
        elif ds.name in DATASETS and spec.control.train_split == ds.split:
            problems.append((f"datasets.{i}.split", f"{ds.split!r} is also control.train_split; the policies must be "
                             f"evaluated on held-out requests (another split)"))
    return problems


def _check_search(spec: SweepSpec) -> list[tuple[str, str]]:
    """search: tune needs a grid with more than one configuration and a budget within it."""
    from flexvlm_ray.spec.expand import knob_grid

    if spec.search == "grid":
        return [("tune", "settings for search: tune, but search is 'grid'; remove tune or set search: tune")] \
            if spec.tune is not None else []
    configs = len(knob_grid(spec))
    if configs < 2:
        return [("search", f"tune needs a knob grid of at least 2 configurations, got {configs}")]
    budget = (spec.tune.num_samples if spec.tune else 16)
    if budget > configs:
        return [("tune.num_samples", f"{budget} is above the grid's {configs} configurations; allowed 1..{configs}")]
    return []


def _check_knob_ranges(spec: SweepSpec, info: Any) -> list[tuple[str, str]]:
    knobs, problems = spec.knobs, []
    limits = {
        "top_k": (info.num_experts, f"the model's {info.num_experts} experts", "the model is dense (no experts)"),
        "active_blocks": (info.num_blocks, f"the model's {info.num_blocks} blocks", "the model has no blocks"),
        "max_crops": (info.max_crops_limit, f"the preprocessing limit of {info.max_crops_limit} crops",
                      "this model has no crop knob (it sets vision tokens by image size)"),
    }
    for name, (limit, what, none_msg) in limits.items():
        values = [v for v in grid_values(getattr(knobs, name)) if v is not None]
        if values and limit == 0:
            problems.append((f"knobs.{name}", f"{values}: {none_msg}; remove this knob"))
            continue
        bad = [v for v in values if v > limit]
        if bad:
            problems.append((f"knobs.{name}", f"{bad} above {what}; allowed 1..{limit}"))
    return problems
