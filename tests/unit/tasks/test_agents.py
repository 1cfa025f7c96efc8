"""``agents.run_agent`` called directly: the job and its run row, and a second delivery."""

from __future__ import annotations

from celery import Celery
from sqlalchemy import func, select

from app.db import Database
from app.jobs.names import TaskName
from app.models import AgentRun, AuditEvent, Job, JobStatus
from tests.support.agents import agent, provider
from tests.support.factories import Factory
from tests.support.llm_server import LlmTestServer
from tests.unit.worker_support import only_job, run_task, start_run


def _queued(factory: Factory, org: str, llm: LlmTestServer) -> str:
    admin = factory.user(org, "admin")
    return start_run(admin, org, agent(admin, org, provider(admin, org, factory, llm)[0]))


def test_the_task_records_the_run_and_its_job(
    tasks_app: Celery, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    run_id = _queued(factory, org, llm)
    llm.script([{"text": "hi there"}])
    job_id = only_job(db, TaskName.RUN_AGENT).id

    assert run_task(tasks_app, TaskName.RUN_AGENT, job_id) == "succeeded"

    with db.session() as s:
        job, run = s.get(Job, job_id), s.get(AgentRun, run_id)
        assert job is not None and run is not None
        assert (job.status, job.attempts, job.error_code) == (JobStatus.SUCCEEDED, 1, None)
        assert job.result == {"run_id": run_id, "status": "succeeded", "steps": 1}
        assert (run.status, run.output) == (JobStatus.SUCCEEDED, "hi there")


def test_a_failed_run_fails_its_job_with_the_runs_code_and_message(
    tasks_app: Celery, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    run_id = _queued(factory, org, llm)
    llm.api_key = "not-the-providers-key"
    job_id = only_job(db, TaskName.RUN_AGENT).id

    assert run_task(tasks_app, TaskName.RUN_AGENT, job_id) == "failed"

    with db.session() as s:
        job, run = s.get(Job, job_id), s.get(AgentRun, run_id)
        assert job is not None and run is not None
        assert (job.status, job.error_code) == (JobStatus.FAILED, "provider_auth_failed")
        assert (run.status, run.error_code, run.error_message) == (JobStatus.FAILED, job.error_code, job.error_message)


def test_running_the_task_twice_calls_the_model_once(
    tasks_app: Celery, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    run_id = _queued(factory, org, llm)
    llm.script([{"text": "once"}])
    job_id = only_job(db, TaskName.RUN_AGENT).id

    assert run_task(tasks_app, TaskName.RUN_AGENT, job_id) == "succeeded"
    with db.session() as s:
        first = s.get(AgentRun, run_id)
        assert first is not None
        events, finished_at = list(first.events), first.finished_at

    # A redelivered message for a finished job does nothing.
    assert run_task(tasks_app, TaskName.RUN_AGENT, job_id) == "skipped"

    assert len(llm.requests) == 1
    with db.session() as s:
        run, job = s.get(AgentRun, run_id), s.get(Job, job_id)
        assert run is not None and job is not None
        assert (run.events, run.finished_at, job.attempts) == (events, finished_at, 1)
        finished = select(func.count()).where(AuditEvent.action == "agent.run_finished")
        assert s.scalar(finished) == 1
