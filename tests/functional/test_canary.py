"""Canary scan: secret values never reach the database, Redis, logs or API responses."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import pytest

from tests.support.factories import Caller, Factory
from tests.support.leaks import dump_database, dump_redis, find_leaks, leak_forms


def test_leak_forms_find_encoded_canaries() -> None:
    canary = "canary-" + secrets.token_hex(8)
    import base64
    import urllib.parse

    for encoded in (
        base64.b64encode(b"xy" + canary.encode()).decode(),
        urllib.parse.quote(canary + "/"),
        canary.encode().hex(),
        base64.urlsafe_b64encode(b"z" + canary.encode()).decode(),
    ):
        assert find_leaks([("t", "prefix " + encoded + " suffix")], [canary])
    assert not find_leaks([("t", "nothing to see here")], [canary])
    assert all(len(f) >= 8 for f in leak_forms(canary))


@pytest.fixture
def sql_logging() -> Any:
    # SQL statements and their parameters at INFO: proves plaintext never even reaches the driver.
    logger = logging.getLogger("sqlalchemy.engine")
    old = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(old)


def test_no_canary_in_database_redis_logs_or_responses(
    factory: Factory, db: Any, settings: Any, captured_logs: list[str], sql_logging: Any
) -> None:
    org = factory.org("canary")
    admin: Caller = factory.user(org, "admin")
    canaries = [f"CANARY{i}-" + secrets.token_urlsafe(24) for i in range(6)]
    responses: list[tuple[str, str]] = []

    def keep(resp: Any) -> Any:
        responses.append(
            (
                f"{resp.request.method} {resp.request.path} -> {resp.status_code}",
                resp.get_data(as_text=True) + str(dict(resp.headers)),
            )
        )
        return resp

    a = keep(
        admin.post(
            f"orgs/{org}/secrets", json={"name": "A", "value": canaries[0]}, headers={"Idempotency-Key": "canary-1"}
        )
    )
    assert a.status_code == 201
    keep(
        admin.post(
            f"orgs/{org}/secrets", json={"name": "A", "value": canaries[0]}, headers={"Idempotency-Key": "canary-1"}
        )
    )  # replay
    sid = a.get_json()["id"]
    assert keep(admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": canaries[1]})).status_code == 200
    # Failures that carry a value must not echo or store it either.
    assert keep(admin.post(f"orgs/{org}/secrets", json={"name": "A", "value": canaries[2]})).status_code == 409
    assert keep(admin.post(f"orgs/{org}/secrets", json={"name": "bad name", "value": canaries[3]})).status_code == 422
    assert (
        keep(
            admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": canaries[3]}, headers={"If-Match": '"99"'})
        ).status_code
        == 412
    )
    bad_json = admin.client.post(
        f"/api/v1/orgs/{org}/secrets",
        data='{"name": "B", "value": "' + canaries[4],
        headers=admin.headers({"Content-Type": "application/json"}),
    )
    assert keep(bad_json).status_code == 400
    assert (
        keep(
            admin.post(f"orgs/{org}/secrets", json={"name": "B", "value": canaries[5], "unknown": canaries[5]})
        ).status_code
        == 422
    )
    b = keep(admin.post(f"orgs/{org}/secrets", json={"name": "B", "value": canaries[5]}))
    assert keep(admin.delete(f"orgs/{org}/secrets/{b.get_json()['id']}")).status_code == 204
    keep(admin.get(f"orgs/{org}/secrets"))
    keep(admin.get(f"orgs/{org}/audit-events"))

    assert db.engine is not None
    db_dump = dump_database(db.engine)
    redis_dump = dump_redis(settings.redis_url)
    logs = [("logs", "\n".join(captured_logs))]
    assert any("INSERT INTO secrets" in line for line in captured_logs), "SQL logging was not captured"
    assert any(t.startswith("table secrets") and t for t, _ in db_dump)

    leaks = find_leaks([*db_dump, *redis_dump, *logs, *responses], canaries)
    assert leaks == []
