"""Start-up checks of a production process's keys.

``app.config`` says which settings a process needs; only the keyring can say whether the keys
they name are usable, and the settings module must not depend on the sealing package (that
dependency ran both ways). Each process entry calls one of these before it serves or works.
"""

from __future__ import annotations

from app.config import ConfigError, Settings
from app.secrets.keyring import Keyring, KeyringError, PublicKeySet


def check_web_keys(settings: Settings) -> None:
    """Refuse to serve in production without the web tier's keys, or with unusable or development ones."""
    settings.check_web()
    if not settings.is_production or not settings.public_keys:
        return
    try:
        keys = PublicKeySet.parse(settings.public_keys)
    except KeyringError as exc:
        raise ConfigError(f"LATCHKEY_PUBLIC_KEYS is invalid: {exc}") from None
    if keys.has_dev_keys:
        raise ConfigError("LATCHKEY_PUBLIC_KEYS contains development keys; generate production keys")


def check_worker_keys(settings: Settings) -> None:
    """Refuse to run a production worker without its keyring, or with an unreadable or development one."""
    settings.check_worker()
    if not settings.is_production or settings.private_keys_file is None:
        return
    try:
        ring = Keyring.load(settings.private_keys_file)
    except KeyringError as exc:
        raise ConfigError(f"LATCHKEY_PRIVATE_KEYS_FILE: {exc}") from None
    if ring.has_dev_keys:
        raise ConfigError("LATCHKEY_PRIVATE_KEYS_FILE holds development keys; generate production keys")
