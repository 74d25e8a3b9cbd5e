"""Failure scenarios run side by side against multiprocessing.Pool, ProcessPoolExecutor and
mpop; prints a Markdown table of what each one did (docs/reliability.md holds a run of it).

    python benchmarks/reliability.py [--out docs/reliability.md]

Every scenario runs in a child interpreter with a time limit, so a pool that hangs shows up
as "hung" instead of hanging this script."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

LIMIT = 40.0  # seconds a scenario may take before we call it hung

try:  # the children import the same mpop as this script (installed, or ../python)
    import mpop

    MPOP_DIR = Path(mpop.__file__).resolve().parents[1]
except ImportError:
    MPOP_DIR = Path(__file__).resolve().parents[1] / "python"

COMMON = textwrap.dedent("""
    import concurrent.futures as cf, json, multiprocessing as mp, os, signal, sys, time
    import mpop

    def sleepy(x):
        time.sleep(0.2)
        return x

    def poison(x):
        if x == 3:
            os._exit(1)
        time.sleep(0.05)
        return x

    def slow(x):
        time.sleep(30 if x == 0 else 0.05)
        return x

    def pids_of(kind, pool):
        if kind == "Pool":
            return [p.pid for p in pool._pool]
        if kind == "ProcessPoolExecutor":
            return list(pool._processes)
        return [w["pid"] for w in pool.status()["workers"] if w["state"] in ("idle", "busy")]

    def make(kind):
        if kind == "Pool":
            return mp.get_context("fork").Pool(2)
        if kind == "ProcessPoolExecutor":
            return cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
        return mpop.MpopApi(workers=2, auto_terminate=False, task_timeout=1.0, max_retries=1)

    class Refused:
        def __init__(self, e):
            self.e = e

    def submit(kind, pool, fn, x):
        try:
            if kind == "Pool":
                return pool.apply_async(fn, (x,))
            return pool.submit(fn, x)
        except Exception as e:
            return Refused(e)

    def outcome(kind, handle, timeout):
        if isinstance(handle, Refused):
            return ("refused: " + type(handle.e).__name__, None)
        try:
            v = handle.get(timeout) if kind == "Pool" else handle.result(timeout)
            return ("ok", v)
        except mpop.MpopError as e:  # before TimeoutError: TaskTimeoutError is one
            return (type(e).__name__, None)
        except mp.TimeoutError:
            return ("no result", None)
        except cf.TimeoutError:
            return ("no result", None)
        except Exception as e:
            return (type(e).__name__, None)

    def report(d):
        print(json.dumps(d), flush=True)
""")

SCENARIOS = {
    "worker SIGKILL": """
        pool = make(KIND)
        list(map(lambda f: outcome(KIND, f, 10), [submit(KIND, pool, sleepy, i) for i in range(4)]))
        hs = [submit(KIND, pool, sleepy, i) for i in range(10)]
        time.sleep(0.1)
        os.kill(pids_of(KIND, pool)[0], signal.SIGKILL)
        res = [outcome(KIND, h, 8) for h in hs]
        after = outcome(KIND, submit(KIND, pool, sleepy, 99), 8)
        report({"results": res, "after": after})
        os._exit(0)
    """,
    "poison task": """
        pool = make(KIND)
        hs = [submit(KIND, pool, poison, i) for i in range(8)]
        res = [outcome(KIND, h, 8) for h in hs]
        after = outcome(KIND, submit(KIND, pool, sleepy, 99), 8)
        report({"results": res, "after": after})
        os._exit(0)
    """,
    "task past its time limit (1 s)": """
        pool = make(KIND)
        hs = [submit(KIND, pool, slow, i) for i in range(6)]
        res = [outcome(KIND, hs[0], 5)] + [outcome(KIND, h, 5) for h in hs[1:]]
        t = time.monotonic()
        after = [outcome(KIND, submit(KIND, pool, sleepy, 99), 5) for _ in range(2)]
        report({"results": res, "after": after[-1], "two_more_s": round(time.monotonic() - t, 2)})
        os._exit(0)
    """,
    "owner SIGKILL": """
        pool = make(KIND)
        outcome(KIND, submit(KIND, pool, sleepy, 1), 10)
        hs = [submit(KIND, pool, slow, 0) for _ in range(2)]
        time.sleep(0.3)
        seg = pool.segment_name if KIND == "mpop" else None
        print(json.dumps({"pids": pids_of(KIND, pool), "segment": seg}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
    # mpop: a persistent pool, whose results (of enqueue()d tasks: none is in the killed
    # process's hands) a process attaching later collects.
    "client SIGKILL with 20 tasks queued": """
        name = "mpop-rel-" + os.urandom(4).hex() if KIND == "mpop" else None
        pool = mpop.MpopApi(name=name, persistent=True, workers=2) if name else make(KIND)
        if name:
            pool.start()
            for i in range(20):
                pool.enqueue(sleepy, args=(i,), tsk_id=i)
        else:
            hs = [submit(KIND, pool, sleepy, i) for i in range(20)]
        time.sleep(0.3)
        print(json.dumps({"pids": pids_of(KIND, pool), "pool": name}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
    "supervisor SIGKILL mid-run": """
        if KIND != "mpop":
            report({"na": True})
            os._exit(0)
        pool = mpop.MpopApi(name="mpop-rel-" + os.urandom(4).hex(), persistent=True, workers=2)
        hs = [submit(KIND, pool, sleepy, i) for i in range(20)]
        time.sleep(0.5)
        os.kill(pool.status()["supervisor"]["pid"], signal.SIGKILL)
        res = [outcome(KIND, h, 20) for h in hs]
        after = outcome(KIND, submit(KIND, pool, sleepy, 99), 8)
        pool.shutdown()
        report({"results": res, "after": after})
        os._exit(0)
    """,
}

COLLECT = textwrap.dedent("""
    import json, sys, mpop
    app = mpop.attach(sys.argv[1], timeout=10)
    got = list(app.results(timeout=30))
    ok = sorted(r.value for r in got if r.success)
    app.shutdown()
    print(json.dumps({"got": len(got), "ok": ok}), flush=True)
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return False


def run_one(kind: str, scenario: str) -> str:
    code = COMMON + f"\nKIND = {kind!r}\n" + textwrap.dedent(SCENARIOS[scenario])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MPOP_DIR), env.get("PYTHONPATH")]))
    import tempfile

    # Output goes to a file, not a pipe: orphaned workers holding a pipe open would make
    # reading it hang after the process we wait for is gone.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=LIMIT)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
        elapsed = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if hung:
        os.killpg(proc.pid, 9)
        proc.wait()
        partial = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        return f"hung (killed after {LIMIT:.0f} s)" + ("" if not partial else " after reporting: " + partial[-1][:80])

    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return f"crashed the caller: {stderr.strip().splitlines()[-1:]}"
    data = json.loads(lines[-1])
    if data.get("na"):
        return "no supervisor apart from the owner: its death is the owner's (above)"
    if scenario == "client SIGKILL with 20 tasks queued":
        if not data["pool"]:
            time.sleep(2.0)
            left = [p for p in data["pids"] if alive(p)]
            for p in left:
                os.kill(p, 9)
            return (f"no other process can reach the pool: 20 results lost"
                    + (f"; {len(left)} orphaned workers killed by this script" if left else ""))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MPOP_DIR), env.get("PYTHONPATH")]))
        t1 = time.monotonic()
        done = subprocess.run([sys.executable, "-c", COLLECT, data["pool"]], capture_output=True, text=True,
                              env=env, timeout=LIMIT)
        got = json.loads(done.stdout.strip().splitlines()[-1])
        exact = got["ok"] == list(range(20))
        return (f"the next process to attach got {got['got']} of 20 results"
                + (", each once" if exact and got["got"] == 20 else " (NOT each once)")
                + f" [{time.monotonic() - t1:.1f} s]")
    if scenario == "owner SIGKILL":
        time.sleep(2.0)
        left = [p for p in data["pids"] if alive(p)]
        for p in left:
            os.kill(p, 9)
        msg = ("workers exited within 2 s" if not left
               else f"{len(left)} of {len(data['pids'])} workers still running after 2 s (killed by this script)")
        if data.get("segment"):
            gone = not os.path.exists(f"/dev/shm/{data['segment']}")
            msg += "; shared memory removed" if gone else "; shared memory LEFT BEHIND"
        return msg
    res = data["results"]
    kinds: dict[str, int] = {}
    for status, _ in res:
        kinds[status] = kinds.get(status, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    after = data["after"][0]
    tail = "pool keeps working" if after == "ok" else f"next task: {after}"
    if "two_more_s" in data:
        tail += f" (next 2 tasks took {data['two_more_s']} s)"
    return f"{summary}; {tail} [{elapsed:.1f} s]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the Markdown report here")
    args = ap.parse_args()
    kinds = ["Pool", "ProcessPoolExecutor", "mpop"]
    rows = []
    for scenario in SCENARIOS:
        row = [scenario]
        for kind in kinds:
            row.append(run_one(kind, scenario))
            print(f"{scenario:<32} {kind:<20} {row[-1]}", file=sys.stderr, flush=True)
        rows.append(row)
    table = ["| scenario | multiprocessing.Pool | ProcessPoolExecutor | mpop |", "| --- | --- | --- | --- |"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    header = (f"Run with `python benchmarks/reliability.py` on {platform.platform()}, Python "
              f"{platform.python_version()}, 2 workers, fork context for the stdlib pools.")
    text = header + "\n\n" + "\n".join(table) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
