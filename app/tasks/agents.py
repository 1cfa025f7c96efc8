"""Agent runs on the worker side: the run itself is ``app.agents.runner``."""

from __future__ import annotations

from typing import Any

from app.agents import runner
from app.jobs.names import TaskName
from app.tasks.runtime import JobView, WorkerContext, job_task


@job_task(TaskName.RUN_AGENT, time_limit=300)
def run_agent(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Run an agent: resolve its provider's key, loop model turns and tool calls, store masked events."""
    return runner.run(ctx, job)
