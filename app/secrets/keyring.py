"""Sealing keys: the public key set (web tier) and the private keyring (workers only).

The web tier is configured with ``PublicKeySet.dumps()`` (env ``LATCHKEY_PUBLIC_KEYS``) and
can only seal. Workers load a ``Keyring`` file (mode 0600) and can open. The newest key
(by ``created_at``, ties broken by kid) seals; every key in the ring opens.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PUBLIC_FORMAT = "latchkey-public-keys/1"
KEYRING_FORMAT = "latchkey-keyring/1"

# Kids are generated, never typed by hand, so the format is strict. The prefix must agree
# with the dev flag, so a dev key cannot be passed off as a production key by editing one field.
_KID_RE = re.compile(r"^(lk|dev)-[0-9]{8}-[0-9a-f]{8}$")
# 32 raw bytes in unpadded base64url is 43 chars; urlsafe_b64decode silently skips junk
# characters, so the alphabet is checked first.
_B64_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{43}=?$")
_DERIVE_PREFIX = b"latchkey/derive/v1|"


class KeyringError(Exception):
    """A keyring or public key set is missing, unsafe or malformed (never carries key bytes)."""


class UnknownKeyError(KeyringError):
    """No key with this kid is in the ring or set."""

    def __init__(self, kid: str) -> None:
        super().__init__(f"unknown sealing key id {kid!r}")
        self.kid = kid


@dataclass(frozen=True)
class PublicKey:
    """One public sealing key."""

    kid: str
    created_at: datetime
    key: X25519PublicKey
    dev: bool

    def __post_init__(self) -> None:
        # Naive datetimes cannot be ordered against aware ones; "newest seals" needs order.
        if self.created_at.tzinfo is None:
            raise KeyringError(f"key {self.kid}: created_at must be timezone-aware")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64_key(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not _B64_KEY_RE.fullmatch(value):
        raise KeyringError(f"{what} must be 32 bytes as base64url")
    try:
        raw = base64.urlsafe_b64decode(value.rstrip("=") + "=")
    except (binascii.Error, ValueError):
        raise KeyringError(f"{what} must be 32 bytes as base64url") from None
    if len(raw) != 32:
        raise KeyringError(f"{what} must be 32 bytes as base64url")
    return raw


def _format_time(ts: datetime) -> str:
    # Microseconds, so keys added in quick succession still order by time.
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: object, kid: str) -> datetime:
    if not isinstance(value, str):
        raise KeyringError(f"key {kid}: created_at must be an ISO 8601 string")
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise KeyringError(f"key {kid}: created_at is not ISO 8601") from None
    if ts.tzinfo is None:
        raise KeyringError(f"key {kid}: created_at must carry a timezone (Z)")
    return ts.astimezone(UTC)


def _check_kid(kid: object, dev: object) -> str:
    if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
        raise KeyringError("key id must look like lk-YYYYMMDD-xxxxxxxx or dev-YYYYMMDD-xxxxxxxx")
    if not isinstance(dev, bool):
        raise KeyringError(f"key {kid}: dev must be true or false")
    if dev != kid.startswith("dev-"):
        raise KeyringError(f"key {kid}: dev flag does not match the key id prefix")
    return kid


def _check_public_key(pub: X25519PublicKey, kid: str) -> None:
    # A low-order point (e.g. all zeros) would only fail at seal time; fail at startup instead.
    try:
        X25519PrivateKey.generate().exchange(pub)
    except ValueError:
        raise KeyringError(f"key {kid}: public key is not a usable X25519 key") from None


def _load_json(text: object, fmt: str) -> list[dict[str, Any]]:
    """Parse the common ``{"format": ..., "keys": [...]}`` shell; messages never echo input."""
    if not isinstance(text, str):
        raise KeyringError("expected a JSON string")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyringError(f"not valid JSON (line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise KeyringError(f"expected a JSON object with format {fmt!r}")
    if set(doc) != {"format", "keys"}:
        raise KeyringError("expected exactly the fields 'format' and 'keys'")
    keys = doc["keys"]
    if not isinstance(keys, list) or not keys:
        raise KeyringError("'keys' must be a non-empty list")
    if not all(isinstance(entry, dict) for entry in keys):
        raise KeyringError("every entry of 'keys' must be an object")
    return keys


def _check_fields(entry: dict[str, Any], fields: set[str]) -> None:
    if set(entry) != fields:
        raise KeyringError(f"each key needs exactly the fields {', '.join(sorted(fields))}")


def _order(kid: str, created_at: datetime) -> tuple[datetime, str]:
    return (created_at, kid)


def _check_unique(kids: Iterable[str]) -> None:
    seen: set[str] = set()
    for kid in kids:
        if kid in seen:
            raise KeyringError(f"duplicate key id {kid}")
        seen.add(kid)


class PublicKeySet:
    """Immutable set of public sealing keys; what the web tier holds."""

    __slots__ = ("_keys",)
    _keys: tuple[PublicKey, ...]

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        ordered = tuple(sorted(keys, key=lambda k: _order(k.kid, k.created_at)))
        if not ordered:
            raise KeyringError("public key set is empty")
        _check_unique(k.kid for k in ordered)
        object.__setattr__(self, "_keys", ordered)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PublicKeySet is immutable")

    @classmethod
    def parse(cls, text: str) -> PublicKeySet:
        """Parse the one-line JSON from ``dumps()`` (e.g. env LATCHKEY_PUBLIC_KEYS)."""
        try:
            keys: list[PublicKey] = []
            for entry in _load_json(text, PUBLIC_FORMAT):
                _check_fields(entry, {"kid", "created_at", "public_key", "dev"})
                kid = _check_kid(entry["kid"], entry["dev"])
                raw = _unb64_key(entry["public_key"], f"key {kid}: public_key")
                pub = X25519PublicKey.from_public_bytes(raw)
                _check_public_key(pub, kid)
                keys.append(PublicKey(kid, _parse_time(entry["created_at"], kid), pub, entry["dev"]))
            return cls(keys)
        except KeyringError as exc:
            raise KeyringError(f"public key set: {exc}") from None

    def dumps(self) -> str:
        """One line of compact JSON for LATCHKEY_PUBLIC_KEYS."""
        doc = {
            "format": PUBLIC_FORMAT,
            "keys": [
                {
                    "kid": k.kid,
                    "created_at": _format_time(k.created_at),
                    "public_key": _b64(k.key.public_bytes_raw()),
                    "dev": k.dev,
                }
                for k in self._keys
            ],
        }
        return json.dumps(doc, separators=(",", ":"))

    @property
    def keys(self) -> tuple[PublicKey, ...]:
        """All keys, oldest first."""
        return self._keys

    @property
    def current(self) -> PublicKey:
        """The newest key: the one that seals."""
        return self._keys[-1]

    @property
    def kids(self) -> tuple[str, ...]:
        """Key ids, oldest first."""
        return tuple(k.kid for k in self._keys)

    @property
    def has_dev_keys(self) -> bool:
        """True if any key is a dev key (production should refuse to start)."""
        return any(k.dev for k in self._keys)

    def get(self, kid: str) -> PublicKey:
        """The key with this kid, or UnknownKeyError."""
        for k in self._keys:
            if k.kid == kid:
                return k
        raise UnknownKeyError(kid)

    def __repr__(self) -> str:
        return f"PublicKeySet(kids={list(self.kids)!r}, current={self.current.kid!r})"


@dataclass(frozen=True, repr=False)
class _PrivateEntry:
    kid: str
    created_at: datetime
    key: X25519PrivateKey
    dev: bool


def _new_entry(dev: bool, not_before: datetime | None = None) -> _PrivateEntry:
    now = datetime.now(UTC)
    # A new key must sort after every existing one even if the clock is behind or coarse,
    # otherwise "newest seals" would pick an old key after a rotation.
    if not_before is not None and now <= not_before:
        now = not_before + timedelta(microseconds=1)
    kid = f"{'dev' if dev else 'lk'}-{now:%Y%m%d}-{secrets.token_hex(4)}"
    return _PrivateEntry(kid, now, X25519PrivateKey.generate(), dev)


class Keyring:
    """Private sealing keys (worker only). ``repr`` never shows key bytes."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[_PrivateEntry]) -> None:
        ordered = sorted(entries, key=lambda e: _order(e.kid, e.created_at))
        if not ordered:
            raise KeyringError("keyring is empty")
        _check_unique(e.kid for e in ordered)
        self._entries: list[_PrivateEntry] = ordered

    # -- construction -------------------------------------------------------------------

    @classmethod
    def generate(cls, dev: bool = False) -> Keyring:
        """A new keyring with one fresh X25519 key."""
        return cls([_new_entry(dev)])

    @classmethod
    def from_private_bytes(cls, kid: str, private_key: bytes, created_at: datetime, dev: bool = False) -> Keyring:
        """A one-key ring from raw key bytes (imports, known-answer tests)."""
        _check_kid(kid, dev)
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise KeyringError(f"key {kid}: private key must be 32 raw bytes")
        if created_at.tzinfo is None:
            raise KeyringError(f"key {kid}: created_at must be timezone-aware")
        key = X25519PrivateKey.from_private_bytes(private_key)
        return cls([_PrivateEntry(kid, created_at.astimezone(UTC), key, dev)])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a keyring file; refuses files readable or writable by group/others."""
        p = Path(path)
        try:
            # fstat the descriptor we read from, so the checked file is the read file.
            # Symlinks are followed on purpose (mounted secrets are often symlinks); the
            # mode check applies to the target.
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            raise KeyringError(f"keyring file not found: {p}") from None
        except OSError as exc:
            raise KeyringError(f"cannot open keyring file {p}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyringError(f"keyring path is not a regular file: {p}")
            if st.st_mode & 0o077:
                raise KeyringError(
                    f"keyring file {p} is accessible by group/others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}"
                )
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise KeyringError(f"cannot read keyring file {p}: {exc.strerror}") from None
        finally:
            os.close(fd)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyringError(f"keyring file {p} is not UTF-8 text") from None
        return cls._parse(text, f"keyring file {p}")

    @classmethod
    def _parse(cls, text: str, where: str) -> Keyring:
        try:
            entries: list[_PrivateEntry] = []
            for entry in _load_json(text, KEYRING_FORMAT):
                _check_fields(entry, {"kid", "created_at", "private_key", "dev"})
                kid = _check_kid(entry["kid"], entry["dev"])
                raw = _unb64_key(entry["private_key"], f"key {kid}: private_key")
                key = X25519PrivateKey.from_private_bytes(raw)
                ts = _parse_time(entry["created_at"], kid)
                entries.append(_PrivateEntry(kid, ts, key, entry["dev"]))
            return cls(entries)
        except KeyringError as exc:
            raise KeyringError(f"{where}: {exc}") from None

    def _dumps(self) -> str:
        doc = {
            "format": KEYRING_FORMAT,
            "keys": [
                {
                    "kid": e.kid,
                    "created_at": _format_time(e.created_at),
                    "private_key": _b64(e.key.private_bytes_raw()),
                    "dev": e.dev,
                }
                for e in self._entries
            ],
        }
        return json.dumps(doc, indent=2) + "\n"

    def write(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Atomically write the keyring file with mode 0600; refuses to overwrite by default."""
        p = Path(path)
        directory = p.parent
        # mkstemp opens with O_CREAT|O_EXCL and mode 0600, so the key bytes are never
        # readable by others, not even briefly; fchmod guards against odd umask/ACL setups.
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise KeyringError(f"cannot write keyring in {directory}: {exc.strerror}") from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write(self._dumps().encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
            if overwrite:
                os.replace(tmp, p)
            else:
                # link() fails if the target exists, so "no overwrite" holds even under a race.
                try:
                    os.link(tmp, p)
                except FileExistsError:
                    raise KeyringError(f"keyring file already exists: {p} (refusing to overwrite)") from None
                except OSError:
                    # No hard links on this filesystem: check-then-rename is the best left.
                    if p.exists():
                        raise KeyringError(f"keyring file already exists: {p} (refusing to overwrite)") from None
                    os.replace(tmp, p)
        except OSError as exc:
            raise KeyringError(f"cannot write keyring file {p}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(directory)

    # -- keys ---------------------------------------------------------------------------

    def add_key(self, *, dev: bool | None = None) -> str:
        """Add a fresh key that becomes current (rotation); returns its kid.

        ``dev`` defaults to the current key's flag.
        """
        if dev is None:
            dev = self._current.dev
        entry = _new_entry(dev, not_before=self._current.created_at)
        while any(e.kid == entry.kid for e in self._entries):  # 32-bit suffix; be certain
            entry = _new_entry(dev, not_before=self._current.created_at)
        self._entries.append(entry)
        return entry.kid

    def remove_key(self, kid: str) -> None:
        """Remove a retired key; the last key cannot be removed."""
        entry = self._entry(kid)
        if len(self._entries) == 1:
            raise KeyringError(f"refusing to remove {kid}: it is the last key in the ring")
        self._entries.remove(entry)

    def private_key(self, kid: str) -> X25519PrivateKey:
        """The private key for kid, or UnknownKeyError."""
        return self._entry(kid).key

    def public_set(self) -> PublicKeySet:
        """The public half of every key, for the web tier."""
        return PublicKeySet(PublicKey(e.kid, e.created_at, e.key.public_key(), e.dev) for e in self._entries)

    @property
    def current_kid(self) -> str:
        """Kid of the newest key, the one that seals."""
        return self._current.kid

    @property
    def kids(self) -> tuple[str, ...]:
        """Key ids, oldest first."""
        return tuple(e.kid for e in self._entries)

    @property
    def has_dev_keys(self) -> bool:
        """True if any key is a dev key."""
        return any(e.dev for e in self._entries)

    def derive_key(self, purpose: str, length: int = 32) -> bytes:
        """Deterministic worker-only key for ``purpose`` from the current key (HKDF-SHA256).

        Every worker with the same keyring derives the same key; it changes on rotation.
        """
        if not purpose:
            raise ValueError("purpose must be a non-empty string")
        cur = self._current
        # The kid is the suffix after the last "|" and never contains "|", so the
        # (purpose, kid) pair is encoded unambiguously.
        info = _DERIVE_PREFIX + purpose.encode("utf-8") + b"|" + cur.kid.encode("ascii")
        hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info)
        return hkdf.derive(cur.key.private_bytes_raw())

    @property
    def _current(self) -> _PrivateEntry:
        return max(self._entries, key=lambda e: _order(e.kid, e.created_at))

    def _entry(self, kid: str) -> _PrivateEntry:
        for e in self._entries:
            if e.kid == kid:
                return e
        raise UnknownKeyError(kid)

    def __repr__(self) -> str:
        return f"Keyring(kids={list(self.kids)!r}, current={self.current_kid!r})"

    def __reduce__(self) -> Any:
        # Keep private keys out of pickles (e.g. a Celery result or a crash dump).
        raise TypeError("Keyring cannot be pickled")


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; best effort where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
