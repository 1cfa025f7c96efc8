"""Logging setup: one line per record, with the request id when there is one."""

from __future__ import annotations

import logging
import sys

from flask import g, has_app_context


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = g.get("request_id", "-") if has_app_context() else "-"
        return True


_configured = False


def configure_logging(level: str = "INFO") -> None:
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [req=%(request_id)s] %(message)s"))
    root = logging.getLogger("latchkey")
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = True
    _configured = True
