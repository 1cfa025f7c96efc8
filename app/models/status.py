"""Status columns: each a ``StrEnum`` stored as the plain string it always was.

``status_type`` maps one as a non-native enum: a ``VARCHAR`` of the column's length with no
CHECK constraint, so the schema is exactly the migrations' (``alembic check`` finds nothing);
a value outside the enum is refused when it is written (``validate_strings``) and when read.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import Enum


class JobStatus(StrEnum):
    """A job's life cycle (an agent run follows its job's)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class McpServerStatus(StrEnum):
    """An MCP server's validation: pending until a validation is queued, then its outcome."""

    PENDING = "pending"
    VALIDATING = "validating"
    VALID = "valid"
    INVALID = "invalid"


class ConnectionStatus(StrEnum):
    """An MCP connection (OAuth tokens held for an org or a user), as stored.

    ``expired`` is also what a caller is shown for a connected row whose access token ran out
    and that has no refresh token left to renew it with. ``revoking``: disconnected by a user,
    the worker is revoking the tokens at the server; never used again.
    """

    CONNECTED = "connected"
    AUTH_REQUIRED = "auth_required"
    EXPIRED = "expired"
    ERROR = "error"
    REVOKING = "revoking"


class FlowStatus(StrEnum):
    """An OAuth authorization in progress: prepared by a worker, completed once by its user."""

    PREPARING = "preparing"
    PENDING = "pending"
    EXCHANGING = "exchanging"
    COMPLETED = "completed"
    FAILED = "failed"


def status_type(enum: type[StrEnum], length: int) -> Enum:
    """The column type for ``enum``: its values (not its member names) in a ``VARCHAR(length)``."""
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )
