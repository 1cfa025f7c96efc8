import base64
import json
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.secrets.keyring import Keyring, PublicKeySet
from app.secrets.sealing import (
    EPHEMERAL_KID,
    CiphertextError,
    Sealed,
    SealingError,
    UnknownKeyIdError,
    generate_ephemeral,
    open_sealed,
    open_with,
    seal,
    seal_to,
    secret_context,
)

VECTOR = Path(__file__).parent / "vectors" / "sealing_kat.json"
ORG, SECRET, VERSION = "org_1", "sec_1", 3
CTX = secret_context(ORG, SECRET, VERSION)
PLAINTEXT = b"sk-test-0123456789abcdef"

# database=None: no .hypothesis/ directory in the repo.
PROPERTY = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def ring() -> Keyring:
    return Keyring.generate()


@pytest.fixture(scope="module")
def sealed(ring: Keyring) -> Sealed:
    return seal(ring.public_set(), PLAINTEXT, CTX)


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _assert_clean(exc: BaseException, *secret: bytes) -> None:
    """The typed error carries no chained cause and no secret material in its message."""
    assert exc.__cause__ is None
    assert exc.__suppress_context__ or exc.__context__ is None
    msg = str(exc)
    for value in secret:
        assert value.decode("utf-8", "replace") not in msg
        assert value.hex() not in msg


# -- round trips ---------------------------------------------------------------------------


@PROPERTY
@given(value=st.text(max_size=4096))
@example(value="")
@example(value="x" * 65536)
@example(value="é🔑秘" * 7000)  # multi-byte, ~63 KiB encoded
@example(value="\x00\ud7ff\ue000\U0010ffff")
def test_text_values_round_trip(ring: Keyring, value: str) -> None:
    plaintext = value.encode("utf-8")
    result = seal(ring.public_set(), plaintext, CTX)
    assert result.key_id == ring.current_kid
    if len(plaintext) >= 16:  # shorter values could match random bytes by chance
        assert plaintext not in result.ciphertext
    assert open_sealed(ring, result.ciphertext, CTX, expected_key_id=result.key_id) == plaintext


@PROPERTY
@given(
    value=st.binary(max_size=2048),
    org=st.text(min_size=1),
    sid=st.text(min_size=1),
    version=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_binary_values_round_trip_under_any_context(
    ring: Keyring, value: bytes, org: str, sid: str, version: int
) -> None:
    try:
        ctx = secret_context(org, sid, version)
    except UnicodeEncodeError:  # lone surrogates cannot be stored anyway
        return
    result = seal(ring.public_set(), value, ctx)
    assert open_sealed(ring, result.ciphertext, ctx) == value


def test_sealing_is_randomised(ring: Keyring) -> None:
    keys = ring.public_set()
    assert seal(keys, PLAINTEXT, CTX).ciphertext != seal(keys, PLAINTEXT, CTX).ciphertext


def test_envelope_layout_is_version_kid_then_hpke_output(ring: Keyring, sealed: Sealed) -> None:
    kid = ring.current_kid.encode()
    ct = sealed.ciphertext
    assert ct[0] == 1
    assert ct[1] == len(kid)
    assert ct[2 : 2 + len(kid)] == kid
    assert len(ct) == 2 + len(kid) + 32 + len(PLAINTEXT) + 16


def test_ciphertext_accepts_memoryview_from_db_drivers(ring: Keyring, sealed: Sealed) -> None:
    assert open_sealed(ring, memoryview(sealed.ciphertext), CTX) == PLAINTEXT


def test_sealed_repr_shows_length_not_bytes(sealed: Sealed) -> None:
    text = repr(sealed)
    assert sealed.key_id in text
    assert f"<{len(sealed.ciphertext)} bytes>" in text
    assert sealed.ciphertext.hex()[:16] not in text


# -- tampering -----------------------------------------------------------------------------


def _regions(ct: bytes) -> dict[str, int]:
    kid_len = ct[1]
    enc = 2 + kid_len
    return {
        "format": 0,
        "kid_length": 1,
        "kid": 2 + kid_len // 2,
        "enc": enc + 16,
        "body": enc + 32 + 4,
        "tag": len(ct) - 8,
    }


@pytest.mark.parametrize("region", ["format", "kid_length", "kid", "enc", "body", "tag"])
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipped_byte_in_each_region_does_not_open(ring: Keyring, sealed: Sealed, region: str, mask: int) -> None:
    ct = bytearray(sealed.ciphertext)
    ct[_regions(sealed.ciphertext)[region]] ^= mask
    with pytest.raises(CiphertextError) as info:
        open_sealed(ring, bytes(ct), CTX)
    _assert_clean(info.value, PLAINTEXT)


def test_every_single_byte_flip_does_not_open(ring: Keyring, sealed: Sealed) -> None:
    failures = 0
    for i in range(len(sealed.ciphertext)):
        ct = bytearray(sealed.ciphertext)
        ct[i] ^= 0x01
        with pytest.raises(CiphertextError):
            open_sealed(ring, bytes(ct), CTX)
        failures += 1
    assert failures == len(sealed.ciphertext)


def test_truncation_at_any_length_does_not_open(ring: Keyring, sealed: Sealed) -> None:
    ct = sealed.ciphertext
    header = 2 + ct[1]
    lengths = {0, 1, 2, header - 1, header, header + 31, header + 32, header + 47, len(ct) - 1}
    for n in sorted(lengths):
        with pytest.raises(CiphertextError):
            open_sealed(ring, ct[:n], CTX)


def test_low_order_encapsulated_key_does_not_open(ring: Keyring, sealed: Sealed) -> None:
    # An all-zero enc makes the X25519 exchange itself fail, not just the tag check.
    enc = 2 + sealed.ciphertext[1]
    ct = sealed.ciphertext[:enc] + b"\x00" * 32 + sealed.ciphertext[enc + 32 :]
    with pytest.raises(CiphertextError, match="does not open") as info:
        open_sealed(ring, ct, CTX)
    _assert_clean(info.value, PLAINTEXT)


def test_appended_bytes_do_not_open(ring: Keyring, sealed: Sealed) -> None:
    with pytest.raises(CiphertextError):
        open_sealed(ring, sealed.ciphertext + b"\x00", CTX)


@pytest.mark.parametrize("version", [0, 2, 0x7F, 0xFF])
def test_unknown_format_version_is_rejected(ring: Keyring, sealed: Sealed, version: int) -> None:
    ct = bytes([version]) + sealed.ciphertext[1:]
    with pytest.raises(CiphertextError, match=f"format version {version}"):
        open_sealed(ring, ct, CTX)


def test_zero_length_kid_is_malformed(ring: Keyring, sealed: Sealed) -> None:
    with pytest.raises(CiphertextError, match="malformed"):
        open_sealed(ring, b"\x01\x00" + b"\x00" * 64, CTX)


@pytest.mark.parametrize(
    "moved",
    [
        secret_context(ORG, "sec_2", VERSION),
        secret_context("org_2", SECRET, VERSION),
        secret_context(ORG, SECRET, VERSION - 1),
        secret_context(ORG, SECRET, VERSION + 1),
        CTX + b"\x00",
        CTX[:-1],
    ],
    ids=["other-secret", "other-org", "older-version", "newer-version", "extended", "cut"],
)
def test_ciphertext_moved_to_another_context_does_not_open(ring: Keyring, sealed: Sealed, moved: bytes) -> None:
    with pytest.raises(CiphertextError) as info:
        open_sealed(ring, sealed.ciphertext, moved)
    _assert_clean(info.value, PLAINTEXT)


def test_another_keyring_cannot_open(sealed: Sealed) -> None:
    with pytest.raises(UnknownKeyIdError) as info:
        open_sealed(Keyring.generate(), sealed.ciphertext, CTX)
    assert info.value.kid == sealed.key_id
    assert isinstance(info.value, CiphertextError)


def test_wrong_private_key_under_the_same_kid_cannot_open(sealed: Sealed) -> None:
    imposter = Keyring.from_private_bytes(sealed.key_id, b"\x42" * 32, datetime.fromisoformat("2026-01-01T00:00:00Z"))
    with pytest.raises(CiphertextError, match="does not open") as info:
        open_sealed(imposter, sealed.ciphertext, CTX)
    assert not isinstance(info.value, UnknownKeyIdError)
    _assert_clean(info.value, PLAINTEXT)


def test_unknown_kid_raises_unknown_key_id_error(ring: Keyring, sealed: Sealed) -> None:
    kid = sealed.key_id
    other = kid[:-1] + ("0" if kid[-1] != "0" else "1")
    ct = sealed.ciphertext.replace(kid.encode(), other.encode(), 1)
    with pytest.raises(UnknownKeyIdError) as info:
        open_sealed(ring, ct, CTX)
    assert info.value.kid == other


def test_expected_key_id_mismatch_is_rejected(ring: Keyring, sealed: Sealed) -> None:
    with pytest.raises(CiphertextError, match="does not match"):
        open_sealed(ring, sealed.ciphertext, CTX, expected_key_id="lk-20000101-00000000")
    assert open_sealed(ring, sealed.ciphertext, CTX, expected_key_id=sealed.key_id) == PLAINTEXT


def test_non_bytes_or_empty_context_is_a_programming_error(ring: Keyring, sealed: Sealed) -> None:
    keys = ring.public_set()
    with pytest.raises(ValueError, match="context must be non-empty"):
        seal(keys, PLAINTEXT, b"")
    with pytest.raises(TypeError):
        seal(keys, PLAINTEXT, "secret")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seal(keys, "plaintext", CTX)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="context must be non-empty"):
        open_sealed(ring, sealed.ciphertext, b"")


# -- binding context -----------------------------------------------------------------------


def test_secret_context_is_unambiguous_for_separator_like_strings() -> None:
    assert secret_context("a|b", "c", 1) != secret_context("a", "b|c", 1)
    assert secret_context("a", "bs\x00\x00\x00\x01c", 1) != secret_context("a", "b", 1)
    assert secret_context("o", "s", 1) != secret_context("o", "s", 256)


@PROPERTY
@given(
    a=st.tuples(
        st.text(min_size=1, max_size=12),
        st.text(min_size=1, max_size=12),
        st.integers(0, 2**64 - 1),
    ),
    b=st.tuples(
        st.text(min_size=1, max_size=12),
        st.text(min_size=1, max_size=12),
        st.integers(0, 2**64 - 1),
    ),
)
def test_secret_context_is_injective(a: tuple[str, str, int], b: tuple[str, str, int]) -> None:
    try:
        ca, cb = secret_context(*a), secret_context(*b)
    except UnicodeEncodeError:
        return
    assert (ca == cb) == (a == b)


@pytest.mark.parametrize(
    ("org", "sid", "version", "error"),
    [
        ("", "s", 1, ValueError),
        ("o", "", 1, ValueError),
        ("o", "s", -1, ValueError),
        ("o", "s", 2**64, ValueError),
        ("o", "s", True, TypeError),
        ("o", "s", "1", TypeError),
        (1, "s", 1, TypeError),
    ],
)
def test_secret_context_rejects_bad_fields(org: object, sid: object, version: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        secret_context(org, sid, version)  # type: ignore[arg-type]


# -- known-answer vector -------------------------------------------------------------------


def test_known_answer_vector_opens_and_context_format_is_stable() -> None:
    v = json.loads(VECTOR.read_text(encoding="utf-8"))
    ctx = secret_context(v["org_id"], v["secret_id"], v["version"])
    # A change to the context encoding breaks this line before it breaks stored data.
    assert ctx.hex() == v["context_hex"]
    ring = Keyring.from_private_bytes(v["kid"], _unb64url(v["private_key"]), datetime.fromisoformat(v["created_at"]))
    assert ring.public_set().current.key.public_bytes_raw() == _unb64url(v["public_key"])
    envelope = base64.b64decode(v["envelope_b64"])
    plaintext = open_sealed(ring, envelope, ctx, expected_key_id=v["kid"])
    assert plaintext == base64.b64decode(v["plaintext_b64"])
    with pytest.raises(CiphertextError):
        open_sealed(ring, envelope, secret_context(v["org_id"], v["secret_id"], v["version"] + 1))


# -- key sets ------------------------------------------------------------------------------


def test_web_tier_seals_with_only_the_parsed_public_set() -> None:
    ring = Keyring.generate()
    published = ring.public_set().dumps()
    web_keys = PublicKeySet.parse(published)
    assert "private" not in published
    result = seal(web_keys, PLAINTEXT, CTX)
    assert result.key_id == ring.current_kid
    assert open_sealed(ring, result.ciphertext, CTX, expected_key_id=result.key_id) == PLAINTEXT


def test_newest_key_seals_and_every_key_in_the_ring_opens() -> None:
    ring = Keyring.generate()
    first_kid = ring.current_kid
    old = seal(ring.public_set(), b"old", CTX)
    new_kid = ring.add_key()
    newer_kid = ring.add_key()
    assert ring.current_kid == newer_kid != new_kid != first_kid
    new = seal(ring.public_set(), b"new", CTX)
    assert old.key_id == first_kid
    assert new.key_id == newer_kid
    assert open_sealed(ring, old.ciphertext, CTX, expected_key_id=first_kid) == b"old"
    assert open_sealed(ring, new.ciphertext, CTX, expected_key_id=newer_kid) == b"new"
    # A ring that no longer holds the old key reports exactly which key is missing.
    ring.remove_key(first_kid)
    with pytest.raises(UnknownKeyIdError) as info:
        open_sealed(ring, old.ciphertext, CTX)
    assert info.value.kid == first_kid


# -- one-shot (reveal reply) sealing -------------------------------------------------------


def test_ephemeral_seal_to_and_open_with_round_trip() -> None:
    private_key, public_raw = generate_ephemeral()
    assert isinstance(public_raw, bytes) and len(public_raw) == 32
    ct = seal_to(public_raw, PLAINTEXT, CTX)
    assert ct[2 : 2 + ct[1]] == EPHEMERAL_KID.encode()
    assert open_with(private_key, ct, CTX) == PLAINTEXT


def test_ephemeral_reply_does_not_open_with_another_key_or_context() -> None:
    _, public_raw = generate_ephemeral()
    other_private, _ = generate_ephemeral()
    ct = seal_to(public_raw, PLAINTEXT, CTX)
    with pytest.raises(CiphertextError) as info:
        open_with(other_private, ct, CTX)
    _assert_clean(info.value, PLAINTEXT)
    private_key, public_raw = generate_ephemeral()
    ct = seal_to(public_raw, PLAINTEXT, CTX)
    with pytest.raises(CiphertextError):
        open_with(private_key, ct, secret_context(ORG, SECRET, VERSION + 1))
    with pytest.raises(CiphertextError):
        open_with(private_key, ct[:-1], CTX)


def test_stored_and_reply_envelopes_are_not_interchangeable(ring: Keyring, sealed: Sealed) -> None:
    private_key, public_raw = generate_ephemeral()
    with pytest.raises(CiphertextError, match="one-request key"):
        open_with(private_key, sealed.ciphertext, CTX)
    with pytest.raises(CiphertextError, match="one-shot reply"):
        open_sealed(ring, seal_to(public_raw, PLAINTEXT, CTX), CTX)


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, b"\x00" * 32, "a" * 32])
def test_seal_to_rejects_unusable_public_keys(bad: object) -> None:
    with pytest.raises(SealingError):
        seal_to(bad, PLAINTEXT, CTX)  # type: ignore[arg-type]
