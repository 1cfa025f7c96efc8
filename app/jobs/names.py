"""Every task's name, in one place: the task declarations, beat's schedule and the jobs'
``kind`` (a job is re-published from its row by that name) all use these.

Names are ``<domain>.<verb_noun>`` and are part of the broker contract: a queued message
and a stored job carry them, so renaming one strands the jobs already queued under it.
"""

from __future__ import annotations

from enum import StrEnum


class TaskName(StrEnum):
    PING = "system.ping"
    REQUEUE_STUCK = "jobs.requeue_stuck"
    SWEEP_LEASES = "jobs.sweep_leases"
    RUN_PART = "jobs.run_part"
    REPLAY_INVALIDATIONS = "secrets.replay_invalidations"
    REVEAL_VALUE = "secrets.reveal_value"
    VALIDATE_SERVER = "mcp.validate_server"
    REFRESH_TOOLS = "mcp.refresh_tools"
    PREPARE_CONNECTION = "mcp.prepare_connection"
    EXCHANGE_CODE = "mcp.exchange_code"
    REVOKE_CONNECTION = "mcp.revoke_connection"
    RUN_AGENT = "agents.run_agent"
    RESEAL_SECRETS = "keys.reseal_secrets"
    BACKFILL = "backfill.run"
    VERIFY = "backfill.verify"
