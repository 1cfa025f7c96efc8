"""Sealing: HPKE (RFC 9180) base mode, X25519 / HKDF-SHA256 / AES-256-GCM.

Envelope v1 (bytes)::

    0x01 | len(kid) (1 byte) | kid (ascii) | enc (32) | ciphertext | tag (16)

HPKE ``info`` = ``b"latchkey/seal/v1|" + kid + b"|" + context``. The public HPKE API takes
no AAD, so the header (format version via the ``v1`` label, the kid) and the caller's
binding context all go into ``info``: a ciphertext moved to another row, org, version or key
id fails to open instead of opening as something else.

Sealing needs only a ``PublicKeySet`` (web tier); opening needs the ``Keyring`` (workers).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from app.secrets.keyring import Keyring, PublicKeySet, UnknownKeyError

FORMAT_V1 = 1
EPHEMERAL_KID = "ephemeral"

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_INFO_PREFIX = b"latchkey/seal/v1|"
_ENC_LEN = 32  # X25519 encapsulated key
_TAG_LEN = 16  # AES-GCM tag
# Kids never contain "|", which keeps kid and context apart inside ``info``.
_KID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

# Accepted for ciphertexts because DB drivers may return bytea as memoryview.
CiphertextBytes = bytes | bytearray | memoryview


class SealingError(Exception):
    """Base class for sealing failures; messages never include plaintext or key bytes."""


class CiphertextError(SealingError):
    """The ciphertext does not open: malformed, truncated, tampered, moved, or wrong key."""


class UnknownKeyIdError(CiphertextError):
    """The envelope names a key id that is not in the keyring (retired or foreign key)."""

    def __init__(self, kid: str) -> None:
        super().__init__(f"ciphertext was sealed to key {kid}, which is not in the keyring")
        self.kid = kid


@dataclass(frozen=True)
class Sealed:
    """A sealed value and the id of the key it was sealed to (stored next to it)."""

    ciphertext: bytes
    key_id: str

    def __repr__(self) -> str:
        return f"Sealed(key_id={self.key_id!r}, ciphertext=<{len(self.ciphertext)} bytes>)"


def encode_context(label: str, *fields: str | int) -> bytes:
    """Unambiguous binding context: ``label|`` then each field tagged and length-prefixed."""
    if not _LABEL_RE.fullmatch(label):
        raise ValueError("context label must match [a-z0-9][a-z0-9._-]*")
    out = [label.encode("ascii"), b"|"]
    for value in fields:
        # Type tag + fixed-size length/value, so no two field lists encode alike,
        # whatever the strings contain.
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError("context fields must be str or int")
        if isinstance(value, int):
            if not 0 <= value < 2**64:
                raise ValueError("context int fields must be in [0, 2**64)")
            out.append(b"i" + struct.pack(">Q", value))
        else:
            raw = value.encode("utf-8")
            out.append(b"s" + struct.pack(">I", len(raw)) + raw)
    return b"".join(out)


def secret_context(org_id: str, secret_id: str, version: int) -> bytes:
    """Binding context for a stored secret value: (org_id, secret_id, version)."""
    if not isinstance(org_id, str) or not isinstance(secret_id, str):
        raise TypeError("org_id and secret_id must be str")
    if not org_id or not secret_id:
        raise ValueError("org_id and secret_id must be non-empty")
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError("version must be int")
    return encode_context("secret", org_id, secret_id, version)


def _info(kid: str, context: bytes) -> bytes:
    if not isinstance(context, bytes):
        raise TypeError("context must be bytes")
    if not context:
        # An empty context would make a ciphertext valid in every row.
        raise ValueError("context must be non-empty")
    return _INFO_PREFIX + kid.encode("ascii") + b"|" + context


def _seal(public_key: X25519PublicKey, kid: str, plaintext: bytes, context: bytes) -> bytes:
    if not isinstance(plaintext, bytes):
        raise TypeError("plaintext must be bytes")
    if not _KID_RE.fullmatch(kid):
        raise ValueError("invalid key id")
    info = _info(kid, context)
    try:
        body = _SUITE.encrypt(plaintext, public_key, info=info)
    except ValueError:
        # e.g. a low-order public key: the shared secret cannot be computed.
        raise SealingError("cannot seal to this public key") from None
    kid_raw = kid.encode("ascii")
    return bytes([FORMAT_V1, len(kid_raw)]) + kid_raw + body


def _parse(ciphertext: CiphertextBytes) -> tuple[str, bytes]:
    """Split an envelope into (kid, HPKE output); raises CiphertextError."""
    if not isinstance(ciphertext, (bytes, bytearray, memoryview)):
        raise TypeError("ciphertext must be bytes")
    data = bytes(ciphertext)
    if len(data) < 2:
        raise CiphertextError("ciphertext is truncated")
    if data[0] != FORMAT_V1:
        raise CiphertextError(f"unsupported ciphertext format version {data[0]}")
    kid_len = data[1]
    header_len = 2 + kid_len
    if kid_len == 0:
        raise CiphertextError("ciphertext header is malformed")
    if len(data) < header_len + _ENC_LEN + _TAG_LEN:
        raise CiphertextError("ciphertext is truncated")
    kid = data[2:header_len].decode("ascii", errors="replace")
    if not _KID_RE.fullmatch(kid):
        raise CiphertextError("ciphertext header is malformed")
    return kid, data[header_len:]


def _open(private_key: X25519PrivateKey, kid: str, body: bytes, context: bytes) -> bytes:
    info = _info(kid, context)
    try:
        return _SUITE.decrypt(body, private_key, info=info)
    except (InvalidTag, ValueError):
        # One message for tampered, moved and wrong-key: they are indistinguishable anyway.
        raise CiphertextError("ciphertext does not open (tampered, wrong context, or wrong key)") from None


def seal(keys: PublicKeySet, plaintext: bytes, context: bytes) -> Sealed:
    """Seal plaintext to the newest public key, bound to context (no private key needed)."""
    current = keys.current
    return Sealed(_seal(current.key, current.kid, plaintext, context), current.kid)


def open_sealed(
    keyring: Keyring,
    ciphertext: CiphertextBytes,
    context: bytes,
    expected_key_id: str | None = None,
) -> bytes:
    """Open a stored envelope with the ring; raises CiphertextError on any failure.

    A kid that is not in the ring raises ``UnknownKeyIdError`` (a ``CiphertextError`` with
    ``.kid``), so callers can tell "key retired/missing" from tampering if they care to.
    """
    kid, body = _parse(ciphertext)
    if expected_key_id is not None and kid != expected_key_id:
        raise CiphertextError(f"ciphertext key id {kid} does not match the stored key id {expected_key_id}")
    if kid == EPHEMERAL_KID:
        raise CiphertextError("ciphertext is a one-shot reply, not a stored secret")
    try:
        private_key = keyring.private_key(kid)
    except UnknownKeyError:
        raise UnknownKeyIdError(kid) from None
    return _open(private_key, kid, body, context)


def generate_ephemeral() -> tuple[X25519PrivateKey, bytes]:
    """A one-request key pair: (private key, raw 32-byte public key)."""
    private_key = X25519PrivateKey.generate()
    return private_key, private_key.public_key().public_bytes_raw()


def seal_to(public_key_raw: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Seal plaintext to a raw X25519 public key (reveal replies); kid is "ephemeral"."""
    if not isinstance(public_key_raw, bytes) or len(public_key_raw) != 32:
        raise SealingError("reply public key must be 32 raw bytes")
    public_key = X25519PublicKey.from_public_bytes(public_key_raw)
    return _seal(public_key, EPHEMERAL_KID, plaintext, context)


def open_with(private_key: X25519PrivateKey, ciphertext: CiphertextBytes, context: bytes) -> bytes:
    """Open a seal_to envelope with its one-request private key; raises CiphertextError."""
    kid, body = _parse(ciphertext)
    if kid != EPHEMERAL_KID:
        raise CiphertextError("ciphertext was not sealed to a one-request key")
    return _open(private_key, kid, body, context)
