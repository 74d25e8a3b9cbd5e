"""Long runs in flat memory: a 3,000,000-item map(..., ordered=False) stream, with a share of
arguments and results large enough to travel through the argument pool, keeps the parent's
RSS and the pool's usage flat, and delivers every result exactly once."""

from __future__ import annotations

import os
import time

import pytest

from mpop import MpopApi
from _helpers import leak_check

N = 3_000_000
BASELINE_AT = 500_000  # RSS is compared with its size after this many results
SAMPLE_EVERY = 50_000
BIG_EVERY = 10  # every 10th item is a string that goes through the argument pool
PAD = "x" * 300  # a few hundred bytes: too large for a slot's inline space
RSS_GROWTH_LIMIT = 60 << 20  # the requirement
# The pool's pages resident in this process may not grow either: the allocator keeps blocks
# where freed blocks were instead of walking the whole 64 MiB arena over a long run.
SHMEM_GROWTH_LIMIT = 16 << 20

_PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def shmem_bytes() -> int:
    """Resident shared-memory pages of this process (the segment's ring and pool)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) << 10
    return 0  # pragma: no cover - kernels before 4.5


def echo(x: int | str) -> int | str:
    """An int comes back as 3x+1 (inline); a string "i:payload" as "i:" + payload reversed
    (pooled both ways). Both name their item, so the parent can check each result alone."""
    if x.__class__ is str:
        i, _, payload = x.partition(":")
        return f"{i}:{payload[::-1]}"
    return 3 * x + 1


def items(n: int):
    for i in range(n):
        yield f"{i}:{i % 7}{PAD}" if i % BIG_EVERY == 0 else i


def test_three_million_unordered_results_in_flat_memory():
    seen = bytearray((N + 7) // 8)  # one bit per item: exactly once, without keeping results
    count = pooled = 0
    samples: list[tuple[int, int, int, int]] = []  # (results, rss, shmem, pool_used_bytes)
    t0 = time.perf_counter()
    with MpopApi(workers=2) as app:
        pool_bytes = app.config["pool_bytes"]
        # At most max_in_flight items (4 x queue_slots) are out at once, each with an
        # argument and a result of at most a few hundred bytes.
        pool_bound = 4 * app.config["queue_slots"] * 2 * (len(PAD) + 64)
        assert pool_bound < pool_bytes // 4, "the bound must say something about this pool"
        for r in app.map(echo, items(N), ordered=False):
            if r.__class__ is str:
                head, _, payload = r.partition(":")
                i = int(head)
                assert i % BIG_EVERY == 0 and payload == f"{i % 7}{PAD}"[::-1], (i, r[:40])
                pooled += 1
            else:
                i, rem = divmod(r - 1, 3)
                assert rem == 0 and i % BIG_EVERY != 0, r
            byte, bit = i >> 3, 1 << (i & 7)
            assert not seen[byte] & bit, f"item {i} came back twice"
            seen[byte] |= bit
            count += 1
            if count % SAMPLE_EVERY == 0:
                samples.append((count, rss_bytes(), shmem_bytes(),
                                app.status()["queue"]["pool_used_bytes"]))
        elapsed = time.perf_counter() - t0
        end_pool = app.status()["queue"]["pool_used_bytes"]
    base = next(s for s in samples if s[0] == BASELINE_AT)
    mib = 1 << 20
    summary = (f"{N} items in {elapsed:.1f} s; RSS {base[1] / mib:.1f} MiB after {BASELINE_AT} "
               f"results, {samples[-1][1] / mib:.1f} MiB after the last (shared pages "
               f"{base[2] / mib:.1f} -> {samples[-1][2] / mib:.1f} MiB); pool use max "
               f"{max(s[3] for s in samples) / 1024:.0f} KiB of {pool_bytes / mib:.0f} MiB, "
               f"{end_pool} B at the end")
    print(summary)

    assert count == N and pooled == N // BIG_EVERY, summary
    assert seen[: N // 8] == b"\xff" * (N // 8), "an item never came back"
    # Taken while the app still runs, so that shutdown's unmapping does not count.
    last = samples[-1]
    assert last[0] == N
    assert abs(last[1] - base[1]) <= RSS_GROWTH_LIMIT, summary
    assert last[2] - base[2] <= SHMEM_GROWTH_LIMIT, summary
    assert all(s[3] <= pool_bound for s in samples), (pool_bound, [s[3] for s in samples])
    assert end_pool == 0, summary
