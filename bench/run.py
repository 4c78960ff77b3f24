"""Corral against the gateways people use today: one command, every workload, every target.

    python bench/run.py            # full run (about 20 minutes on 2 cores)
    python bench/run.py --quick    # short durations (about 5 minutes), for re-runs after changes
    python bench/run.py --only w1,w2 --profile

Targets: `direct` (the sim backend itself: the physical limit), `corral` (private PostgreSQL
and NATS, one frontend process, workers), `litellm` (LiteLLM proxy, one worker, no database,
no telemetry) and `vllm-router` (the Rust router), all in front of the same sim processes.
Writes bench/RESULTS.md, bench/plots/*.png and raw data under bench/out/.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BENCH_VENV = BENCH / ".venv"
REQUIREMENTS = BENCH / "requirements.txt"


def _ensure_project_python() -> None:
    """Re-exec under the project's virtualenv when corral is not importable here."""
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401

        import corral  # noqa: F401
    except ImportError:
        venv_python = ROOT / ".venv" / "bin" / "python"
        if venv_python.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
            os.execv(str(venv_python), [str(venv_python), *sys.argv])  # noqa: S606
        raise SystemExit(
            "bench/run.py needs corral installed (pip install -e . in a virtualenv at .venv)"
        ) from None


def _ensure_bench_venv() -> None:
    """bench/.venv holds LiteLLM, vllm-router, matplotlib and py-spy, apart from the project."""
    stamp = BENCH_VENV / ".requirements"
    wanted = REQUIREMENTS.read_text()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    print("installing the bench's tools into bench/.venv (once) ...", flush=True)
    import shutil

    uv = shutil.which("uv") or str(ROOT / ".venv" / "bin" / "uv")
    python = BENCH_VENV / "bin" / "python"
    if Path(uv).exists():
        if not python.exists():
            subprocess.run(
                [uv, "venv", "-q", "--python", sys.executable, str(BENCH_VENV)], check=True
            )
        cmd = [uv, "pip", "install", "-q", "--python", str(python), "-r", str(REQUIREMENTS)]
    else:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        cmd = [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)]
    subprocess.run(cmd, check=True, timeout=1200)
    stamp.write_text(wanted)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short durations (a few minutes)")
    p.add_argument(
        "--only", default="w1,w2,w3,w4,w5,w6,w7", help="workloads, e.g. w1,w2 (w8: --processes)"
    )
    p.add_argument(
        "--targets",
        default="direct,corral,litellm,vllm-router",
        help="targets of workloads 1-3 (all by default; the table needs all four)",
    )
    p.add_argument("--rounds", type=int, help="alternations of the targets (default 3, quick 2)")
    p.add_argument(
        "--servers",
        default="",
        help="workloads 1-3 also against Corral under other HTTP servers (bench/servers.py):"
        " uvicorn (tuned), uvicorn-stock, granian; e.g. --servers uvicorn,granian",
    )
    p.add_argument(
        "--processes",
        default="",
        help="workload 8, scaling: Corral with N frontend processes against vllm-router on"
        " N cores, e.g. --processes 1,2,4,8 (needs 2N+ cores)",
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="do not create bench/.venv (its tools are on PATH, e.g. on a machine offline)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--profile", action="store_true", help="py-spy the frontend under workload 2")
    p.add_argument("--max-minutes", type=float, default=60.0, help="hard limit for the whole run")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="rewrite RESULTS.md and the plots from a results.json; run nothing",
    )
    p.add_argument("--out", type=Path, default=BENCH / "out")
    p.add_argument(
        "--results",
        type=Path,
        default=BENCH / "RESULTS.md",
        help="where to write the results page (experiments: elsewhere)",
    )
    return p.parse_args()


def main() -> None:
    _ensure_project_python()
    args = parse_args()
    if not args.no_install:
        _ensure_bench_venv()
    sys.path.insert(0, str(BENCH))
    if args.report_only:
        _report_only(args)
        return
    from harness import Harness  # after the interpreter is settled
    from procs import stop_all

    def _stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def _alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"the bench ran past --max-minutes {args.max_minutes}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(args.max_minutes * 60))
    harness = Harness(args)
    try:
        harness.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the bench started", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.alarm(0)
        harness.close()
        stop_all()


def _report_only(args: argparse.Namespace) -> None:
    import json

    import report

    results = json.loads(args.report_only.read_text())
    if not args.no_plots:
        plots = BENCH / "plots"
        plots.mkdir(exist_ok=True)
        python = str(BENCH_VENV / "bin" / "python")
        subprocess.run(
            [python, str(BENCH / "plots.py"), str(args.report_only), str(plots)],
            check=True,
            timeout=300,
        )
    args.results.write_text(report.results_md(results))
    print(report.console(results))


if __name__ == "__main__":
    main()
