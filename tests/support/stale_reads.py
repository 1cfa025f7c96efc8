"""What a stale read is, for the stale-read stress (bench/resolve.py) and the many-workers test and benchmark.

An edit is (the time its HTTP response had been read, the version it returned); a read is
(the time its resolve started, the version it saw). A read is **stale** when it started after
some edit's response had returned and saw a version lower than that edit's. With concurrent
editors the edits return out of version order, so a read is compared with the highest version
of every edit that had returned before it started.

All times are from one clock that every process on the machine shares (``time.monotonic_ns``,
or ``perf_counter_ns`` within one process: both are CLOCK_MONOTONIC on Linux).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Staleness:
    """The stale reads found, a few examples, the largest lag (ms) and how many edits were read stale."""

    stale: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    max_lag_ms: float = 0.0
    edits_read_stale: int = 0


class Edits:
    """Edits sorted by the time their response returned, with the highest version returned so far."""

    def __init__(self, returned: Sequence[int], versions: Sequence[int]) -> None:
        order = sorted(range(len(returned)), key=lambda i: returned[i])
        self.returned = [returned[i] for i in order]
        self.newest: list[int] = []  # newest[j]: the highest version among the first j + 1 to return
        self.newest_at: list[int] = []  # which of them returned it (an index into the sorted edits)
        best, at = -1, -1
        for j, i in enumerate(order):
            if versions[i] > best:
                best, at = versions[i], j
            self.newest.append(best)
            self.newest_at.append(at)


def find_stale(
    starts: Sequence[Sequence[int]],
    versions: Sequence[Sequence[int]],
    returned: Sequence[int],
    edit_versions: Sequence[int],
    *,
    example_limit: int = 5,
) -> Staleness:
    """The reads of each reader (``starts[r][n]`` started, saw ``versions[r][n]``; in time order) that were stale."""
    edits = Edits(returned, edit_versions)
    e = len(edits.returned)
    out = Staleness()
    hit: set[int] = set()
    for reader, (ts, vs) in enumerate(zip(starts, versions, strict=True)):
        j = 0  # edits that returned before this read started: edits.returned[:j] (a reader's reads are in time order)
        for t, v in zip(ts, vs, strict=True):
            while j < e and edits.returned[j] < t:
                j += 1
            if not j or v >= edits.newest[j - 1]:
                continue
            want, edit = edits.newest[j - 1], edits.newest_at[j - 1]
            out.stale += 1
            hit.add(edit)
            lag = (t - edits.returned[edit]) / 1e6
            out.max_lag_ms = max(out.max_lag_ms, lag)
            if len(out.examples) < example_limit:
                out.examples.append(
                    {
                        "reader": reader,
                        "started_ms_after_edit_returned": round(lag, 3),
                        "saw_version": v,
                        "expected_at_least": want,
                    }
                )
    out.edits_read_stale = len(hit)
    return out
