"""Recording the SQL a piece of code sends: for tests that count queries or look for one that must not run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event


@contextmanager
def recorded_statements(target: Any, keep: Callable[[str], bool] = lambda _statement: True) -> Iterator[list[str]]:
    """The statements ``target`` (an Engine, or the ``Engine`` class for every engine) sends inside the block.

    Only those ``keep`` accepts are recorded; the list fills as they are sent.
    """
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if keep(statement):
            seen.append(statement)

    event.listen(target, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(target, "before_cursor_execute", record)
