"""Settings of the frontend and the worker: CORRAL_* environment variables, overridden by CLI flags.

Settings are built once at process start and passed down; nothing reads the environment later.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from corral.domain.sizes import MemoryBudget

ADMIN_KEY_FILE = "admin.key"


def default_data_dir() -> Path:
    """The per-user data directory Corral uses when --data-dir is not given."""
    return Path(platformdirs.user_data_dir("corral", appauthor=False))


class FrontendSettings(BaseSettings):
    """Everything `corral serve` needs; see `corral serve --help` for the meaning of each."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/corral"
    nats_url: str = "nats://127.0.0.1:4222"
    public_nats_url: str | None = None  # the NATS URL told to workers; defaults to nats_url
    nats_prefix: str = "corral"  # subject prefix; lets several clusters share one NATS
    # NATS authentication (docs/architecture.md, Security): the directory of the cluster's
    # NATS keys (created on first start); every frontend of a cluster gets the same one
    nats_auth_dir: Path | None = None
    nats_ca_file: Path | None = None  # PEM CA a tls:// NATS server is checked against
    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path | None = None
    model_store: Path | None = None  # artifacts with a relative path are served from here
    token: SecretStr | None = None  # registration token workers join with
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)  # admin keys
    # where the admin key file (admin.key) lives; `corral serve` defaults it to the per-user
    # data directory, a frontend built in-process has none
    data_dir: Path | None = None
    admin_key: bool = True  # create an admin key in data_dir on first start and accept it
    metrics_key: SecretStr | None = None  # /metrics then needs it (or an admin key)
    frontend_id: str = Field(default_factory=lambda: f"fe-{secrets.token_hex(4)}")

    # HTTP serving
    processes: int = Field(default=1, ge=1)  # frontend processes sharing the port (SO_REUSEPORT)
    header_timeout: float = Field(default=10.0, gt=0)  # seconds for a request line + headers
    body_timeout: float = Field(default=30.0, gt=0)  # seconds per window for a request body
    body_min_rate: float = Field(default=1024.0, ge=0)  # bytes/s a body must keep up per window
    keep_alive_timeout: float = Field(default=30.0, gt=0)  # seconds an idle connection stays
    shutdown_timeout: float = Field(default=10.0, ge=0)  # seconds requests get to finish at stop
    tls_cert: Path | None = None  # PEM certificate chain: serve HTTPS
    tls_key: Path | None = None  # PEM private key of tls_cert

    # cold path
    # seconds a request may wait (for a load, or a slot) unless its model's `deadline` or its
    # x-corral-deadline header says otherwise: then 503 with the load's progress, or 504
    wait_budget: float = 60.0
    placement: Literal["binpack", "spread"] = "binpack"
    start_timeout: float = 900.0  # seconds a replica start may take on its node
    load_job_ttl: float = 30.0  # seconds a load job's claim lives without renewal

    # warm path
    health_ttl: float = 30.0  # seconds a successful backend probe stays valid
    request_timeout: float = 600.0  # seconds a backend may take to answer
    max_body_bytes: int = 32 * 1024 * 1024
    spool_memory_bytes: int = Field(default=1024 * 1024, ge=0)  # an upload's bytes kept in
    # memory for forwarding (and resending on a retry); beyond them it goes to a temporary file
    response_ttl: float = Field(default=3600.0, gt=0)  # seconds a response id routes home
    response_map_size: int = Field(default=100_000, ge=0)  # response ids remembered (newest)
    max_inflight: int = 0  # per frontend; 0 = unlimited, else 429 past it
    # request headers passed to backends besides x-*, openai-*, traceparent, accept, user-agent:
    # names, or prefixes ending in "*" (authorization and hop-by-hop headers never pass)
    forward_headers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # admission (corral.frontend.admission): the per-model wait queue in front of the replicas
    queue_max_entries: int = Field(default=1024, ge=0)  # requests waiting per model; then 429
    queue_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)  # their bodies, per model
    max_deadline: float = Field(default=600.0, gt=0)  # the most x-corral-deadline may ask for
    # API keys' priority classes: "KEY=high,KEY2=low"; a key's class is its default and the
    # most its x-corral-priority header may ask for (keys not named: normal, up to high)
    key_priorities: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    load_backoff: float = Field(default=5.0, gt=0)  # seconds after a failed load; doubles
    load_backoff_max: float = Field(default=300.0, gt=0)  # the most it grows to
    load_report_interval: float = 0.2  # seconds between in-flight reports to other frontends
    # routing's prompt-prefix index, shared by the frontends over NATS
    prefix_share_interval: float = Field(default=0.2, gt=0)  # seconds between two batches
    prefix_index_size: int = Field(default=65_536, ge=1)  # prefix hashes remembered
    prefix_ttl: float = Field(default=300.0, gt=0)  # seconds a routed prefix counts as cached
    resync_interval: float = 10.0  # seconds between full snapshot refreshes from PostgreSQL
    last_used_flush_interval: float = 2.0
    # seconds between usage flushes to PostgreSQL; per-key limits hold across frontends
    # within one interval of the other frontends' traffic
    usage_flush_interval: float = Field(default=2.0, gt=0)

    # control loops
    heartbeat_interval: float = 5.0  # told to workers at registration
    unhealthy_after: int = 3  # heartbeat intervals before a node is unhealthy
    offline_after: float = 60.0  # seconds without heartbeat before a node is offline
    reconcile_interval: float = 10.0
    capacity_cooldown: float = 30.0
    orphan_grace: float = 30.0
    drain_timeout: float = 120.0  # also how long a retired replica's requests may take
    unload_grace: float = 1.0  # seconds a retired replica stays out of routing before its stop
    revision_retry: float = 300.0  # seconds a rollout stays halted after its revision failed

    @field_validator("api_keys", "forward_headers", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [k for k in (s.strip() for s in value.split(",")) if k]
        return value

    @field_validator("key_priorities", mode="before")
    @classmethod
    def _parse_priorities(cls, value: object) -> object:
        if isinstance(value, str):
            value = parse_labels(value)
        if isinstance(value, dict):
            for key, tier in value.items():
                if tier not in ("high", "normal", "low"):
                    raise ValueError(f"key priority {tier!r} of {key[:4]}… is not high/normal/low")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> FrontendSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self

    @property
    def admin_key_path(self) -> Path | None:
        """The admin key file this frontend creates and accepts (None: none)."""
        if not self.admin_key or self.data_dir is None:
            return None
        return self.data_dir / ADMIN_KEY_FILE

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    @property
    def async_database_url(self) -> str:
        return to_async_url(self.database_url)


class WorkerSettings(BaseSettings):
    """Everything `corral worker` needs; see `corral worker --help`."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_WORKER_", extra="ignore")

    join: str = "http://127.0.0.1:8000"  # URL of a frontend (or a load balancer in front)
    token: SecretStr | None = None
    name: str | None = None
    labels: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    advertise_host: str | None = None
    bind_host: str | None = None
    data_dir: Path = Field(default_factory=lambda: default_data_dir() / "worker")
    nats_url: str | None = None  # overrides the URL the frontend tells us
    nats_ca_file: Path | None = None  # PEM CA a tls:// NATS server is checked against
    # (default: --ca-file, else the system's trust store)
    ca_file: Path | None = None  # PEM CA bundle an https:// frontend's certificate is checked
    # against (default: the system's trust store)
    memory_budget: str = "80%"
    max_replicas_per_model: int = 0
    backends_dir: Path | None = None  # extra backend catalog entries
    backends_root: Path | None = None  # where backend virtualenvs live (default: data_dir)
    stop_grace: float = 10.0
    drain_timeout: float = 120.0  # seconds a SIGTERM waits for the frontend to move replicas
    ready_timeout: float = 900.0
    port_low: int = 20000
    port_high: int = 29999

    @field_validator("labels", mode="before")
    @classmethod
    def _parse_labels(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_labels(value)
        return value

    @field_validator("memory_budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        MemoryBudget.parse(value)
        return value


def parse_labels(text: str) -> dict[str, str]:
    """Parse "k=v,k2=v2" into a dict; raise ValueError naming the bad pair."""
    labels: dict[str, str] = {}
    for raw in text.split(","):
        pair = raw.strip()
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {pair!r} is not of the form key=value")
        labels[key.strip()] = value.strip()
    return labels


def to_async_url(url: str) -> str:
    """Turn postgresql:// or postgres:// into the SQLAlchemy asyncpg form."""
    for scheme in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+asyncpg://" + url[len(scheme) :]
    raise ValueError(f"not a PostgreSQL URL: {url.split('@')[-1]!r}")
