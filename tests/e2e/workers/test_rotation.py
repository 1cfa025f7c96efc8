"""Key rotation end to end: `keys rotate` -> reseal job on a real worker -> `keys retire`.

Every test works on a COPY of the session keyring, so the shared keyring never changes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from app.cli import main
from app.config import Settings
from app.db import Database, utcnow
from app.factory import create_app
from app.models import AuditEvent, Job, Secret
from app.secrets.keyring import Keyring, PublicKeySet
from app.secrets.resolver import Resolver
from app.secrets.sealing import open_sealed, seal, secret_context
from tests.support.factories import Caller, Factory
from tests.support.processes import settings_env, spawned_worker
from tests.support.workers import extra_worker, parked_app, wait_for, wait_job


@pytest.fixture
def ring_copy(tmp_path: Path, keyring_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    shutil.copyfile(keyring_path, path)
    os.chmod(path, 0o600)
    return path


def cli(settings: Settings, ring: Path, queue: str, *args: str, public: str | None = None) -> Result:
    """Run the CLI as an operator would; ``public`` is LATCHKEY_PUBLIC_KEYS (the web tier's set)."""
    update: dict[str, Any] = {"queue": queue, "private_keys_file": ring}
    if public is not None:
        update["public_keys"] = public
    custom = settings.model_copy(update=update)
    return CliRunner().invoke(main, list(args), env=settings_env(custom))


def operator_on(web: Any, factory: Factory) -> Caller:
    op = factory.user(operator=True)
    return Caller(web.test_client(), op.token, op.user_id, op.email)


def key_ids(db: Database) -> set[str | None]:
    with db.session() as s:
        return set(s.scalars(select(Secret.key_id)))


def revisions(db: Database) -> dict[str, int]:
    with db.session() as s:
        return dict(s.execute(select(Secret.id, Secret.revision)).all())


def test_rotate_reseal_retire(
    settings: Settings, db: Database, factory: Factory, admin: Caller, org: str, ring_copy: Path
) -> None:
    values = {f"ROT_{i}": f"value-{i}-{uuid.uuid4().hex}" for i in range(5)}
    ids = {name: factory.secret(admin, org, name=name, value=v)["id"] for name, v in values.items()}
    old_kid = Keyring.load(ring_copy).current_kid
    assert key_ids(db) == {old_kid}
    before_revisions = revisions(db)
    # A resolver that loaded the ring before the rotation: it must pick up the new key by itself.
    resolver = Resolver(db, Keyring.load(ring_copy), None, listen=False, keyring_file=ring_copy)

    # The current key cannot be retired.
    refused = cli(settings, ring_copy, settings.queue, "keys", "retire", old_kid)
    assert refused.exit_code == 1 and "current" in refused.stderr

    with parked_app(settings) as (_web, parked):
        # Rotate while nobody consumes the queue: the reseal waits, so the old key is still in use.
        rotated = cli(settings, ring_copy, parked, "keys", "rotate")
        assert rotated.exit_code == 0, rotated.stderr
        lines = rotated.stdout.strip().splitlines()
        assert len(lines) == 1
        public = PublicKeySet.parse(lines[0])
        new_kid = public.current.kid
        assert len(public.keys) == 2 and public.kids[0] == old_kid and new_kid != old_kid
        assert Keyring.load(ring_copy).current_kid == new_kid
        m = re.search(r"re-seal job (\S+) queued", rotated.stderr)
        assert m is not None
        with db.session() as s:
            job = s.get(Job, m.group(1))
            assert job is not None and job.kind == "keys.reseal_secrets" and job.status == "queued"

        # While the web tier still seals to the old key, retiring it is refused outright.
        web_old = cli(settings, ring_copy, parked, "keys", "retire", old_kid)
        assert web_old.exit_code == 1 and "LATCHKEY_PUBLIC_KEYS" in web_old.stderr
        early = cli(settings, ring_copy, parked, "keys", "retire", old_kid, public=lines[0])
        assert early.exit_code == 1
        assert "5 sealed value(s) still use it" in early.stderr and len(early.stderr.strip().splitlines()) == 1
        current = cli(settings, ring_copy, parked, "keys", "retire", new_kid, public=lines[0])
        assert current.exit_code == 1 and "current" in current.stderr

    with extra_worker(settings, private_keys_file=ring_copy) as (_producer, web):
        op = operator_on(web, factory)
        resp = op.post("admin/keys/reseal", json={"batch_size": 2})
        assert resp.status_code == 202, resp.get_json()
        done = wait_job(op.get, f"admin/jobs/{resp.get_json()['job']['id']}")
        assert done["status"] == "succeeded", done
        assert done["progress"] == {"done": 5, "total": 5}
        assert done["result"]["resealed"] == 5 and done["result"]["key_id"] == new_kid
        assert key_ids(db) == {new_kid}
        # The same state, so the same cache pointers: a reseal does not bump the revision.
        assert revisions(db) == before_revisions

        for name, secret_id in ids.items():
            got = resolver.resolve(factory_org_id(db, org), secret_id)
            assert got.value == values[name] and got.version == 1
        assert resolver.keyring.current_kid == new_kid
        resolver.close()

        # Nothing left to do: still a success, with an empty total.
        again = wait_job(op.get, f"admin/jobs/{op.post('admin/keys/reseal').get_json()['job']['id']}")
        assert again["status"] == "succeeded" and again["progress"] == {"done": 0, "total": 0}
        bad = op.post("admin/keys/reseal", json={"batch_size": 0})
        assert bad.status_code == 422

    retired = cli(settings, ring_copy, settings.queue, "keys", "retire", old_kid, public=public.dumps())
    assert retired.exit_code == 0, retired.stderr
    assert PublicKeySet.parse(retired.stdout.strip()).kids == (new_kid,)
    assert Keyring.load(ring_copy).kids == (new_kid,)

    with db.session() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "keys.reseal")))
        assert len(events) == 2 and events[0].details["resealed"] in (0, 5)
    verified = cli(settings, ring_copy, settings.queue, "audit", "verify")
    assert verified.exit_code == 0, verified.output


def test_rotate_without_a_keyring_is_one_line(settings: Settings, ring_copy: Path) -> None:
    custom = settings.model_copy(update={"private_keys_file": None})
    result = CliRunner().invoke(main, ["keys", "rotate"], env=settings_env(custom))
    assert result.exit_code == 1 and "LATCHKEY_PRIVATE_KEYS_FILE" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_reseal_route_is_for_operators(worker: Any, factory: Factory, admin: Caller) -> None:
    assert admin.post("admin/keys/reseal").status_code == 403
    op = factory.user(operator=True)
    resp = op.post("admin/keys/reseal", json={"batch_size": 10})
    assert resp.status_code == 202
    assert resp.get_json()["job"]["kind"] == "keys.reseal_secrets"
    wait_job(op.get, f"admin/jobs/{resp.get_json()['job']['id']}")


@contextmanager
def own_worker(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A worker process this test may SIGKILL."""
    with spawned_worker(settings, log, concurrency=2) as (proc, _producer):
        yield proc


def test_a_crashed_reseal_resumes_without_damage(
    settings: Settings, db: Database, factory: Factory, org: str, ring_copy: Path, tmp_path: Path
) -> None:
    org_id = factory_org_id(db, org)
    public = PublicKeySet.parse(settings.public_keys or "")
    values: dict[str, str] = {}
    with db.session() as s:
        for i in range(300):
            secret_id = str(uuid.uuid4())
            values[secret_id] = f"crash-{i}-{uuid.uuid4().hex}"
            sealed = seal(public, values[secret_id].encode(), secret_context(org_id, secret_id, 1))
            s.add(
                Secret(
                    id=secret_id,
                    org_id=org_id,
                    name=f"CRASH_{i}",
                    ciphertext=sealed.ciphertext,
                    key_id=sealed.key_id,
                    version=1,
                    updated_at=utcnow(),
                )
            )
    ring = Keyring.load(ring_copy)
    new_kid = ring.add_key()
    ring.write(ring_copy, overwrite=True)

    custom = settings.model_copy(
        update={"queue": f"latchkey-rot-{uuid.uuid4().hex[:10]}", "private_keys_file": ring_copy}
    )
    web = create_app(custom)
    op = operator_on(web, factory)
    try:
        with own_worker(custom, tmp_path / "w1.log") as proc:
            job_id = op.post("admin/keys/reseal", json={"batch_size": 1}).get_json()["job"]["id"]

            def progressing() -> bool:
                # A bare read on a pool connection: a session would take SQLite's write lock
                # (BEGIN IMMEDIATE) and queue behind the worker's batches until the job is done.
                assert db.engine is not None
                raw = db.engine.raw_connection()
                try:
                    mark = "?" if db.engine.dialect.name == "sqlite" else "%s"
                    cur = raw.cursor()
                    cur.execute(f"SELECT progress_done FROM jobs WHERE id = {mark}", (job_id,))
                    row = cur.fetchone()
                    raw.rollback()
                finally:
                    raw.close()
                return row is not None and (row[0] or 0) > 0

            wait_for(progressing, 30, interval=0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.status == "running"
            assert 0 < (job.progress_done or 0) < (job.progress_total or 0) == 300, "the reseal finished too fast"
        partly = key_ids(db)
        assert partly == {public.current.kid, new_kid}

        # Nothing was damaged: every row opens with its recorded key, to its value.
        _check_all(db, ring_copy, org_id, values)

        with own_worker(custom, tmp_path / "w2.log"):
            rerun = op.post("admin/keys/reseal", json={"batch_size": 50}).get_json()["job"]["id"]
            done = wait_job(op.get, f"admin/jobs/{rerun}", timeout=60)
            assert done["status"] == "succeeded", done
            assert 0 < done["progress"]["total"] < 300 and done["progress"]["done"] == done["progress"]["total"]
        assert key_ids(db) == {new_kid}
        _check_all(db, ring_copy, org_id, values)
    finally:
        web.extensions["latchkey.db"].dispose()


def factory_org_id(db: Database, slug: str) -> str:
    from app.models import Org

    with db.session() as s:
        org = s.scalar(select(Org).where(Org.slug == slug))
        assert org is not None
        return org.id


def _check_all(db: Database, ring_file: Path, org_id: str, values: dict[str, str]) -> None:
    ring = Keyring.load(ring_file)
    with db.session() as s:
        rows = s.execute(select(Secret.id, Secret.ciphertext, Secret.key_id, Secret.version)).all()
    assert len(rows) == len(values)
    for secret_id, ciphertext, kid, version in rows:
        assert version == 1
        plain = open_sealed(ring, ciphertext, secret_context(org_id, secret_id, 1), kid)
        assert plain.decode() == values[secret_id]
