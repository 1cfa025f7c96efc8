"""Settings from the environment, `_FILE` variants, and production's refusal to start without keys."""

from __future__ import annotations

import secrets as _random
from pathlib import Path

import pytest

from app.config import ConfigError, Environment, Settings, load_settings
from app.factory import create_app
from app.secrets.checks import check_worker_keys
from app.secrets.keyring import Keyring


@pytest.fixture(scope="module")
def production_public_keys() -> str:
    return Keyring.generate().public_set().dumps()


@pytest.fixture
def production_env(tmp_path: Path, production_public_keys: str) -> dict[str, str]:
    """A complete production web configuration; tests remove or spoil one setting."""
    return {
        "LATCHKEY_ENV": "production",
        "LATCHKEY_DATABASE_URL": f"sqlite:///{tmp_path / 'prod.db'}",
        "LATCHKEY_SECRET_KEY": _random.token_urlsafe(48),
        "LATCHKEY_PUBLIC_KEYS": production_public_keys,
    }


def _create(env: dict[str, str]) -> None:
    app = create_app(load_settings(env))
    app.extensions["latchkey.db"].dispose()


# load_settings ---------------------------------------------------------------------------------


def test_defaults_without_any_variable() -> None:
    s = load_settings({})
    assert s.env is Environment.PRODUCTION and s.is_production
    assert s.database_url == "sqlite:///instance/latchkey.db"
    assert s.broker_url is None
    assert s.effective_broker_url == s.redis_url
    assert s.secret_key is None and s.public_keys is None and s.private_keys_file is None
    assert s.gateway_token is None
    assert s.ai_gateway_base_url == "https://gateway.ai.cloudflare.com/v1"
    assert s.egress_allow_private is False
    assert s.egress_allow_http_hosts == ()


def test_variables_override_defaults_and_the_broker_falls_back_to_redis() -> None:
    s = load_settings({"LATCHKEY_ENV": "test", "LATCHKEY_REDIS_URL": "redis://cache:6379/2"})
    assert s.env is Environment.TEST and not s.is_production
    assert s.effective_broker_url == "redis://cache:6379/2"
    s = load_settings({"LATCHKEY_REDIS_URL": "redis://cache:6379/2", "LATCHKEY_BROKER_URL": "redis://mq:6379/0"})
    assert s.effective_broker_url == "redis://mq:6379/0"


def test_settings_ignore_unrelated_and_empty_variables() -> None:
    s = load_settings({"PATH": "/usr/bin", "LATCHKEY_SECRET_KEY": "", "LATCHKEY_ENV": ""})
    assert s.secret_key is None and s.env is Environment.PRODUCTION


@pytest.mark.parametrize("name", ["SECRET_KEY", "GATEWAY_TOKEN"])
def test_secret_settings_are_read_from_a_file(name: str, tmp_path: Path) -> None:
    path = tmp_path / name.lower()
    path.write_text("value-from-a-mounted-file\n", encoding="utf-8")
    s = load_settings({f"LATCHKEY_{name}_FILE": str(path)})
    secret = getattr(s, name.lower())
    assert secret is not None
    # The trailing newline an editor or `echo` leaves is not part of the value.
    assert secret.get_secret_value() == "value-from-a-mounted-file"


@pytest.mark.parametrize("name", ["SECRET_KEY", "GATEWAY_TOKEN"])
def test_setting_both_a_value_and_its_file_is_an_error(name: str, tmp_path: Path) -> None:
    path = tmp_path / name.lower()
    path.write_text("from-file", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings({f"LATCHKEY_{name}": "inline", f"LATCHKEY_{name}_FILE": str(path)})
    assert f"LATCHKEY_{name}" in str(info.value) and f"LATCHKEY_{name}_FILE" in str(info.value)


def test_an_unreadable_secret_file_names_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ConfigError, match="LATCHKEY_SECRET_KEY_FILE"):
        load_settings({"LATCHKEY_SECRET_KEY_FILE": str(missing)})


def test_http_hosts_are_a_trimmed_lowercase_comma_list() -> None:
    s = load_settings({"LATCHKEY_EGRESS_ALLOW_HTTP_HOSTS": " Localhost, 127.0.0.1 ,,mcp.internal.test, "})
    assert s.egress_allow_http_hosts == ("localhost", "127.0.0.1", "mcp.internal.test")
    assert load_settings({"LATCHKEY_EGRESS_ALLOW_HTTP_HOSTS": "single"}).egress_allow_http_hosts == ("single",)


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("1", True), ("false", False), ("0", False)])
def test_booleans_parse_common_spellings(raw: str, expected: bool) -> None:
    assert load_settings({"LATCHKEY_EGRESS_ALLOW_PRIVATE": raw}).egress_allow_private is expected


def test_a_bad_boolean_is_a_config_error_naming_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"LATCHKEY_EGRESS_ALLOW_PRIVATE": "maybe"})
    message = str(info.value)
    assert message.startswith("LATCHKEY_EGRESS_ALLOW_PRIVATE")
    assert "\n" not in message


def test_an_unknown_environment_is_a_config_error_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"^LATCHKEY_ENV"):
        load_settings({"LATCHKEY_ENV": "staging"})


def test_secret_settings_never_appear_in_repr(tmp_path: Path) -> None:
    token_file = tmp_path / "gateway"
    token_file.write_text("gateway-token-do-not-print", encoding="utf-8")
    s = load_settings(
        {"LATCHKEY_SECRET_KEY": "session-key-do-not-print", "LATCHKEY_GATEWAY_TOKEN_FILE": str(token_file)}
    )
    for text in (repr(s), str(s), repr(s.model_dump())):
        assert "session-key-do-not-print" not in text
        assert "gateway-token-do-not-print" not in text
    assert s.secret_key is not None and s.secret_key.get_secret_value() == "session-key-do-not-print"


# Production web tier ---------------------------------------------------------------------------


def test_production_app_starts_with_proper_keys(production_env: dict[str, str]) -> None:
    app = create_app(load_settings(production_env))
    try:
        resp = app.test_client().get("/healthz")
        assert resp.status_code == 200
        assert app.config["SECRET_KEY"] == production_env["LATCHKEY_SECRET_KEY"]
        assert app.extensions["latchkey.public_keys"] is not None
    finally:
        app.extensions["latchkey.db"].dispose()


def test_production_refuses_without_a_secret_key(production_env: dict[str, str]) -> None:
    del production_env["LATCHKEY_SECRET_KEY"]
    with pytest.raises(ConfigError, match="LATCHKEY_SECRET_KEY"):
        _create(production_env)


def test_production_refuses_a_short_secret_key(production_env: dict[str, str]) -> None:
    production_env["LATCHKEY_SECRET_KEY"] = "x" * 31
    with pytest.raises(ConfigError, match="LATCHKEY_SECRET_KEY"):
        _create(production_env)


def test_production_refuses_the_development_secret_key(production_env: dict[str, str]) -> None:
    production_env["LATCHKEY_SECRET_KEY"] = "dev-insecure-" + _random.token_urlsafe(32)
    with pytest.raises(ConfigError, match="LATCHKEY_SECRET_KEY"):
        _create(production_env)


def test_production_refuses_without_public_keys(production_env: dict[str, str]) -> None:
    del production_env["LATCHKEY_PUBLIC_KEYS"]
    with pytest.raises(ConfigError, match="LATCHKEY_PUBLIC_KEYS"):
        _create(production_env)


@pytest.mark.parametrize("bad", ["not json", '{"format": "latchkey-public-keys/1", "keys": []}', "[]"])
def test_production_refuses_malformed_public_keys(production_env: dict[str, str], bad: str) -> None:
    production_env["LATCHKEY_PUBLIC_KEYS"] = bad
    with pytest.raises(ConfigError, match="LATCHKEY_PUBLIC_KEYS"):
        _create(production_env)


def test_production_refuses_development_public_keys(production_env: dict[str, str]) -> None:
    production_env["LATCHKEY_PUBLIC_KEYS"] = Keyring.generate(dev=True).public_set().dumps()
    with pytest.raises(ConfigError, match="LATCHKEY_PUBLIC_KEYS"):
        _create(production_env)


def test_development_starts_without_any_keys_and_uses_a_random_session_key(tmp_path: Path) -> None:
    env = {"LATCHKEY_ENV": "development", "LATCHKEY_DATABASE_URL": f"sqlite:///{tmp_path / 'dev.db'}"}
    apps = [create_app(load_settings(env)) for _ in range(2)]
    try:
        assert all(a.extensions["latchkey.public_keys"] is None for a in apps)
        assert len(apps[0].config["SECRET_KEY"]) >= 32
        assert apps[0].config["SECRET_KEY"] != apps[1].config["SECRET_KEY"]
    finally:
        for a in apps:
            a.extensions["latchkey.db"].dispose()


# Production worker -----------------------------------------------------------------------------


def test_worker_check_refuses_production_without_a_keyring() -> None:
    with pytest.raises(ConfigError, match="LATCHKEY_PRIVATE_KEYS_FILE"):
        check_worker_keys(load_settings({"LATCHKEY_ENV": "production"}))


def test_worker_check_refuses_a_development_keyring(tmp_path: Path) -> None:
    path = tmp_path / "dev-keyring.json"
    Keyring.generate(dev=True).write(path)
    settings = load_settings({"LATCHKEY_ENV": "production", "LATCHKEY_PRIVATE_KEYS_FILE": str(path)})
    with pytest.raises(ConfigError, match="LATCHKEY_PRIVATE_KEYS_FILE"):
        check_worker_keys(settings)


def test_worker_check_refuses_a_missing_keyring_file(tmp_path: Path) -> None:
    settings = load_settings({"LATCHKEY_ENV": "production", "LATCHKEY_PRIVATE_KEYS_FILE": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="LATCHKEY_PRIVATE_KEYS_FILE"):
        check_worker_keys(settings)


def test_worker_check_accepts_a_production_keyring(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring.generate().write(path)
    settings: Settings = load_settings({"LATCHKEY_ENV": "production", "LATCHKEY_PRIVATE_KEYS_FILE": str(path)})
    check_worker_keys(settings)
    check_worker_keys(load_settings({"LATCHKEY_ENV": "test"}))
