"""Key rotation: re-seal every sealed column to the keyring's newest key (worker only).

Every sealed column is listed in ``SEALED_COLUMNS``: the table, the ciphertext column, the
column recording the key id, the columns that build the binding context, and the columns
that guard the update against concurrent edits. Today the only sealed column is
``secrets.ciphertext``; a new sealed column is one more entry there, and the reseal job,
``count_using`` (which gates ``latchkey keys retire``) and ``remaining`` cover it at once,
so no column is left behind.

The reseal opens each row still sealed to an old key with the ring, seals the same bytes
to the current key with the SAME context (the value and version do not change), and writes
it back with a guarded ``UPDATE ... WHERE id = :id AND key_id = :old AND <guards>``: a
concurrent edit wins (its row is either already on the new key or is picked up by a
rerun). Neither ``revision`` nor ``updated_at`` is touched: the value, version, hosts and
name are unchanged, so the cache pointer (``<version>:<revision>``) and every cached entry
still describe the row exactly; bumping the revision would only turn every entry of the
fleet into a database read at once. (Entries sealed under the old L2 key, derived from the
old current key, become misses on their own when workers load the new ring.)

It walks each table by primary key (keyset pagination) in batches, one transaction per
batch: a crash loses at most the batch in flight, and a rerun (the same job redelivered,
or a new job) only touches rows that are still on an old key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, and_, func, select, update
from sqlalchemy.engine import Row

from app.db import BatchCheckpoint, Database, updated
from app.models import Secret
from app.secrets.keyring import Keyring
from app.secrets.sealing import CiphertextError, open_sealed, seal, secret_context

log = logging.getLogger("latchkey.rotation")

DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 5000


@dataclass(frozen=True)
class SealedColumn:
    """One column holding sealed values, and how to rebuild its binding context."""

    table: Table
    column: str
    key_column: str
    context_columns: tuple[str, ...]
    context: Callable[[Row[Any]], bytes]
    # Columns whose value must not have changed since the row was read (besides the key id).
    guards: tuple[str, ...] = ()
    id_column: str = "id"

    @property
    def name(self) -> str:
        return f"{self.table.name}.{self.column}"

    def sealed(self) -> Any:
        """Rows holding a value in this column."""
        return self.table.c[self.column].is_not(None)


SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn(
        table=Secret.__table__,  # type: ignore[arg-type]
        column="ciphertext",
        key_column="key_id",
        context_columns=("org_id", "version"),
        context=lambda r: secret_context(r.org_id, r.id, r.version),
        guards=("version",),
    ),
)


def remaining(db: Database, current_kid: str) -> int:
    """How many sealed values are not yet on ``current_kid`` (all columns)."""
    total = 0
    with db.session() as s:
        for col in SEALED_COLUMNS:
            key = col.table.c[col.key_column]
            stmt = select(func.count()).select_from(col.table).where(col.sealed(), key != current_kid)
            total += int(s.scalar(stmt) or 0)
    return total


def count_using(session: Any, kid: str) -> dict[str, int]:
    """Per sealed column, how many values are sealed to ``kid`` (only non-zero entries)."""
    out: dict[str, int] = {}
    for col in SEALED_COLUMNS:
        stmt = select(func.count()).select_from(col.table).where(col.sealed(), col.table.c[col.key_column] == kid)
        n = int(session.scalar(stmt) or 0)
        if n:
            out[col.name] = n
    return out


@dataclass
class ResealReport:
    total: int = 0
    resealed: int = 0
    changed: int = 0  # edited concurrently: the edit won, nothing written
    failed: int = 0  # does not open with the ring (retired key or damaged row): left as is

    @property
    def done(self) -> int:
        return self.resealed + self.changed + self.failed

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "resealed": self.resealed,
            "changed": self.changed,
            "failed": self.failed,
        }

    @classmethod
    def restore(cls, state: dict[str, int]) -> ResealReport:
        return cls(state["total"], state["resealed"], state["changed"], state["failed"])

    def merge(self, other: ResealReport) -> None:
        self.total += other.total
        self.resealed += other.resealed
        self.changed += other.changed
        self.failed += other.failed


def _column(name: str) -> SealedColumn:
    for col in SEALED_COLUMNS:
        if col.name == name:
            return col
    raise KeyError(name)


def plan(db: Database, current_kid: str, part_rows: int) -> list[tuple[dict[str, Any], int]]:
    """Parts of about ``part_rows`` values not yet on ``current_kid``: ranges of ids per sealed column.

    A part is ``{"column", "after", "upto"}``: the ids in ``(after, upto]`` (None: unbounded).
    The boundaries are every ``part_rows``-th such id, found by one window query per column.
    Values sealed to an old key after the plan (a concurrent edit with an old ring) are caught
    by the unbounded last part or by a rerun.
    """
    out: list[tuple[dict[str, Any], int]] = []
    with db.session() as s:
        for col in SEALED_COLUMNS:
            t = col.table
            ident, key = t.c[col.id_column], t.c[col.key_column]
            ranked = (
                select(ident.label("id"), func.row_number().over(order_by=ident).label("n"))
                .where(col.sealed(), key != current_kid)
                .subquery()
            )
            total = int(s.scalar(select(func.count()).select_from(t).where(col.sealed(), key != current_kid)) or 0)
            if total == 0:
                continue
            bounds = list(s.scalars(select(ranked.c.id).where(ranked.c.n % part_rows == 0).order_by(ranked.c.id)))
            if bounds and len(bounds) * part_rows == total:
                bounds.pop()  # the last boundary is the last id: the final part is unbounded anyway
            edges: list[str | None] = [None, *bounds, None]
            for i in range(len(edges) - 1):
                rows = part_rows if i < len(bounds) else total - part_rows * len(bounds)
                out.append(({"column": col.name, "after": edges[i], "upto": edges[i + 1], "rows": rows}, rows))
    return out


def reseal_part(
    db: Database,
    keyring: Keyring,
    spec: dict[str, Any],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    state: dict[str, Any] | None = None,
    checkpoint: BatchCheckpoint | None = None,
) -> ResealReport:
    """Re-seal the values of one part (:func:`plan`) that are not on the current key.

    ``state``: the totals an earlier attempt of this part committed; ``checkpoint`` is called
    in each batch's transaction (app/tasks/split.py).
    """
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}")
    col = _column(spec["column"])
    report = ResealReport.restore(state) if state else ResealReport(total=int(spec.get("rows", 0)))
    # Carry on after the last id an earlier attempt committed (a value that did not open is counted once).
    after = state.get("last", spec.get("after")) if state else spec.get("after")
    _reseal_column(
        db,
        keyring,
        keyring.public_set(),
        keyring.current_kid,
        col,
        batch_size,
        report,
        after,
        spec.get("upto"),
        checkpoint,
    )
    return report


def _reseal_column(
    db: Database,
    keyring: Keyring,
    public: Any,
    current: str,
    col: SealedColumn,
    batch_size: int,
    report: ResealReport,
    after: Any,
    upto: Any,
    checkpoint: BatchCheckpoint | None,
) -> None:
    t = col.table
    ident, key = t.c[col.id_column], t.c[col.key_column]
    wanted = {col.id_column, col.column, col.key_column, *col.context_columns, *col.guards}
    columns = [t.c[name] for name in sorted(wanted)]
    last = after
    while True:
        stmt = select(*columns).where(col.sealed(), key != current)
        if last is not None:
            stmt = stmt.where(ident > last)
        if upto is not None:
            stmt = stmt.where(ident <= upto)
        stmt = stmt.order_by(ident).limit(batch_size)
        with db.session() as s:
            rows = s.execute(stmt).all()
            if not rows:
                return
            for row in rows:
                m = row._mapping
                old_kid = m[col.key_column]
                context = col.context(row)
                try:
                    plain = open_sealed(keyring, m[col.column], context, old_kid)
                except CiphertextError as exc:
                    # Never the value; the id and the reason (e.g. the key is not in the ring).
                    log.error("%s row %s does not open: %s", col.name, m[col.id_column], exc)
                    report.failed += 1
                    continue
                sealed = seal(public, plain, context)
                guard = and_(
                    ident == m[col.id_column],
                    key == old_kid,
                    *(t.c[g] == m[g] for g in col.guards),
                )
                values = {col.column: sealed.ciphertext, col.key_column: sealed.key_id}
                if updated(s, update(t).where(guard).values(values)) == 1:
                    report.resealed += 1
                else:
                    report.changed += 1
            last = rows[-1]._mapping[col.id_column]
            if report.done > report.total:  # rows sealed to an old key while we ran
                report.total = report.done
            if checkpoint is not None:  # in this batch's transaction: committed with it, or not at all
                checkpoint(s, {**report.as_dict(), "last": last}, report.done, report.total)
