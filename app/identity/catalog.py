"""The rules of identity's fields: org slugs and names, email addresses, passwords, token names and expiries."""

from __future__ import annotations

import re
from datetime import datetime

from app.db import utcnow

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")
MAX_TOKEN_NAME = 100
MAX_ORG_NAME = 200
MIN_PASSWORD = 12
MAX_PASSWORD = 1024


def check_slug(slug: str) -> str:
    """An org's path segment in the API."""
    if not SLUG_RE.fullmatch(slug):
        raise ValueError("lowercase letters, digits and inner hyphens, 1 to 63 characters")
    return slug


def org_name(name: str | None, slug: str) -> str:
    """The name shown for an org: the slug when none is given, cut at :data:`MAX_ORG_NAME`."""
    return (name or slug)[:MAX_ORG_NAME]


def normalize_email(email: str) -> str:
    """Lowercased and trimmed; ValueError unless it looks like an address."""
    email = email.strip().lower()
    if not EMAIL_RE.fullmatch(email):
        raise ValueError("not a valid email address")
    return email


def check_password_length(password: str) -> str:
    """A login password: :data:`MIN_PASSWORD` to :data:`MAX_PASSWORD` characters."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"must be at most {MAX_PASSWORD} characters")
    return password


def check_token_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= MAX_TOKEN_NAME:
        raise ValueError(f"1 to {MAX_TOKEN_NAME} characters")
    return name


def in_the_future(when: datetime) -> datetime:
    if when <= utcnow():
        raise ValueError("must be in the future")
    return when
