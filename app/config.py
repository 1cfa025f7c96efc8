"""Settings: the only module that reads the environment.

Every setting is ``LATCHKEY_<NAME>``; settings that hold a secret also accept
``LATCHKEY_<NAME>_FILE`` (a path whose contents are the value), so operators can
mount them from a secrets store instead of exporting them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "LATCHKEY_"

# Settings that may carry secret material: each also has a ``_FILE`` variant.
SECRET_SETTINGS = frozenset(
    {
        "secret_key",
        "gateway_token",
        "public_keys",
        "database_url",
        "redis_url",
        "broker_url",
        "worker_redis_url",
        "metrics_token",
    }
)

# The session key `latchkey dev` writes; production refuses it.
DEV_SECRET_KEY_PREFIX = "dev-insecure-"  # noqa: S105 - a marker, not a key


class Environment(StrEnum):
    PRODUCTION = "production"
    DEVELOPMENT = "development"
    TEST = "test"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the setting in one line."""


class Settings(BaseModel):
    """One typed settings object, built from the environment (or a dict in tests)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    env: Environment = Environment.PRODUCTION
    # URLs may embed passwords: kept out of repr() so they never reach a log line.
    database_url: str = Field(default="sqlite:///instance/latchkey.db", repr=False)
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    # The web tier's Redis calls (sign-in limiter, reveal replies, invalidations) give up after
    # this long; a limiter that cannot answer refuses the sign-in rather than wait.
    redis_timeout_seconds: float = Field(default=1.0, gt=0, le=30)
    broker_url: str | None = Field(default=None, repr=False)
    # RabbitMQ only: the broker's `consumer_timeout` (rabbitmq.conf has it in ms), in seconds; 0 if
    # disabled, unset for RabbitMQ's default (30 min). It cannot be read over AMQP, so a worker
    # compares this declaration with its longest task time limit at start (app/broker.py).
    broker_consumer_timeout_seconds: int | None = Field(default=None, ge=0, le=30 * 86400)
    secret_key: SecretStr | None = None
    public_keys: str | None = None
    private_keys_file: Path | None = None
    gateway_token: SecretStr | None = None
    ai_gateway_base_url: str = "https://gateway.ai.cloudflare.com/v1"
    egress_allow_private: bool = False
    egress_allow_http_hosts: tuple[str, ...] = ()
    # How long a worker may keep a decrypted value in process (L1) and in Redis (L2, encrypted):
    # the bound on staleness when an invalidation could not be delivered.
    secret_l1_max_age_seconds: float = Field(default=30.0, gt=0, le=3600)
    secret_cache_ttl_seconds: int = Field(default=600, ge=1, le=86400)
    # How old (since its state was read from the database) an L2 entry may be and still be used:
    # the longest a Redis writer can roll a worker that never saw the newer state back.
    secret_l2_max_age_seconds: float = Field(default=60.0, gt=0, le=3600)
    # How long an edit waits for every subscribed worker to acknowledge its invalidation. A
    # worker that acknowledges later still drops its copy, but the edit has returned before it
    # did: until then that worker may serve the previous value (docs/workers.md).
    secret_ack_timeout_seconds: float = Field(default=0.5, gt=0, le=10)
    # Bound on one MCP exchange (handshake + tools/list or a tool call).
    mcp_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    # This deployment's own address as browsers reach it: OAuth authorization servers send the
    # user back to {public_url}/oauth/callback (web tier), and workers register that redirect URI.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$")
    # How long a started OAuth authorization may be completed (the ceiling: 10 minutes).
    oauth_flow_ttl_seconds: int = Field(default=600, ge=30, le=600)
    # How often beat re-validates valid MCP servers to refresh their tool lists.
    mcp_refresh_seconds: float = Field(default=6 * 3600, ge=1)
    log_level: str = "INFO"
    # "json" (one object per line, for log pipelines) or "text" (for people).
    log_format: Literal["json", "text"] = "json"
    # Bearer token a scraper must send to the web tier's /metrics. Unset: /metrics is open in
    # development and test, and not served (404) in production (docs/observability.md).
    metrics_token: SecretStr | None = Field(default=None, min_length=16)
    # A worker serves its own Prometheus metrics (resolver, tasks) on this port when set.
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # The Celery queue this deployment's web tier publishes to and its workers consume.
    queue: str = Field(default="latchkey", pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    # How long a POST Idempotency-Key is remembered.
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    # Cap on a request body; a secret value is at most 64 KiB, JSON escaping can
    # grow it up to 6x (\uXXXX), so leave room for that and the other fields.
    max_request_bytes: int = Field(default=512 * 1024, ge=1024)
    trusted_proxy_count: int = Field(default=0, ge=0, le=5)
    # Reveals per user per minute (fixed window in Redis).
    reveal_rate_limit: int = Field(default=10, ge=1, le=10_000)
    # How long a reveal request waits for a worker's sealed reply before answering 503.
    # At most 50 s: a reply lives 60 s in Redis and the worker's time limit is 30 s.
    reveal_timeout_seconds: float = Field(default=10.0, gt=0, le=50)
    # Job leases (docs/workers.md): a running job is held this long and renewed every third of
    # it; beat's sweep re-queues (or fails with worker_lost) jobs whose lease ran out, every
    # LATCHKEY_JOB_SWEEP_SECONDS; a job is tried at most LATCHKEY_JOB_MAX_ATTEMPTS times.
    job_lease_seconds: float = Field(default=30.0, ge=0.5, le=600)
    job_max_attempts: int = Field(default=5, ge=1, le=100)
    job_sweep_seconds: float = Field(default=10.0, ge=0.1, le=3600)
    # How often beat re-sends jobs left queued (their message lost), and replays the cache
    # invalidations Redis could not take (the outbox).
    job_requeue_seconds: float = Field(default=60.0, ge=0.1, le=3600)
    invalidation_replay_seconds: float = Field(default=10.0, ge=0.1, le=3600)
    # Worker-side reveal controls (docs/reveal.md): read by the worker only, so a compromised web
    # tier cannot switch them off. Counted per fixed window of reveal_limit_window_seconds.
    reveal_disabled: bool = False
    # Org ids (not slugs: the web tier can rename a slug) whose reveals the worker refuses.
    reveal_disabled_orgs: tuple[str, ...] = ()
    reveal_limit_per_user: int = Field(default=30, ge=1, le=1_000_000)
    reveal_limit_per_org: int = Field(default=100, ge=1, le=1_000_000)
    reveal_limit_instance: int = Field(default=500, ge=1, le=1_000_000)
    reveal_limit_window_seconds: int = Field(default=900, ge=10, le=86400)
    # Where the worker counts reveals; unset = redis_url (then only as strong as Redis access control).
    worker_redis_url: str | None = Field(default=None, repr=False)
    # Cap on the bytes read from one MCP or model-API HTTP response (for MCP over SSE: the whole stream).
    max_response_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # Web sessions (server-side rows): absolute lifetime, however active the session is.
    session_lifetime_seconds: int = Field(default=12 * 3600, ge=60, le=30 * 86400)
    # Sign-in limiting (Redis, counted before the password is checked). Per (email, address):
    # this many failures are free, then each failure locks the pair for base * 2^n seconds (capped).
    login_free_failures_per_pair: int = Field(default=5, ge=1, le=1000)
    login_backoff_base_seconds: int = Field(default=30, ge=1, le=3600)
    login_backoff_max_seconds: int = Field(default=3600, ge=1, le=86400)
    # Looser ceilings per 15-minute window: failures for one email from anywhere, and from one address.
    login_max_failures_per_email: int = Field(default=100, ge=1, le=100_000)
    login_max_failures_per_address: int = Field(default=50, ge=1, le=100_000)
    # The signed "known device" cookie set on sign-in: with it, that email's sign-ins from that
    # browser skip the two ceilings (only their own per-(email, device) back-off applies).
    login_device_cookie_seconds: int = Field(default=180 * 86400, ge=60, le=400 * 86400)
    # How long an org invitation can be accepted.
    invitation_ttl_seconds: int = Field(default=7 * 86400, ge=60, le=90 * 86400)

    @field_validator("egress_allow_http_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @field_validator("reveal_disabled_orgs", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @property
    def oauth_redirect_uri(self) -> str | None:
        return self.public_url.rstrip("/") + "/oauth/callback" if self.public_url else None

    @property
    def effective_worker_redis_url(self) -> str:
        return self.worker_redis_url or self.redis_url

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def is_production(self) -> bool:
        return self.env == Environment.PRODUCTION

    def check_web(self) -> None:
        """Refuse to serve in production without the settings the web tier needs.

        Whether the key set itself is usable is the keyring's to say: app.secrets.checks.
        """
        if not self.is_production:
            return
        if self.secret_key is None or not self.secret_key.get_secret_value():
            raise ConfigError("LATCHKEY_SECRET_KEY is required when LATCHKEY_ENV=production")
        if self.secret_key.get_secret_value().startswith(DEV_SECRET_KEY_PREFIX):
            raise ConfigError("LATCHKEY_SECRET_KEY is a development key; set a random production key")
        if len(self.secret_key.get_secret_value()) < 32:
            raise ConfigError("LATCHKEY_SECRET_KEY must be at least 32 characters in production")
        if not self.public_keys:
            raise ConfigError(
                "LATCHKEY_PUBLIC_KEYS is required when LATCHKEY_ENV=production "
                "(run `latchkey keys generate --out PATH` and set the printed key set)"
            )

    def check_worker(self) -> None:
        """Refuse to run a production worker without its keyring setting (the file: app.secrets.checks)."""
        if not self.is_production:
            return
        if self.private_keys_file is None:
            raise ConfigError("LATCHKEY_PRIVATE_KEYS_FILE is required for a worker when LATCHKEY_ENV=production")


def _read_file(name: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}_FILE: cannot read {path}: {exc.strerror}") from None


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from ``LATCHKEY_*`` variables (and ``_FILE`` variants), then overrides."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for name in Settings.model_fields:
        key = ENV_PREFIX + name.upper()
        file_key = key + "_FILE"
        if name in SECRET_SETTINGS and environ.get(file_key):
            if environ.get(key):
                raise ConfigError(f"set only one of {key} and {file_key}")
            raw[name] = _read_file(name, environ[file_key])
        elif key in environ and environ[key] != "":
            raw[name] = environ[key]
    raw.update(overrides)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ENV_PREFIX + str(err["loc"][0]).upper() if err["loc"] else "settings"
        raise ConfigError(f"{field}: {err['msg']}") from None
