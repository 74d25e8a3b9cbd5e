"""``python -m mpop``: demo, bench, status NAME, cleanup, and for persistent pools serve
NAME, supervise NAME and shutdown NAME."""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]

def _demo(args: argparse.Namespace) -> int:
    import multiprocessing

    from . import MpopApi, ProcTaskFnID
    from ._workloads import medium

    n = args.tasks
    workers = args.workers
    print(f"mpop demo: {n} CPU-bound tasks (300 mixing rounds each) on {workers} workers\n")
    with MpopApi(workers=workers, auto_terminate=False) as app:
        app.register(medium, fn_id=0xD000, name="medium")
        for i in range(5):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i * 10, 1), tsk_id=i + 1)
        warm = app.run()
        print("INCREMENT results:", warm.values())
        for i in range(n):
            app.enqueue(fn_id=0xD000, args=(i,), tsk_id=i)
        t0 = time.perf_counter()
        result = app.run()
        t_mpop = time.perf_counter() - t0
        print(f"medium results: {result.values()[:5]} ... ({len(result)} tasks, "
              f"{len(result.failures)} failed)\n")
        app.print_status(config=False, queue=True, workers=True)

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        pool.map(medium, range(workers * 4))  # warm up
        t0 = time.perf_counter()
        values = pool.map(medium, range(n))
        t_pool = time.perf_counter() - t0
    assert values == result.values(), "mpop and multiprocessing disagree"
    print("\nside by side (same tasks, same machine, workers already started):")
    print(f"  mpop.MpopApi.run          {t_mpop:8.3f} s")
    print(f"  multiprocessing.Pool.map  {t_pool:8.3f} s")
    print(f"  ratio (Pool / mpop)       {t_pool / t_mpop:8.2f}x")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    from ._cleanup import remove_dead_segments

    removed = remove_dead_segments(report=print)
    print(f"{len(removed)} segment(s) removed")
    return 0


def _shutdown(args: argparse.Namespace) -> int:
    from ._errors import MpopError
    from ._persistent import stop_pool

    try:
        name = stop_pool(args.name, graceful=not args.now, timeout=args.timeout)
    except MpopError as e:
        print(f"mpop shutdown: {e}", file=sys.stderr)
        return 1
    print(f"stopped persistent pool {args.name!r} (segment {name})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ._api import MpopApi
    from ._errors import MpopError

    if os.getcwd() not in sys.path:  # a handler module beside the caller, for the workers too
        sys.path.insert(0, os.getcwd())
    try:
        app = MpopApi(name=args.name, persistent=True, workers=args.workers, handler_module=args.handler_module)
        app.start()
        status = app.status()
        segment, workers = app.segment_name, app.config["workers"]
        app.detach()
    except MpopError as e:
        print(f"mpop serve: {e}", file=sys.stderr)
        return 1
    print(f"serving persistent pool {args.name!r} (segment {segment}, supervisor pid "
          f"{status['supervisor']['pid']}, {workers} workers)")
    return 0


def _supervise(args: argparse.Namespace) -> int:
    from ._errors import MpopError
    from ._persistent import find_pools, recover

    try:
        segment = recover(args.name)
    except MpopError as e:
        print(f"mpop supervise: {e}", file=sys.stderr)
        return 1
    if segment is None:
        live = find_pools(args.name)
        if live:
            print(f"persistent pool {args.name!r} (segment {live[0]}) has a live supervisor already")
            return 0
        print(f"mpop supervise: no persistent pool named {args.name!r} whose workers wait for a supervisor",
              file=sys.stderr)
        return 1
    print(f"a new supervisor process took over persistent pool {args.name!r} (segment {segment})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from . import _core
    from ._cleanup import segments
    from ._core import owner_alive
    from ._persistent import find_pools
    from ._status import format_status

    pools = [] if args.name in segments() else find_pools(args.name)
    if len(pools) == 1:
        args.name = pools[0]
    try:
        seg = _core.Segment.attach(args.name)
    except Exception as e:
        print(f"cannot attach {args.name!r}: {e}", file=sys.stderr)
        print("segments here: " + (", ".join(segments()) or "none"), file=sys.stderr)
        return 1
    try:
        while True:
            status = {"config": {}, "queue": seg.queue_status(), "workers": seg.workers_status()}
            status["queue"]["owner_pid"] = seg.owner_pid
            text = format_status(status, config=False)
            owner = "supervisor process" if seg.supervised else "owner"
            if seg.client_count:
                text += "\n" + _clients_table(seg)
            print(f"mpop segment {args.name} ({owner} pid {seg.owner_pid}, "
                  f"{'alive' if owner_alive(seg) else 'dead'})\n{text}\n", flush=True)
            if args.once or not owner_alive(seg):
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        seg.leave()


def _clients_table(seg) -> str:
    """A persistent pool's clients, one line each."""
    from ._clients import describe

    lines = ["clients:", f"  {'#':>3} {'state':<9} {'pid':>8} {'alive':<6} {'adopted by':>10} {'submitted':>10} "
             f"{'waiting':>8}"]
    for c in describe(seg):
        adopted = "" if c["adopted_by"] is None else str(c["adopted_by"])
        lines.append(f"  {c['index']:>3} {c['state']:<9} {c['pid'] or '':>8} {str(c['alive']):<6} {adopted:>10} "
                     f"{c['submitted']:>10} {c['results_waiting']:>8}")
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from ._bench import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a short workload and compare with multiprocessing.Pool")
    p.add_argument("--tasks", type=int, default=4000)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_demo)
    p = sub.add_parser("bench", help="side-by-side benchmark table against the standard library")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--plot", metavar="FILE.png", help="draw throughput against task size")
    p.add_argument("--only", metavar="SCENARIO", action="append", help="run only these scenarios")
    p.add_argument("--long", action="store_true",
                   help="add the prototype's heavy workload x 1,800,000 (about an hour more)")
    p.set_defaults(func=_bench)
    p = sub.add_parser("status", help="live view of a running app, by segment name (or persistent pool name)")
    p.add_argument("name")
    p.add_argument("--once", action="store_true")
    p.add_argument("--interval", type=float, default=1.0)
    p.set_defaults(func=_status)
    p = sub.add_parser("cleanup", help="remove shared-memory segments whose owner is dead")
    p.set_defaults(func=_cleanup)
    p = sub.add_parser("serve", help="start the persistent pool NAME and return once it is ready")
    p.add_argument("name")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the usable CPUs)")
    p.add_argument("--handler-module", default=None, metavar="MODULE",
                   help="a module whose HANDLERS dict the pool's clients call by fn_id or name")
    p.set_defaults(func=_serve)
    p = sub.add_parser("supervise", help="start a new supervisor for the persistent pool NAME whose supervisor "
                                         "died (it adopts the running workers)")
    p.add_argument("name")
    p.set_defaults(func=_supervise)
    p = sub.add_parser("shutdown", help="stop the persistent pool NAME (once nothing is queued or running)")
    p.add_argument("name")
    p.add_argument("--now", action="store_true", help="stop at once: queued and running tasks are dropped")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for queued tasks before stopping at once (default 60)")
    p.set_defaults(func=_shutdown)
    args = parser.parse_args(argv)
    return args.func(args)
