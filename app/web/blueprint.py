"""The UI's blueprint (``/``), its templates and static files; every page module registers on it."""

from __future__ import annotations

import logging

from flask import Blueprint

log = logging.getLogger("latchkey.web")

bp = Blueprint(
    "web",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
