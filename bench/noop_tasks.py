"""A bare Celery task for ``bench.throughput``: what a job costs with none of Latchkey's job life cycle."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="bench.noop", ignore_result=False)
def noop() -> None:
    """Nothing at all."""
