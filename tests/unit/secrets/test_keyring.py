import base64
import json
import os
import pickle
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.secrets.keyring import Keyring, KeyringError, PublicKey, PublicKeySet, UnknownKeyError

VECTOR = Path(__file__).parent / "vectors" / "sealing_kat.json"
KID_RE = re.compile(r"^lk-\d{8}-[0-9a-f]{8}$")
DEV_KID_RE = re.compile(r"^dev-\d{8}-[0-9a-f]{8}$")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _private_b64(ring: Keyring, kid: str) -> str:
    return _b64(ring.private_key(kid).private_bytes_raw())


def _write_text(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def _entry(**override: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "kid": "lk-20261128-0000abcd",
        "created_at": "2026-11-28T10:00:00.000000Z",
        "private_key": _b64(b"\x07" * 32),
        "dev": False,
    }
    entry.update(override)
    return entry


def _keyring_doc(*entries: dict[str, object]) -> str:
    return json.dumps({"format": "latchkey-keyring/1", "keys": list(entries or [_entry()])})


# -- generate / ids ------------------------------------------------------------------------


def test_generate_makes_one_key_with_a_dated_kid() -> None:
    ring = Keyring.generate()
    assert len(ring.kids) == 1
    assert KID_RE.match(ring.current_kid)
    assert ring.current_kid[3:11] == datetime.now(UTC).strftime("%Y%m%d")
    assert not ring.has_dev_keys
    assert Keyring.generate().current_kid != ring.current_kid


def test_dev_keys_have_a_dev_prefix_and_flag() -> None:
    ring = Keyring.generate(dev=True)
    assert DEV_KID_RE.match(ring.current_kid)
    assert ring.has_dev_keys
    assert ring.public_set().has_dev_keys
    assert ring.public_set().current.dev is True


def test_added_key_becomes_current_even_in_quick_succession() -> None:
    ring = Keyring.generate()
    for _ in range(25):
        kid = ring.add_key()
        assert ring.current_kid == kid
        assert ring.public_set().current.kid == kid
    assert len(set(ring.kids)) == 26
    assert ring.kids[-1] == ring.current_kid


def test_added_key_becomes_current_even_if_the_clock_is_behind() -> None:
    future = datetime.now(UTC) + timedelta(days=2)
    ring = Keyring.from_private_bytes("lk-20300101-00000001", b"\x05" * 32, future)
    kid = ring.add_key()
    assert ring.current_kid == kid
    assert PublicKeySet.parse(ring.public_set().dumps()).current.kid == kid


def test_added_key_inherits_dev_flag_unless_given() -> None:
    ring = Keyring.generate(dev=True)
    assert DEV_KID_RE.match(ring.add_key())
    assert KID_RE.match(ring.add_key(dev=False))
    assert ring.has_dev_keys


def test_remove_key_refuses_the_last_key_and_unknown_kids() -> None:
    ring = Keyring.generate()
    only = ring.current_kid
    with pytest.raises(KeyringError, match="last key"):
        ring.remove_key(only)
    new = ring.add_key()
    ring.remove_key(only)
    assert ring.kids == (new,)
    with pytest.raises(UnknownKeyError) as info:
        ring.remove_key(only)
    assert info.value.kid == only
    with pytest.raises(UnknownKeyError):
        ring.private_key(only)


# -- file round trip -----------------------------------------------------------------------


def test_write_then_load_round_trips_every_key(tmp_path: Path) -> None:
    ring = Keyring.generate()
    ring.add_key()
    path = tmp_path / "keyring.json"
    ring.write(path)
    loaded = Keyring.load(path)
    assert loaded.kids == ring.kids
    assert loaded.current_kid == ring.current_kid
    for kid in ring.kids:
        assert _private_b64(loaded, kid) == _private_b64(ring, kid)
    assert loaded.public_set().dumps() == ring.public_set().dumps()


def test_written_file_is_mode_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "keyring.json"
        Keyring.generate().write(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keyring.json"]  # no temp file left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_load_refuses_a_file_readable_or_writable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keyring.json"
    Keyring.generate().write(path)
    path.chmod(mode)
    with pytest.raises(KeyringError) as info:
        Keyring.load(path)
    msg = str(info.value)
    assert "chmod 600" in msg and str(path) in msg
    assert "\n" not in msg


def test_load_accepts_owner_read_only_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring.generate()
    ring.write(path)
    path.chmod(0o400)
    assert Keyring.load(path).current_kid == ring.current_kid


def test_load_follows_a_symlink_and_checks_the_target_mode(tmp_path: Path) -> None:
    target = tmp_path / "keyring.json"
    ring = Keyring.generate()
    ring.write(target)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert Keyring.load(link).current_kid == ring.current_kid
    target.chmod(0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        Keyring.load(link)


def test_write_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    first, second = Keyring.generate(), Keyring.generate()
    first.write(path)
    with pytest.raises(KeyringError, match="already exists"):
        second.write(path)
    assert Keyring.load(path).current_kid == first.current_kid
    second.write(path, overwrite=True)
    assert Keyring.load(path).current_kid == second.current_kid
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keyring.json"]


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "keyring.json"
    with pytest.raises(KeyringError, match="not found") as info:
        Keyring.load(path)
    assert str(path) in str(info.value)


def test_write_into_a_missing_directory_is_a_keyring_error(tmp_path: Path) -> None:
    with pytest.raises(KeyringError):
        Keyring.generate().write(tmp_path / "nope" / "keyring.json")


def test_dev_flag_round_trips_through_the_file_and_public_set(tmp_path: Path) -> None:
    ring = Keyring.generate(dev=True)
    ring.add_key(dev=False)
    path = tmp_path / "keyring.json"
    ring.write(path)
    loaded = Keyring.load(path)
    assert loaded.has_dev_keys
    keys = PublicKeySet.parse(loaded.public_set().dumps())
    assert [k.dev for k in keys.keys] == [True, False]
    assert not Keyring.load(_prod_file(tmp_path)).has_dev_keys


def _prod_file(tmp_path: Path) -> Path:
    path = tmp_path / "prod.json"
    Keyring.generate().write(path)
    return path


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not valid JSON"),
        ("not json", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[]", "format"),
        ("null", "format"),
        ('{"format":"latchkey-keyring/1"}', "exactly the fields"),
        ('{"format":"latchkey-keyring/2","keys":[]}', "format"),
        ('{"format":"latchkey-public-keys/1","keys":[]}', "format"),
        ('{"format":"latchkey-keyring/1","keys":[]}', "non-empty list"),
        ('{"format":"latchkey-keyring/1","keys":{}}', "non-empty list"),
        ('{"format":"latchkey-keyring/1","keys":[1]}', "must be an object"),
        ('{"format":"latchkey-keyring/1","keys":[{}]}', "exactly the fields"),
        (_keyring_doc(_entry(private_key="short")), "base64url"),
        (_keyring_doc(_entry(private_key=_b64(b"\x07" * 31))), "base64url"),
        (_keyring_doc(_entry(private_key=_b64(b"\x07" * 32) + "!")), "base64url"),
        (_keyring_doc(_entry(private_key=123)), "base64url"),
        (_keyring_doc(_entry(kid="lk-2026-1")), "key id must look like"),
        (_keyring_doc(_entry(kid="ephemeral")), "key id must look like"),
        (_keyring_doc(_entry(kid=5)), "key id must look like"),
        (_keyring_doc(_entry(dev=True)), "dev flag does not match"),
        (_keyring_doc(_entry(dev="false")), "dev must be true or false"),
        (_keyring_doc(_entry(created_at="yesterday")), "not ISO 8601"),
        (_keyring_doc(_entry(created_at="2026-11-28T10:00:00")), "timezone"),
        (_keyring_doc(_entry(created_at=1764324000)), "ISO 8601 string"),
        (_keyring_doc(_entry(extra=1)), "exactly the fields"),
        (json.dumps({**json.loads(_keyring_doc()), "extra": 1}), "exactly the fields"),
        (_keyring_doc(_entry(), _entry()), "duplicate key id"),
    ],
)
def test_malformed_keyring_file_is_a_keyring_error(tmp_path: Path, text: str, reason: str) -> None:
    path = _write_text(tmp_path / "keyring.json", text)
    with pytest.raises(KeyringError, match=re.escape(reason)) as info:
        Keyring.load(path)
    assert type(info.value) is KeyringError
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert str(path) in str(info.value)
    assert _b64(b"\x07" * 32) not in str(info.value)


def test_non_utf8_keyring_file_is_a_keyring_error(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(b"\xff\xfe{}")
    path.chmod(0o600)
    with pytest.raises(KeyringError, match="UTF-8"):
        Keyring.load(path)


def test_directory_instead_of_file_is_a_keyring_error(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyringError):
        Keyring.load(d)


def test_known_keyring_file_loads(tmp_path: Path) -> None:
    path = _write_text(tmp_path / "keyring.json", _keyring_doc())
    ring = Keyring.load(path)
    assert ring.kids == ("lk-20261128-0000abcd",)
    assert ring.private_key("lk-20261128-0000abcd").private_bytes_raw() == b"\x07" * 32


# -- secrecy -------------------------------------------------------------------------------


def test_repr_and_str_hide_private_keys() -> None:
    ring = Keyring.generate()
    ring.add_key()
    for kid in ring.kids:
        raw = ring.private_key(kid).private_bytes_raw()
        for text in (repr(ring), str(ring), f"{ring!r}"):
            assert _b64(raw) not in text
            assert raw.hex() not in text
            assert kid in text


def test_keyring_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Keyring.generate())


def test_public_set_dumps_holds_no_private_key() -> None:
    ring = Keyring.generate()
    text = ring.public_set().dumps()
    assert _private_b64(ring, ring.current_kid) not in text


# -- derive_key ----------------------------------------------------------------------------


def test_derive_key_is_deterministic_across_load(tmp_path: Path) -> None:
    ring = Keyring.generate()
    path = tmp_path / "keyring.json"
    ring.write(path)
    key = ring.derive_key("cache")
    assert len(key) == 32
    assert Keyring.load(path).derive_key("cache") == key
    assert ring.derive_key("cache") == key
    assert len(ring.derive_key("cache", length=64)) == 64


def test_derive_key_differs_per_purpose_keyring_and_current_key() -> None:
    ring = Keyring.generate()
    cache = ring.derive_key("cache")
    assert ring.derive_key("cache2") != cache
    assert ring.derive_key("other") != cache
    assert Keyring.generate().derive_key("cache") != cache
    ring.add_key()
    assert ring.derive_key("cache") != cache


def test_derive_key_rejects_empty_purpose() -> None:
    with pytest.raises(ValueError, match="purpose must be a non-empty string"):
        Keyring.generate().derive_key("")


def test_derive_key_matches_the_known_answer_vector() -> None:
    v = json.loads(VECTOR.read_text(encoding="utf-8"))
    raw = base64.urlsafe_b64decode(v["private_key"] + "=")
    ring = Keyring.from_private_bytes(v["kid"], raw, datetime.fromisoformat(v["created_at"]))
    assert ring.derive_key("cache").hex() == v["derive_key_hex"]["cache"]
    assert ring.derive_key("other").hex() == v["derive_key_hex"]["other"]


# -- public key set ------------------------------------------------------------------------


def test_public_set_dumps_is_one_compact_line_and_parses_back() -> None:
    ring = Keyring.generate()
    ring.add_key()
    text = ring.public_set().dumps()
    assert "\n" not in text and ", " not in text and ": " not in text
    doc = json.loads(text)
    assert doc["format"] == "latchkey-public-keys/1"
    assert [k["kid"] for k in doc["keys"]] == list(ring.kids)
    for entry in doc["keys"]:
        assert set(entry) == {"kid", "created_at", "public_key", "dev"}
        assert entry["created_at"].endswith("Z")
        assert len(base64.urlsafe_b64decode(entry["public_key"] + "=")) == 32
    parsed = PublicKeySet.parse(text)
    assert parsed.dumps() == text
    assert parsed.kids == ring.kids
    assert parsed.current.kid == ring.current_kid
    # Operators paste this into env files; surrounding whitespace is harmless.
    assert PublicKeySet.parse(f"  {text}\n").dumps() == text


def _public(kid: str, created_at: datetime, dev: bool = False) -> PublicKey:
    return PublicKey(kid, created_at, Keyring.generate().public_set().current.key, dev)


def test_current_is_newest_with_ties_broken_by_kid() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    older = _public("lk-20260101-ffffffff", t0)
    a = _public("lk-20260101-0000000a", t0 + timedelta(seconds=1))
    b = _public("lk-20260101-0000000b", t0 + timedelta(seconds=1))
    keys = PublicKeySet([b, older, a])
    assert keys.current.kid == b.kid
    assert keys.kids == (older.kid, a.kid, b.kid)
    assert PublicKeySet.parse(keys.dumps()).current.kid == b.kid


def test_public_set_get_and_unknown_kid() -> None:
    keys = Keyring.generate().public_set()
    assert keys.get(keys.current.kid) is keys.current
    with pytest.raises(UnknownKeyError) as info:
        keys.get("lk-20000101-00000000")
    assert info.value.kid == "lk-20000101-00000000"
    assert isinstance(info.value, KeyringError)


def test_public_set_is_immutable() -> None:
    keys = Keyring.generate().public_set()
    assert isinstance(keys.keys, tuple)
    with pytest.raises(AttributeError):
        keys._keys = ()
    with pytest.raises(AttributeError):
        keys.current.kid = "x"  # type: ignore[misc]


def test_public_set_rejects_empty_duplicate_and_naive_keys() -> None:
    with pytest.raises(KeyringError, match="empty"):
        PublicKeySet([])
    key = _public("lk-20260101-00000001", datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(KeyringError, match="duplicate"):
        PublicKeySet([key, key])
    with pytest.raises(KeyringError, match="timezone"):
        _public("lk-20260101-00000001", datetime(2026, 1, 1))


def _public_doc(*entries: dict[str, object]) -> str:
    return json.dumps({"format": "latchkey-public-keys/1", "keys": list(entries)})


_GOOD_PUBLIC = {
    "kid": "lk-20261128-0000abcd",
    "created_at": "2026-11-28T10:00:00Z",
    "public_key": _b64(b"\x09" + b"\x00" * 31),  # the X25519 base point
    "dev": False,
}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not valid JSON"),
        ("   ", "not valid JSON"),
        ("not json", "not valid JSON"),
        ("{}", "format"),
        ('{"format":"latchkey-public-keys/1","keys":[]}', "non-empty list"),
        ('{"format":"latchkey-keyring/1","keys":[]}', "format"),
        (_public_doc({**_GOOD_PUBLIC, "public_key": _b64(b"\x00" * 32)}), "not a usable X25519"),
        (_public_doc({**_GOOD_PUBLIC, "public_key": _b64(b"\x09" * 16)}), "base64url"),
        (_public_doc({**_GOOD_PUBLIC, "kid": "lk-bad"}), "key id must look like"),
        (_public_doc({**_GOOD_PUBLIC, "dev": True}), "dev flag does not match"),
        (_public_doc({**_GOOD_PUBLIC, "created_at": "2026-11-28 10:00"}), "timezone"),
        (_public_doc({k: v for k, v in _GOOD_PUBLIC.items() if k != "dev"}), "exactly the fields"),
        (_public_doc({**_GOOD_PUBLIC, "private_key": "x"}), "exactly the fields"),
        (_public_doc(_GOOD_PUBLIC, _GOOD_PUBLIC), "duplicate key id"),
    ],
)
def test_malformed_public_set_is_a_keyring_error(text: str, reason: str) -> None:
    with pytest.raises(KeyringError, match=re.escape(reason)) as info:
        PublicKeySet.parse(text)
    assert type(info.value) is KeyringError
    assert info.value.__cause__ is None
    assert str(info.value).startswith("public key set:")


def test_known_public_set_parses() -> None:
    keys = PublicKeySet.parse(_public_doc(_GOOD_PUBLIC))
    assert keys.kids == ("lk-20261128-0000abcd",)
    assert keys.current.created_at == datetime(2026, 11, 28, 10, tzinfo=UTC)
    assert keys.current.key.public_bytes_raw() == b"\x09" + b"\x00" * 31
    assert not keys.has_dev_keys
