"""A real headless Chromium for browser tests: found on the machine, driven by Playwright.

Playwright's own browser downloads are never used: the system's Chromium (Debian's
`chromium` package, which scripts/test installs when it can) is launched by path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
]

#: Where browser tests leave screenshots (gitignored).
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def find_chromium() -> str | None:
    """Path of a Chromium binary: $CORRAL_TEST_CHROMIUM, /usr/bin/chromium, or one on PATH."""
    explicit = os.environ.get("CORRAL_TEST_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium(path: str) -> Iterator[Any]:
    """A launched headless Chromium (a Playwright Browser); closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class ConsoleLog:
    """Console errors and uncaught exceptions of one page, each with the URL it came from."""

    errors: list[tuple[str, str]] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        def on_console(msg: Any) -> None:
            if msg.type == "error":
                self.errors.append((msg.text, msg.location.get("url", "")))

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append((f"uncaught: {exc}", page.url)))
