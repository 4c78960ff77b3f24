"""Model declarations in YAML files: parsing and validation with errors that name file and field."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from corral.backends.capabilities import Capability, expand_aliases
from corral.domain.autoscale import ScalingTarget, Signal
from corral.domain.entities import ModelSpec, Rollout, RolloutStrategy, Scheduling
from corral.domain.routing_weights import RoutingWeights
from corral.domain.sizes import INT32_MAX, INT64_MAX, parse_size
from corral.errors import ConfigError

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$"
MODEL_FILE_SUFFIXES = (".yaml", ".yml")


#: Names a model file may give the scaling signal.
METRICS = {
    "queue_wait": Signal.QUEUE_WAIT,
    "inflight": Signal.INFLIGHT,
    "inflight_per_replica": Signal.INFLIGHT,
    "ttft_p90": Signal.TTFT_P90,
}


class ScalingDecl(BaseModel):
    """The `scheduling.scaling:` block: scale on one load signal towards a target."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    target: float = Field(gt=0, allow_inf_nan=False)
    window: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    idle_timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_step: int = Field(default=0, ge=0, le=INT32_MAX)

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"must be one of queue_wait, inflight, ttft_p90; got {value!r}")
        return value

    def to_domain(self) -> ScalingTarget:
        return ScalingTarget(
            metric=METRICS[self.metric],
            target=self.target,
            window=self.window,
            idle_timeout=self.idle_timeout,
            max_step=self.max_step,
        )


class SchedulingDecl(BaseModel):
    """The `scheduling:` block of a model file."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=0, ge=0, le=INT32_MAX)
    max_replicas: int = Field(default=0, ge=0, le=INT32_MAX)
    spread_all: bool = False
    node_selector: dict[str, str] = Field(default_factory=dict)
    scale_down_delay: float = Field(default=300.0, ge=0, allow_inf_nan=False)
    scaling: ScalingDecl | None = None
    max_concurrency: int | None = Field(default=None, ge=0)  # per replica; 0 = unlimited
    deadline: float | None = Field(default=None, gt=0)  # seconds a request may wait in line

    @model_validator(mode="after")
    def _bounds(self) -> SchedulingDecl:
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}"
            )
        if self.scaling and self.scaling.idle_timeout is not None and self.min_replicas:
            raise ValueError("scaling.idle_timeout unloads a model: it needs min_replicas 0")
        return self

    def to_domain(self) -> Scheduling:
        return Scheduling(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            spread_all=self.spread_all,
            node_selector=dict(self.node_selector),
            scale_down_delay=self.scale_down_delay,
            scaling=self.scaling.to_domain() if self.scaling else None,
            max_concurrency=self.max_concurrency,
            deadline=self.deadline,
        )


class RolloutDecl(BaseModel):
    """The `rollout:` block (or just its strategy: `rollout: recreate`)."""

    model_config = ConfigDict(extra="forbid")

    strategy: RolloutStrategy = RolloutStrategy.ROLLING
    newest_only: bool = True

    def to_domain(self) -> Rollout:
        return Rollout(strategy=self.strategy, newest_only=self.newest_only)


class RoutingDecl(BaseModel):
    """The `routing:` block: how much each scorer of the routing pipeline counts (defaults:
    load 1, prefix 1, session 1, speed 0, affinity_slack 0.5, concurrency 8)."""

    model_config = ConfigDict(extra="forbid")

    load: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    prefix: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    session: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    speed: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    affinity_slack: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    concurrency: int = Field(default=8, ge=1)

    def to_domain(self) -> RoutingWeights:
        return RoutingWeights(
            load=self.load,
            prefix=self.prefix,
            session=self.session,
            speed=self.speed,
            affinity_slack=self.affinity_slack,
            concurrency=self.concurrency,
        )


class ModelDecl(BaseModel):
    """One model as written in YAML (or sent to the admin API)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    backend: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    artifact: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    memory: int | None = Field(default=None, ge=0, le=INT64_MAX)  # bytes
    scheduling: SchedulingDecl = Field(default_factory=SchedulingDecl)
    rollout: RolloutDecl = Field(default_factory=RolloutDecl)
    #: narrows the backend's capabilities (`capabilities: [chat]`); None: all of them
    capabilities: tuple[Capability, ...] | None = Field(default=None, min_length=1)
    routing: RoutingDecl = Field(default_factory=RoutingDecl)

    @field_validator("rollout", mode="before")
    @classmethod
    def _strategy(cls, value: object) -> object:
        return {"strategy": value} if isinstance(value, str) else value

    @field_validator("capabilities", mode="before")
    @classmethod
    def _expand_aliases(cls, value: Any) -> Any:
        """`audio` → transcription, speech (as in the catalog)."""
        return tuple(expand_aliases(value)) if isinstance(value, list | tuple) else value

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        if value is None:
            return None
        if isinstance(value, str | int | float):
            return parse_size(value)
        raise ValueError(f"not a size: {value!r}")

    def to_domain(self) -> ModelSpec:
        return ModelSpec(
            name=self.name,
            backend=self.backend,
            artifact=self.artifact,
            options=dict(self.options),
            memory=self.memory,
            scheduling=self.scheduling.to_domain(),
            rollout=self.rollout.to_domain(),
            capabilities=self.capabilities,
            routing=self.routing.to_domain(),
        )


def parse_model(data: Any, *, path: str = "<api>") -> ModelSpec:
    """Validate one model mapping; raise ConfigError naming `path` and the first bad field."""
    if not isinstance(data, dict):
        raise ConfigError("a model must be a mapping with at least name and backend", path=path)
    try:
        return ModelDecl.model_validate(data).to_domain()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ConfigError(first["msg"], path=path, field=field) from None


def patch_scheduling(current: Mapping[str, Any], changes: Mapping[str, Any]) -> Scheduling:
    """The scheduling block `current` (as the store writes it) with only the fields in
    `changes` replaced (`scaling: null` removes the scaling target), validated as a whole;
    ConfigError names the first bad field."""
    path = "PATCH scheduling"
    unknown = sorted(set(changes) - set(SchedulingDecl.model_fields))
    if unknown:
        raise ConfigError("unknown field", path=path, field=unknown[0])
    try:
        return SchedulingDecl.model_validate({**current, **changes}).to_domain()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ConfigError(first["msg"], path=path, field=field) from None


def parse_model_file(path: Path) -> list[ModelSpec]:
    """Parse one YAML file holding a model, a list of models, or `models: [...]`."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        raise ConfigError(f"invalid YAML: {exc}", path=str(path), field=where) from None
    if data is None:
        return []
    if isinstance(data, dict) and "models" in data and "name" not in data:
        data = data["models"]
    items = data if isinstance(data, list) else [data]
    specs = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(data, list) else str(path)
        specs.append(parse_model(item, path=where))
    return specs


def load_models_dir(directory: Path) -> tuple[list[ModelSpec], list[ConfigError]]:
    """Parse every *.yaml / *.yml file but hidden ones; broken files are returned as errors, the
    rest load.

    A model name declared twice keeps the first declaration and reports the second.
    """
    specs: dict[str, ModelSpec] = {}
    errors: list[ConfigError] = []
    if not directory.is_dir():
        return [], [ConfigError("models directory does not exist", path=str(directory))]
    files = sorted(
        p
        for p in directory.iterdir()
        if p.suffix in MODEL_FILE_SUFFIXES and not p.name.startswith(".")  # editors' locks
    )
    for path in files:
        try:
            parsed = parse_model_file(path)
        except ConfigError as exc:
            errors.append(exc)
            continue
        for spec in parsed:
            if spec.name in specs:
                errors.append(ConfigError("declared twice", path=str(path), field=spec.name))
                continue
            specs[spec.name] = spec
    return list(specs.values()), errors
