"""OAuth connection tokens: a use costs what a secret resolve costs; a refresh adds one token-endpoint round trip.

Against a real OAuth 2.1 authorization server and MCP server (``tests.support.oauth_server``), with the
worker's own code: the tokens are obtained through ``app.mcp.oauth`` and stored with
``app.mcp.grants.store``, then ``grants.access`` (what validation and agent runs call per server) is
timed next to ``Resolver.resolve`` of the same secret:

* **L1**: both answered from process memory; the goal is no I/O at all for ``access`` either.
* **L2**: the resolver's L1 cleared before every call; the goal is one Redis command (the GET) and
  no database query for ``access``, as for ``resolve``.
* **Refresh**: every iteration first makes a bare refresh request (the round trip a refresh cannot
  avoid), stores the result as an expired version, then times ``access``, which must redeem it.
  The goal is a refresh costing that round trip plus the version's write (< 25 ms more).

    .venv/bin/python -m bench.connections [--n N] [--refreshes N] [--json PATH] [--strict]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx2
from sqlalchemy import select

from app.mcp import grants, oauth
from app.models import ConnectionStatus, McpConnection, McpServer
from app.models.connections import ORG_SUBJECT
from app.tasks.runtime import WorkerContext
from bench.common import (
    REDIS_URL,
    Goal,
    Report,
    delete_matching,
    machine_info,
    make_settings,
    make_user,
    new_keys,
    print_goals,
    print_table,
    summarize,
    throwaway_database,
    write_json,
)
from bench.resolve import CountingRedis, DbCounter
from tests.support.oauth_server import OAuthTestServer

REFRESH_OVERHEAD_MS = 25.0
L1_HIT_US = 5.0  # the resolver's own L1 goal


def _time(fn: Any, n: int, before: Any = None) -> list[int]:
    samples = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def _tokens(ctx: WorkerContext, auth: OAuthTestServer) -> tuple[oauth.Discovery, oauth.OAuthClient, oauth.TokenSet]:
    """A real authorization: discovery, dynamic registration, PKCE, consent (auto), the code exchange."""
    factory = grants.client_factory(ctx)
    redirect = ctx.settings.oauth_redirect_uri or ""
    with factory(()) as http:
        found = oauth.discover(http, auth.url)
        client = oauth.register(http, found.server, redirect, list(found.scopes))
    verifier, challenge = oauth.pkce_pair()
    url = oauth.authorization_url(
        found.server, client, redirect_uri=redirect, state="s", challenge=challenge, resource=found.resource, scopes=[]
    )
    code = httpx2.URL(httpx2.get(url, follow_redirects=False).headers["location"]).params["code"]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect,
        "code_verifier": verifier,
        "resource": found.resource,
    }
    return found, client, oauth.token_request(factory, found.server, client, form)


def run(args: argparse.Namespace, report: Report) -> None:
    keys = new_keys()
    with throwaway_database("connections") as url, OAuthTestServer(auto_approve=True, access_token_ttl=3600) as auth:
        settings = make_settings(url, REDIS_URL, keys, f"latchkey-bench-{os.getpid()}").model_copy(
            update={
                "egress_allow_private": True,
                "egress_allow_http_hosts": ("127.0.0.1",),
                "public_url": "http://127.0.0.1:5080",
            }
        )
        ctx = WorkerContext(settings)
        counting = CountingRedis.from_url(REDIS_URL, socket_timeout=1.0)
        try:
            resolver = ctx.resolver
            resolver.redis = counting
            resolver._fill_script = counting.register_script(resolver._fill_script.script)
            assert resolver.wait_until_listening()
            admin = make_user(ctx.db, org_slug=f"bench-conn-{os.getpid()}")
            assert admin.org_id is not None
            found, client, tokens = _tokens(ctx, auth)
            with ctx.db.session() as s:
                server = McpServer(
                    org_id=admin.org_id, name="Bench", url=auth.url, auth_type="oauth", connection_scope="org"
                )
                s.add(server)
                s.flush()
                connection = McpConnection(
                    org_id=admin.org_id,
                    mcp_server_id=server.id,
                    subject=ORG_SUBJECT,
                    status=ConnectionStatus.CONNECTED,
                    scopes=[],
                    wanted_scopes=[],
                )
                s.add(connection)
                s.flush()
                grant = grants.Grant(admin.org_id, server.id, ORG_SUBJECT, tokens, client, found.server, found.resource)
                grants.store(s, ctx, connection, server, grant)
                s.flush()
                s.expunge_all()
            secret_id = connection.secret_id
            assert secret_id is not None

            def resolve() -> Any:
                return resolver.resolve(admin.org_id, secret_id)

            def use() -> Any:
                return grants.access(ctx, server, None)

            for fn in (resolve, use):
                _time(fn, 200)
            results: dict[str, Any] = {}
            with DbCounter(ctx.db.engine) as db_count:
                counting.zero()
                results["l1_resolve_us"] = summarize(_time(resolve, args.n))
                results["l1_access_us"] = summarize(_time(use, args.n))
                results["l1_io"] = {"redis": counting.foreground, "db_round_trips": db_count.round_trips}

            def drop_l1() -> None:
                with resolver._l1_lock:
                    resolver._l1.clear()

            _time(use, 50, drop_l1)
            with DbCounter(ctx.db.engine) as db_count:
                counting.zero()
                results["l2_resolve_us"] = summarize(_time(resolve, args.n, drop_l1))
                mid_redis, mid_db = counting.foreground, db_count.round_trips
                results["l2_access_us"] = summarize(_time(use, args.n, drop_l1))
                results["l2_io_per_access"] = {
                    "redis": (counting.foreground - mid_redis) / args.n,
                    "db_round_trips": (db_count.round_trips - mid_db) / args.n,
                }

            bare: list[int] = []
            refreshed: list[int] = []
            factory = grants.client_factory(ctx)
            for _ in range(args.refreshes):
                current, version = grants._open(ctx, connection, current=True)
                t0 = time.perf_counter_ns()
                fresh = oauth.token_request(
                    factory,
                    found.server,
                    client,
                    {
                        "grant_type": "refresh_token",
                        "refresh_token": current.tokens.refresh_token or "",
                        "resource": found.resource,
                    },
                )
                bare.append(time.perf_counter_ns() - t0)
                expired = oauth.TokenSet(
                    fresh.access_token, fresh.refresh_token, time.time() - 1, time.time() - 3600, fresh.scopes
                )
                with ctx.db.session() as s:
                    row = s.get(McpConnection, connection.id)
                    live = s.get(McpServer, server.id)
                    assert row is not None and live is not None
                    grants.store(s, ctx, row, live, current.with_tokens(expired))
                before = auth.refresh_redemptions
                t0 = time.perf_counter_ns()
                granted = grants.access(ctx, server, None)
                refreshed.append(time.perf_counter_ns() - t0)
                assert auth.refresh_redemptions == before + 1 and granted.version > version + 1
            results["refresh_bare_round_trip_ms"] = summarize(bare, 1e6)
            results["refresh_access_ms"] = summarize(refreshed, 1e6)
            with ctx.db.session() as s:
                assert s.scalar(select(McpConnection.status).where(McpConnection.id == connection.id)) == "connected"
        finally:
            ctx.close()
            delete_matching(counting, f"lk:s:{admin.org_id}:*" if "admin" in locals() else "lkbench:none")
            counting.close()
            keys.close()
    report.results = results
    l1_access = results["l1_access_us"]["median"]
    l1_ratio = l1_access / results["l1_resolve_us"]["median"]
    overhead = results["refresh_access_ms"]["median"] - results["refresh_bare_round_trip_ms"]["median"]
    report.goals = [
        Goal(
            "L1 hit: access",
            f"< {L1_HIT_US} µs, no I/O",
            f"{l1_access:.2f} µs ({l1_ratio:.1f}x resolve), redis {results['l1_io']['redis']}, "
            f"db {results['l1_io']['db_round_trips']}",
            l1_access < L1_HIT_US and results["l1_io"] == {"redis": 0, "db_round_trips": 0},
            l1_ratio,
        ),
        Goal(
            "L2 hit: I/O per access",
            "1 Redis GET, 0 DB",
            f"redis {results['l2_io_per_access']['redis']:.2f}, db {results['l2_io_per_access']['db_round_trips']:.2f}",
            results["l2_io_per_access"] == {"redis": 1.0, "db_round_trips": 0.0},
        ),
        Goal(
            "refresh: access - bare token round trip",
            f"< {REFRESH_OVERHEAD_MS} ms",
            f"{overhead:.2f} ms",
            overhead < REFRESH_OVERHEAD_MS,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--refreshes", type=int, default=30)
    parser.add_argument("--json", default="bench/results/connections.json")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    report = Report("connections", machine=machine_info())
    report.config = {"n": args.n, "refreshes": args.refreshes}
    run(args, report)
    rows = [
        [name, f"{v['median']:.2f}", f"{v['p90']:.2f}", f"{v['p99']:.2f}"]
        for name, v in report.results.items()
        if isinstance(v, dict) and "median" in v
    ]
    print_table(["measure", "median", "p90", "p99"], rows)
    print(json.dumps({k: v for k, v in report.results.items() if "io" in k}))
    print_goals(report.goals)
    write_json(args.json, report)
    return 1 if args.strict and not report.all_passed else 0


if __name__ == "__main__":
    sys.exit(main())
