"""The agents service on a rolled-back session: providers of the same org only, edits, deletes."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.agents import service as agents
from app.agents.schemas import AgentCreate, AgentUpdate
from app.errors import NotFoundError, ValidationFailedError
from app.models import Org, Role
from app.providers import service as providers
from app.providers.schemas import ProviderCreate
from app.schemas import validated
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from app.secrets.schemas import SecretCreate
from tests.support.factories import CTX


def _admin(org: Org) -> OrgAccess:
    return OrgAccess(org, Role.ADMIN)


def _provider(session: Session, org: Org, keys: PublicKeySet) -> str:
    access = OrgAccess.system(org)
    ref = secrets.create_secret(
        session, CTX, access, keys, SecretCreate(name="KEY", value="sk-unit-0123456789abcdef")
    ).id
    body = ProviderCreate(name="OpenAI", provider_type="openai", model_id="gpt-5.2", secret_ref=ref)
    return providers.create_provider(session, CTX, access, body).id


def test_an_agent_needs_a_provider_of_its_own_org(
    db_session: Session, org_row: Org, other_org_row: Org, public_keys: PublicKeySet
) -> None:
    foreign = _provider(db_session, other_org_row, public_keys)
    with pytest.raises(ValidationFailedError) as info:
        agents.create_agent(db_session, CTX, _admin(org_row), AgentCreate(name="Helper", provider_id=foreign))
    assert [e.field for e in info.value.errors] == ["provider_id"]


def test_an_edit_changes_only_what_it_names(db_session: Session, org_row: Org, public_keys: PublicKeySet) -> None:
    provider = _provider(db_session, org_row, public_keys)
    access = _admin(org_row)
    agent = agents.create_agent(
        db_session, CTX, access, AgentCreate(name="Helper", provider_id=provider, system_prompt="Be brief.")
    )
    edited = agents.update_agent(db_session, CTX, access, agent.id, AgentUpdate(name="Assistant"))
    assert (edited.name, edited.system_prompt, edited.provider_id) == ("Assistant", "Be brief.", provider)
    # An edit naming nothing is refused by the input model (AgentUpdate), before the service runs.
    with pytest.raises(ValidationFailedError):
        agents.update_agent(db_session, CTX, access, agent.id, validated(AgentUpdate, {}))


def test_another_orgs_agent_is_not_found(
    db_session: Session, org_row: Org, other_org_row: Org, public_keys: PublicKeySet
) -> None:
    provider = _provider(db_session, other_org_row, public_keys)
    mine, theirs = _admin(org_row), _admin(other_org_row)
    agent = agents.create_agent(db_session, CTX, theirs, AgentCreate(name="Theirs", provider_id=provider))
    with pytest.raises(NotFoundError):
        agents.get_agent(db_session, mine, agent.id)
    with pytest.raises(NotFoundError):
        agents.delete_agent(db_session, CTX, mine, agent.id)
    agents.delete_agent(db_session, CTX, theirs, agent.id)
    with pytest.raises(NotFoundError):
        agents.get_agent(db_session, theirs, agent.id)
