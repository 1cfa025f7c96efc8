"""What job code needs of its process and of its job: the protocols a worker's ``WorkerContext``
and ``JobView`` satisfy, so domain code (the agent runner, the MCP validation) runs without Celery."""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database


class Worker(Protocol):
    """What a run needs of the process it runs in (a worker's ``WorkerContext``)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def db(self) -> Database: ...

    @property
    def resolver(self) -> Any: ...


class RunJob(Protocol):
    """The job a run belongs to (a worker's ``JobView``): its id, params, and whether it is still ours."""

    @property
    def id(self) -> str: ...

    @property
    def org_id(self) -> str | None: ...

    @property
    def kind(self) -> str: ...

    @property
    def params(self) -> dict[str, Any]: ...

    def ensure_held(self, session: Session | None = None) -> None: ...
