"""The backfill's part of the operator page: its three buttons, its job kinds and the migration card."""

from __future__ import annotations

from flask import Blueprint

from app.backfill.status import status as migration_status
from app.jobs.names import TaskName
from app.web.operator import Operation, OperatorPart

# No routes: it only lends the UI its template folder (the card), registered by app/web/__init__.py.
bp = Blueprint("backfill", __name__, template_folder="templates")

OPERATOR = OperatorPart(
    topics=["the legacy backfill", "its verification"],
    operations={
        "backfill_dry_run": Operation(
            "Backfill: dry run",
            TaskName.BACKFILL,
            "Counts what the backfill would seal and link, and changes nothing.",
            {"dry_run": True},
        ),
        "backfill_run": Operation(
            "Backfill: run",
            TaskName.BACKFILL,
            "Seals legacy plaintext values and links MCP servers and agents to the new secrets and providers.",
            {"dry_run": False},
            danger=True,
        ),
        "backfill_verify": Operation(
            "Verify the backfill",
            TaskName.VERIFY,
            "In a worker: every backfilled value against its legacy value, and a live cache check."
            " The contract migration runs only after a verification passed.",
        ),
    },
    kinds=[TaskName.BACKFILL, TaskName.VERIFY],
    # Where the migration stands (rows left, the latest verification): the CLI's and the API's ``status``.
    card_template="backfill/_migration.html",
    card_data=migration_status,
)
