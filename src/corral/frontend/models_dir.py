"""The models directory: its YAML files declared as models, kept in step as files change.

`sync` reads every file and turns the result into actions (UpsertModel for each model declared,
RemoveModel for a model this directory declared before and no longer does); `watch` runs `sync`
again whenever a file in the directory is added, changed or removed (inotify through
watchfiles), so a change takes effect within a second, with no restart. The errors of the last
scan (file and field) are kept for `GET /api/models` and `corral models`.

Any number of frontends may watch one directory: an upsert of an unchanged spec changes
nothing (no revision, no event, no audit entry), and a removal that finds the model gone
already does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from watchfiles import Change, awatch

from corral.backends.catalog import Catalog
from corral.domain.actions import RemoveModel, UpsertModel
from corral.errors import ConfigError
from corral.frontend.actuator import Actuator
from corral.modelfile import MODEL_FILE_SUFFIXES, load_models_dir
from corral.store.registry import Registry

log = logging.getLogger(__name__)


class ModelsDir:
    """One frontend's view of its models directory."""

    def __init__(
        self,
        directory: Path,
        *,
        registry: Registry,
        actuator: Actuator,
        catalog: Catalog,
        missing_retry: float = 5.0,
    ) -> None:
        self.directory = directory
        self.registry = registry
        self.actuator = actuator
        self.catalog = catalog
        self.missing_retry = missing_retry  # seconds between looks for a directory not there yet
        self.errors: list[ConfigError] = []  # the last scan's broken files
        self.watching = False  # the watcher runs, and caught up with what came before it

    def errors_json(self) -> list[dict[str, Any]]:
        """The last scan's errors as the admin API lists them."""
        return [{"file": e.path, "field": e.field, "message": e.message} for e in self.errors]

    async def sync(self) -> list[ConfigError]:
        """Declare the models in the directory and remove those that left it.

        Broken files are logged with their path and field; the other models still load.
        Returns (and keeps) the errors.
        """
        specs, errors = await asyncio.to_thread(load_models_dir, self.directory)
        for spec in list(specs):
            narrowed = self.catalog.check_capabilities(spec)
            if narrowed:  # a model may only narrow its backend's endpoints
                errors.append(ConfigError(narrowed, path=str(self.directory), field=spec.name))
                specs.remove(spec)
        if [e.message for e in errors] != [e.message for e in self.errors]:
            for error in errors:
                log.error("model file error: %s", error.message)
        self.errors = errors
        source = f"file:{await asyncio.to_thread(self.directory.resolve)}"
        for spec in specs:
            problem = self.catalog.check_model(spec)
            if problem:  # a node's own --backends-dir may provide it: warn, keep the model
                log.warning("model %s in %s: %s", spec.name, self.directory, problem)
            await self.actuator.apply(UpsertModel(spec, f"{source}/{spec.name}"))
        kept = {s.name for s in specs}
        for name, src in (await self.registry.models.sources()).items():
            if src.startswith(source + "/") and name not in kept:
                await self.actuator.apply(RemoveModel(name))
        return errors

    async def watch(self) -> None:
        """Sync after every change of a model file, until cancelled.

        The watcher wakes once a second without changes (an empty set): the first time, it
        syncs to catch up with changes made before it started watching."""
        while True:
            try:
                async for changes in awatch(
                    self.directory,
                    watch_filter=_model_file,
                    recursive=False,
                    debounce=400,
                    rust_timeout=1000,
                    yield_on_timeout=True,
                ):
                    if changes or not self.watching:
                        await self._sync_logged()
                        self.watching = True
            except FileNotFoundError:
                self.watching = False
                log.warning("models directory %s does not exist (yet)", self.directory)
                await asyncio.sleep(self.missing_retry)

    async def _sync_logged(self) -> None:
        try:
            await self.sync()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("syncing the models directory %s failed", self.directory)


def _model_file(_: Change, path: str) -> bool:
    """A change worth a scan: a model file (also one renamed away or deleted), or the `..data`
    link a Kubernetes ConfigMap volume swaps to update its files at once."""
    return path.endswith(MODEL_FILE_SUFFIXES) or Path(path).name.startswith("..")
