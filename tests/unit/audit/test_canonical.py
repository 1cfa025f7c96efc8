"""An audit event's hash is pinned: a change to its canonical encoding would make every stored chain read as broken."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.audit.service import compute_hash


def test_stored_chains_keep_their_hashes() -> None:
    # Hashes of stored events (json.dumps(body, sort_keys=True, separators=(',', ':'), ensure_ascii=True)).
    event: dict[str, Any] = {
        "chain": "0190abcd-0000-7000-8000-000000000001",
        "seq": 42,
        "org_id": "0190abcd-0000-7000-8000-000000000001",
        "at": datetime(2026, 12, 2, 5, 6, 7, 890123, tzinfo=UTC),
        "actor_type": "user",
        "actor_id": "u-1",
        "action": "secret.update",
        "target_type": "secret",
        "target_id": "s-1",
        "request_id": "req-1",
        "ip": "203.0.113.9",
        "details": {
            "name": "DB_PASSWORD",
            "changed": ["value", "allowed_hosts"],
            "version": 3,
            "note": 'pässwörd 🔑 "q"\n',
            "nested": {"b": 1, "a": [True, None, 1.5]},
        },
        "prev_hash": "ab" * 32,
    }
    assert compute_hash(event) == "3300a57f7a43a7d31ec5607780e940967d5e5c79bb68d8c1986bba43b2700b4a"
    bare = {**event, **dict.fromkeys(("org_id", "actor_id", "request_id", "ip", "target_type", "target_id"))}
    assert compute_hash({**bare, "details": {}}) == "9f70cc719b4eb0475269a58d2058f6e1bbc1afc919b5defb8cbddde143e232ce"
