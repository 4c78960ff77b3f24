"""Every setting is a flag: each field of the frontend and worker settings has a --flag on
`corral serve` / `corral worker`, a flag given wins over its CORRAL_* variable, and the tables
the operator commands print have a header."""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated, Any

import pytest
import typer
from pydantic_settings import BaseSettings
from typer.testing import CliRunner

from corral.cli import app
from corral.config import FrontendSettings, WorkerSettings
from corral.ctl.flags import HELP, env_name, settings_flags
from corral.ctl.tables import ago, last_line, render


def _options(command: str) -> dict[str, Any]:
    """The click parameters of a command, by option string (typer may vendor click)."""
    group: Any = typer.main.get_command(app)
    return {opt: p for p in group.commands[command].params for opt in p.opts}


@pytest.mark.parametrize(
    ("command", "settings"), [("serve", FrontendSettings), ("worker", WorkerSettings)]
)
def test_every_setting_is_a_flag_of_its_command(command: str, settings: type[BaseSettings]) -> None:
    options = _options(command)
    missing = [
        name for name in settings.model_fields if f"--{name.replace('_', '-')}" not in options
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("command", "settings"), [("serve", FrontendSettings), ("worker", WorkerSettings)]
)
def test_generated_flags_name_their_variable_in_help(
    command: str, settings: type[BaseSettings]
) -> None:
    options = _options(command)
    for name in HELP:
        if name in settings.model_fields:
            option = options[f"--{name.replace('_', '-')}"]
            flag_help = option.help or ""
            assert f"[{env_name(settings, name)}]" in flag_help, name
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "--drain-timeout" in result.stdout


def test_a_flag_given_overrides_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CORRAL_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("CORRAL_HEALTH_TTL", "4")
    seen: list[FrontendSettings] = []
    probe = typer.Typer()

    @probe.command()
    @settings_flags(FrontendSettings)
    def run(port: Annotated[int | None, typer.Option()] = None) -> None:
        seen.append(FrontendSettings(**({"port": port} if port else {})))

    result = CliRunner().invoke(probe, ["--request-timeout", "7.5", "--port", "9"])
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert settings.request_timeout == 7.5, "the flag wins"
    assert settings.health_ttl == 4.0, "the variable stands where no flag is given"
    assert settings.port == 9, "the command's own options are untouched"


def test_tables_have_a_header_and_aligned_columns() -> None:
    text = render(("name", "status"), [("w1", "healthy"), ("worker-two", None)])
    assert text.splitlines() == [
        "NAME        STATUS",
        "w1          healthy",
        "worker-two  -",
    ]


def test_ages() -> None:
    assert ago(None) == "never"
    assert ago(100.0, now=105.0) == "5s ago"
    assert ago(0.5, now=7300.0) == "2h ago"


def test_last_line_of_an_error() -> None:
    assert last_line("Traceback:\n  x\nValueError: bad\n\n") == "ValueError: bad"
    assert last_line("  \n ") == ""
    assert last_line(None) == ""


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["drain"], "error: Missing argument 'node'."),
        (["nodez"], "error: No such command 'nodez'. Did you mean 'nodes'?"),
        (["scale", "m", "--min", "x"], "error: Invalid value for '--min'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], line: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corral", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(line), done.stderr
