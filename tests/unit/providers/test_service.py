"""The provider catalog service on a rolled-back session: names, secret references, tenancy, in-use deletes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.agents import service as agents
from app.errors import ConflictError, NotFoundError, ValidationFailedError
from app.models import Org, Provider
from app.providers import service as providers
from app.providers.service import ProviderInUseError
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from tests.support.factories import CTX


def _secret(session: Session, org: Org, keys: PublicKeySet) -> str:
    return secrets.create_secret(session, CTX, org, keys, name="OPENAI_KEY", value="sk-unit-0123456789abcdef").id


def _create(session: Session, org: Org, secret_ref: str, name: str = "OpenAI", **fields: Any) -> Provider:
    body = {"name": name, "provider_type": "openai", "model_id": "gpt-5.2", "secret_ref": secret_ref, **fields}
    return providers.create_provider(session, CTX, org, body)


def test_create_and_rename_keep_names_unique_per_org(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    ref = _secret(db_session, org_row, public_keys)
    first = _create(db_session, org_row, ref)
    second = _create(db_session, org_row, ref, name="Backup")
    with pytest.raises(ConflictError):
        _create(db_session, org_row, ref)
    with pytest.raises(ConflictError):
        providers.update_provider(db_session, CTX, org_row, second.id, {"name": first.name})
    renamed = providers.update_provider(db_session, CTX, org_row, second.id, {"name": "Spare"})
    assert renamed.name == "Spare"


def test_another_orgs_secret_cannot_be_referenced(
    db_session: Session, org_row: Org, other_org_row: Org, public_keys: PublicKeySet
) -> None:
    foreign = _secret(db_session, other_org_row, public_keys)
    with pytest.raises(ValidationFailedError) as info:
        _create(db_session, org_row, foreign)
    assert [e.field for e in info.value.errors] == ["secret_ref"]


def test_another_orgs_provider_is_not_found(
    db_session: Session, org_row: Org, other_org_row: Org, public_keys: PublicKeySet
) -> None:
    provider = _create(db_session, other_org_row, _secret(db_session, other_org_row, public_keys))
    with pytest.raises(NotFoundError):
        providers.update_provider(db_session, CTX, org_row, provider.id, {"name": "Mine"})
    with pytest.raises(NotFoundError):
        providers.delete_provider(db_session, CTX, org_row, provider.id)


def test_a_provider_an_agent_uses_is_deleted_only_after_the_agent(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    provider = _create(db_session, org_row, _secret(db_session, org_row, public_keys))
    agent = agents.create_agent(db_session, CTX, org_row, {"name": "Helper", "provider_id": provider.id})
    with pytest.raises(ProviderInUseError):
        providers.delete_provider(db_session, CTX, org_row, provider.id)
    agents.delete_agent(db_session, CTX, org_row, agent.id)
    providers.delete_provider(db_session, CTX, org_row, provider.id)
    with pytest.raises(NotFoundError):
        providers.get_provider(db_session, org_row, provider.id)
