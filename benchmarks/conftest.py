"""Shared pools for the side-by-side benchmarks, and a closing table of mpop/stdlib ratios.

    python -m pytest benchmarks            # or: make bench (the CLI table)
"""

from __future__ import annotations

import multiprocessing

import pytest

import mpop
from mpop._workloads import inc

_stats: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="session")
def app():
    with mpop.MpopApi(workers=2, auto_terminate=False, max_performance=True) as a:
        a.start()
        list(a.map(inc, range(1000)))  # warm: workers up, handler loaded
        yield a


@pytest.fixture(scope="session")
def pool():
    p = multiprocessing.get_context("fork").Pool(2)
    p.map(inc, range(1000))
    yield p
    p.terminate()
    p.join()


@pytest.fixture
def record(request):
    """record(pair, side, benchmark, scale=1.0): remember a benchmark's mean for the ratio
    table, multiplied by `scale` (a side timed on fewer items than the pair names, whose
    cost per item does not depend on their count, scaled to the pair's count). `side` is
    "mpop" or what it is compared with ("stdlib", "loky")."""

    def _record(pair: str, side: str, benchmark, scale: float = 1.0) -> None:
        _stats.setdefault(pair, {})[side] = benchmark.stats.stats.mean * scale

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _stats:
        return
    tr = terminalreporter
    tr.section("mpop vs stdlib, or vs the side named (same run; ratio = the other side's time / mpop time)")
    for pair, sides in sorted(_stats.items()):
        others = [s for s in sides if s != "mpop"]
        if "mpop" in sides and len(others) == 1:
            other = others[0]
            tr.write_line(f"{pair:<40} mpop {sides['mpop'] * 1e3:9.3f} ms   {other} "
                          f"{sides[other] * 1e3:9.3f} ms   ratio {sides[other] / sides['mpop']:6.2f}x")
