"""SIGTERM in a worker's own process stays deliverable: only a prefork pool child hands it to a watcher.

Run in a fresh interpreter each, because the fault being guarded against (SIGTERM blocked in the
thread that built a solo pool) is inherited by every process that thread spawns afterwards: the
test process's own later children (gunicorn, beat, ``latchkey dev``) could no longer be stopped.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import signal, subprocess, sys
import app.worker  # connects the worker_process_init receiver
from celery.concurrency.solo import TaskPool

TaskPool(initargs=(None, "probe@host"))
blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout
child_mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
print(blocked, bool(child_mask & (1 << (signal.SIGTERM - 1))))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses sigwaitinfo")
def test_a_solo_pool_leaves_sigterm_deliverable_in_its_host_and_its_children() -> None:
    # The solo pool sends worker_process_init in the worker's own process (celery.contrib.testing's
    # start_worker builds it in the caller's thread); prefork's children are tested with the
    # Procfile (tests/e2e/test_procfile.py: SIGTERM to the process group mid-task).
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == ["False", "False"], out
