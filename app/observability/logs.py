"""Logging setup: one line per record (JSON, or text for humans), secret values redacted.

Every line carries the request id (web) or job id (worker) when there is one. Every
handler in the process gets :class:`~app.observability.redact.RedactingFilter`, including
the handlers a Celery worker adds later (``app.tasks`` hooks Celery's logging signals to
:func:`adopt_handlers`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import weakref
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from flask import g, has_app_context

from app.observability.redact import (
    STANDARD_RECORD_ATTRS,
    RedactingFilter,
    format_message,
    is_redacted,
    redact,
    redact_record,
)

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s job=%(job_id)s] %(message)s"
# Extra values nested deeper than this are logged as their (redacted) string.
_MAX_DEPTH = 4

# Terminal escape sequences (CSI: colours, cursor moves; OSC: titles, links) and other control
# characters but tab and newline. Libraries colour their own messages (the development server's
# banner and access lines); a log line is data for a pipeline, never instructions to a terminal.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f]")

_job_id: ContextVar[str | None] = ContextVar("latchkey_job_id", default=None)


def set_job_id(job_id: str | None) -> Token[str | None]:
    """Stamp ``job_id`` on every log line of the current task (pass the token to :func:`reset_job_id`)."""
    return _job_id.set(job_id)


def reset_job_id(token: Token[str | None]) -> None:
    _job_id.reset(token)


def current_job_id() -> str | None:
    return _job_id.get()


def current_request_id() -> str | None:
    if not has_app_context():
        return None
    rid = g.get("request_id")
    return rid if isinstance(rid, str) and rid else None


def plain_text(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (tabs and newlines kept)."""
    return _ESCAPES.sub("", text) if "\x1b" in text or not text.isprintable() else text


def _ids(record: logging.LogRecord) -> tuple[str | None, str | None]:
    # ``extra={"request_id": ...}`` wins over the context.
    rid = record.__dict__.get("request_id") or current_request_id()
    jid = record.__dict__.get("job_id") or current_job_id()
    return (str(rid) if rid else None), (str(jid) if jid else None)


def _plain(value: Any, depth: int = 0) -> Any:
    """An ``extra`` value as JSON-ready data with every string redacted."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            return {redact(str(k)): _plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [_plain(v, depth + 1) for v in value]
    try:
        return redact(str(value))
    except Exception:
        return f"<unprintable {type(value).__name__}>"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, request_id, job_id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        redact_record(record)
        # After redact_record (when anything is registered) these are already masked.
        done = is_redacted(record)
        message = format_message(record)
        rid, jid = _ids(record)
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": plain_text(message if done else redact(message)),
            "request_id": rid,
            "job_id": jid,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text if done else redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = record.stack_info if done else redact(record.stack_info)
        for key, value in record.__dict__.items():
            if key in STANDARD_RECORD_ATTRS or key.startswith("_") or key in entry:
                continue
            entry[key] = _plain(value)
        return json.dumps(entry, ensure_ascii=True, default=str)


class TextFormatter(logging.Formatter):
    """The human format: ``time LEVEL logger [req=… job=…] message``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        redact_record(record)
        rid, jid = _ids(record)
        record.request_id, record.job_id = rid or "-", jid or "-"
        text = super().format(record)
        return plain_text(text if is_redacted(record) else redact(text))


def make_formatter(fmt: str = "json") -> logging.Formatter:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


# Handlers this module created or adopted (they print our format).
_ours: weakref.WeakSet[logging.Handler] = weakref.WeakSet()
_format: LogFormat = "json"
_configured = False


def _stderr() -> TextIO:
    stream: TextIO | None = sys.stderr
    # A Celery worker replaces sys.stderr by a proxy that logs what is written: never log into it.
    if stream is None or type(stream).__name__ == "LoggingProxy":
        stream = sys.__stderr__
    assert stream is not None
    return stream


def install_filter(handler: logging.Handler) -> None:
    """Put a :class:`RedactingFilter` first on ``handler`` (once)."""
    if not any(isinstance(f, RedactingFilter) for f in handler.filters):
        handler.filters.insert(0, RedactingFilter())


def install_redaction() -> None:
    """Put the redacting filter on every handler of every logger that exists now (idempotent)."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in list(lg.handlers):
            install_filter(handler)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Send log records to stderr as JSON lines (``fmt="json"``) or text (``fmt="text"``), redacted.

    The first call installs one stderr handler on the root logger (unless a Celery worker's
    handler was already adopted there) and sets the ``latchkey`` loggers to ``level``; third
    parties keep their own levels. Every call puts the redacting filter on every handler
    that exists at that moment.
    """
    global _configured, _format
    formatter = make_formatter(fmt)
    if not _configured:
        _format = "json" if fmt == "json" else "text"
        root = logging.getLogger()
        if not any(h in _ours for h in root.handlers):
            handler = logging.StreamHandler(_stderr())
            handler.setFormatter(formatter)
            _ours.add(handler)
            root.addHandler(handler)
        latchkey = logging.getLogger("latchkey")
        latchkey.setLevel(level.upper())
        latchkey.propagate = True
        _configured = True
    install_redaction()


def adopt_handlers(logger: logging.Logger | None) -> None:
    """Celery's ``after_setup_logger`` / ``after_setup_task_logger``: its handlers print our format, redacted."""
    from celery.utils.log import ColorFormatter

    if logger is not None:
        for handler in list(logger.handlers):
            install_filter(handler)
            if handler.formatter is None or isinstance(handler.formatter, ColorFormatter):
                handler.setFormatter(make_formatter(_format))
                _ours.add(handler)
    install_redaction()
