"""The backfill's names: unique per org, in row order, one query per round however many rows share a base."""

from __future__ import annotations

from app.backfill.service import Namer
from app.db import Database
from app.identity import service as identity
from app.models import Secret
from tests.support.factories import Caller, Factory
from tests.support.statements import recorded_statements


def _org_id(db: Database, slug: str) -> str:
    with db.session() as s:
        return identity.get_org(s, slug).id


def _assign(db: Database, namer: Namer, wants: list[tuple[str, str]]) -> tuple[list[str], int]:
    """The names handed out and how many SELECTs on secrets that took."""
    assert db.engine is not None
    with recorded_statements(db.engine, _selects_secrets) as queries, db.session() as s:
        names = namer.assign(s, wants)
    return names, len(queries)


def _selects_secrets(statement: str) -> bool:
    return statement.lstrip().upper().startswith("SELECT") and "secrets" in statement


def test_rows_sharing_a_base_are_named_in_one_round(db: Database, org: str) -> None:
    org_id = _org_id(db, org)
    namer = Namer(Secret, "_", 128)

    names, queries = _assign(db, namer, [(org_id, "legacy_0190abcd")] * 20 + [(org_id, "other")])

    assert names == ["legacy_0190abcd"] + [f"legacy_0190abcd_{n}" for n in range(2, 21)] + ["other"]
    assert queries == 1


def test_names_taken_in_the_database_are_skipped_keeping_row_order(
    db: Database, factory: Factory, admin: Caller, org: str
) -> None:
    for name in ("legacy_x", "legacy_x_2", "legacy_x_4"):
        factory.secret(admin, org, name)
    org_id = _org_id(db, org)
    namer = Namer(Secret, "_", 128)

    names, queries = _assign(db, namer, [(org_id, "legacy_x")] * 3)

    # Round 1 offers legacy_x, _2, _3 (only _3 is free); round 2 offers _4 (taken) and _5;
    # round 3 offers _6. The first row gets the lowest free name.
    assert names == ["legacy_x_3", "legacy_x_5", "legacy_x_6"]
    assert queries == 3


def test_a_name_handed_out_before_is_not_offered_again(db: Database, org: str) -> None:
    org_id = _org_id(db, org)
    namer = Namer(Secret, "_", 128)
    first, _ = _assign(db, namer, [(org_id, "mcp_docs")] * 2)
    # Nothing was written (a dry run): the names are remembered, not found in the database.
    again, queries = _assign(db, namer, [(org_id, "mcp_docs")] * 2)

    assert first == ["mcp_docs", "mcp_docs_2"]
    assert again == ["mcp_docs_3", "mcp_docs_4"]
    assert queries == 1


def test_names_are_per_org_and_fit_the_column(db: Database, factory: Factory) -> None:
    a, b = _org_id(db, factory.org()), _org_id(db, factory.org())
    namer = Namer(Secret, "_", 10)

    names, _ = _assign(db, namer, [(a, "abcdefghijkl"), (b, "abcdefghijkl"), (a, "abcdefghijkl")])

    assert names == ["abcdefghij", "abcdefghij", "abcdefgh_2"]


def test_two_bases_offering_one_name_in_a_round_get_different_names(db: Database, org: str) -> None:
    org_id = _org_id(db, org)
    # Truncated to the column, both bases start as "abcdefghij"; "x" offers "x_2", which is also a base.
    namer = Namer(Secret, "_", 10)

    names, _ = _assign(db, namer, [(org_id, "abcdefghijkl"), (org_id, "abcdefghijXY"), (org_id, "x"), (org_id, "x")])
    more, _ = _assign(db, Namer(Secret, "_", 128), [(org_id, "y"), (org_id, "y"), (org_id, "y_2")])

    assert names == ["abcdefghij", "abcdefgh_2", "x", "x_2"]
    assert more == ["y", "y_2", "y_2_2"]
