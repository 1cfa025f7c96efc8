# Every target goes through manage.py, which installs the pinned dependencies first.
PY ?= python3

.PHONY: dev test test-fast coverage lint check lock bench bench-1m

dev:            ## run Latchkey on embedded defaults
	$(PY) manage.py dev

test:           ## run the whole test suite (on xdist workers, with the 25 slowest durations)
	$(PY) manage.py test

test-fast:      ## the unit lane only (tests/unit): services on a rolled-back session, pure code
	$(PY) manage.py test --fast

coverage:       ## the whole suite with branch coverage of app/, failing under the floor
	$(PY) manage.py test --coverage

lint:           ## ruff (lint + format check), mypy and the import contracts (lint-imports)
	$(PY) manage.py lint

check:          ## migrations match the models (against a scratch SQLite database)
	$(PY) manage.py install
	rm -f /tmp/latchkey-check.db
	LATCHKEY_DATABASE_URL=sqlite:////tmp/latchkey-check.db .venv/bin/latchkey db upgrade
	LATCHKEY_DATABASE_URL=sqlite:////tmp/latchkey-check.db .venv/bin/alembic check

lock:           ## re-pin dependencies after editing pyproject.toml (pip-tools is a tool, not a dependency)
	.venv/bin/pip install -q pip-tools
	.venv/bin/pip-compile -q --strip-extras --generate-hashes --extra dev -o requirements/dev.lock pyproject.toml

bench:          ## resolver (L1/L2/miss vs floors, stale-read stress), job-overhead, backfill, OAuth-connection, MCP-session and many-workers benchmarks; JSON in bench/results/
	$(PY) manage.py install
	mkdir -p bench/results
	.venv/bin/python -m bench.resolve --stress-edits 1000 --json bench/results/resolve.json
	.venv/bin/python -m bench.resolve --no-timing --stress-edits 1000 --stress-l1-max-age 0.002 --json bench/results/resolve-stress-expiring-l1.json
	.venv/bin/python -m bench.jobs --n 200 --json bench/results/jobs.json
	.venv/bin/python -m bench.backfill --json bench/results/backfill.json
	.venv/bin/python -m bench.connections --json bench/results/connections.json
	.venv/bin/python -m bench.throughput --json bench/results/throughput.json
	.venv/bin/python -m bench.mcp_sessions --json bench/results/mcp_sessions.json
	.venv/bin/python -m bench.many_workers --json bench/results/many_workers.json

bench-1m:       ## the backfill on 1,000,000 legacy MCP rows, 2 worker processes: time and peak RSS per worker
	$(PY) manage.py install
	mkdir -p bench/results
	.venv/bin/python -m bench.backfill --mcp 1000000 --workers 2 --no-crypto-floor --timeout 3000 --json bench/results/backfill-1m.json
