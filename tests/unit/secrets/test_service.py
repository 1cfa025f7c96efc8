"""The secrets service on a rolled-back session: sealing on create, versions, names, tenancy, in-use deletes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.errors import ConflictError, NotFoundError, SecretInUseError, VersionMismatchError
from app.models import Org, Secret
from app.providers import service as providers
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from tests.support.factories import CTX

VALUE = "unit-secret-value-0123456789"


def _create(session: Session, org: Org, keys: PublicKeySet, name: str = "API_KEY", **fields: Any) -> Secret:
    return secrets.create_secret(session, CTX, org, keys, name=name, value=fields.pop("value", VALUE), **fields)


def test_create_seals_the_value_at_version_1(db_session: Session, org_row: Org, public_keys: PublicKeySet) -> None:
    secret = _create(db_session, org_row, public_keys)
    assert secret.version == 1
    assert secret.ciphertext and VALUE.encode() not in secret.ciphertext
    assert secrets.get_secret(db_session, org_row, secret.id).name == "API_KEY"


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
    first = secret.ciphertext
    updated = secrets.update_secret(db_session, CTX, org_row, public_keys, secret.id, {"value": "another-value-987654"})
    assert updated.version == 2 and updated.ciphertext != first
    with pytest.raises(VersionMismatchError):
        secrets.update_secret(db_session, CTX, org_row, public_keys, secret.id, {"description": "x"}, if_match=1)


def test_another_orgs_secret_is_not_found(
    db_session: Session, org_row: Org, other_org_row: Org, public_keys: PublicKeySet
) -> None:
    secret = _create(db_session, other_org_row, public_keys)
    with pytest.raises(NotFoundError):
        secrets.get_secret(db_session, org_row, secret.id)
    with pytest.raises(NotFoundError):
        secrets.update_secret(db_session, CTX, org_row, public_keys, secret.id, {"description": "x"})
    with pytest.raises(NotFoundError):
        secrets.delete_secret(db_session, CTX, org_row, secret.id)


def test_a_secret_a_provider_uses_cannot_be_deleted(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    secret = _create(db_session, org_row, public_keys)
    providers.create_provider(
        db_session,
        CTX,
        org_row,
        {"name": "OpenAI", "provider_type": "openai", "model_id": "m", "secret_ref": secret.id},
    )
    with pytest.raises(SecretInUseError):
        secrets.delete_secret(db_session, CTX, org_row, secret.id)
    assert secrets.get_secret(db_session, org_row, secret.id).id == secret.id
