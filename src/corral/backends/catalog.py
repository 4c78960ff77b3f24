"""The backend catalog: which inference engines a worker can run, and how to launch them."""

from __future__ import annotations

import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.backends.capabilities import Capability, expand_aliases
from corral.domain.entities import ModelSpec
from corral.domain.sizes import parse_size
from corral.errors import ConfigError

#: Placeholders a launch command may use.
PLACEHOLDERS = frozenset({"corral_backends", "python", "host", "port", "model", "model_path"})


class BackendEntry(BaseModel):
    """One backend of the catalog (see catalog.yaml for the meaning of each field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    version: str = "0"
    requirements: tuple[str, ...] = ()
    command: tuple[str, ...]
    options: Literal["flags", "none"] = "flags"
    option_names: Literal["dashes", "underscores"] = "dashes"
    option_bools: Literal["switch", "value"] = "switch"
    capabilities: tuple[Capability, ...] = ("chat", "completions")
    health: str = "/health"
    memory: str | int | None = None
    gpu: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    install_timeout: float = 1800.0
    #: requests one replica may have in flight when its model sets no `max_concurrency`
    #: (0 = unlimited); `concurrency_option` names the model option that sets the engine's
    #: batch slots, whose value then is the default (sim: slots, vLLM: max_num_seqs)
    max_concurrency: int = Field(default=0, ge=0)
    concurrency_option: str | None = None

    @field_validator("capabilities", mode="before")
    @classmethod
    def _expand_aliases(cls, value: Any) -> Any:
        """`audio` → transcription, speech (each unknown name keeps its position, for the item
        check to name it)."""
        return tuple(expand_aliases(value)) if isinstance(value, list | tuple) else value

    @field_validator("command")
    @classmethod
    def _known_placeholders(cls, command: tuple[str, ...]) -> tuple[str, ...]:
        for part in command:
            for _, name, _, _ in string.Formatter().parse(part):
                if name is not None and name not in PLACEHOLDERS:
                    known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                    raise ValueError(f"unknown placeholder {{{name}}} (known: {known})")
        return command

    @property
    def needs_install(self) -> bool:
        return bool(self.requirements)

    @property
    def default_memory(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)

    def serves(self, capability: Capability | None) -> bool:
        """Whether this backend serves requests needing `capability` (None: no inference
        endpoint, e.g. /v1/models, which every backend answers)."""
        return capability is None or capability in self.capabilities

    def argv(
        self,
        *,
        python: str,
        host: str,
        port: int | str,
        model: str,
        model_path: str | None,
        options: Mapping[str, Any],
    ) -> list[str]:
        """The launch command with placeholders filled and model options turned into flags."""
        values = {
            "corral_backends": str(Path(__file__).resolve().parent),
            "python": python,
            "host": host,
            "port": str(port),
            "model": model,
            "model_path": model_path or "",
        }
        argv = [part.format(**values) for part in self.command]
        if self.options == "flags":
            argv += option_flags(
                options,
                underscores=self.option_names == "underscores",
                bool_values=self.option_bools == "value",
            )
        return argv


def option_flags(
    options: Mapping[str, Any], *, underscores: bool = False, bool_values: bool = False
) -> list[str]:
    """{"foo_bar": 1, "fast": True, "off": False} → ["--foo-bar", "1", "--fast"].

    `underscores` keeps `--foo_bar`; `bool_values` passes booleans as values
    (`--fast true --off false`) for parsers that want them."""
    flags: list[str] = []
    for key, value in options.items():
        if key in RESERVED_OPTIONS or value is None or (value is False and not bool_values):
            continue
        flag = "--" + (key if underscores else key.replace("_", "-"))
        if isinstance(value, bool) and bool_values:
            flags += [flag, "true" if value else "false"]
        elif value is True:
            flags.append(flag)
        elif isinstance(value, list | tuple):
            for item in value:
                flags += [flag, str(item)]
        else:
            flags += [flag, str(value)]
    return flags


#: Model options Corral itself interprets; never passed to a backend as flags.
RESERVED_OPTIONS = frozenset({"gpu", "context_length", "ready_timeout", "env"})


@dataclass(frozen=True)
class Catalog:
    """Backend entries by name; later sources override earlier ones."""

    entries: Mapping[str, BackendEntry] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> Catalog:
        text = resources.files("corral.backends").joinpath("catalog.yaml").read_text()
        return cls(_parse(text, "corral/backends/catalog.yaml"))

    def with_dir(self, directory: Path | None) -> Catalog:
        """This catalog plus the entries of every *.yaml file in `directory`."""
        if directory is None:
            return self
        merged = dict(self.entries)
        for path in sorted(directory.glob("*.y*ml")):
            merged.update(_parse(path.read_text(), str(path)))
        return Catalog(merged)

    def get(self, name: str) -> BackendEntry | None:
        return self.entries.get(name)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def gpu_backends(self) -> frozenset[str]:
        return frozenset(n for n, e in self.entries.items() if e.gpu)

    def runnable(self, has_gpu: bool) -> list[str]:
        """Backends a node can run: everything, minus GPU backends on a node without GPU."""
        return sorted(n for n, e in self.entries.items() if has_gpu or not e.gpu)

    def max_concurrency_of(self, spec: ModelSpec) -> int:
        """Requests one replica of `spec` may have in flight (0 = unlimited): the model's own
        setting, else its engine's batch slots from its options, else its backend's default."""
        if spec.scheduling.max_concurrency is not None:
            return spec.scheduling.max_concurrency
        entry = self.entries.get(spec.backend)
        if entry is None:
            return 0
        if entry.concurrency_option is not None:
            slots = spec.options.get(entry.concurrency_option)
            if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0:
                return slots
        return entry.max_concurrency

    def check_model(self, spec: ModelSpec) -> str | None:
        """A reason the model cannot run, or None."""
        if spec.backend not in self.entries:
            return f"unknown backend {spec.backend!r} (known: {', '.join(self.names())})"
        return self.check_capabilities(spec)

    def check_capabilities(self, spec: ModelSpec) -> str | None:
        """Why the model's `capabilities` are not a subset of its backend's, or None."""
        entry = self.entries.get(spec.backend)
        if entry is None or spec.capabilities is None:
            return None
        extra = [c for c in spec.capabilities if c not in entry.capabilities]
        if not extra:
            return None
        return (
            f"capabilities: backend {spec.backend!r} does not serve {', '.join(extra)}"
            f" (it serves: {', '.join(entry.capabilities)})"
        )

    def capabilities_of(self, spec: ModelSpec) -> tuple[str, ...] | None:
        """The endpoints `spec` may serve: its backend's, narrowed by its own `capabilities`;
        None when neither is known here (a backend only a node's own catalog has: allow)."""
        entry = self.entries.get(spec.backend)
        if entry is None:
            return spec.capabilities
        if spec.capabilities is None:
            return entry.capabilities
        return tuple(c for c in spec.capabilities if c in entry.capabilities)


def _parse(text: str, path: str) -> dict[str, BackendEntry]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=path) from None
    items = data.get("backends") if isinstance(data, dict) else data
    if items is None:
        return {}
    if not isinstance(items, list):
        raise ConfigError("must be a list of backend entries", path=path, field="backends")
    entries: dict[str, BackendEntry] = {}
    for i, item in enumerate(items):
        try:
            entry = BackendEntry.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(first["msg"], path=path, field=f"backends[{i}].{where}") from None
        entries[entry.name] = entry
    return entries


def self_python() -> str:
    """The interpreter Corral runs under (for backends that need no install)."""
    return sys.executable
