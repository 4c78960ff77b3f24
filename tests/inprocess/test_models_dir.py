"""The models directory in one process: files become models, changes are seen by the watcher
without a restart, broken files are reported by file and field, and frontends that watch the
same directory never take turns changing a model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from harness import InProcessCluster

from corral.frontend.service import Frontend
from factories import write_file
from infra import apoll_until


def _declare(directory: Path, name: str, **fields: object) -> Path:
    body = {"name": name, "backend": "sim", **fields}
    return write_file(directory, f"{name}.yaml", yaml.safe_dump(body))


async def _audit(fe: Frontend, kind: str) -> list[str]:
    return [e["message"] for e in await fe.registry.audit.recent(100, kind)]


async def test_two_frontends_syncing_one_directory_change_each_model_once(
    cluster: InProcessCluster, tmp_path: Path
) -> None:
    _declare(tmp_path, "a")
    one = await cluster.frontend(models_dir=tmp_path)
    two = await cluster.frontend(models_dir=tmp_path)  # its open() synced the same files
    assert one.models_dir is not None and two.models_dir is not None
    spec = await one.registry.models.get("a")
    assert spec is not None and spec.revision == 1
    assert len(await _audit(one, "model.updated")) == 1

    async def both_sync() -> None:
        assert one.models_dir is not None and two.models_dir is not None
        await asyncio.gather(*(fe.models_dir.sync() for fe in (one, two, one, two)))

    await both_sync()  # nothing changed: nothing happens
    spec = await one.registry.models.get("a")
    assert spec is not None and spec.revision == 1
    assert len(await _audit(one, "model.updated")) == 1

    _declare(tmp_path, "a", options={"tokens": 3})
    await both_sync()
    spec = await one.registry.models.get("a")
    assert spec is not None and (spec.revision, dict(spec.options)) == (2, {"tokens": 3})
    assert len(await _audit(one, "model.updated")) == 2, "one change, one revision, one entry"

    (tmp_path / "a.yaml").unlink()
    await both_sync()
    assert await one.registry.models.get("a") is None
    assert len(await _audit(one, "model.deleted")) == 1
    await cluster.events.barrier(one.bus)
    await cluster.events.barrier(two.bus)
    assert [(e.kind, e.name) for e in cluster.events.models if e.name == "a"] == [
        ("updated", "a"),
        ("updated", "a"),
        ("removed", "a"),
    ]


async def test_the_watcher_sees_new_changed_broken_and_removed_files(
    cluster: InProcessCluster, tmp_path: Path
) -> None:
    fe = await cluster.frontend(models_dir=tmp_path)
    assert fe.models_dir is not None
    watching = asyncio.create_task(fe.models_dir.watch())
    try:
        await apoll_until(lambda: fe.models_dir and fe.models_dir.watching, timeout=5)
        _declare(tmp_path, "fresh", scheduling={"max_replicas": 2})
        await apoll_until(lambda: "fresh" in fe.view.models, timeout=5, what="the new model")

        _declare(tmp_path, "fresh", scheduling={"max_replicas": 5})
        await apoll_until(
            lambda: fe.view.models["fresh"].scheduling.max_replicas == 5,
            timeout=5,
            what="the changed model",
        )

        write_file(tmp_path, "broken.yml", "name: broken\nbackend: sim\nscheduling: {min: 1}\n")
        await apoll_until(lambda: fe.models_dir and fe.models_dir.errors, timeout=5, what="error")
        (error,) = fe.models_dir.errors_json()
        assert error["file"] == str(tmp_path / "broken.yml")
        assert error["field"] == "scheduling.min"
        assert "broken.yml: scheduling.min: Extra inputs are not permitted" in error["message"]
        assert "broken" not in fe.view.models, "a broken file declares nothing"

        (tmp_path / "fresh.yaml").unlink()
        (tmp_path / "broken.yml").unlink()
        await apoll_until(lambda: "fresh" not in fe.view.models, timeout=5, what="the removal")
        await apoll_until(lambda: not fe.models_dir.errors, timeout=5, what="errors cleared")
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def test_a_models_directory_that_appears_later_is_watched(
    cluster: InProcessCluster, tmp_path: Path
) -> None:
    directory = tmp_path / "later"
    fe = await cluster.frontend(models_dir=directory)
    assert fe.models_dir is not None
    assert [e.message for e in fe.models_dir.errors] == [
        f"{directory}: models directory does not exist"
    ]
    fe.models_dir.missing_retry = 0.1
    watching = asyncio.create_task(fe.models_dir.watch())
    try:
        directory.mkdir()
        _declare(directory, "late")
        await apoll_until(lambda: "late" in fe.view.models, timeout=5, what="the late model")
        assert fe.models_dir.errors == []
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def test_capabilities_may_only_narrow_the_backends(
    cluster: InProcessCluster, tmp_path: Path
) -> None:
    _declare(tmp_path, "narrow", capabilities=["chat", "audio"])
    _declare(tmp_path, "wide", backend="embeddings", capabilities=["embeddings", "chat"])
    fe = await cluster.frontend(models_dir=tmp_path)
    assert fe.models_dir is not None
    narrow = await fe.registry.models.get("narrow")
    assert narrow is not None and narrow.capabilities == ("chat", "transcription", "speech")
    assert await fe.registry.models.get("wide") is None  # refused, not silently narrowed
    (error,) = fe.models_dir.errors_json()
    assert error["field"] == "wide" and "does not serve chat" in error["message"]
