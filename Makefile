# Every target goes through manage.py, which installs the pinned dependencies first.
PY ?= python3

.PHONY: dev test lint check lock bench

dev:            ## run Latchkey on embedded defaults
	$(PY) manage.py dev

test:           ## run the whole test suite
	$(PY) manage.py test

lint:           ## ruff (lint + format check) and mypy
	$(PY) manage.py lint

check:          ## migrations match the models (against a scratch SQLite database)
	$(PY) manage.py install
	rm -f /tmp/latchkey-check.db
	LATCHKEY_DATABASE_URL=sqlite:////tmp/latchkey-check.db .venv/bin/latchkey db upgrade
	LATCHKEY_DATABASE_URL=sqlite:////tmp/latchkey-check.db .venv/bin/alembic check

lock:           ## re-pin dependencies after editing pyproject.toml (pip-tools is a tool, not a dependency)
	.venv/bin/pip install -q pip-tools
	.venv/bin/pip-compile -q --strip-extras --generate-hashes --extra dev -o requirements/dev.lock pyproject.toml
