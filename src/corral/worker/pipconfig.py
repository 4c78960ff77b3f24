"""pip's configured package sources (index, extra indexes, find-links, constraints), for uv.

uv reads neither pip.conf nor PIP_* variables; passing these on makes a uv install resolve from
the same sources as pip would.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PipSettings:
    """The package sources pip is configured with, so that uv installs from the same ones.

    uv reads neither pip.conf nor PIP_* variables; without these a uv install could pick other
    distributions than pip would (e.g. a CUDA torch from PyPI instead of a local CPU wheel).
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()
    cert: str | None = None
    no_index: bool = False

    @classmethod
    def parse(cls, config_list: str) -> PipSettings:
        """From the output of `pip config list` (`scope.key='value'` per line; the `:env:`
        scope, from PIP_* variables, wins over `install.`, which wins over `global.`)."""
        rank = {":env:": 3, "install": 2, "global": 1}
        best: dict[str, tuple[int, str]] = {}
        for line in config_list.splitlines():
            m = re.match(r"^(:env:|[a-z]+)\.([a-z-]+)=(.*)$", line.strip())
            if m is None or m.group(1) not in rank:
                continue
            scope, key, raw = m.groups()
            try:
                value = str(ast.literal_eval(raw))
            except (ValueError, SyntaxError):
                value = raw.strip("'\"")
            if key not in best or rank[scope] >= best[key][0]:
                best[key] = (rank[scope], value)

        def many(key: str) -> tuple[str, ...]:
            return tuple(best[key][1].split()) if key in best else ()

        def one(key: str) -> str | None:
            return best[key][1].strip() or None if key in best else None

        return cls(
            index_url=one("index-url"),
            extra_index_urls=many("extra-index-url"),
            find_links=many("find-links"),
            constraints=many("constraint"),
            trusted_hosts=many("trusted-host"),
            cert=one("cert"),
            no_index=(one("no-index") or "").lower() in ("1", "true", "yes", "on"),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PipSettings:
        """From PIP_* variables only (when pip itself cannot be asked)."""
        lines = [
            f":env:.{key[4:].lower().replace('_', '-')}={value!r}"
            for key, value in env.items()
            if key.startswith("PIP_")
        ]
        return cls.parse("\n".join(lines))

    def uv_args(self) -> list[str]:
        """The `uv pip install` options that select the same sources as pip."""
        args: list[str] = ["--no-index"] if self.no_index else []
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        for path in self.constraints:
            args += ["--constraint", path]
        for host in self.trusted_hosts:
            args += ["--allow-insecure-host", host]
        if self.extra_index_urls or self.find_links:
            # pip takes the best version across all sources; uv's default takes the first
            # index that knows a package. Match pip.
            args += ["--index-strategy", "unsafe-best-match"]
        return args

    def uv_env(self) -> dict[str, str]:
        return {"SSL_CERT_FILE": self.cert} if self.cert else {}


async def read_pip_settings() -> PipSettings:
    """The sources of `pip config list` of Corral's interpreter (PIP_* variables when no pip)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pip",
        "config",
        "list",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    if proc.returncode == 0:
        return PipSettings.parse(out.decode(errors="replace"))
    return PipSettings.from_env(os.environ)  # no pip beside Corral: its variables still count
