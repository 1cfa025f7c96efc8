"""JSON responses: compact, UTF-8, for every API answer (handlers, replays, health, errors)."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, current_app


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = current_app.response_class(
        json.dumps(payload, separators=(",", ":"), ensure_ascii=False), status=status, mimetype="application/json"
    )
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp
