"""Fixtures of the process tests: the LATCHKEY_* environment of a production deployment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import Settings
from app.secrets.keyring import Keyring


@pytest.fixture
def production_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """A production environment on the session's database and Redis, with a keyring of its own
    (the file, mode 0600, for workers; its public set for the web tier)."""
    ring = Keyring.generate()
    ring.write(tmp_path / "ring.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATCHKEY_")}
    env.update(
        LATCHKEY_ENV="production",
        LATCHKEY_DATABASE_URL=settings.database_url,
        LATCHKEY_REDIS_URL=settings.redis_url,
        LATCHKEY_SECRET_KEY="p" * 48,
        LATCHKEY_PUBLIC_KEYS=ring.public_set().dumps(),
        LATCHKEY_PRIVATE_KEYS_FILE=str(tmp_path / "ring.json"),
    )
    if settings.broker_url:  # this run's broker (RabbitMQ with --broker rabbitmq)
        env["LATCHKEY_BROKER_URL"] = settings.broker_url
    return env
