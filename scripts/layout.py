"""Print the code layout (every package and module of app/ with the first line of its docstring).

``docs/architecture.md`` embeds this output between its layout markers; a test fails when the
two differ, so the documented layout is always the code's. Regenerate with::

    .venv/bin/python scripts/layout.py --write
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- layout:begin -->", "<!-- layout:end -->"
WIDTH = 34


def summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    return doc.strip().splitlines()[0] if doc else ""


def lines(package: Path) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        name = str(rel.parent) + "/" if path.name == "__init__.py" else str(rel)
        text = summary(path)
        out.append(f"{name:<{WIDTH}}{text}".rstrip())
    return out


def render() -> str:
    body = "\n".join(lines(ROOT / "app"))
    return f"{BEGIN}\n```\n{body}\n```\n{END}"


def embedded() -> str:
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def write() -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DOC.write_text(text[:start] + render() + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write()
    else:
        sys.stdout.write(render() + "\n")
