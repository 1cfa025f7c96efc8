"""The ``latchkey backfill`` commands (``run``, ``verify``, ``status``), added to ``latchkey`` by app/cli.py."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from app.cli import fail, one_line_errors, open_database, settings, unit_of_work
from app.context import cli_context


@click.group("backfill")
def group() -> None:
    """Move legacy plaintext secrets, MCP tokens and agent keys into sealed secrets."""


@group.command("run")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option("--batch-size", type=click.IntRange(1, 5000), default=200, show_default=True, help="Rows per batch.")
@click.option("--org", "org_slug", default=None, metavar="SLUG", help="Only this org.")
@one_line_errors
def backfill_run(dry_run: bool, batch_size: int, org_slug: str | None) -> None:
    """Run the backfill here (batched, resumable, idempotent); prints the summary as JSON.

    Seals with LATCHKEY_PUBLIC_KEYS (no private key needed). A real run is recorded as a
    ``backfill.run`` job, so ``latchkey backfill status`` shows it.
    """
    import json

    from app.backfill import service as backfill_service
    from app.jobs import service as jobs
    from app.jobs.names import TaskName
    from app.secrets.keyring import PublicKeySet

    cfg = settings()
    if not cfg.public_keys:
        fail("set LATCHKEY_PUBLIC_KEYS to the public key set (printed by `latchkey keys generate`)")
    assert cfg.public_keys is not None
    keys = PublicKeySet.parse(cfg.public_keys)
    ctx = cli_context()
    job_id: str | None = None
    with open_database(cfg) as database:
        if not dry_run:
            # Recorded as a running job and never published: no worker picks it up.
            with database.session() as s:
                params: dict[str, Any] = {"batch_size": batch_size, "org": org_slug, "source": "cli"}
                job = jobs.create_job(s, ctx, org_id=None, kind=TaskName.BACKFILL, params=params, publish=False)
                job_id = job.id
                jobs.claim(s, job_id)

        def record(done: int, total: int) -> None:
            if job_id is not None:
                with database.session() as s:
                    jobs.set_progress(s, job_id, done, total)

        try:
            with _progress_bar() as bar:

                def progress(done: int, total: int) -> None:
                    record(done, total)
                    bar(done, total)

                summary = backfill_service.run_backfill(
                    database, keys, ctx, dry_run=dry_run, batch_size=batch_size, org_slug=org_slug, progress=progress
                )
        except BaseException as exc:
            if job_id is not None:
                with database.session() as s:
                    jobs.mark_failed(
                        s, job_id, "interrupted", f"the backfill stopped: {type(exc).__name__}; run it again"
                    )
            raise
        result = summary.as_dict()
        if job_id is not None:
            with database.session() as s:
                jobs.mark_succeeded(s, job_id, result)
    click.echo(json.dumps(result, indent=2, sort_keys=True))
    if summary.failed:
        click.echo(f'latchkey: {summary.failed} row(s) were not migrated; see "failures"', err=True)


@contextmanager
def _progress_bar(label: str = "backfill") -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar when stdout is a terminal; otherwise nothing."""
    if not sys.stdout.isatty():
        yield lambda done, total: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


@group.command("verify")
@click.option("--batch-size", type=click.IntRange(1, 5000), default=None, help="Rows per batch (default 1000).")
@click.option("--no-wait", is_flag=True, help="Queue the job, print its id, and return.")
@click.option("--timeout", type=click.IntRange(1), default=3600, show_default=True, help="Seconds to wait.")
@one_line_errors
def backfill_verify(batch_size: int | None, no_wait: bool, timeout: int) -> None:
    """Queue the verification on a worker and follow it; prints the verification record (JSON).

    Exit 0 when it passed, 1 when it found a failure or an unmigrated row (see "failures").
    Only workers can open sealed values, so this needs a running worker.
    """
    import json
    import time

    from app.errors import BrokerUnavailableError
    from app.jobs import service as jobs
    from app.jobs.names import TaskName
    from app.models import Job, JobStatus

    with open_database(settings()) as database:
        try:
            with database.session() as s:
                params = {"batch_size": batch_size} if batch_size else {}
                job_id = jobs.create_job(s, cli_context(), org_id=None, kind=TaskName.VERIFY, params=params).id
        except BrokerUnavailableError:
            fail("the job queue is unavailable; start the broker, or use POST /api/v1/admin/backfill/verify")
        click.echo(f"latchkey: verification job {job_id} queued", err=True)
        if no_wait:
            click.echo(job_id)
            return
        deadline = time.monotonic() + timeout
        with _progress_bar("verify") as bar:
            while True:
                with database.session() as s:
                    job = s.get(Job, job_id)
                    assert job is not None
                    state, done, total = job.status, job.progress_done, job.progress_total
                    result, error = job.result, (job.error_code, job.error_message)
                bar(done, total or 0)
                if state in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                    break
                if time.monotonic() > deadline:
                    fail(f"verification job {job_id} is still {state} after {timeout}s; is a worker running?")
                time.sleep(0.25)
    if state == JobStatus.FAILED or result is None:
        fail(f"verification job {job_id} failed: {error[0]}: {error[1]}")
    assert result is not None
    click.echo(json.dumps(result, indent=2, sort_keys=True))
    if not result["passed"]:
        fail(
            f"verification failed: {len(result['failures'])} failure(s), {result['unmigrated']} unmigrated row(s), "
            f"cache check {'ok' if result['cache_check'].get('ok') else 'not ok'}"
        )


@group.command("status")
@one_line_errors
def backfill_status() -> None:
    """Rows left to migrate, the latest backfill run and the latest verification (JSON)."""
    import json

    from app.backfill.status import status as migration_status

    with unit_of_work() as s:
        status = migration_status(s)
        if status.latest_run is None and status.latest_verification is None:
            fail(f"no backfill has run yet; start one with `latchkey backfill run` (remaining: {status.remaining})")
        job = status.latest_run
        run = None
        if job is not None:
            run = {
                "id": job.id,
                "status": job.status,
                "params": job.params,
                "progress": {"done": job.progress_done, "total": job.progress_total},
                "result": job.result,
                "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
                "created_at": job.created_at.isoformat() if job.created_at else None,
                "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            }
        out = {
            "legacy_columns": status.legacy_columns,
            "remaining": status.remaining,
            "run": run,
            "verification": status.latest_verification,
        }
    click.echo(json.dumps(out, indent=2, sort_keys=True))
