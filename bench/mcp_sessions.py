"""MCP sessions: a run's tool call on its reused session against a persistent session of the official SDK.

Against one local MCP server (``tests.support.mcp_server.McpTestServer``, Streamable HTTP, in
process), the same ``add`` call is timed, per call, on:

* **sdk**: a direct persistent session of the official SDK (``mcp.Client`` over
  ``streamable_http_client`` with a plain ``httpx2.AsyncClient``), timed inside its own event loop
  around ``await client.call_tool`` alone: the floor.
* **session (guarded)**: ``app.mcp.client.McpSession``, what an agent run's tool calls use, with the
  run's egress-guarded client factory (``guarded_async_client``), timed around the synchronous
  ``call_tool`` from the calling thread (the hop to the session's loop thread included).
* **session (plain)**: the same session with a plain ``httpx2.AsyncClient`` factory (the guard's share).
* **one-shot**: the old path, ``app.mcp.client.call_tool`` (a connection and handshake per call).

The reused paths are timed in rounds of ``--round`` calls, alternating which goes first, so a
change of machine load affects all alike. The goal: session (guarded) / sdk <= 1.15x (medians).

    .venv/bin/python -m bench.mcp_sessions [--n N] [--one-shot N] [--json PATH] [--strict]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx2
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from app.egress import EgressPolicy, guarded_async_client
from app.mcp.client import McpSession, call_tool
from bench.common import Goal, Report, machine_info, print_goals, print_table, summarize, write_json
from tests.support.mcp_server import McpTestServer

GOAL_RATIO = 1.15
ARGS = {"a": 2, "b": 3}


def plain_factory(**kwargs: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(**kwargs)


class SdkSession:
    """A persistent official-SDK session held open on its own loop; ``timed(k)`` times k calls inside that loop."""

    def __init__(self, portal: BlockingPortal, url: str, token: str) -> None:
        self._portal = portal
        self._url, self._token = url, token
        self._stop = anyio.Event()
        self._client: Client | None = None
        self._future, _ = portal.start_task(self._hold)

    async def _hold(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            Client(streamable_http_client(self._url, http_client=http)) as client,
        ):
            self._client = client
            await client.call_tool("add", ARGS)  # the tool listing the SDK fetches once, as the session's does
            task_status.started()
            await self._stop.wait()

    def timed(self, k: int) -> list[int]:
        async def run() -> list[int]:
            assert self._client is not None
            samples = []
            for _ in range(k):
                t0 = time.perf_counter_ns()
                result = await self._client.call_tool("add", ARGS)
                samples.append(time.perf_counter_ns() - t0)
                assert result.structured_content == {"result": 5}
            return samples

        return self._portal.call(run)

    def close(self) -> None:
        self._portal.call(self._stop.set)
        self._future.result(10)


def _timed(fn: Callable[[], Any], k: int) -> list[int]:
    samples = []
    for _ in range(k):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def _timed_session(session: McpSession, k: int) -> list[int]:
    return _timed(lambda: session.call_tool("add", ARGS), k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="timed calls per reused path")
    parser.add_argument("--round", type=int, default=20, help="calls per path per alternating round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--one-shot", type=int, default=40, help="timed calls of the one-shot path")
    parser.add_argument("--json")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)

    report = Report("mcp_sessions", machine=machine_info())
    report.config = {"n": args.n, "round": args.round, "warmup": args.warmup, "one_shot": args.one_shot}
    with McpTestServer() as server, start_blocking_portal(name="bench-sdk") as portal:
        policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1"}))
        guarded = functools.partial(guarded_async_client, policy, host_rules=[[f"127.0.0.1:{server.port}"]])
        options: dict[str, Any] = {"token": server.token, "timeout": 15.0}
        sdk = SdkSession(portal, server.url, server.token)
        sessions = {
            "session (guarded)": McpSession(server.url, http_client_factory=guarded, **options),
            "session (plain)": McpSession(server.url, http_client_factory=plain_factory, **options),
        }
        paths: dict[str, Callable[[int], list[int]]] = {"sdk": sdk.timed}
        for name, session in sessions.items():
            paths[name] = functools.partial(_timed_session, session)
        samples: dict[str, list[int]] = {name: [] for name in paths}
        try:
            for run in paths.values():
                run(args.warmup)
            order = list(paths)
            rounds = max(1, args.n // args.round)
            for r in range(rounds):
                for name in order if r % 2 == 0 else reversed(order):
                    samples[name].extend(paths[name](args.round))
            opened = {name: session.opened for name, session in sessions.items()}
        finally:
            for session in sessions.values():
                session.close()
            sdk.close()
        one_shot = _timed(
            lambda: call_tool(server.url, "add", ARGS, http_client_factory=guarded, **options), args.one_shot
        )
        samples["one-shot (guarded)"] = one_shot

    stats = {name: summarize(values) for name, values in samples.items()}
    floor = stats["sdk"]["median"]
    rows = []
    for name, s in stats.items():
        rows.append([name, s["n"], s["median"], s["p90"], s["p99"], s["min"], f"{s['median'] / floor:.2f}x"])
    load = report.machine["loadavg_at_start"]
    print(f"MCP tools/call per call (µs), one local Streamable HTTP server; load at start {load}")
    print_table(["path", "n", "median", "p90", "p99", "min", "/ sdk"], rows)
    print(f"handshakes per reused session over the run: {opened}")
    ratio = stats["session (guarded)"]["median"] / floor
    fastest = stats["session (guarded)"]["min"] / stats["sdk"]["min"]
    print(f"(info) fastest calls: session (guarded) / sdk = {fastest:.2f}x")
    report.results = {"per_call_us": stats, "handshakes": opened, "min_ratio": fastest}
    report.goals.append(
        Goal(
            "a run's tool call on its session vs a persistent SDK session (medians)",
            f"<= {GOAL_RATIO}x",
            f"{ratio:.2f}x ({stats['session (guarded)']['median']:.0f} µs vs {floor:.0f} µs)",
            ratio <= GOAL_RATIO,
            ratio=ratio,
            notes=f"one-shot: {stats['one-shot (guarded)']['median'] / floor:.1f}x",
        )
    )
    print_goals(report.goals)
    write_json(args.json, report)
    return 1 if args.strict and not report.all_passed else 0


if __name__ == "__main__":
    sys.exit(main())
