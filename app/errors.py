"""Domain errors. Each carries an HTTP status and a stable machine ``code``.

Services raise these; ``app.api.problems`` renders them as problem+json and the UI
renders them as a page or a flashed message. Messages never contain a secret value.

``WorkerError`` is the other family: failures of worker-side work (a model call, an MCP
exchange, the egress guard, the resolver, a job), each a stable ``code`` and a ``message``
safe to show and to log. The job runtime records any of them as the job's error.
"""

from __future__ import annotations

from typing import Any


class LatchkeyError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


class BadRequestError(LatchkeyError):
    status, code, title = 400, "bad_request", "Bad request"


class InvalidJsonError(BadRequestError):
    code, title = "invalid_json", "Malformed JSON"


class InvalidCursorError(BadRequestError):
    code, title = "invalid_cursor", "Invalid pagination cursor"


class UnauthorizedError(LatchkeyError):
    status, code, title = 401, "unauthorized", "Authentication required"


class ForbiddenError(LatchkeyError):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFoundError(LatchkeyError):
    status, code, title = 404, "not_found", "Not found"


class ConflictError(LatchkeyError):
    status, code, title = 409, "conflict", "Conflict"


class SecretInUseError(ConflictError):
    code, title = "secret_in_use", "Secret is in use"


class IdempotencyInProgressError(ConflictError):
    code, title = "idempotency_in_progress", "A request with this Idempotency-Key is in progress"


class VersionMismatchError(LatchkeyError):
    status, code, title = 412, "version_mismatch", "Version mismatch"


class UnsupportedMediaTypeError(LatchkeyError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class FieldError:
    """One entry of a 422's ``errors`` list."""

    __slots__ = ("field", "message")

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class ValidationFailedError(LatchkeyError):
    status, code, title = 422, "validation_error", "Validation failed"

    def __init__(self, errors: list[FieldError], detail: str | None = None) -> None:
        super().__init__(detail or "; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors

    @classmethod
    def single(cls, field: str, message: str) -> ValidationFailedError:
        return cls([FieldError(field, message)])


class IdempotencyKeyReusedError(ValidationFailedError):
    code, title = "idempotency_key_reused", "Idempotency-Key reused with a different request"


class RateLimitedError(LatchkeyError):
    status, code, title = 429, "rate_limited", "Too many requests"


class BrokerUnavailableError(LatchkeyError):
    status, code, title = 503, "broker_unavailable", "Job queue unavailable"


class WorkerUnavailableError(LatchkeyError):
    status, code, title = 503, "worker_unavailable", "No worker answered in time"


class ServiceUnavailableError(LatchkeyError):
    status, code, title = 503, "unavailable", "Service unavailable"


class WorkerError(Exception):
    """A failure of worker-side work: a stable ``code`` and a ``message`` without secrets.

    ``args`` are ``(code, message)``, so an error rebuilt from them (pickle, JSON) is the same.
    """

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
