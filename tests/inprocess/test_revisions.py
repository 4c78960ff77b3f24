"""A model's revision as the actuator records it: the artifact's content digest counts, and the
replica events carry each replica's revision to the other frontends."""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness import InProcessCluster, declare

from corral.domain.actions import StartReplica
from corral.domain.entities import spec_revision
from factories import MB, model
from infra import apoll_until


async def test_the_artifacts_content_is_part_of_the_revision(
    cluster: InProcessCluster, tmp_path: Path
) -> None:
    fe = await cluster.frontend(model_store=tmp_path)
    blob = tmp_path / "m.gguf"
    blob.write_bytes(b"weights v1")
    spec = model("m", artifact="m.gguf")
    await declare(fe, spec)
    stored = await fe.registry.models.get("m")
    digest = hashlib.sha256(b"weights v1").hexdigest()
    assert stored is not None and stored.spec_hash == spec_revision(spec, digest)
    assert stored.spec_hash != spec_revision(spec), "the digest, not the path"

    blob.write_bytes(b"weights v2, same path")
    await declare(fe, spec)
    changed = await fe.registry.models.get("m")
    assert changed is not None and changed.spec_hash != stored.spec_hash
    assert changed.revision == stored.revision + 1

    await declare(fe, model("x", artifact="missing.gguf"))
    missing = await fe.registry.models.get("x")
    assert missing is not None and missing.spec_hash == spec_revision(missing), "no digest known"


async def test_replica_events_carry_the_revision(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    peer = await cluster.frontend()
    await cluster.worker(fe, "n1")
    await declare(fe, model("m", options={"tokens": 3}))
    started = await fe.actuator.apply(StartReplica("m", "n1", None, "sim", 64 * MB, "t", 7))
    revision = fe.view.models["m"].config_revision
    assert (started.revision, started.replaces) == (revision, 7)
    await apoll_until(
        lambda: ("m", 0) in peer.view.replicas and peer.view.replicas[("m", 0)].revision != "",
        timeout=5,
        what="the peer's view of the replica",
    )
    seen = peer.view.replicas[("m", 0)]
    assert (seen.revision, seen.replaces) == (revision, 7)
