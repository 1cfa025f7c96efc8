"""The provider catalog service on a rolled-back session: names, secret references, tenancy, in-use deletes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.agents import service as agents
from app.agents.schemas import AgentCreate
from app.errors import ConflictError, NotFoundError, ValidationFailedError
from app.models import Org, Provider, Role
from app.providers import service as providers
from app.providers.schemas import ProviderCreate, ProviderUpdate
from app.providers.service import ProviderInUseError
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from app.secrets.schemas import SecretCreate
from tests.support.factories import CTX


def _admin(org: Org) -> OrgAccess:
    return OrgAccess(org, Role.ADMIN)


def _secret(session: Session, org: Org, keys: PublicKeySet) -> str:
    data = SecretCreate(name="OPENAI_KEY", value="sk-unit-0123456789abcdef")
    return secrets.create_secret(session, CTX, OrgAccess.system(org), keys, data).id


def _create(session: Session, org: Org, secret_ref: str, name: str = "OpenAI", **fields: Any) -> Provider:
    body = {"name": name, "provider_type": "openai", "model_id": "gpt-5.2", "secret_ref": secret_ref, **fields}
    return providers.create_provider(session, CTX, _admin(org), ProviderCreate.model_validate(body))


def test_create_and_rename_keep_names_unique_per_org(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    ref = _secret(db_session, org_row, public_keys)
    first = _create(db_session, org_row, ref)
    second = _create(db_session, org_row, ref, name="Backup")
    with pytest.raises(ConflictError):
        _create(db_session, org_row, ref)
    access = _admin(org_row)
    with pytest.raises(ConflictError):
        providers.update_provider(db_session, CTX, access, second.id, ProviderUpdate(name=first.name))
    renamed = providers.update_provider(db_session, CTX, access, second.id, ProviderUpdate(name="Spare"))
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
    mine = _admin(org_row)
    with pytest.raises(NotFoundError):
        providers.update_provider(db_session, CTX, mine, provider.id, ProviderUpdate(name="Mine"))
    with pytest.raises(NotFoundError):
        providers.delete_provider(db_session, CTX, mine, provider.id)


def test_a_provider_an_agent_uses_is_deleted_only_after_the_agent(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    provider = _create(db_session, org_row, _secret(db_session, org_row, public_keys))
    access = _admin(org_row)
    agent = agents.create_agent(db_session, CTX, access, AgentCreate(name="Helper", provider_id=provider.id))
    with pytest.raises(ProviderInUseError):
        providers.delete_provider(db_session, CTX, access, provider.id)
    agents.delete_agent(db_session, CTX, access, agent.id)
    providers.delete_provider(db_session, CTX, access, provider.id)
    with pytest.raises(NotFoundError):
        providers.get_provider(db_session, access, provider.id)
