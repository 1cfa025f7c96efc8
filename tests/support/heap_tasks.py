"""A test-only task, imported by worker processes via ``--include``: the garbage collector's state where tasks run."""

from __future__ import annotations

import gc
import os
from typing import Any

from celery import shared_task


@shared_task(name="tests.heap_state")
def heap_state() -> dict[str, Any]:
    """How many objects this process froze (``gc.freeze``), and which process it is."""
    return {"frozen": gc.get_freeze_count(), "pid": os.getpid(), "gc_enabled": gc.isenabled()}
