"""A live check of the secret cache on this deployment: resolve, edit, resolve again.

The backfill verification runs it on a worker (``backfill.verify``), so the contract migration
only goes ahead once the cache flow is proven on the real database, Redis and workers.
"""

from __future__ import annotations

import hmac
import logging
import secrets as pysecrets
from typing import Any

from app.access import OrgAccess
from app.config import Settings
from app.context import Actor, RequestContext
from app.db import Database, new_id
from app.models import Org
from app.secrets import service as secrets_service
from app.secrets.keyring import PublicKeySet
from app.secrets.resolver import build_resolver
from app.secrets.schemas import SecretCreate, SecretUpdate

log = logging.getLogger("latchkey.backfill")
WORKER = RequestContext(Actor("worker"))


def probe_values() -> tuple[str, str]:
    """Two fresh random values for the probe secret."""
    return "probe-" + pysecrets.token_urlsafe(24), "probe-" + pysecrets.token_urlsafe(24)


def check_cache_invalidation(
    settings: Settings, db: Database, resolver: Any, keys: PublicKeySet, org_id: str
) -> dict[str, Any]:
    """Resolve, edit, resolve again on this deployment's database, Redis and workers.

    A temporary probe secret (deleted afterwards) is resolved by ``resolver`` (this worker's:
    L1 and L2 filled) and by a second resolver with an empty L1 (served by L2); then edited
    through the secrets service (``db`` sends the invalidation on commit, as the web tier's
    does). This worker's L1 and a fresh resolver (L2) must both answer the new version and
    value. Never returns a value.
    """
    old, new = probe_values()
    steps: dict[str, Any] = {}
    secret_id: str | None = None

    def seen(resolved: Any, value: str, version: int) -> bool:
        return resolved.version == version and hmac.compare_digest(resolved.value.encode(), value.encode())

    try:
        with db.session() as s:
            org = s.get(Org, org_id)
            assert org is not None
            probe = secrets_service.create_secret(
                s,
                WORKER,
                OrgAccess.system(org),
                keys,
                SecretCreate(
                    name=f"latchkey_verify_probe_{new_id()[-12:]}",
                    value=old,
                    description="temporary: the backfill verification's cache check (deleted when it ends)",
                ),
            )
            secret_id = probe.id
        first = resolver.resolve(org_id, secret_id)
        resolver.flush_fills()
        steps["first_resolve"] = seen(first, old, 1)
        other = build_resolver(settings, db, listen=False)
        try:
            steps["shared_cache_before_edit"] = seen(other.resolve(org_id, secret_id), old, 1)
        finally:
            other.close()
        with db.session() as s:
            org = s.get(Org, org_id)
            assert org is not None
            secrets_service.update_secret(s, WORKER, OrgAccess.system(org), keys, secret_id, SecretUpdate(value=new))
        steps["after_edit_this_worker"] = seen(resolver.resolve(org_id, secret_id), new, 2)
        fresh = build_resolver(settings, db, listen=False)
        try:
            steps["after_edit_shared_cache"] = seen(fresh.resolve(org_id, secret_id), new, 2)
        finally:
            fresh.close()
        return {"ok": all(steps.values()), "org_id": org_id, "steps": steps}
    except Exception as exc:  # reported in the record, which then fails
        log.warning("backfill verify: the cache check failed: %s", type(exc).__name__)
        return {"ok": False, "org_id": org_id, "steps": steps, "error": type(exc).__name__}
    finally:
        if secret_id is not None:
            try:
                with db.session() as s:
                    org = s.get(Org, org_id)
                    if org is not None:
                        secrets_service.delete_secret(s, WORKER, OrgAccess.system(org), secret_id)
            except Exception as exc:
                log.warning("backfill verify: could not delete the probe secret %s: %s", secret_id, type(exc).__name__)
