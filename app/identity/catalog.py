"""The rules of identity's fields: org slugs, email addresses, token names and expiries."""

from __future__ import annotations

import re
from datetime import datetime

from app.db import utcnow

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")
MAX_TOKEN_NAME = 100


def normalize_email(email: str) -> str:
    """Lowercased and trimmed; ValueError unless it looks like an address."""
    email = email.strip().lower()
    if not EMAIL_RE.match(email):
        raise ValueError("not a valid email address")
    return email


def check_token_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= MAX_TOKEN_NAME:
        raise ValueError(f"1 to {MAX_TOKEN_NAME} characters")
    return name


def in_the_future(when: datetime) -> datetime:
    if when <= utcnow():
        raise ValueError("must be in the future")
    return when
