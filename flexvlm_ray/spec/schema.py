"""The typed sweep spec. Structure and types are checked here (pydantic, unknown keys are
errors); names and ranges that depend on registries (model shape, datasets) in spec.load."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_serializer, model_validator

from flexvlm_ray.knobs.base import BLOCK_POLICIES
from flexvlm_ray.models.base import BACKENDS
from flexvlm_ray.searchers import SAMPLERS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


GRID_HELP = "an integer, a list of integers, or a range {start: A, stop: B, step: C} (inclusive)"
# Bounds that hold before any model is known (spec.load checks each knob against the model too).
MAX_GRID_VALUES = 1024        # values of one knob
MAX_KNOB_VALUE = 1_000_000    # any knob value
MAX_NEW_TOKENS = 32_768       # output length; also bounded by the model's context where it is known
MAX_REPEATS, MAX_SHARDS, MAX_SAMPLES = 1000, 100_000, 10_000_000


def _to_grid(value: Any) -> list[int]:
    """Normalize a grid field to a list of ints; ranges are inclusive of stop."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        return [value]
    if isinstance(value, list) and len(value) <= MAX_GRID_VALUES and all(is_int(v) for v in value):
        return list(value)
    if isinstance(value, dict):
        extra = set(value) - {"start", "stop", "step"}
        if extra or not {"start", "stop"} <= set(value):
            raise ValueError(f"a range needs keys start, stop (and optional step), got keys {sorted(value)}")
        start, stop, step = value["start"], value["stop"], value.get("step", 1)
        if not all(is_int(v) for v in (start, stop, step)) or step < 1 or stop < start:
            raise ValueError(f"a range needs integers start <= stop and step >= 1, got {value}")
        count = (stop - start) // step + 1
        if count > MAX_GRID_VALUES:
            raise ValueError(f"the range has {count} values; a knob takes at most {MAX_GRID_VALUES}")
        return list(range(start, stop + 1, step))
    if isinstance(value, list) and len(value) > MAX_GRID_VALUES:
        raise ValueError(f"{len(value)} values; a knob takes at most {MAX_GRID_VALUES}")
    raise ValueError(f"expected {GRID_HELP}")


IntGrid = Annotated[list[int], BeforeValidator(_to_grid)]


def grid_values(grid: Optional[list[int]]) -> list[Optional[int]]:
    """The values of a grid field; an absent grid is the model default (None)."""
    return [None] if grid is None else list(grid)


class ModelSpec(_Strict):
    family: str = Field(description="model family name (registry), e.g. flexmoe")
    preset: Optional[str] = Field(default=None, description="named shape/weights of the family")
    path: Optional[str] = Field(default=None, description="local checkpoint folder")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: cuda when the worker sees a GPU, else cpu")
    backend: Literal[BACKENDS] = "hf"
    trust_remote_code: bool = False
    options: dict[str, Any] = Field(default_factory=dict, description="family-specific options")


class DatasetSpec(_Strict):
    name: str
    split: str = "validation"
    num_samples: Optional[int] = Field(default=None, ge=1, le=MAX_SAMPLES)
    shards: int = Field(default=1, ge=1, le=MAX_SHARDS, description="disjoint shards (one unit each)")
    path: Optional[str] = Field(default=None, description="local folder/Parquet instead of the hub")


class KnobGrid(_Strict):
    max_crops: Optional[IntGrid] = None
    top_k: Optional[IntGrid] = None
    active_blocks: Optional[IntGrid] = None
    block_policy: list[Literal[BLOCK_POLICIES]] = Field(default_factory=lambda: ["prefix"])
    max_new_tokens: IntGrid = Field(default_factory=lambda: [16])

    @field_validator("max_crops", "top_k", "active_blocks", "max_new_tokens")
    @classmethod
    def _grid(cls, grid: Optional[IntGrid], info) -> Optional[IntGrid]:
        values = grid_values(grid)
        if grid is not None and not grid:
            raise ValueError("empty grid: give at least one value")
        floor = 0 if info.field_name == "max_new_tokens" else 1
        bad = [v for v in values if v is not None and v < floor]
        if bad:
            raise ValueError(f"values must be >= {floor}, got {bad[:10]}")
        ceiling = MAX_NEW_TOKENS if info.field_name == "max_new_tokens" else MAX_KNOB_VALUE
        bad = [v for v in values if v is not None and v > ceiling]
        if bad:
            raise ValueError(f"values must be <= {ceiling}, got {bad[:10]}")
        if len(set(values)) != len(values):
            raise ValueError(f"repeated values {values[:20]}")
        return grid

    @field_validator("block_policy")
    @classmethod
    def _policies(cls, policies: list[str]) -> list[str]:
        if not policies:
            raise ValueError(f"empty grid: give at least one of {', '.join(BLOCK_POLICIES)}")
        return policies


class MeasureSpec(_Strict):
    warmup: int = Field(default=1, ge=0, le=1000, description="untimed passes before the first timed pass of every "
                                                               "distinct shape (crops, tokens) and knob setting")
    runs_per_sample: int = Field(default=1, ge=1, le=1000, description="timed passes of every sample (the minimum "
                                                                        "with target_ci)")
    target_ci: Optional[float] = Field(
        default=None, gt=0, lt=1, description="adaptive repeats: timed passes continue until the 95% CI "
                                              "half-width of T_total is <= target_ci x its mean (e.g. 0.02) "
                                              "or max_runs passes ran")
    max_runs: Optional[int] = Field(default=None, ge=1, le=10000,
                                    description="most timed passes per sample with target_ci")
    decode_mode: Literal["forced", "natural"] = Field(
        default="forced", description="forced: exactly max_new_tokens (EOS ignored); natural: stop at EOS")
    prefill_hook: bool = Field(default=True, description="also time prefill with block hooks (in a separate "
                                                         "pass, so the timed pass keeps the deployed path)")
    per_token_decode: bool = Field(default=False, description="record every decode step's time")
    block_parts: bool = Field(default=False, description="attention vs FFN time per block (prefill)")
    score: bool = Field(default=True, description="score predictions with the dataset's metric")
    gc_off: bool = Field(default=True, description="Python garbage collection off during the unit's passes")
    pin_cpus: Optional[bool] = Field(default=None, description="pin the thread that issues the kernels to "
                                                               "cpu_threads cores (a slice per GPU); default: on for a "
                                                               "GPU worker, off on the CPU (where it would change the "
                                                               "computation)")
    cpu_threads: Optional[int] = Field(default=None, ge=1, description="torch CPU threads during the passes "
                                                                       "(with pin_cpus: the cores pinned; default 4)")
    burn_in_s: Optional[float] = Field(default=None, ge=0, le=600,
                                       description="seconds of untimed passes a worker runs once, before its first "
                                                   "timed pass; default: 10 on a GPU worker, 0 on the CPU")
    sync: Literal["pass", "stage"] = Field(default="pass", description="pass: one host synchronisation per "
                                                                       "timed pass; stage: one after every stage")
    check_gpu_idle: bool = Field(default=True, description="record how many other processes use the worker's GPU")

    @model_validator(mode="after")
    def _adaptive(self) -> "MeasureSpec":
        if self.max_runs is not None and self.target_ci is None:
            raise ValueError("max_runs needs target_ci (the CI half-width that ends the repeats)")
        if self.target_ci is not None:
            if self.max_runs is None:
                raise ValueError("target_ci needs max_runs (the most timed passes per sample)")
            if self.max_runs < max(self.runs_per_sample, 2):
                raise ValueError(f"max_runs ({self.max_runs}) must be >= runs_per_sample "
                                 f"({self.runs_per_sample}) and >= 2")
        return self


class TuneSpec(_Strict):
    num_samples: int = Field(default=16, ge=1, le=MAX_GRID_VALUES, description="distinct knob configurations the search may measure")
    seed: int = Field(default=0, description="seed of the searcher's sampler")
    searcher: Literal[SAMPLERS] = Field(
        default="tpe", description="optuna sampler behind Ray Tune's OptunaSearch (multi-objective)")


# the policies of flexvlm_ray.control.POLICIES (spec sits below control in the import order, so the names
# are listed here; tests/test_e4.py checks that the two agree)
# ``learned:<trainer>``: E4's learned network trained by an E5 trainer (control.trained, control.train.TRAINERS)
E5_TRAINERS = ("dpo", "grpo", "lut", "ppo", "supervised")
POLICY_NAMES = ("flops_proxy", "full", "learned", *(f"learned:{t}" for t in E5_TRAINERS), "lut", "random", "static")


class PolicySpec(_Strict):
    name: Literal[POLICY_NAMES] = Field(description="policy name (flexvlm_ray.control.POLICIES)")
    guardrail: bool = Field(default=False, description="drop configs whose estimated T_total (x its spread: "
                            "control.guard_quantile) > budget x margin")


def _policy_entry(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class TrainedSpec(_Strict):
    """How the ``learned:<trainer>`` policies train (E5 trainers on the bandit of the run's training rows;
    docs/E5_TRAINING.md): every listed one with the same budget, reward and seed (the spec's)."""

    samples: int = Field(default=10_000, ge=1, description="environment samples each trainer may spend")
    held_out: float = Field(default=0.25, gt=0, lt=1, description="share of the training requests kept out of "
                            "the bandit (its own held-out curve; the run's held-out requests are never seen)")
    beta: float = Field(default=1.0, ge=0, description="reward: weight of the relative budget overshoot")
    gamma: float = Field(default=0.5, ge=0, description="reward: penalty of a violated budget")
    eval_every: int = Field(default=1000, ge=1, description="environment samples between curve points")
    hparams: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per trainer: hyperparameters "
                                               "over its defaults, e.g. {ppo: {lr: 0.003}}")

    @field_validator("hparams")
    @classmethod
    def _trainers(cls, hparams: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(hparams) - set(E5_TRAINERS))
        if unknown:
            raise ValueError(f"unknown trainer {', '.join(unknown)}; allowed: {', '.join(E5_TRAINERS)}")
        return hparams


class ControlSpec(_Strict):
    """A closed-loop (E4) run: a profiling grid over training requests, the full model on the
    held-out requests, then every policy x budget on the held-out requests."""

    policies: list[Annotated[PolicySpec, BeforeValidator(_policy_entry)]] = Field(
        min_length=1, description="policies to evaluate: names or {name, guardrail}")
    budgets: list[float] = Field(default_factory=lambda: [0.35, 0.5, 0.7, 0.85, 1.0],
                                 description="budgets as fractions of the full model's P50 T_total per workload")
    margin: float = Field(default=1.0, gt=0, le=2, description="guardrail: admit configs whose estimate (x its "
                          "spread, with guard_quantile) <= budget x margin")
    guard_quantile: Optional[float] = Field(
        default=0.95, gt=0, le=1, description="calibrated guardrail: estimates x this quantile of measured / "
        "estimated T_total on the training rows (the spread); null: the estimates alone")
    spread_per: Literal["task", "config"] = Field(
        default="config", description="the spread per configuration of a task (its rows; few rows: the task's), or one per task")
    train_split: str = Field(default="train", description="split of every dataset the policies are trained on")
    train_samples: int = Field(default=64, ge=2, description="training requests per dataset")
    quantile: float = Field(default=0.95, gt=0, le=1, description="latency quantile static and lut fit to the budget")
    lut_min_cell: int = Field(default=5, ge=1, description="training requests a lut cell needs (else it falls back)")
    lut_prior: float = Field(default=5.0, ge=0, description="lut: a cell's mean quality shrunk towards its parent's "
                             "as if this many of the parent's requests were added (0: the cell's own mean)")
    lut_pooled_spread: bool = Field(default=True, description="lut: a cell's latency quantile = its median x the "
                                    "task's spread over cell medians (false: the cell's own quantile)")
    hidden: int = Field(default=64, ge=4, le=512, description="learned policy: hidden width of its MLP")
    epochs: int = Field(default=300, ge=1, description="learned policy: full-batch training epochs")
    trained: Optional[TrainedSpec] = Field(default=None, description="the learned:<trainer> policies' E5 training "
                                           "(defaults when omitted)")

    @model_serializer(mode="wrap")
    def _without_unset_trained(self, handler: Any) -> dict[str, Any]:
        # a spec that does not set ``trained`` dumps (hashes, unit ids) as before the key existed
        data = handler(self)
        if data.get("trained") is None:
            data.pop("trained", None)
        return data

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, budgets: list[float]) -> list[float]:
        if not budgets:
            raise ValueError("give at least one budget fraction")
        bad = [b for b in budgets if not 0 < b <= 2]
        if bad:
            raise ValueError(f"budget fractions must be in (0, 2], got {bad}")
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"repeated budget fractions {budgets}")
        return budgets


class TimeoutSpec(_Strict):
    """Limits that keep a run from hanging. Not part of the spec hash or unit ids (they change
    nothing that is measured), so they may be raised in RUN_DIR/spec.yaml before a --resume."""
    unit_s: float = Field(default=1800.0, gt=0, description="a unit running longer on its worker (a "
                          "restarted worker's model load included) is stopped and recorded as a Timeout failure")
    worker_start_s: float = Field(default=900.0, gt=0, description="time for every worker to start and "
                                  "load the model (GPUs free in the cluster included)")


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    experiment: str = Field(description="analysis family, e.g. quickstart, motivation_exp3, e2")
    description: str = Field(default="", max_length=10_000)
    model: ModelSpec
    datasets: list[DatasetSpec] = Field(min_length=1)
    knobs: KnobGrid = Field(default_factory=KnobGrid)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    repeats: int = Field(default=1, ge=1, le=MAX_REPEATS, description="independent repetitions of every unit")
    gpu_types: Optional[list[str]] = Field(
        default=None, min_length=1, description="pin units to these Ray accelerator types")
    order: Literal["grid", "interleave", "shape"] = Field(
        default="grid", description="interleave: alternate configs so clock drift does not follow one knob; "
                                    "shape: units that share CUDA graphs (active blocks, policy, top_k) run "
                                    "one after another, crops within them")
    seed: int = 0
    search: Literal["grid", "tune"] = Field(
        default="grid", description="grid: every knob combination; tune: an adaptive multi-objective search "
                                    "over the knob grid (latency P50 min, mean score max) per dataset")
    tune: Optional[TuneSpec] = Field(default=None, description="settings of search: tune")
    timeouts: TimeoutSpec = Field(default_factory=TimeoutSpec, description="per-unit and worker-start limits")
    control: Optional[ControlSpec] = Field(
        default=None, description="a closed-loop run (E4): policies pick knobs per request under budgets")
