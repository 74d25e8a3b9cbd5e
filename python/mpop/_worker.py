"""The worker process entry: attach the segment, send output and logging to the owner
(_output.py), set up the interpreter as the owner asked (sys.path, handler_module, CPU
pinning), run the initializer (_hooks.py), then the native worker loop, and worker_exit
when the worker retires."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback

from ._builtins import BOOT_FN_ID, MAP_CHUNK_ID, fix_chunk, set_resolver, with_state
from ._pickling import pack_error

class _Resolver:
    """fn_id -> (callable, slot class or None), read from the segment's registry log.

    Handlers are unpickled on first use, after the owner's sys.path is in place (and kept
    until their record changes); one that cannot be loaded fails its own tasks with the
    reason instead of the worker. A handler that declares ``worker_state`` gets the
    worker's (see _builtins.with_state)."""

    def __init__(self, segment):
        self.segment = segment
        self.offset = 0
        self.blobs: dict[int, bytes] = {}
        self.loaded: dict[int, tuple[bytes, tuple]] = {}  # fn_id -> (its record, the entry)
        self.boot: dict = {}
        self.epoch = 0  # the registry epoch of the last refresh

    def refresh(self) -> None:
        entries, self.offset = self.segment.read_registry(self.offset)
        for fn_id, blob in entries:
            if fn_id == BOOT_FN_ID:
                self.boot = pickle.loads(blob)
            else:
                self.blobs[fn_id] = blob

    def resolve(self, fn_id: int):
        # New records first when the fn_id is unknown, or when a handler was registered
        # again under its fn_id since (the registry epoch moved).
        epoch = self.segment.registry_epoch
        if fn_id not in self.blobs or epoch != self.epoch:
            self.epoch = epoch
            self.refresh()
        blob = self.blobs.get(fn_id)
        if blob is None:
            return None
        loaded = self.loaded.get(fn_id)
        if loaded is not None and loaded[0] is blob:
            return loaded[1]
        try:
            import cloudpickle  # noqa: F401  (reducers its payloads may need)

            fn, slot_class = pickle.loads(blob)
            entry = (with_state(fn), slot_class)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"

            def unloadable(*args, **kwargs):
                from ._errors import RegistryError

                raise RegistryError(f"the handler for fn_id {fn_id:#x} cannot be loaded in the "
                                    f"worker ({reason}); make its module importable by the "
                                    f"workers or define it where it can travel by value")

            entry = (unloadable, None)
        self.loaded[fn_id] = (blob, entry)
        return entry


def _prepare(resolver: _Resolver, worker_id: int) -> None:
    boot = resolver.boot
    for p in reversed(boot.get("sys_path", [])):
        if p not in sys.path:
            sys.path.insert(0, p)
    cpus = boot.get("cpu_affinity")
    if cpus and worker_id >= 0:
        os.sched_setaffinity(0, {cpus[worker_id % len(cpus)]})
    module = boot.get("handler_module")
    if module and module not in sys.modules:
        __import__(module)


def run(name: str, worker_id: int, generation: int) -> int:
    """A worker's life in slot `worker_id` of segment `name`, as the supervisor's
    `generation`-th process there: returns its exit code."""
    from . import _core
    from ._hooks import RETIRING, WorkerLife, clip
    from ._output import install, pack_exit
    from ._results import TaskResult

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle
    segment = _core.Segment.attach(name)
    if not _core.claim_worker(segment, worker_id, generation):
        # Started by a supervisor that died before it recorded this process; its successor
        # has given the record to another.
        segment.leave()
        return 0
    _core.arm_worker_exit(segment)
    side = _core.SideChannel(segment, worker_id)
    resolver = _Resolver(segment)
    set_resolver(resolver.resolve)
    outbox = None
    try:
        resolver.refresh()
        outbox = install(side, worker_id, resolver.boot.get("log_levels"))
        _prepare(resolver, worker_id)
        life = WorkerLife(resolver.boot.get("hooks"))
        why = life.begin()
    except BaseException:
        why = clip(traceback.format_exc(), 3500)
    if why is not None:
        if outbox is not None:
            outbox.close()  # what the initializer printed before it failed
        segment.set_start_error(worker_id, why)
        _core.leave_segment(segment, not _core.owner_alive(segment))
        return 3
    reason = _core.worker_loop(segment, worker_id, resolver.resolve, pack_error, TaskResult,
                               MAP_CHUNK_ID, fix_chunk, side, outbox.flush)
    if reason in RETIRING:
        value = life.end()
        outbox.flush()
        if value is not WorkerLife.NO_EXIT:
            side.send(_core.ROUTE_EXIT, pack_exit(*value))
    owner_died = reason == _core.WORKER_EXIT["OWNER_DIED"]
    if not owner_died:
        outbox.close()
    else:
        outbox.closed = True
    _core.leave_segment(segment, owner_died)
    return 0


def package_parent() -> str:
    """The directory this mpop package is in: what a child interpreter puts first on its
    sys.path to import the same mpop."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn_command(name: str) -> tuple[list[str], list[str]]:
    """The argv (without worker id and generation) and environment of a spawned worker of
    segment `name`."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from mpop._worker import main; "
            "sys.exit(main(sys.argv[2:]))")
    argv = [sys.executable, "-c", code, package_parent(), name]
    return argv, [f"{k}={v}" for k, v in os.environ.items()]


def main(argv: list[str] | None = None) -> int:
    """``python -m mpop._worker SEGMENT WORKER_ID GENERATION`` (spawn start method)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 4 and argv[0] == "--forkserver":
        return forkserver_main(argv[1], int(argv[2]), int(argv[3]))
    if len(argv) != 3:
        print("usage: python -m mpop._worker SEGMENT WORKER_ID GENERATION", file=sys.stderr)
        return 2
    return run(argv[0], int(argv[1]), int(argv[2]))


def forked_main(name: str, worker_id: int, generation: int) -> int:
    """Entry of a worker forked from the owner (fork start method)."""
    try:
        return run(name, worker_id, generation)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def forkserver_main(name: str, owner_pid: int, reply_fd: int) -> int:
    """A fork server: a fresh interpreter that imports mpop and the handler module once,
    then forks one worker per request line ``WORKER_ID GENERATION`` on stdin, answering with the
    child's pid on `reply_fd` (a pipe of its own: its standard output and error, and its
    workers', are the owner's). It never imports the owner's ``__main__``; it exits when
    stdin closes or its parent (the owner's supervisor thread) dies."""
    from . import _core

    if not _core.die_with_parent(owner_pid):
        return 1  # the owner died before the death signal was armed
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children

    segment = _core.Segment.attach(name)
    resolver = _Resolver(segment)
    try:
        resolver.refresh()
        _prepare(resolver, -1)
    except BaseException:
        traceback.print_exc()
    segment.leave()
    del segment
    replies = os.fdopen(reply_fd, "w", buffering=1)
    me = os.getpid()
    for line in sys.stdin:
        worker_id, generation = map(int, line.split())
        pid = os.fork()
        if pid == 0:
            try:
                sys.stdin.close()
                os.close(reply_fd)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = run(name, worker_id, generation) if _core.die_with_parent(me) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
            os._exit(code)
        replies.write(f"{pid}\n")
    return 0


class ForkServer:
    """The owner's handle on its fork server (start_method="forkserver")."""

    def __init__(self, name: str, argv_prefix: list[str]) -> None:
        self.name = name
        self.argv_prefix = argv_prefix
        self.proc = None
        self.replies = None  # the read end of the fork server's reply pipe

    def spawn(self, worker_id: int, generation: int) -> int:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            self._close_replies()
            # Replies (pids) come on a pipe of their own: the fork server's standard output
            # and error, which its workers inherit, stay the owner's.
            r, w = os.pipe()
            try:
                self.proc = subprocess.Popen(
                    [*self.argv_prefix, "--forkserver", self.name, str(os.getpid()), str(w)],
                    stdin=subprocess.PIPE, pass_fds=(w,))
            except BaseException:
                os.close(r)
                raise
            finally:
                os.close(w)
            self.replies = os.fdopen(r, "rb")
        self.proc.stdin.write(f"{worker_id} {generation}\n".encode())
        self.proc.stdin.flush()
        line = self.replies.readline()
        if not line:
            raise RuntimeError("the mpop fork server exited (see its stderr)")
        return int(line)

    def _close_replies(self) -> None:
        if self.replies is not None:
            self.replies.close()
            self.replies = None

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except Exception:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self._close_replies()


if __name__ == "__main__":
    sys.exit(main())
