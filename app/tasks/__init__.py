"""The worker's tasks, declared with ``shared_task``: they bind to whichever Celery app the
process built (``app.worker.make_celery``). Importing this package, or any module in it,
builds no app and reads no environment; the worker entry is ``app.worker``.
"""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    # Deprecated entry: `celery -A app.tasks ...` keeps working for one release, with a warning.
    if name == "celery":
        from app.worker import process_app

        warnings.warn(
            "`celery -A app.tasks` is deprecated and will be removed in the next release; use `celery -A app.worker`",
            FutureWarning,
            stacklevel=2,
        )
        app = process_app()
        globals()["celery"] = app  # looked up once: later lookups find it without a warning
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
