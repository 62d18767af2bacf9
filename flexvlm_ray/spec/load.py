"""YAML -> validated SweepSpec, with one error line per problem and no side effects.

Every line names the file, the key path, the bad value and what is allowed, e.g.
``sweeps/x.yaml: knobs.top_k: 80 is above the model's 64 experts; allowed 1..64``.
"""
from __future__ import annotations

import copy
import difflib
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from flexvlm_ray.spec.schema import SweepSpec, grid_values

MAX_SPEC_BYTES = 1 << 20     # a spec file larger than this is refused unread
MAX_LINE_CHARS = 300         # each problem line is cut to this length
MAX_PROBLEMS = 50            # at most this many problem lines, then a count
MAX_UNITS = 100_000          # expanded work units; --max-units raises it


class SpecError(ValueError):
    """A spec that cannot run; ``problems`` holds one line per problem, each of readable length."""

    def __init__(self, problems: list[str]) -> None:
        lines = [truncate(" ".join(p.split())) for p in problems[:MAX_PROBLEMS]]  # one line each
        if len(problems) > MAX_PROBLEMS:
            lines.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        super().__init__("\n".join(lines))
        self.problems = lines


def shipped_sweeps() -> Path:
    """The sweep files installed with the package (``sweeps/`` of the checkout)."""
    return Path(__file__).resolve().parent.parent / "sweeps"


def resolve_spec_path(path: str | Path) -> Path:
    """``path`` if it exists; else the shipped sweep it names (``e2_pareto``, ``e2_pareto.yaml`` or
    ``sweeps/e2_pareto.yaml``), so ``flexvlm-ray launch`` finds the sweeps outside a checkout."""
    path = Path(path)
    if path.exists():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    shipped = shipped_sweeps() / name
    if (path.parent in (Path("."), Path("sweeps"))) and shipped.is_file():
        return shipped
    return path


def truncate(line: str, limit: int = MAX_LINE_CHARS) -> str:
    return line if len(line) <= limit else line[:limit - 25] + f" ... ({len(line)} chars)"


def load_spec(path: str | Path, *, overrides: Sequence[str] = (), max_units: Optional[int] = None) -> SweepSpec:
    path = resolve_spec_path(path)
    return load_spec_text(read_spec_text(path), source=str(path), overrides=overrides, max_units=max_units)


def read_spec_text(path: str | Path) -> str:
    """The spec file's text; SpecError when it cannot be read, is too large or is not UTF-8 text."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError([f"{path}: the spec is {size} bytes; a spec may have at most {MAX_SPEC_BYTES}"])
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError([f"{path}: cannot read the spec: {exc.strerror or exc}"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         f"a spec is a YAML text file"]) from None


def load_spec_text(text: str, *, source: str, overrides: Sequence[str] = (),
                   max_units: Optional[int] = None) -> SweepSpec:
    raw = parse_yaml(text, source=source)
    raw = apply_overrides(raw, overrides, source=source)
    origin = _origins(overrides, source=source)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([_pydantic_line(err, source=origin(err["loc"])) for err in exc.errors()]) from None
    limit = MAX_UNITS if max_units is None else max_units
    count = unit_count(spec)
    if count > limit:
        raise SpecError([f"{source}: the spec expands to {count} work units, above the cap of {limit}; "
                         f"shrink the grid, or raise the cap with --max-units {count}"])
    problems = [f"{origin(loc.split('.'))}: {loc}: {msg}" for loc, msg in check_semantics(spec)]
    if problems:
        raise SpecError(problems)
    return spec


def _origins(overrides: Sequence[str], *, source: str):
    """loc -> where its value came from: the last ``--set`` whose key path overlaps the loc
    (either is a prefix of the other), else the spec file."""
    keyed = [(item.partition("=")[0].split("."), item) for item in overrides]

    def origin(loc: Sequence[Any]) -> str:
        parts = [str(p) for p in loc]
        for key, item in reversed(keyed):
            n = min(len(key), len(parts))
            if n and key[:n] == parts[:n]:
                return f"--set {item}"
        return source

    return origin


def unit_count(spec: SweepSpec) -> int:
    """How many work units ``expand`` would make, computed without making them."""
    k = spec.knobs
    configs = len(grid_values(k.max_crops)) * len(grid_values(k.top_k)) * len(grid_values(k.max_new_tokens))
    configs *= len(k.active_blocks) * len(k.block_policy) if k.active_blocks is not None else 1
    shards = sum(ds.shards for ds in spec.datasets)
    return configs * shards * spec.repeats * len(spec.gpu_types or [None])


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` refusing aliases (``*name``): an alias can expand a few bytes into
    gigabytes ("billion laughs"), and a spec has no need for them."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            mark = event.start_mark
            raise yaml.YAMLError(f"line {mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed "
                                 f"in a spec; write the value out")
    return yaml.safe_load(text)


def parse_yaml(text: str, *, source: str) -> dict[str, Any]:
    try:
        raw = safe_load_yaml(text)
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
            problems.append(f"--set {item!r}: expected KEY.PATH=VALUE")
            continue
        try:
            value = safe_load_yaml(value_text)
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
            problems.append(f"--set {item!r}: no such key path {key!r} in the spec {source}")
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
        hint = did_you_mean(str(loc[-1]), list(owner.model_fields)) if owner else ""
        return f"{source}: {_loc(loc)}: unknown key{hint}; allowed keys here: {allowed}"
    if kind == "missing":
        return f"{source}: {_loc(loc)}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = "" if "got " in msg else f" (got {truncate(repr(err.get('input')), 80)})"
    return f"{source}: {_loc(loc)}: {msg}{got}"


def did_you_mean(name: str, allowed: Sequence[str]) -> str:
    """' (did you mean top_k?)' for the closest allowed name, or ''."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_semantics(spec: SweepSpec) -> list[tuple[str, str]]:
    """Checks that need the registries: names exist, knob values fit the model's shape."""
    from flexvlm_ray.data import DATASETS
    from flexvlm_ray.metrics import METRICS
    from flexvlm_ray.models import MODELS, describe_model
    from flexvlm_ray.models.base import adapter_options

    problems: list[tuple[str, str]] = []
    if spec.model.family not in MODELS:
        return [("model.family", f"unknown model {spec.model.family!r}{did_you_mean(spec.model.family, MODELS.names())}; "
                                 f"allowed: {', '.join(MODELS.names())}")]
    info = None
    if spec.model.path is not None and not Path(spec.model.path).expanduser().exists():
        problems.append(("model.path", f"{spec.model.path} does not exist on this machine (a path must be "
                                       f"valid on the driver and on every worker node)"))
    else:
        try:
            options = adapter_options(options=spec.model.options, trust_remote_code=spec.model.trust_remote_code)
            info = describe_model(spec.model.family, preset=spec.model.preset, path=spec.model.path, options=options)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            problems.append(("model", str(exc)))
    if info is not None and spec.model.backend not in info.backends:
        problems.append(("model.backend", f"backend {spec.model.backend!r} is not available for family "
                         f"{spec.model.family!r}; allowed: {', '.join(info.backends)}"))

    for i, ds in enumerate(spec.datasets):
        if ds.name not in DATASETS:
            problems.append((f"datasets.{i}.name", f"unknown dataset {ds.name!r}{did_you_mean(ds.name, DATASETS.names())}; "
                                                   f"allowed: {', '.join(DATASETS.names())}"))
            continue
        entry = DATASETS.get(ds.name)
        if ds.path is not None and entry.synthetic:
            problems.append((f"datasets.{i}.path", f"{ds.name} is synthetic (generated in the package) and reads "
                                                   f"no files; remove path"))
        elif ds.path is not None and not Path(ds.path).expanduser().exists():
            problems.append((f"datasets.{i}.path", f"{ds.path} does not exist on this machine (a path must be "
                                                   f"valid on the driver and on every worker node)"))
        if ds.split not in entry.splits:
            problems.append((f"datasets.{i}.split", f"{ds.split!r} is not a split of {ds.name}; allowed: {', '.join(entry.splits)}"))
        if entry.metric != "none" and entry.metric not in METRICS:
            problems.append((f"datasets.{i}.name", f"{ds.name} names metric {entry.metric!r}, which is not registered"))
        if ds.num_samples is not None and ds.shards > ds.num_samples:
            problems.append((f"datasets.{i}.shards", f"{ds.shards} shards for {ds.num_samples} samples; allowed 1..{ds.num_samples}"))

    if info is not None:
        problems += _check_knob_ranges(spec, info)
        problems += _check_context(spec, info)
        for line in context_notes(spec, info):
            print(f"note: {line}", file=sys.stderr)
    problems += _check_search(spec)
    problems += _check_control(spec)
    return problems


def _check_control(spec: SweepSpec) -> list[tuple[str, str]]:
    """A closed-loop run: registered policies, one entry per label, a training split every dataset has."""
    if spec.control is None:
        return []
    from flexvlm_ray.data import DATASETS

    problems: list[tuple[str, str]] = []
    if spec.search != "grid":
        problems.append(("search", "a control run takes its configurations from the knob grid; use search: grid"))
    if spec.gpu_types and len(spec.gpu_types) > 1:
        problems.append(("gpu_types", f"a control run fits one controller on one GPU type; got {spec.gpu_types}"))
    labels = []
    for i, policy in enumerate(spec.control.policies):
        if policy.name == "full" and policy.guardrail:
            problems.append((f"control.policies.{i}.guardrail", "the full policy runs no reduced knobs; no guardrail"))
        labels.append(f"{policy.name}+guard" if policy.guardrail else policy.name)
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


def _check_context(spec: SweepSpec, info: Any) -> list[tuple[str, str]]:
    """Output lengths that cannot run on the chosen backend at all (e.g. past a static KV cache)."""
    limit = info.context_limits.get(spec.model.backend, 0)
    long = [v for v in grid_values(spec.knobs.max_new_tokens) if v is not None and limit and v >= limit]
    if not long:
        return []
    return [("knobs.max_new_tokens", f"{long} do not fit the {spec.model.backend} backend's {limit} positions "
                                     f"(prompt included); lower max_new_tokens, or raise model.options.cache_len "
                                     f"(e.g. {2 * limit})")]


def context_notes(spec: SweepSpec, info: Any) -> list[str]:
    """Output lengths that, with any prompt, run past the positions the model was trained on. Not an
    error: every shipped family computes rotary positions per token, so such a run is valid for
    latency (its answers past that length are out of distribution); the hard cap is the schema's."""
    limit = info.context_limits.get(spec.model.backend, 0)
    if not info.trained_context:
        return []
    long = [v for v in grid_values(spec.knobs.max_new_tokens)
            if v is not None and v >= info.trained_context and not (limit and v >= limit)]
    if not long:
        return []
    return [f"knobs.max_new_tokens: {long} reach {info.preset}'s trained context of {info.trained_context} "
            f"positions (prompt included); rotary positions are computed per token, so latency stays valid, "
            f"answers past that length are out of distribution"]


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
