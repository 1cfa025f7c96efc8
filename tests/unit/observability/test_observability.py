"""Observability: value-based log redaction, structured logs, Prometheus metrics, Celery wiring."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import sys
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.utils.log import ColorFormatter
from flask import Flask, g
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from app.config import Settings
from app.db import Database, utcnow
from app.factory import create_app
from app.models import Job
from app.observability import logs, metrics, redact
from app.observability.redact import MASK, MIN_LENGTH, RedactingFilter
from app.worker import _adopt_log_handlers, make_celery
from tests.support.leaks import find_leaks


@pytest.fixture(autouse=True)
def _empty_registry() -> Iterator[None]:
    redact.clear()
    yield
    redact.clear()


@pytest.fixture
def canary() -> str:
    # Space, slash, plus, non-ASCII, quote and backslash: every encoding differs from the raw value.
    value = f'lk-canary {secrets.token_urlsafe(12)} /+é"\\'
    redact.register(value)
    return value


class Captured:
    def __init__(self, logger: logging.Logger, stream: io.StringIO) -> None:
        self.logger = logger
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def captured() -> Iterator[Captured]:
    """A logger with one plain handler that carries the redacting filter (and nothing else)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logs.install_filter(handler)
    logger = logging.getLogger(f"latchkey.tests.observability.{uuid.uuid4().hex[:8]}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    yield Captured(logger, stream)
    logger.removeHandler(handler)


def assert_clean(text: str, value: str) -> None:
    assert find_leaks([("log", text)], [value]) == [], text
    assert MASK in text, text


# Redaction --------------------------------------------------------------------------------------


def test_plain_message_is_masked(captured: Captured, canary: str) -> None:
    captured.logger.info("token is " + canary)
    assert_clean(captured.text, canary)
    assert captured.text.strip() == f"INFO {captured.logger.name} token is {MASK}"


def test_percent_args_are_masked(captured: Captured, canary: str) -> None:
    captured.logger.warning("token %s for %s", canary, "server-1")
    captured.logger.warning("mapping %(token)s", {"token": canary})
    captured.logger.warning("repr %r", {"token": canary})
    assert_clean(captured.text, canary)
    assert "server-1" in captured.text


def test_f_string_is_masked(captured: Captured, canary: str) -> None:
    captured.logger.error(f"header Authorization: Bearer {canary}!")
    assert_clean(captured.text, canary)
    assert captured.text.rstrip().endswith(f"Bearer {MASK}!")


def test_exception_message_and_traceback_are_masked(captured: Captured, canary: str) -> None:
    def connect() -> None:
        try:
            raise KeyError(canary)
        except KeyError as inner:
            raise RuntimeError(f"connect failed with {canary}") from inner

    try:
        connect()
    except RuntimeError:
        captured.logger.exception("validation of %s failed", "server-1")
    assert "Traceback (most recent call last)" in captured.text
    assert "RuntimeError: connect failed with ***" in captured.text
    assert "The above exception was the direct cause" in captured.text
    assert_clean(captured.text, canary)


def test_the_record_keeps_no_live_exception(captured: Captured, canary: str) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logs.install_filter(keep)
    captured.logger.addHandler(keep)
    try:
        raise ValueError(canary)
    except ValueError:
        captured.logger.exception("boom")
    (record,) = records
    assert record.exc_info is None  # a later handler cannot format the raw exception again
    assert record.exc_text and "ValueError: ***" in record.exc_text
    assert record.args == ()


def test_url_encoded_forms_are_masked(captured: Captured, canary: str) -> None:
    captured.logger.info("GET https://mcp.example/sse?token=%s", urllib.parse.quote(canary, safe=""))
    captured.logger.info("GET https://mcp.example/sse?token=%s", urllib.parse.quote(canary))
    captured.logger.info("form body token=%s&x=1", urllib.parse.quote_plus(canary))
    assert_clean(captured.text, canary)
    assert captured.text.count(MASK) == 3


@pytest.mark.parametrize("prefix", [b"", b"u", b"us", b"usr:"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_forms_are_masked_at_every_alignment(
    captured: Captured, canary: str, prefix: bytes, encode: Any
) -> None:
    for suffix in (b"", b"!", b"!!"):
        captured.logger.info("Authorization: Basic %s", encode(prefix + canary.encode() + suffix).decode())
    assert_clean(captured.text, canary)
    assert captured.text.count(MASK) == 3


def test_json_escaped_and_hex_forms_are_masked(captured: Captured, canary: str) -> None:
    captured.logger.info("body %s", json.dumps({"token": canary}))
    captured.logger.info("body %s", json.dumps({"token": canary}, ensure_ascii=False))
    captured.logger.info("bytes %s", canary.encode().hex())
    assert_clean(captured.text, canary)
    assert captured.text.count(MASK) == 3


def test_each_line_of_a_multiline_value_is_masked(captured: Captured) -> None:
    body = [secrets.token_urlsafe(48) for _ in range(3)]
    pem = "-----BEGIN TEST KEY-----\n" + "\n".join(body) + "\n-----END TEST KEY-----\n"
    redact.register(pem)
    captured.logger.info("line %s", body[1])
    captured.logger.info("whole %s", pem)
    assert not any(line in captured.text for line in body)


def test_values_shorter_than_the_minimum_are_ignored(captured: Captured) -> None:
    assert MIN_LENGTH == 8
    for short in ("", "a", "1234567", " " * 12, "\t\n" * 5):
        redact.register(short)
    assert redact.size() == 0
    text = "a 1234567 b            c"
    assert redact.redact(text) == text
    redact.register("12345678")
    assert redact.redact("x 12345678 y") == f"x {MASK} y"
    captured.logger.info("pin %s", "1234567")
    assert "1234567" in captured.text


def test_unrelated_text_is_untouched(captured: Captured, canary: str) -> None:
    text = "job 0191a2b3 finished: 3 tools listed from https://mcp.example/sse (Authorization: Bearer <redacted>)"
    assert redact.redact(text) is text
    captured.logger.info(text)
    assert captured.text.strip() == f"INFO {captured.logger.name} {text}"
    partial = canary[: len(canary) // 2]
    assert redact.redact(partial) == partial


def test_nothing_registered_is_a_no_op(captured: Captured) -> None:
    assert not redact.active()
    try:
        raise ValueError("not a secret")
    except ValueError:
        captured.logger.exception("x %s", 1)
    assert "ValueError: not a secret" in captured.text
    assert redact.redact("anything at all") == "anything at all"


def test_overlapping_values_are_masked_as_one(captured: Captured) -> None:
    redact.register("abcdefgh12")
    redact.register("gh12345678")
    assert redact.redact("<abcdefgh12345678>") == f"<{MASK}>"


def test_arguments_that_do_not_fit_never_reach_stderr_raw(captured: Captured, canary: str) -> None:
    captured.logger.info("%s and %s", canary)
    assert_clean(captured.text, canary)


def test_string_extras_and_stack_info_are_masked(canary: str) -> None:
    record = logging.LogRecord("latchkey.x", logging.INFO, __file__, 1, "m", (), None)
    record.stack_info = f"Stack (most recent call last):\n  value = {canary!r}"
    record.__dict__["detail"] = f"token={canary}"  # as extra={"detail": ...} would
    assert RedactingFilter().filter(record)
    detail = record.__dict__["detail"]
    assert MASK in record.stack_info and MASK in detail
    assert find_leaks([("stack", record.stack_info), ("extra", detail)], [canary]) == []


def test_registry_is_bounded_least_recently_registered_first() -> None:
    bound = redact.MAX_VALUES
    assert bound == 10_000
    values = [f"value-{i:06d}-{secrets.token_hex(4)}" for i in range(bound)]
    for v in values:
        redact.register(v)
    assert redact.size() == bound
    redact.register(values[0])  # used again: now the most recent
    redact.register("one-value-too-many")
    assert redact.size() == bound
    assert redact.redact(values[0]) == MASK
    assert redact.redact(values[1]) == values[1]  # the least recent went
    assert redact.redact(values[2]) == MASK
    assert redact.redact(values[-1]) == MASK
    assert redact.redact("one-value-too-many") == MASK
    # Evicted values leave nothing behind in the index.
    assert set(redact.PROCESS._refs) == {text for forms in redact.PROCESS._values.values() for text, _l, _t in forms}


def test_registry_is_also_bounded_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "MAX_CHARS", 200_000)
    big = [secrets.token_urlsafe(3000) for _ in range(20)]  # ~4 KB each, ~14 forms: ~50 KB of forms
    for v in big:
        redact.register(v)
    assert 1 <= redact.size() < 20
    assert redact.PROCESS._chars <= 200_000
    assert redact.redact(big[-1]) == MASK and redact.redact(big[0]) == big[0]
    huge = secrets.token_urlsafe(300_000)  # alone over the budget: still kept, the newest always is
    redact.register(huge)
    assert redact.size() == 1 and redact.redact(f"<{huge}>") == f"<{MASK}>"


def test_registry_is_thread_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    # Smoke test: concurrent registration (with evictions) and redaction; no errors, and the
    # registry is consistent afterwards.
    monkeypatch.setattr(redact, "MAX_VALUES", 300)
    errors: list[BaseException] = []
    registered: list[str] = []
    start = threading.Barrier(8)

    def writer(n: int) -> None:
        try:
            start.wait()
            for i in range(400):
                value = f"writer-{n}-{i:04d}-{secrets.token_hex(6)}"
                registered.append(value)
                redact.register(value)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader(n: int) -> None:
        try:
            start.wait()
            for _ in range(400):
                mine = f"reader-{n}-{secrets.token_hex(6)}"
                redact.register(mine)
                out = redact.redact(f"x {mine} y {secrets.token_urlsafe(30)}")
                assert out.startswith("x ") and len(out) < 80
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert redact.size() == 300
    kept = list(redact.PROCESS._values)
    assert all(redact.redact(v) == MASK for v in kept)
    evicted = [v for v in registered if v not in redact.PROCESS._values]
    assert len(evicted) > 1000 and all(redact.redact(v) == v for v in evicted[:200])
    # The index holds exactly the forms of the kept values, each under its grams.
    assert set(redact.PROCESS._refs) == {text for forms in redact.PROCESS._values.values() for text, _l, _t in forms}
    assert all(count > 0 for count, _l, _t, _window in redact.PROCESS._refs.values())
    indexed = {(text, offset) for entries in redact.PROCESS._index.values() for text, offset, _l, _t in entries}
    refs = redact.PROCESS._refs
    assert indexed == {(text, o) for text, ref in refs.items() for _g, o in redact._grams(text, ref[3])}


_ALPHABET = 'abcAB01+/=%- "é\\\n'


def _reference(text: str, values: list[str]) -> str:
    """Brute force: every occurrence of every form, extended, merged."""
    spans = []
    for value in values:
        if len(value) < MIN_LENGTH or not value.strip():
            continue
        for form, (lead, tail) in redact._forms(value).items():
            at = text.find(form)
            while at != -1:
                start, end, before, after = at, at + len(form), lead, tail
                while before and start > 0 and text[start - 1] in redact._B64_CHARS:
                    start, before = start - 1, before - 1
                while after and end < len(text) and text[end] in redact._B64_CHARS:
                    end, after = end + 1, after - 1
                spans.append((start, end))
                at = text.find(form, at + 1)
    if not spans:
        return text
    spans.sort()
    merged = [list(spans[0])]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, pos = [], 0
    for start, end in merged:
        out += [text[pos:start], MASK]
        pos = end
    return "".join([*out, text[pos:]])


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_redact_matches_a_brute_force_reference(data: st.DataObject) -> None:
    redact.clear()
    values = data.draw(st.lists(st.text(_ALPHABET, min_size=6, max_size=14), min_size=1, max_size=4))
    for v in values:
        redact.register(v)
    forms = [f for v in values if len(v) >= MIN_LENGTH and v.strip() for f in redact._forms(v)]
    pieces = st.text(_ALPHABET, max_size=5)
    if forms:
        pieces = st.one_of(pieces, st.sampled_from(forms), st.sampled_from(values))
    text = "".join(data.draw(st.lists(pieces, max_size=8)))
    assert redact.redact(text) == _reference(text, values)
    redact.clear()


@pytest.mark.parametrize(
    "template",
    ["many-workers-value#{:d}", "{:05d}-the-rest-of-the-value-is-shared", "shared-head-of-the-value-{:05d}-tail"],
    ids=["counter-last", "counter-first", "counter-off-centre"],
)
def test_values_that_differ_in_a_few_characters_do_not_share_one_bucket(template: str) -> None:
    # A worker resolving every edit of one secret registers thousands of values that differ
    # only in a counter. Indexed under their middle grams, every one of them landed in the same
    # few buckets, and each registration rebuilt those buckets: the 5,000th cost ~140 ms.
    reg = redact.Registry()
    n = 3000
    values = [template.format(i) for i in range(n)]
    for v in values:
        reg.register(v)
    assert max(len(bucket) for bucket in reg._index.values()) < n // 2
    assert any(ref[3] != redact._middle(text) for text, ref in reg._refs.items())  # windows moved
    for v in values[::97]:
        forms = list(redact._forms(v))
        text = f"<{v}> " + " | ".join(forms)
        assert reg.redact(text) == _reference(text, [v])
        assert v not in reg.redact(text)


@hsettings(max_examples=100, deadline=None)
@given(st.data())
def test_redact_matches_the_reference_for_crowded_similar_values(data: st.DataObject) -> None:
    reg = redact.Registry()
    head = data.draw(st.text(_ALPHABET, max_size=12))
    tail = data.draw(st.text(_ALPHABET, max_size=12))
    middles = data.draw(st.lists(st.text(_ALPHABET, min_size=1, max_size=3), min_size=12, max_size=30, unique=True))
    values = [head + m + tail for m in middles]
    for v in values:
        reg.register(v)
    forms = [f for v in values if len(v) >= MIN_LENGTH and v.strip() for f in redact._forms(v)]
    pieces = st.text(_ALPHABET, max_size=5)
    if forms:
        pieces = st.one_of(pieces, st.sampled_from(forms), st.sampled_from(values))
    text = "".join(data.draw(st.lists(pieces, max_size=8)))
    assert reg.redact(text) == _reference(text, values)


# Structured logs --------------------------------------------------------------------------------


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("latchkey.test", logging.WARNING, __file__, 7, msg, args or None, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_formatter_emits_one_valid_object_with_ids_and_extras(canary: str) -> None:
    flask_app = Flask(__name__)
    formatter = logs.JsonFormatter()
    with flask_app.test_request_context("/"):
        g.request_id = "req-123"
        token = logs.set_job_id("job-456")
        try:
            line = formatter.format(_record("two\nlines %s", canary, detail={"token": canary, "n": [1, canary]}))
        finally:
            logs.reset_job_id(token)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "latchkey.test"
    assert entry["message"] == f"two\nlines {MASK}"
    assert entry["request_id"] == "req-123"
    assert entry["job_id"] == "job-456"
    assert entry["detail"] == {"token": MASK, "n": [1, MASK]}
    assert entry["ts"].endswith("Z")
    assert find_leaks([("json", line)], [canary]) == []


def test_json_formatter_outside_requests_and_jobs_has_null_ids() -> None:
    entry = json.loads(logs.JsonFormatter().format(_record("hello")))
    assert entry["request_id"] is None and entry["job_id"] is None
    assert entry["message"] == "hello"


def test_log_lines_carry_no_terminal_escapes() -> None:
    # The development server colours its banner and access lines (werkzeug's ANSI styles).
    banner = "\x1b[31m\x1b[1mWARNING: This is a development server.\x1b[0m \x1b]0;title\x07done\r\tok"
    entry = json.loads(logs.JsonFormatter().format(_record(banner)))
    assert entry["message"] == "WARNING: This is a development server. done\tok"
    text = logs.TextFormatter().format(_record("%s", "\x1b[33mPress CTRL+C to quit\x1b[0m"))
    assert text.endswith("] Press CTRL+C to quit") and "\x1b" not in text
    assert logs.plain_text("two\nlines, caf\u00e9") == "two\nlines, caf\u00e9"


def test_json_formatter_includes_the_redacted_exception(canary: str) -> None:
    try:
        raise ValueError(canary)
    except ValueError:
        record = logging.LogRecord("latchkey.x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["exception"].startswith("Traceback") and entry["exception"].endswith(f"ValueError: {MASK}")


def test_text_format_is_the_human_one_and_redacted(canary: str) -> None:
    token = logs.set_job_id("job-9")
    try:
        line = logs.make_formatter("text").format(_record("using %s", canary))
    finally:
        logs.reset_job_id(token)
    assert " WARNING latchkey.test [req=- job=job-9] using ***" in line
    with pytest.raises(ValueError, match="log format"):
        logs.make_formatter("xml")


def test_configure_logging_filters_every_handler_of_every_logger() -> None:
    added: list[tuple[logging.Logger, logging.Handler]] = []
    for name in ("", "latchkey", "celery", "werkzeug", "gunicorn.error", "gunicorn.access", "sqlalchemy.engine.Engine"):
        lg = logging.getLogger(name)
        plain: logging.Handler = logging.StreamHandler(io.StringIO())
        lg.addHandler(plain)
        added.append((lg, plain))
    try:
        logs.configure_logging("INFO")  # the old signature still works
        logs.configure_logging("INFO", fmt="json")
        root = logging.getLogger()
        assert root.handlers
        for on_root in root.handlers:
            assert isinstance(on_root.filters[0], RedactingFilter), on_root
            assert sum(isinstance(f, RedactingFilter) for f in on_root.filters) == 1  # once, however many calls
        for lg, plain in added:
            assert any(isinstance(f, RedactingFilter) for f in plain.filters), lg.name
        # Exactly one stderr handler of ours on the root logger.
        assert sum(h in logs._ours for h in root.handlers) == 1
    finally:
        for lg, plain in added:
            lg.removeHandler(plain)


def test_the_celery_signal_handler_adopts_the_workers_handlers(canary: str) -> None:
    # What after_setup_logger / after_setup_task_logger call (exercised for real in the worker test below).
    lg = logging.getLogger(f"latchkey.tests.celery.{uuid.uuid4().hex[:8]}")
    lg.propagate = False
    stream = io.StringIO()
    celery_handler = logging.StreamHandler(stream)
    celery_handler.setFormatter(ColorFormatter("%(message)s", use_color=False))
    other = logging.StreamHandler(io.StringIO())
    other_formatter = logging.Formatter("%(message)s")
    other.setFormatter(other_formatter)
    lg.addHandler(celery_handler)
    lg.addHandler(other)
    try:
        _adopt_log_handlers(logger=lg)
        assert isinstance(celery_handler.formatter, logs.JsonFormatter)  # Celery's format is replaced ...
        assert other.formatter is other_formatter  # ... anybody else's is kept
        for handler in (celery_handler, other):
            assert isinstance(handler.filters[0], RedactingFilter)
        lg.warning("task saw %s", canary)
        entry = json.loads(stream.getvalue())
        assert entry["message"] == f"task saw {MASK}"
    finally:
        lg.removeHandler(celery_handler)
        lg.removeHandler(other)


def test_task_signals_count_outcomes() -> None:
    def sample(outcome: str) -> float:
        return REGISTRY.get_sample_value("latchkey_worker_tasks_total", {"task": "obs.t", "outcome": outcome}) or 0.0

    before = {o: sample(o) for o in ("succeeded", "failed", "retry")}
    metrics.task_started("a")
    metrics.task_finished("a", "obs.t", "SUCCESS", "succeeded")
    metrics.task_finished("b", "obs.t", "SUCCESS", "failed")
    metrics.task_finished("c", "obs.t", "RETRY", None)
    assert sample("succeeded") == before["succeeded"] + 1
    assert sample("failed") == before["failed"] + 1
    assert sample("retry") == before["retry"] + 1


def test_flower_can_follow_the_workers(settings: Settings) -> None:
    app = make_celery(settings)
    try:
        assert app.conf.worker_send_task_events is True
        assert app.conf.task_send_sent_event is True
    finally:
        app.close()


# /metrics ---------------------------------------------------------------------------------------


@pytest.fixture
def metrics_client(settings: Settings, db: Database) -> Iterator[FlaskClient]:
    application = create_app(settings)
    metrics.init_app(application)
    metrics.init_app(application)  # idempotent
    yield application.test_client()
    application.extensions["latchkey.db"].dispose()


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_serves_prometheus_text_with_http_and_job_series(
    metrics_client: FlaskClient, db: Database, settings: Settings, keyring_path: Path
) -> None:
    now = utcnow()
    with db.session() as s:
        s.add(Job(kind="obs.kind", status="queued", params={}, created_at=now - timedelta(seconds=90)))
        s.add(Job(kind="obs.kind", status="queued", params={}, created_at=now - timedelta(seconds=10)))
        for seconds, status in ((1, "succeeded"), (2, "succeeded"), (3, "succeeded"), (9, "failed")):
            s.add(
                Job(
                    kind="obs.kind",
                    status=status,
                    params={},
                    created_at=now - timedelta(minutes=5),
                    started_at=now - timedelta(minutes=2),
                    finished_at=now - timedelta(minutes=2) + timedelta(seconds=seconds),
                )
            )
        # Finished two hours ago: counted by status, but not in the last hour's durations.
        s.add(
            Job(
                kind="obs.old",
                status="succeeded",
                params={},
                created_at=now - timedelta(hours=3),
                started_at=now - timedelta(hours=2, seconds=100),
                finished_at=now - timedelta(hours=2),
            )
        )
    before = _sample("latchkey_http_requests_total", {"method": "GET", "endpoint": "/healthz", "status": "200"})
    assert metrics_client.get("/healthz").status_code == 200

    resp = metrics_client.get("/metrics")

    assert resp.status_code == 200
    assert resp.mimetype == "text/plain"
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.get_data(as_text=True)
    assert "latchkey_http_requests_total{" in body
    assert "latchkey_http_request_duration_seconds_bucket{" in body
    assert _sample("latchkey_http_requests_total", {"method": "GET", "endpoint": "/healthz", "status": "200"}) == (
        before + 1
    )
    lines = set(body.splitlines())
    assert "latchkey_jobs_scrape_success 1.0" in lines
    assert 'latchkey_jobs{kind="obs.kind",status="queued"} 2.0' in lines
    assert 'latchkey_jobs{kind="obs.kind",status="succeeded"} 3.0' in lines
    assert 'latchkey_jobs{kind="obs.kind",status="failed"} 1.0' in lines
    assert 'latchkey_jobs{kind="obs.kind",status="running"} 0.0' in lines  # zero-filled
    assert 'latchkey_jobs{kind="obs.old",status="succeeded"} 1.0' in lines
    oldest = next(
        line for line in lines if line.startswith('latchkey_jobs_oldest_seconds{kind="obs.kind",status="queued"}')
    )
    assert 85 <= float(oldest.split()[-1]) < 600
    assert 'latchkey_jobs_finished_last_hour{kind="obs.kind",status="succeeded"} 3.0' in lines
    assert 'latchkey_job_duration_last_hour_seconds{kind="obs.kind",quantile="0.5"} 2.5' in lines
    assert not any(line.startswith('latchkey_job_duration_last_hour_seconds{kind="obs.old"') for line in lines)
    assert "latchkey_legacy_token_reads" in body

    # No configuration: no URL, host, credential, key material or path.
    lowered = body.lower()
    assert "://" not in body and "127.0.0.1" not in body and "localhost" not in lowered
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() not in body
    for fragment in (settings.database_url, settings.redis_url, str(keyring_path), settings.public_keys or "x" * 40):
        assert fragment not in body
    for url in (settings.database_url, settings.redis_url):
        parts = urllib.parse.urlsplit(url)
        for piece in (parts.netloc, parts.path.strip("/")):
            if piece and len(piece) > 3:
                assert piece not in body


def test_metrics_labels_are_route_templates_never_raw_paths(metrics_client: FlaskClient) -> None:
    marker = secrets.token_hex(8)
    assert metrics_client.get(f"/api/v1/orgs/org-{marker}/secrets").status_code == 401
    assert metrics_client.get(f"/no-such-page-{marker}").status_code == 404
    assert metrics_client.open("/healthz", method="BREW").status_code == 405
    body = metrics_client.get("/metrics").get_data(as_text=True)
    assert marker not in body
    assert 'endpoint="/api/v1/orgs/<org>/secrets"' in body
    assert f'endpoint="{metrics.UNMATCHED}"' in body
    assert 'method="OTHER"' in body and "BREW" not in body


def test_metrics_still_answers_when_the_jobs_table_is_unreadable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Database()
    broken.configure(f"sqlite:///{tmp_path / 'missing' / 'nowhere.db'}")
    try:
        body = metrics.render(broken).decode()
    finally:
        broken.dispose()
    assert "latchkey_jobs_scrape_success 0.0" in body
    assert "latchkey_http_requests" in body
    assert "nowhere" not in body
    assert any("jobs table unreadable" in r.getMessage() for r in caplog.records)


def test_legacy_token_reads_counter_is_importable_and_exported(metrics_client: FlaskClient) -> None:
    before = _sample("latchkey_legacy_token_reads_total", {"kind": "mcp_server"})
    metrics.LEGACY_TOKEN_READS.labels("mcp_server").inc()
    assert _sample("latchkey_legacy_token_reads_total", {"kind": "mcp_server"}) == before + 1
    body = metrics_client.get("/metrics").get_data(as_text=True)
    assert 'latchkey_legacy_token_reads_total{kind="mcp_server"}' in body


def test_metrics_needs_no_auth_and_is_not_in_the_api(metrics_client: FlaskClient, app: Flask) -> None:
    assert metrics_client.get("/metrics", headers={"Authorization": "Bearer lk_bogus"}).status_code == 200
    assert not any(r.rule.startswith("/api/") and "metrics" in r.rule for r in app.url_map.iter_rules())


def test_a_scoped_value_is_masked_in_its_scope_only_and_never_registered_process_wide() -> None:
    value = "scoped-" + secrets.token_hex(12)
    redact.register_scoped(value)  # outside any scope: nothing happens
    assert redact.redact(value) == value
    token = redact.push_scope()
    try:
        redact.register_scoped(value)
        assert redact.redact(f"x {value} y") == f"x {MASK} y"
        assert redact.active()
        assert value not in redact.PROCESS._values
    finally:
        redact.pop_scope(token)
    assert redact.redact(value) == value


def test_a_run_registry_masks_only_its_own_values() -> None:
    mine, theirs = "mine-" + secrets.token_hex(10), "theirs-" + secrets.token_hex(10)
    redact.register(theirs)  # process-wide: what log handlers mask
    run = redact.Registry()
    run.register(mine)
    assert run.redact(f"{mine} {theirs}") == f"{MASK} {theirs}"
    assert redact.redact(f"{mine} {theirs}") == f"{mine} {MASK}"
