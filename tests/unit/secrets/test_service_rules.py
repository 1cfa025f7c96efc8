"""The secrets service on a rolled-back session: sealing on create, versions, names, tenancy, in-use deletes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.errors import ConflictError, NotFoundError, SecretInUseError, VersionMismatchError
from app.models import Org, Role, Secret
from app.providers import service as providers
from app.providers.schemas import ProviderCreate
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from app.secrets.schemas import SecretCreate, SecretOut, SecretUpdate
from tests.support.factories import CTX

VALUE = "unit-secret-value-0123456789"


def _admin(org: Org) -> OrgAccess:
    return OrgAccess(org, Role.ADMIN)


def _create(session: Session, org: Org, keys: PublicKeySet, name: str = "API_KEY", **fields: Any) -> SecretOut:
    data = SecretCreate(name=name, value=fields.pop("value", VALUE), **fields)
    return secrets.create_secret(session, CTX, _admin(org), keys, data)


def _stored(session: Session, secret_id: str) -> Secret:
    """The secret's row: the service answers with metadata only (SecretOut has no ciphertext)."""
    row = session.get(Secret, secret_id)
    assert row is not None
    return row


def test_create_seals_the_value_at_version_1(db_session: Session, org_row: Org, public_keys: PublicKeySet) -> None:
    secret = _create(db_session, org_row, public_keys)
    stored = _stored(db_session, secret.id)
    assert secret.version == 1
    assert stored.ciphertext and VALUE.encode() not in stored.ciphertext
    assert secrets.get_secret(db_session, _admin(org_row), secret.id).name == "API_KEY"


def test_a_taken_name_is_a_conflict_in_the_same_org_only(
    db_session: Session, org_row: Org, other_org_row: Org, public_keys: PublicKeySet
) -> None:
    _create(db_session, org_row, public_keys)
    with pytest.raises(ConflictError):
        _create(db_session, org_row, public_keys)
    assert _create(db_session, other_org_row, public_keys).name == "API_KEY"


def test_a_new_value_bumps_the_version_and_a_stale_if_match_is_refused(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    secret = _create(db_session, org_row, public_keys)
    access = _admin(org_row)
    first = _stored(db_session, secret.id).ciphertext
    updated = secrets.update_secret(
        db_session, CTX, access, public_keys, secret.id, SecretUpdate(value="another-value-987654")
    )
    assert updated.version == 2 and _stored(db_session, updated.id).ciphertext != first
    with pytest.raises(VersionMismatchError):
        secrets.update_secret(
            db_session, CTX, access, public_keys, secret.id, SecretUpdate(description="x"), if_match=1
        )


def test_another_orgs_secret_is_not_found(
    db_session: Session, org_row: Org, other_org_row: Org, public_keys: PublicKeySet
) -> None:
    secret = _create(db_session, other_org_row, public_keys)
    mine = _admin(org_row)
    with pytest.raises(NotFoundError):
        secrets.get_secret(db_session, mine, secret.id)
    with pytest.raises(NotFoundError):
        secrets.update_secret(db_session, CTX, mine, public_keys, secret.id, SecretUpdate(description="x"))
    with pytest.raises(NotFoundError):
        secrets.delete_secret(db_session, CTX, mine, secret.id)


def test_a_secret_a_provider_uses_cannot_be_deleted(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    secret = _create(db_session, org_row, public_keys)
    access = _admin(org_row)
    providers.create_provider(
        db_session,
        CTX,
        access,
        ProviderCreate(name="OpenAI", provider_type="openai", model_id="m", secret_ref=secret.id),
    )
    with pytest.raises(SecretInUseError):
        secrets.delete_secret(db_session, CTX, access, secret.id)
    assert secrets.get_secret(db_session, access, secret.id).id == secret.id
