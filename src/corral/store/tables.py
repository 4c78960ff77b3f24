"""SQLAlchemy Core tables of the registry; the Alembic migrations create exactly these.

Domain times (heartbeats, last use, load timing) are float seconds since the epoch, like the
domain entities; `created_at` columns are database timestamps for operators.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("address", String(255), nullable=False),
    Column("token_hash", String(128), nullable=False),
    Column("nats_credential_hash", String(128), nullable=True),  # digest of its NATS secret
    Column("resources", JSONB, nullable=False, server_default="{}"),
    Column("memory_budget", String(32), nullable=False, server_default="80%"),
    Column("max_replicas_per_model", Integer, nullable=False, server_default="0"),
    Column("backends", JSONB, nullable=False, server_default="[]"),
    Column("artifacts", JSONB, nullable=False, server_default="[]"),
    Column("processes", JSONB, nullable=False, server_default="[]"),
    Column("last_heartbeat", Double, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

node_labels = Table(
    "node_labels",
    metadata,
    Column("node_id", String(64), ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(255), nullable=False),
    Column("value", String(255), nullable=False),
    PrimaryKeyConstraint("node_id", "key"),
)

models = Table(
    "models",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("backend", String(64), nullable=False),
    Column("artifact", Text),
    Column("options", JSONB, nullable=False, server_default="{}"),
    Column("memory", BigInteger),
    Column("min_replicas", Integer, nullable=False, server_default="0"),
    Column("max_replicas", Integer, nullable=False, server_default="0"),
    Column("spread_all", Boolean, nullable=False, server_default="false"),
    Column("node_selector", JSONB, nullable=False, server_default="{}"),
    Column("scale_down_delay", Double, nullable=False, server_default="300"),
    Column("revision", Integer, nullable=False, server_default="1"),
    Column("spec_hash", String(64), nullable=False, server_default=""),
    Column("rollout", JSONB, nullable=False, server_default="{}"),
    Column("scaling", JSONB),
    Column("max_concurrency", Integer),  # per replica; 0 = unlimited; null: the backend's default
    Column("deadline", Double),  # seconds a request may wait for a slot; null: server default
    # the endpoints the model may serve, narrowing its backend's (a list); null: all of them
    Column("capabilities", JSONB(none_as_null=True)),
    # routing weights (`RoutingWeights` as JSON); null: the defaults
    Column("routing", JSONB(none_as_null=True)),
    Column("source", Text, nullable=False, server_default="api"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

replicas = Table(
    "replicas",
    metadata,
    Column("model", String(255), ForeignKey("models.name", ondelete="CASCADE"), nullable=False),
    Column("replica_index", Integer, nullable=False),
    Column("node_id", String(64), ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("address", String(255)),
    Column("memory", BigInteger, nullable=False, server_default="0"),
    Column("last_used", Double, nullable=False, server_default="0"),
    Column("load_error", Text),
    Column("updated", Double, nullable=False, server_default="0"),
    Column("revision", String(64), nullable=False, server_default=""),
    Column("replaces", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("model", "replica_index"),
)

#: One row per (model, spec revision): its last successful load, or its last failed one.
model_load_info = Table(
    "model_load_info",
    metadata,
    Column("model", String(255), nullable=False),
    Column("revision", String(64), nullable=False, server_default=""),
    Column("backend", String(64), nullable=False),
    Column("artifact", Text),
    Column("options", JSONB, nullable=False, server_default="{}"),
    Column("memory", BigInteger, nullable=False, server_default="0"),
    Column("node_id", String(64)),
    Column("load_seconds", Double, nullable=False, server_default="0"),
    Column("loaded_at", Double, nullable=False, server_default="0"),
    Column("error", Text),  # the last load of this revision failed (None: it loaded)
    Column("failed_at", Double, nullable=False, server_default="0"),
    PrimaryKeyConstraint("model", "revision"),
)

load_jobs = Table(
    "load_jobs",
    metadata,
    Column("model", String(255), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("phase", Text),
    Column("percent", Double),
    Column("node_id", String(64)),
    Column("replica_index", Integer),
    Column("error", Text),
    Column("started_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Column("failures", Integer, nullable=False, server_default="0"),  # failed loads in a row
    Column("error_code", String(32)),  # the wire code of a failed load's error
)

backend_installs = Table(
    "backend_installs",
    metadata,
    Column("node_id", String(64), ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Column("backend", String(64), nullable=False),
    Column("version", String(64)),
    Column("state", String(16), nullable=False),
    Column("percent", Double),
    Column("error", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("updated_at", Double, nullable=False, server_default="0"),
    PrimaryKeyConstraint("node_id", "backend"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("key_hash", String(128), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("role", String(16), nullable=False, server_default="inference"),  # admin|inference
    Column("models", JSONB),  # model names an inference key may use; null: every model
    Column("requests_per_minute", Integer, nullable=True),  # null: no limit (0008)
    Column("tokens_per_day", BigInteger, nullable=True),  # null: no limit (0008)
)

#: Requests and tokens per API key, model and minute, flushed in batches by each frontend.
usage = Table(
    "usage",
    metadata,
    Column("key_id", String(64), nullable=False),  # "" when the API is open
    Column("model", String(255), nullable=False),
    Column("bucket", Double, nullable=False),  # the minute's start, seconds since the epoch
    Column("key_name", String(255), nullable=False, server_default=""),
    Column("requests", BigInteger, nullable=False, server_default="0"),
    Column("errors", BigInteger, nullable=False, server_default="0"),  # answered 4xx/5xx
    Column("limited", BigInteger, nullable=False, server_default="0"),  # refused: over a limit
    Column("prompt_tokens", BigInteger, nullable=False, server_default="0"),
    Column("completion_tokens", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("key_id", "model", "bucket"),
)
Index("usage_bucket", usage.c.bucket)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("at", Double, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("subject", String(255), nullable=False, server_default=""),
    Column("message", Text, nullable=False, server_default=""),
    Column("data", JSONB, nullable=False, server_default="{}"),
)
