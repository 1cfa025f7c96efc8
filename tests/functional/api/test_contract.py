"""The contract is the behaviour: schemathesis runs the served OpenAPI document against the app.

All of schemathesis's checks and every phase (examples, coverage, fuzzing, and the stateful
phase over inferred links), through the WSGI app, as a real org admin (also an instance
operator, so the operator endpoints are exercised too) with a real token, and a real worker
process for the endpoints that wait on one (reveal). Bounded (examples per operation, steps)
and derandomized (a fixed seed, deterministic generation), so a run repeats itself. The test
walks the whole document: endpoints added later are covered without editing it.

Two things JSON Schema cannot state are told to schemathesis here, and nowhere else:
- a pagination cursor is signed, so a string that merely matches the cursor pattern is
  refused (400 ``invalid_cursor``); such a refusal is not a "valid data rejected" failure;
- a schema-valid body can still break a rule of the service (a URL the egress policy
  refuses, an expiry in the past, an id naming nothing): 422 ``validation_error`` is then
  the contract's answer (API.md), so 422 counts as an acceptable answer to positive data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from schemathesis.core.failures import Failure
from schemathesis.engine import events, from_schema
from schemathesis.specs.openapi.checks import RejectedPositiveData
from schemathesis.transport import wsgi

from tests.support.factories import Factory

SEED = 20261201
# Per operation and phase; with the stateful steps this keeps the run near a minute.
MAX_EXAMPLES = 8
MAX_STEPS = 20
POSITIVE_OK = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]


def _config(token: str, org: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # No state carried between runs (nothing written into the work tree): each run is the same.
            "cache": {"enabled": False},
            "headers": {"Authorization": f"Bearer {token}"},
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "mode": "all"},
            # Every built-in check (max_response_time is off: no timed assertions).
            "checks": {"enabled": True, "positive_data_acceptance": {"expected-statuses": POSITIVE_OK}},
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": True, "max-steps": MAX_STEPS},
            },
            # The org path parameter names the caller's org, so requests get past tenancy.
            "parameters": {"org": org},
        }
    )


@pytest.fixture
def wsgi_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """schemathesis 4.32.5: the probes of `ignored_auth` reach the WSGI transport with the requests-only
    kwargs (max_redirects, verify, cert, proxies) still set, which werkzeug's client refuses."""
    send = wsgi.WSGITransport.send

    def patched(self: Any, case: Any, **kwargs: Any) -> Any:
        for name in ("max_redirects", "verify", "cert", "proxies"):
            kwargs.pop(name, None)
        return send(self, case, **kwargs)

    monkeypatch.setattr(wsgi.WSGITransport, "send", patched)


def _is_unsigned_cursor_refusal(failure: Failure, response: Any) -> bool:
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
        return False
    try:
        return bool(json.loads(response.content)["code"] == "invalid_cursor")
    except (ValueError, KeyError, TypeError):
        return False


def _run(schema: Any) -> tuple[list[str], int]:
    failures: list[str] = []
    scenarios = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            scenarios += 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        f = check.failure_info.failure
                        failures.append(
                            f"{event.phase.value} {event.label} [{check.name}] {f.title}: {f.message}\n"
                            f"{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            failures.append(f"error in {event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            failures.append(f"fatal: {event.exception!r}")
    return failures, scenarios


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("wsgi_probes")
def test_the_api_keeps_its_openapi_contract(
    app: Flask, factory: Factory, org: str, worker: Any, tmp_path: Path
) -> None:
    caller = factory.user(org, "admin", operator=True)
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app, config=_config(caller.token, org))

    @schema.hook
    def filter_failure(_ctx: Any, failure: Failure, _case: Any, response: Any) -> bool:
        return not _is_unsigned_cursor_refusal(failure, response)

    failures, scenarios = _run(schema)
    assert scenarios > 0
    report = tmp_path / "schemathesis-failures.txt"
    report.write_text("\n\n".join(failures))
    assert not failures, f"{len(failures)} contract failures (full report: {report}):\n\n" + "\n\n".join(failures[:20])
