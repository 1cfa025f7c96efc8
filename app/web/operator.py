"""Operator page: instance jobs and the buttons that start them (re-seal, and the extensions' operations).

Launching creates the same job the operator API creates (e.g. ``POST /api/v1/admin/keys/reseal``):
``jobs.create_job`` with the task name as kind and the same params. A package listed in
app/extensions.py adds its part of the page (operations, job kinds, a card) through its
``web`` module's ``OPERATOR`` (the backfill's: app/backfill/web.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import abort, flash, redirect, render_template, url_for
from sqlalchemy.orm import Session

from app import extensions
from app.api.request import request_context
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import JobStatus
from app.web.pages import db, page

UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True)
class Operation:
    """One button on the operator page: which job it starts, with which params."""

    label: str
    kind: str
    help: str
    params: dict[str, Any] = field(default_factory=dict)
    danger: bool = False


@dataclass(frozen=True)
class OperatorPart:
    """A package's part of the operator page, shown before the page's own (an extension's ``OPERATOR``)."""

    # What the lead sentence names ("Instance jobs: ...").
    topics: list[str]
    operations: dict[str, Operation]
    kinds: list[str]
    # A card above "Start a job": its template, rendered with ``card`` = ``card_data(session)``.
    card_template: str | None = None
    card_data: Callable[[Session], Any] | None = None


# The page's own part: re-sealing after a key rotation.
OWN = OperatorPart(
    topics=["re-sealing after a key rotation"],
    operations={
        "reseal": Operation(
            "Re-seal all secrets",
            TaskName.RESEAL_SECRETS,
            "Re-seals every sealed value under the workers' newest key (after a key rotation).",
        ),
    },
    kinds=[TaskName.RESEAL_SECRETS],
)


@functools.cache
def parts() -> tuple[OperatorPart, ...]:
    """The extensions' parts, then the page's own."""
    return (*(m.OPERATOR for m in extensions.modules("web") if hasattr(m, "OPERATOR")), OWN)


def launchable() -> dict[str, Operation]:
    """Everything an operator can launch from the UI, by the name used in its URL."""
    return {name: op for part in parts() for name, op in part.operations.items()}


def listed_kinds() -> list[str]:
    """The job kinds this page lists."""
    return [kind for part in parts() for kind in part.kinds]


def _sentence(topics: list[str]) -> str:
    return topics[0] if len(topics) == 1 else f"{', '.join(topics[:-1])}, and {topics[-1]}"


def _jobs() -> list[Any]:
    return jobs.list_jobs(db(), None, listed_kinds(), limit=50)


@page("/operator", operator=True)
def operator_home() -> str:
    """Instance jobs and the operations that start them (instance operators only)."""
    session = db()
    return render_template(
        "operator/index.html",
        jobs=_jobs(),
        lead=_sentence([topic for part in parts() for topic in part.topics]),
        cards=[
            (part.card_template, part.card_data(session))
            for part in parts()
            if part.card_template is not None and part.card_data is not None
        ],
        operations=launchable(),
        unfinished=UNFINISHED,
        kinds=listed_kinds(),
    )


@page("/operator/jobs", operator=True)
def operator_jobs() -> str:
    """The jobs table (a fragment the page polls while a job is unfinished)."""
    return render_template("operator/_jobs.html", jobs=_jobs(), unfinished=UNFINISHED)


@page("/operator/launch/<operation>", ["POST"], operator=True)
def launch(operation: str) -> Any:
    """Start one of :func:`launchable` as an instance job."""
    op = launchable().get(operation)
    if op is None:
        abort(404)
    job = jobs.create_job(db(), request_context(), org_id=None, kind=op.kind, params=dict(op.params))
    flash(f"{op.label}: job {job.id} queued.", "success")
    return redirect(url_for("web.operator_home"))
