"""The one registration point of self-contained packages: their routes, UI parts, commands and tasks.

A package listed in :data:`EXTENSIONS` may hold any of these modules, each found by name:

- ``<package>.api``: JSON routes, registered on the API blueprint when imported (``app.api``);
- ``<package>.web``: ``bp``, a blueprint (its templates), and ``OPERATOR``, its part of the operator page (``app.web``);
- ``<package>.cli``: ``group``, a click group added to the ``latchkey`` command (``app.cli``);
- ``<package>.tasks``: worker tasks, registered by every worker (``app.worker``);
- ``<package>.legacy``: a source of pre-contract raw MCP tokens (``app.mcp.legacy``).

Found by name, not imported here, because a package's edges use the host modules that load
them (its routes need the API blueprint): a static import would be a cycle. Removing a package
is deleting it and its entry below.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# The legacy migration (docs/legacy.md): delete the package and this entry after the contract.
EXTENSIONS: tuple[str, ...] = ("app.backfill",)


def module_names(part: str) -> list[str]:
    """The dotted names of every extension's ``part`` module that exists, in registration order."""
    return [f"{ext}.{part}" for ext in EXTENSIONS if importlib.util.find_spec(f"{ext}.{part}") is not None]


def modules(part: str) -> list[ModuleType]:
    """Every extension's ``part`` module, imported (importing it registers what it declares)."""
    return [importlib.import_module(name) for name in module_names(part)]
