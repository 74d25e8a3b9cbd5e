"""Shared helpers of the feature tests: paths, running scripts in a fresh interpreter, and
the leak check every test runs under (no new mpop shared-memory segment, no leftover
process of ours)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import mpop

REPO = Path(__file__).resolve().parents[1]
# Where the mpop under test lives: site-packages of the venv under `make test`, python/ in a
# development tree with a local build. Child interpreters must import that same mpop.
PYDIR = Path(mpop.__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHM = Path("/dev/shm")

# Generous "finishes at all" limits; nothing asserts a duration.
SCRIPT_TIMEOUT = 120
SETTLE_TIMEOUT = 10.0


def env_with_pythonpath(**extra: str) -> dict:
    """os.environ with the mpop under test first on PYTHONPATH."""
    env = dict(os.environ)
    parts = [str(PYDIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.update(extra)
    return env


# Processes the tests started that may own segments (scripts, notebook kernels): a leftover
# segment counts against a test only when this process or one of these owns it, so that
# other test runs on the same machine cannot make these tests fail.
SPAWNED: set[int] = set()


def run_python(args: list[str], cwd: Path | None = None, timeout: float = SCRIPT_TIMEOUT,
               **env: str) -> subprocess.CompletedProcess:
    """Runs `python args...` in a fresh interpreter that sees the repository's mpop."""
    cmd = [sys.executable, *args]
    with subprocess.Popen(cmd, cwd=cwd or REPO, env=env_with_pythonpath(**env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        SPAWNED.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{cmd} did not finish in {timeout}s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wait_until(pred: Callable[[], bool], timeout: float = SETTLE_TIMEOUT, step: float = 0.02) -> bool:
    """Polls `pred` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return bool(pred())
        time.sleep(step)


# -- processes --------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            line = f.read()
    except OSError:
        return None
    rest = line[line.rfind(")") + 2:].split()
    return rest[0], int(rest[1])


def pid_alive(pid: int) -> bool:
    """True while `pid` is a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_mp_helper(pid: int) -> bool:
    """multiprocessing's forkserver and resource tracker live for the whole session."""
    cmd = _cmdline(pid)
    return "multiprocessing.forkserver import main" in cmd or "multiprocessing.resource_tracker" in cmd


def live_descendants(root: int | None = None) -> set[int]:
    """Running descendants of this process, except multiprocessing's session-long helpers
    (the forkserver's own children, i.e. forkserver workers, do count)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is None or st[0] in ("Z", "X"):
            continue
        children.setdefault(st[1], []).append(int(name))
    out: set[int] = set()
    stack = [(root, True)]
    while stack:
        pid, direct = stack.pop()
        for c in children.get(pid, []):
            if pid == root and _is_mp_helper(c):
                stack.append((c, False))  # its children (forkserver workers) still count
                continue
            out.add(c)
            stack.append((c, False))
    return out


# -- shared memory ----------------------------------------------------------------------------


def shm_entries(prefix: str = "mpop") -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith(prefix)}


def _owner_of(name: str) -> int | None:
    """The owner pid recorded in a segment, or None if it cannot be read as one."""
    try:
        from mpop import _core

        seg = _core.Segment.attach(name)
    except Exception:
        return None
    try:
        return int(seg.owner_pid)
    finally:
        seg.leave()


def _ours(name: str, ours: set[int]) -> bool:
    """Whether this process, a process it started, or one of `ours` owns the segment."""
    owner = _owner_of(name)
    return owner is not None and (owner == os.getpid() or owner in SPAWNED or owner in ours)


@contextlib.contextmanager
def leak_check(settle: float = SETTLE_TIMEOUT) -> Iterator[None]:
    """Fails the test if it leaves a new mpop segment in /dev/shm or a process of ours."""
    shm_before = shm_entries()
    procs_before = live_descendants()
    yield
    wait_until(lambda: not (live_descendants() - procs_before), settle, 0.05)
    left_procs = live_descendants() - procs_before

    def leftover_segments() -> list[str]:
        return sorted(n for n in shm_entries() - shm_before if _ours(n, left_procs))

    wait_until(lambda: not leftover_segments(), settle, 0.05)
    left_shm = leftover_segments()
    problems = []
    if left_procs:
        problems.append("processes left running: "
                        + "; ".join(f"{p}: {_cmdline(p)[:120]}" for p in sorted(left_procs)))
    if left_shm:
        problems.append(f"shared-memory segments left in /dev/shm: {left_shm}")
    for p in left_procs:  # don't let one leak fail every later test
        with contextlib.suppress(OSError):
            os.kill(p, 9)
    assert not problems, "; ".join(problems)


# -- per-file leak checks of the unit-style suites ---------------------------------------------


def live_children() -> set[int]:
    """Pids of this process's live (non-zombie) children."""
    me = os.getpid()
    out = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            st = _stat(int(p))
            if st is not None and st[1] == me and st[0] != "Z":
                out.add(int(p))
    return out


def no_leaks_fixture(prefix: str):
    """An autouse fixture: each test leaves no /dev/shm segment named `prefix`... and no
    child process behind."""
    import pytest

    def entries() -> set:
        return {e for e in os.listdir(SHM) if e.startswith(prefix)}

    @pytest.fixture(autouse=True)
    def no_leaks():
        shm_before, kids_before = entries(), live_children()
        yield
        assert entries() - shm_before == set(), "test left /dev/shm segments behind"
        assert live_children() - kids_before == set(), "test left child processes behind"

    return no_leaks


# -- apps of the unit-style suites ------------------------------------------------------------


def app_factory(prefix: str) -> Callable[..., mpop.MpopApi]:
    """`make_app(**kw)`: an MpopApi with one worker whose segments are named `prefix`... (the
    prefix its file's `no_leaks_fixture` watches), unless `kw` says otherwise."""

    def make_app(**kw) -> mpop.MpopApi:
        kw.setdefault("workers", 1)
        kw.setdefault("name", prefix)
        return mpop.MpopApi(**kw)

    return make_app


def app_fixture(make_app: Callable[..., mpop.MpopApi]):
    """A fixture: a fresh app from `make_app()` for each test, shut down after it."""
    import pytest

    @pytest.fixture
    def app():
        a = make_app()
        try:
            yield a
        finally:
            a.shutdown()

    return app


# -- persistent pools ----------------------------------------------------------------------------


def pool_name_fixture(prefix: str):
    """A fixture: a persistent pool name of its own for each test (`prefix`-8 hex digits).
    After the test, a pool of that name still running is stopped (one whose supervisor
    died is first given a new one, so that it can be), and the test fails if any segment
    of that name is left in /dev/shm: a persistent pool's supervisor runs in a session of
    its own, out of leak_check's sight."""
    import uuid

    import pytest

    @pytest.fixture
    def name():
        n = f"{prefix}-{uuid.uuid4().hex[:8]}"
        yield n
        from mpop._persistent import find_pools, recover, stop_pool

        if find_pools(n, orphaned=True):
            recover(n)
        if find_pools(n):
            stop_pool(n, graceful=False, timeout=5)
        left = lambda: [e for e in os.listdir(SHM) if e.startswith(n + "_")]  # noqa: E731
        assert wait_until(lambda: not left(), SETTLE_TIMEOUT), f"pool {n} left segments behind: {left()}"

    return name
