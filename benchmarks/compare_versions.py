"""Two builds of mpop side by side in one run: the rows of `python -m mpop bench` that a
change to the library (not to its peers) can move, measured alternately under each
interpreter, each in a fresh process per round, and the ratio candidate / baseline.

    .venv/bin/python benchmarks/compare_versions.py --baseline /path/to/other/venv/bin/python

Both interpreters need mpop (and numpy for the numpy rows). Higher is better for rates,
lower for the round trip; the ratio is oriented so that above 1 is the candidate ahead."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

ROWS = {
    # name: (unit, higher is better)
    "submit+result": ("tasks/s", True),
    "enqueue+run": ("tasks/s", True),
    "map 1M trivial": ("tasks/s", True),
    "round trip median": ("us", False),
    "numpy map 50 x 8 MB": ("tasks/s", True),
    "numpy submit 50 x 8 MB": ("tasks/s", True),
}


def _measure(row: str) -> float:
    """One measurement of `row` with the mpop this interpreter imports (2 workers)."""
    import mpop
    from mpop._workloads import array_sum, inc

    pool_bytes = 64 << 20 if "numpy" not in row else 1 << 30
    with mpop.MpopApi(workers=2, auto_terminate=False, max_performance=True, pool_bytes=pool_bytes) as app:
        app.start()
        list(app.map(inc, range(200)))  # workers up, handler loaded
        if row == "submit+result":
            n = 200_000
            t = time.perf_counter()
            futs = [app.submit(inc, i) for i in range(n)]
            for f in futs:
                f.result()
            return n / (time.perf_counter() - t)
        if row == "enqueue+run":
            n = 200_000
            t = time.perf_counter()
            for i in range(n):
                app.enqueue(inc, args=(i,))
            assert len(app.run().results) == n
            return n / (time.perf_counter() - t)
        if row == "map 1M trivial":
            n = 1_000_000
            t = time.perf_counter()
            assert len(list(app.map(inc, range(n)))) == n
            return n / (time.perf_counter() - t)
        if row == "round trip median":
            for _ in range(200):
                app.submit(inc, 1).result()
            samples = []
            for i in range(3000):
                t = time.perf_counter()
                app.submit(inc, i).result()
                samples.append(time.perf_counter() - t)
            return statistics.median(samples) * 1e6
        import numpy as np

        arrays = [np.random.default_rng(i).random(1_000_000) for i in range(4)]
        items = [arrays[i % 4] for i in range(50)]
        list(app.map(array_sum, items))  # pool pages mapped
        t = time.perf_counter()
        if row == "numpy map 50 x 8 MB":
            assert len(list(app.map(array_sum, items))) == 50
        else:
            assert len([f.result() for f in [app.submit(array_sum, a) for a in items]]) == 50
        return 50 / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="python of the build to compare against")
    p.add_argument("--candidate", default=sys.executable, help="python of the build under test")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", action="append", choices=list(ROWS))
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure)))
        return 0
    sides = {"candidate": args.candidate, "baseline": args.baseline}
    print(f"{'row':<26}{'candidate':>14}{'baseline':>14}  unit      ratio")
    for row in args.only or ROWS:
        unit, higher = ROWS[row]
        got: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # neither always first
            for k in order:
                out = subprocess.run([sides[k], __file__, "--baseline", "-", "--measure", row],
                                     capture_output=True, text=True, check=True)
                got[k].append(json.loads(out.stdout))
        best = {k: (max(v) if higher else min(v)) for k, v in got.items()}
        ratio = best["candidate"] / best["baseline"] if higher else best["baseline"] / best["candidate"]
        print(f"{row:<26}{best['candidate']:>14.4g}{best['baseline']:>14.4g}  {unit:<8}{ratio:>7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
