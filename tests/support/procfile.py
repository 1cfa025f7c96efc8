"""The repository's Procfile as a Procfile runner reads it: one ``name: command`` a line, run with a given env.

``${NAME:-default}``, ``${NAME}`` and ``$NAME`` are expanded from that env (as ``sh`` does for
Heroku, honcho or foreman), then the line is split with ``shlex``; the first word is looked up
on the env's ``PATH``. The tests run each command exactly as written, so the Procfile that is
deployed is the one that is tested.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VAR = re.compile(rf"\$(?:\{{(?P<braced>{_NAME})(?::-(?P<default>[^}}]*))?\}}|(?P<bare>{_NAME}))")


def expand(line: str, env: Mapping[str, str]) -> str:
    """``line`` with its variables expanded from ``env`` (unset or empty: the ``:-`` default, else empty)."""

    def value(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        got = env.get(name, "")
        if got == "" and match.group("default") is not None:
            return match.group("default")
        return got

    return _VAR.sub(value, line)


def read(path: Path = PROCFILE) -> dict[str, str]:
    """Process name -> command line, as written."""
    entries: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep and name.strip() and command.strip(), f"not a Procfile line: {raw!r}"
        assert name.strip() not in entries, f"process {name.strip()!r} twice in the Procfile"
        entries[name.strip()] = command.strip()
    return entries


def argv(command: str, env: Mapping[str, str]) -> list[str]:
    """The argument vector of one Procfile command under ``env``, its program resolved on ``env``'s PATH."""
    words = shlex.split(expand(command, env))
    program = shutil.which(words[0], path=env.get("PATH", os.defpath))
    assert program is not None, f"{words[0]!r} is not on the PATH"
    return [program, *words[1:]]


def start(
    command: str, env: Mapping[str, str], cwd: Path, log: IO[bytes] | int | None = None
) -> subprocess.Popen[bytes]:
    """Start one Procfile command (stdout and stderr to ``log``) as the leader of a process group of
    its own, so a test can signal all its processes at once, as a process manager does."""
    return subprocess.Popen(
        argv(command, env), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def run(command: str, env: Mapping[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one Procfile command to its end (the release phase); its output in ``stdout``."""
    return subprocess.run(
        argv(command, env),
        env=dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
