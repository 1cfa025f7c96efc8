"""Who is acting and on behalf of which request: passed into every service call."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    """The principal behind a change: a user (API token or session), the CLI, or a worker."""

    type: str  # "user" | "cli" | "system" | "worker"
    id: str | None = None
    is_operator: bool = False


@dataclass(frozen=True)
class RequestContext:
    actor: Actor
    request_id: str | None = None
    ip: str | None = None


SYSTEM = RequestContext(Actor("system"))


def cli_context() -> RequestContext:
    import getpass

    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = None
    return RequestContext(Actor("cli", who))
