"""Persistent pools: the supervisor in a process of its own.

A persistent pool (``MpopApi(persistent=True, name=...)``) is supervised by a process of its
own, started by the pool's creator at start() in a session of its own (supervise). Before it
starts any worker, that process takes the segment over (Segment.take_ownership): the workers
watch it instead of the creator, and it removes the segment when it leaves. So the creator
may exit, or be killed, and the workers go on with the tasks it queued.

The supervisor process stops the pool on a signal: SIGTERM once no task is queued or
running, SIGINT at once (what runs is killed). When its workers cannot start it exits; the
creator finds why in the worker records (a start error, an initializer's traceback) and
raises it as it would for an in-process supervisor. A pool is found by its name (the
segment's name is ``NAME_`` and 16 random hex digits) among the live segments that a
supervisor process took over."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import subprocess
import sys
import time
import weakref

from . import _clients
from ._builtins import BOOT_FN_ID
from ._errors import MpopError

__all__ = ["PoolProcess", "find_pools", "recover", "attach", "supervise", "stop_pool", "main"]

READY_TIMEOUT_S = 60.0
RECOVERY_ATTEMPTS = 3  # new supervisors that die while they take over, before one is given up


def read_boot(segment) -> dict:
    """The segment's boot record (the last one written)."""
    entries, _ = segment.read_registry(0)
    boot: dict = {}
    for fn_id, blob in entries:
        if fn_id == BOOT_FN_ID:
            boot = pickle.loads(blob)
    return boot


@contextlib.contextmanager
def mapped(seg_name: str):
    """The segment `seg_name`, attached for the block."""
    from . import _core

    seg = _core.Segment.attach(seg_name)
    try:
        yield seg
    finally:
        seg.leave()


def the_pool(name: str, found: list[str], waited: str = "") -> str:
    """The one segment of `found` (find_pools(name)); raises MpopError for none or several."""
    if not found:
        raise MpopError(f"no live persistent pool named {name!r}{waited}")
    if len(found) > 1:
        raise MpopError(f"several live persistent pools are named {name!r}: {', '.join(found)}; "
                        f"give the segment's name")
    return found[0]


def supervisor_error(segment) -> str | None:
    """Why the pool's workers could not start, as the supervisor reports it, when a
    worker recorded why."""
    for w in segment.workers_status():
        if w["start_error"]:
            return f"mpop: worker {w['id']} failed to start:\n{w['start_error']}"
    return None


def find_pools(name: str, orphaned: bool = False) -> list[str]:
    """The segment names of the live persistent pools called `name` (or whose segment is
    named `name`); with `orphaned`, of those whose supervisor process died (and that no
    stop, cleanup or last worker out removed): their workers, if any, wait for a new one."""
    from . import _core
    from ._cleanup import segments

    found = []
    for seg_name in segments():
        if seg_name != name and not (seg_name.startswith(name + "_") and len(seg_name) == len(name) + 17):
            continue
        try:
            seg = _core.Segment.attach(seg_name)
        except Exception:
            continue
        try:  # taken over by its supervisor process (not a creator still starting it)
            # (running(), as PoolProcess.alive sees it: a supervisor killed with SIGKILL is
            # gone from its first zombie moment, before its other threads have exited)
            if seg.supervised and not seg.shutdown and running(seg.owner_pid, seg.owner_start_time) != orphaned:
                found.append(seg_name)
        except Exception:
            pass
        finally:
            seg.leave()
    return found


def recover(name: str) -> str | None:
    """Starts a new supervisor process for the persistent pool `name` whose supervisor died
    (it adopts the workers that still run and recovers the others); returns the segment's
    name, or None when there is no such pool. Raises MpopError when the new supervisor
    cannot start. One that dies while it takes over, saying nothing, is followed by
    another (RECOVERY_ATTEMPTS in all)."""
    for seg_name in find_pools(name, orphaned=True):
        with mapped(seg_name) as seg:
            workers = (read_boot(seg).get("client") or {}).get("workers") or 1
            for attempt in range(1, RECOVERY_ATTEMPTS + 1):
                try:
                    PoolProcess.launch(seg, workers, adopt=True)
                except MpopError:
                    if not running(seg.owner_pid, seg.owner_start_time) and (
                            supervisor_error(seg) or attempt == RECOVERY_ATTEMPTS):
                        raise
                if running(seg.owner_pid, seg.owner_start_time):
                    return seg_name  # (or another came first: fine)
            raise MpopError(f"the supervisor process of pool {seg_name} is gone: "
                            f"{RECOVERY_ATTEMPTS} new ones died while they took over")
    return None


def attach(name: str, timeout: float | None = None):
    """mpop.attach: a handle (an MpopApi) on the live persistent pool `name`, from any
    process of its user. Waits up to `timeout` seconds (None: not at all) for the pool to
    appear; raises MpopError when there is none, or several of that name."""
    from ._api import MpopApi, attaching

    if not isinstance(name, str) or not name:
        raise TypeError(f"attach() needs a pool name, got {name!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        found = find_pools(name)
        if not found and recover(name):  # its supervisor died: a new one adopts the workers
            found = find_pools(name)
        if found or deadline is None or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    seg_name = the_pool(name, found, f" (waited {timeout} s)" if timeout else "")
    with mapped(seg_name) as seg:
        settings = dict(read_boot(seg).get("client") or {})
    if not settings:
        raise MpopError(f"{seg_name} is not a persistent pool's segment")
    module, qualname = settings.pop("slot_class")
    try:
        import importlib

        slot_class = importlib.import_module(module)
        for part in qualname.split("."):
            slot_class = getattr(slot_class, part)
    except Exception as e:
        raise MpopError(f"pool {name!r} uses the slot class {module}.{qualname}, which cannot be imported "
                        f"here: {e!r}") from e
    with attaching(seg_name):
        app = MpopApi(persistent=True, slot_class=slot_class, **settings)
    app.start()  # a handle that fails here holds nothing: it is freed with its exception
    return app


# The supervisor process is started through a short-lived intermediate that forks it into a
# session of its own and exits: it is never the creator's child, so the creator has nothing
# to reap, and it runs on however the creator ends.
# It prints the supervisor's pid.
_DAEMONIZE = ("import os, sys\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    os.setsid()\n"
              "    fd = os.open(os.devnull, os.O_RDWR)\n"
              "    for i in (0, 1, 2):\n"
              "        os.dup2(fd, i)\n"
              "    os.execv(sys.argv[1], sys.argv[1:])\n"
              "print(pid, flush=True)\n"
              "os._exit(0)\n")


class PoolProcess:
    """The creator's handle on its pool's supervisor process (pid and start time)."""

    def __init__(self, pid: int, start_time: int, segment) -> None:
        self.pid = pid
        self.start_time = start_time
        self.segment = segment
        self._pidfd: int | None = None  # opened by the first alive() that finds it running

    @classmethod
    def launch(cls, segment, workers: int, adopt: bool = False) -> PoolProcess:
        """Starts the supervisor process of `segment`'s pool with `workers` workers, and
        returns once it owns the segment (`adopt`: in place of one that died, adopting its
        workers). Raises MpopError (WorkerInitError for a failed initializer) when it gives
        up first."""
        from ._hooks import startup_error
        from ._worker import package_parent

        code = ("import sys; sys.path.insert(0, sys.argv[1]); from mpop._persistent import main; "
                "sys.exit(main(sys.argv[2:]))")
        argv = [sys.executable, "-c", code, package_parent(), segment.name, str(workers)] + (["adopt"] if adopt else [])
        # Away from the creator's terminal and pipes too: a reader of the creator's output
        # must not wait for the pool.
        try:
            out = subprocess.run([sys.executable, "-c", _DAEMONIZE, *argv], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
                                 check=True).stdout
            pid = int(out)
        except (OSError, ValueError, subprocess.CalledProcessError) as e:
            raise MpopError(f"could not start the supervisor process of pool {segment.name}: {e}") from e
        from ._core import Segment

        start = Segment.process_start_time(pid)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (segment.supervised and segment.owner_pid == pid and segment.owner_start_time == start):
            if not running(pid, start):
                why = supervisor_error(segment)
                raise startup_error(why) if why else MpopError(
                    f"the supervisor process of pool {segment.name} (pid {pid}) exited before it started")
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise MpopError(f"the supervisor process of pool {segment.name} did not start in "
                                f"{READY_TIMEOUT_S:.0f} s")
            time.sleep(0.005)
        return cls(pid, segment.owner_start_time, segment)

    @classmethod
    def current(cls, segment) -> PoolProcess:
        """The supervisor process that owns `segment` now (for an attached handle), a new
        one that adopts the workers if it died; raises MpopError when none can run."""
        for _ in range(RECOVERY_ATTEMPTS):
            pid, start = segment.owner_pid, segment.owner_start_time
            if segment.supervised and running(pid, start):
                return cls(pid, start, segment)
            recover(segment.name)
        raise MpopError(f"the supervisor process of pool {segment.name} is gone")

    def alive(self) -> bool:
        """Whether the supervisor process runs: one poll of a pidfd (handles check this
        while they wait for results)."""
        if self._pidfd is None:
            if not running(self.pid, self.start_time):
                return False
            try:
                fd = os.pidfd_open(self.pid)
            except OSError:
                return False
            if not running(self.pid, self.start_time):  # its pid was reused before the open
                os.close(fd)
                return False
            self._pidfd = fd
            weakref.finalize(self, os.close, fd)
        return not select.select([self._pidfd], [], [], 0)[0]  # readable once it exited

    def error(self) -> MpopError | None:
        """Why the supervisor process is gone, or None while it runs."""
        if self.alive():
            return None
        from ._hooks import startup_error

        why = supervisor_error(self.segment)
        if why:
            return startup_error(why)
        return MpopError(f"the supervisor process (pid {self.pid}) of pool {self.segment.name} is gone")

    def stop(self, graceful: bool, timeout: float) -> None:
        """Stops the pool: its workers, then the supervisor process (which removes the
        segment). Graceful: once nothing is queued or running (`timeout`, then at once)."""
        _signal_until_gone(self.pid, self.start_time, graceful, timeout)


def running(pid: int, start_time: int) -> bool:
    """Whether the process `pid` that started at `start_time` still runs (a zombie does
    not: the process it is reparented to may take its time to reap it)."""
    from ._core import Segment

    if Segment.process_start_time(pid) != start_time:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _signal_until_gone(pid: int, start_time: int, graceful: bool, timeout: float) -> None:
    """SIGTERM (graceful) or SIGINT to the supervisor process `pid` (started at
    `start_time`), then SIGINT after `timeout`, SIGKILL 10 s later; returns once it is
    gone."""
    wait = _waiter(pid, start_time)
    for sig, limit in ((signal.SIGTERM if graceful else signal.SIGINT, timeout), (signal.SIGINT, 10.0),
                       (signal.SIGKILL, 10.0)):
        if not running(pid, start_time):
            return  # gone (its pid may be another process's now)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        try:
            wait(limit)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_pool(name: str, graceful: bool = True, timeout: float = 60.0) -> str:
    """Stops the live persistent pool `name` from any process of its user (``python -m mpop
    shutdown NAME``); returns its segment's name. Raises MpopError when there is none, or
    more than one."""
    seg_name = the_pool(name, find_pools(name))
    with mapped(seg_name) as seg:
        pid, start = seg.owner_pid, seg.owner_start_time
    _signal_until_gone(pid, start, graceful, timeout)
    return seg_name


def _waiter(pid: int, start_time: int):
    """wait(limit) for the process `pid` (started at `start_time`), which is not our child:
    it watches the process's identity in /proc."""
    def wait(limit: float) -> None:
        deadline = time.monotonic() + limit
        while running(pid, start_time):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {pid}", limit)
            time.sleep(0.01)

    return wait


# -- the supervisor process ---------------------------------------------------------------------

_stop_requested: list[bool] = []  # [graceful] once a signal came


def _on_signal(signum: int, frame) -> None:
    _stop_requested.append(signum == signal.SIGTERM)


def _idle(segment) -> bool:
    """Nothing queued, claimed or running."""
    if segment.queue_status()["queued"]:
        return False
    return all(not w["local_queue"] and w["running_seq"] is None for w in segment.workers_status())


def supervise(name: str, workers: int, adopt: bool = False) -> int:
    """The supervisor process of the persistent pool in segment `name` (see the module's
    docstring); `adopt`: in place of one that died (a second one that comes at the same
    time finds the pool taken and exits). Returns its exit status."""
    from . import _core
    from ._worker import spawn_command

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    segment = _core.Segment.attach(name)
    boot = read_boot(segment)
    if not boot.get("persistent"):
        segment.leave()
        print(f"mpop: {name} is not a persistent pool", file=sys.stderr)
        return 2
    settings = boot["supervisor"]
    if adopt:
        dead = segment.owner_pid
        if running(dead, segment.owner_start_time) or not segment.take_over(dead):
            segment.leave()
            return 0  # another supervisor has it
    else:
        segment.take_ownership()
    argv, env = spawn_command(name)
    sup = _core.Supervisor(segment, workers, settings["max_retries"], float(settings["task_timeout"] or 0.0),
                           "spawn", argv, env, None, persistent=True)
    forwarder = _core.Forwarder(segment)  # the results, to the clients' mailboxes
    forwarder.start()
    graceful = False
    try:
        try:
            sup.start()
        except RuntimeError:
            return 3  # why is in the worker records
        graceful = True
        next_reap = 0.0
        while True:
            if _stop_requested:
                graceful = graceful and _stop_requested[-1]
                if not graceful or _idle(segment):
                    break
            if sup.last_error:  # the workers cannot start: why is in their records
                graceful = False
                return 3
            now = time.monotonic()
            if now >= next_reap:  # clients that died: their results wait for the next one
                _clients.reap(segment)
                next_reap = now + 1.0
            time.sleep(0.05)
        return 0
    finally:
        sup.stop(graceful, 10.0)
        forwarder.stop()
        segment.set_shutdown()
        segment.leave()


def main(argv: list[str]) -> int:
    """``SEGMENT WORKERS [adopt]``: the entry PoolProcess.launch starts."""
    if len(argv) not in (2, 3) or argv[2:] not in ([], ["adopt"]):
        print("usage: python -m mpop._persistent SEGMENT WORKERS [adopt]", file=sys.stderr)
        return 2
    return supervise(argv[0], int(argv[1]), adopt=argv[2:] == ["adopt"])
