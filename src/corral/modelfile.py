"""Model declarations in YAML files: parsing and validation with errors that name file and field."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.backends.capabilities import Capability, expand_aliases
from corral.domain.entities import ModelSpec, Scheduling
from corral.domain.sizes import parse_size
from corral.errors import ConfigError

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$"
MODEL_FILE_SUFFIXES = (".yaml", ".yml")


class SchedulingDecl(BaseModel):
    """The `scheduling:` block of a model file."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=0, ge=0)
    spread_all: bool = False
    node_selector: dict[str, str] = Field(default_factory=dict)
    scale_down_delay: float = Field(default=300.0, ge=0)

    def to_domain(self) -> Scheduling:
        return Scheduling(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            spread_all=self.spread_all,
            node_selector=dict(self.node_selector),
            scale_down_delay=self.scale_down_delay,
        )


class ModelDecl(BaseModel):
    """One model as written in YAML (or sent to the admin API)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    backend: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    artifact: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    memory: int | None = None
    scheduling: SchedulingDecl = Field(default_factory=SchedulingDecl)
    #: narrows the backend's capabilities (`capabilities: [chat]`); None: all of them
    capabilities: tuple[Capability, ...] | None = Field(default=None, min_length=1)

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
            capabilities=self.capabilities,
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
