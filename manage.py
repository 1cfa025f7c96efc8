#!/usr/bin/env python3
"""Set up and run Latchkey with nothing but Python 3.11+.

    python3 manage.py dev                # install (first run), then run on embedded defaults
    python3 manage.py test               # install (first run), then run the whole test suite
    python3 manage.py test --fast        # only the unit lane (tests/unit): no app, no worker processes
    python3 manage.py test --coverage    # the whole suite with branch coverage of app/ and its floor
    python3 manage.py test --broker rabbitmq   # the broker lane (BROKER_LANE) on the local RabbitMQ
    python3 manage.py test --fallbacks   # the in-process lane (FALLBACK_LANE) on SQLite + fakeredis
    python3 manage.py test ARGS          # pytest ARGS (e.g. tests/functional/api -k secrets)

Installs go into ./.venv from the hash-pinned lock file, and are skipped when the lock
file has not changed since the last install.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
LOCK = ROOT / "requirements" / "dev.lock"
STAMP = VENV / ".latchkey-installed"
# xdist workers for the test command (each gets its own database, Redis db, queue and worker
# process; see tests/support/backends.py). Chosen by measuring on the 2-core box: docs/contributing.md.
TEST_WORKERS = "2"
# Branch coverage of app/ must not drop below this: 88.7% when it was set (PostgreSQL run; code
# that runs only inside worker subprocesses is not measured), rounded down a little.
COVERAGE_FLOOR = "88"
# What depends on the broker's semantics: the worker end-to-end suite, the worker boot, readiness
# (in the app and in a production gunicorn). `--broker rabbitmq` runs these (unless paths are
# given) with LATCHKEY_TEST_BROKER=rabbitmq. Left out: the worker files whose broker is only a
# transport (no redelivery, acks, visibility or publish-failure case; docs/contributing.md).
BROKER_LANE = [
    "tests/e2e/workers",
    "--ignore=tests/e2e/workers/test_many_workers.py",
    "--ignore=tests/e2e/workers/test_resolver.py",
    "--ignore=tests/e2e/workers/test_rotation.py",
    "--ignore=tests/e2e/workers/test_contract.py",
    "--ignore=tests/e2e/workers/test_backfill.py",
    "tests/e2e/test_worker_boot.py",
    "tests/functional/api/test_health.py",
    "tests/e2e/test_processes.py::test_gunicorn_serves_the_api_in_production_mode",
]
# What CI runs a second time on the embedded fallbacks (SQLite + fakeredis): everything that runs
# in-process (services, API, UI pages, CLI, migrations) and `latchkey dev` itself. The worker
# processes' suite runs on PostgreSQL (and RabbitMQ); `LATCHKEY_TEST_BACKEND=sqlite python3
# manage.py test` runs the whole suite on the fallbacks (as a fresh machine does).
FALLBACK_LANE = ["tests/unit", "tests/functional", "tests/e2e/test_processes.py"]
BROKERS = ("redis", "rabbitmq")


def split_broker(rest: list[str]) -> tuple[str | None, list[str]]:
    """``--broker KIND`` (or ``--broker=KIND``) taken out of the test command's arguments."""
    out: list[str] = []
    kind = None
    args = iter(rest)
    for arg in args:
        if arg == "--broker":
            kind = next(args, "")
        elif arg.startswith("--broker="):
            kind = arg.split("=", 1)[1]
        else:
            out.append(arg)
    if kind is not None and kind not in BROKERS:
        sys.exit(f"--broker: use one of {', '.join(BROKERS)}")
    return kind, out


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (LOCK, ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def install() -> None:
    if sys.version_info < (3, 11):
        sys.exit("Latchkey needs Python 3.11 or newer")
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    print("installing pinned dependencies into .venv (first run takes a minute) ...", flush=True)
    subprocess.run([*pip, "install", "--require-hashes", "-r", str(LOCK)], check=True)
    subprocess.run([*pip, "install", "--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(_fingerprint())


def pytest_args(rest: list[str]) -> list[str]:
    """The test command's pytest arguments: xdist and --durations unless given, plus the lane flags."""
    broker, rest = split_broker(rest)
    args = [a for a in rest if a not in ("--fast", "--coverage", "--fallbacks")]
    if not any(a.startswith(("-n", "--numprocesses", "-pno:xdist")) or a == "no:xdist" for a in args):
        # The unit lane is CPU-bound and short: xdist's start-up costs more than it saves there.
        workers = "0" if "--fast" in rest else TEST_WORKERS
        args = ["-n", workers, "--dist", "loadfile", *args]
    if not any(a.startswith("--durations") for a in args):
        args.append("--durations=25")
    if "--coverage" in rest:
        args += ["--cov=app", "--cov-report=term", f"--cov-fail-under={COVERAGE_FLOOR}"]
    paths = any(Path(a.split("::")[0]).exists() for a in args if not a.startswith("-"))
    if "--fast" in rest:
        args.append("tests/unit")
    elif broker == "rabbitmq" and not paths:
        args += BROKER_LANE
    elif "--fallbacks" in rest and not paths:
        args += FALLBACK_LANE
    return args


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    install()
    os.chdir(ROOT)
    if command == "install":
        return 0
    if command == "dev":
        os.execv(str(BIN / "latchkey"), [str(BIN / "latchkey"), "dev", *rest])
    if command == "test":
        broker, _ = split_broker(rest)
        if broker:
            os.environ["LATCHKEY_TEST_BROKER"] = broker
        if "--fallbacks" in rest:
            os.environ["LATCHKEY_TEST_BACKEND"] = "sqlite"
        os.execv(str(BIN / "python"), [str(BIN / "python"), "-m", "pytest", *pytest_args(rest)])
    if command == "lint":
        ruff, mypy, contracts = str(BIN / "ruff"), str(BIN / "mypy"), str(BIN / "lint-imports")
        for cmd in ([ruff, "check", "."], [ruff, "format", "--check", "."], [mypy], [contracts, "--no-cache"]):
            if subprocess.run(cmd).returncode:
                return 1
        return 0
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
