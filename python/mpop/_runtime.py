"""Runtime and Lifecycle: the machinery of one app in the owner's process.

A Runtime is the shared-memory segment, the native producer and collector, the result
router, the native fast path, the supervisor with its workers and the fork server: created
on first use, started and stopped (an auto-terminated run stops the workers, a later call
starts them again), and released at the end. A Lifecycle is an app's hold on its runtime:
created, running or stopped, shut down, or inherited by a fork() child (which never uses
or releases its parent's runtime)."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from typing import Callable, Iterator

from . import _clients, _core
from ._builtins import BOOT_FN_ID
from ._config import Config
from ._errors import ConfigError, MpopError, RegistryError, ShutdownError
from ._hooks import startup_error
from ._output import OwnerSide, log_levels
from ._registry import FIRST_AUTO_ID, Handler, Registry
from ._router import ResultRouter
from ._stats import timing_percentiles

__all__ = ["Runtime", "Lifecycle", "MAX_TSK_ID"]

log = logging.getLogger("mpop")

MAX_TSK_ID = 0xFFFFFFFF  # labels are 32-bit

_cleaned = False


def _cleanup_dead_owners_once() -> None:
    """The first app of a process removes segments left by owners that died (API.md: "the
    next start cleans up after a dead owner")."""
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    try:
        from ._cleanup import remove_dead_segments

        remove_dead_segments()
    except Exception as e:  # never let housekeeping stop an app from starting
        log.debug("cleanup of dead owners' segments failed: %r", e)


class Runtime:
    """The native objects of one app (see the module's docstring). Nothing here refers to
    the app: an app nobody holds is freed at once, and its finalizer closes this."""

    def __init__(self, config: Config, registry: Registry, labels: Iterator[int],
                 hooks: bytes | None = None, side: OwnerSide | None = None, attach_to: str | None = None) -> None:
        """`hooks`: the app's worker hooks (_hooks.pack); `side`: where the workers'
        output, log records and worker_exit values go; `attach_to`: the segment of a
        running persistent pool to attach to (mpop.attach) instead of creating one."""
        c = config
        _cleanup_dead_owners_once()
        self.attached = attach_to is not None
        if self.attached:
            self.segment = _core.Segment.attach(attach_to)
        else:
            if c.persistent:
                from ._persistent import find_pools

                live = find_pools(c.name)
                if live:
                    raise ConfigError(f"a persistent pool named {c.name!r} is already running (segment "
                                      f"{live[0]}); stop it (python -m mpop shutdown {c.name}) or choose another "
                                      f"name")
            self.segment = _core.Segment.create(
                c.name, c.layout, c.queue_slots, max(c.queue_slots, 1024), c.scale_limit,
                # a claim never takes more than the ring holds: size local queues to match
                min(c.worker_batch_size, c.queue_slots), c.pool_bytes, c.registry_bytes, debug=c.debug,
                debug_delay=c.debug_delay, max_performance=c.max_performance,
                max_tasks_per_worker=c.max_tasks_per_worker or 0, max_worker_memory=c.max_worker_memory or 0,
                max_clients=_clients.MAX_CLIENTS if c.persistent else 0,
                client_slots=_clients.CLIENT_SLOTS if c.persistent else 0,
                orphan_timeout=c.orphan_timeout if c.persistent else 0.0)
        self.config = config
        self.registry = registry
        # A persistent pool's handle is one of its clients: its own seqs, its results
        # through its mailboxes (see _clients).
        self.client: int | None = None
        self.lease = 0  # the client record's lease while this handle holds it
        self.adopted: dict[int, int] = {}  # adopted client record -> its lease
        self.plain_source = plain_source = None
        if c.persistent:
            try:
                self.client = _clients.claim(self.segment)
                self.lease = self.segment.client_lease(self.client)
            except BaseException:
                self.segment.leave()
                raise
            self.producer = _core.Producer(self.segment, self.client)
            self.collector = _core.Collector(self.segment, self.client, plain=False, track=True,
                                             first_seq=self.producer.first_seq)
            self.plain_source = plain_source = _core.Collector(self.segment, self.client, plain=True, track=False)
        else:
            self.producer = _core.Producer(self.segment)
            self.collector = _core.Collector(self.segment)
        self.supervisor = None
        self.pool = None  # a persistent pool's supervisor process (_persistent.PoolProcess)
        self.forkserver = None
        self.written: set[int] = set()  # fn_ids whose handlers are in this segment's registry
        self.closed = False
        self.failed = False  # the workers could not start (check_workers raised)
        self.error: MpopError | None = None  # what check_workers raises until the next start
        self.inherited = False  # a fork() child's copy of its parent's runtime (see abandon)
        if self.attached:
            from ._persistent import read_boot

            self.boot = read_boot(self.segment)
        else:
            self.boot = {"sys_path": [p for p in sys.path if p], "handler_module": c.handler_module,
                         "cpu_affinity": c.cpu_affinity, "debug": c.debug, "hooks": hooks,
                         "log_levels": log_levels(), "persistent": c.persistent,
                         "supervisor": {"max_retries": c.max_retries, "task_timeout": c.task_timeout},
                         "client": c.client_settings() if c.persistent else None}
            self.segment.write_registry(BOOT_FN_ID, pickle.dumps(self.boot, protocol=5))
        # The producer's count, not a closure over the runtime: nothing the router holds
        # may lead back to the runtime (see close).
        self.router = ResultRouter(
            self.collector, registry.name_of, max_retries=c.max_retries, task_timeout=c.task_timeout,
            keep_timings=not c.max_performance, debug=c.debug and not c.max_performance,
            submitted=functools.partial(getattr, self.producer, "submitted"))
        r = self.router
        r.side = side
        r.check = weakly(self.check_workers)
        if plain_source is not None:
            r.add_plain_source(plain_source)
        if self.attached:
            # What the pool's log already holds needs no second record; this client's own
            # handlers get ids from a range of its own.
            logged, _ = self.segment.read_registry(0)
            self.logged = {fn_id: blob for fn_id, blob in logged}
            registry.reserve_auto_ids(FIRST_AUTO_ID + (self.client << 20), self.logged)
            self.adopt()
        self.fast = _core.fast_path(self.producer, labels, MAX_TSK_ID)  # armed while workers run
        self.fast.bind(r.futures, r.early, r.register_future, r.future_cls, self.check_workers)
        try:
            for h in registry.handlers(internal=True):
                self.write_handler(h)
        except BaseException:
            self.close()  # e.g. a handler that cannot be pickled: the next call starts afresh
            raise

    # -- handlers ---------------------------------------------------------------------------

    def write_handler(self, h: Handler, arm: bool = True) -> None:
        """Puts `h` into the segment's handler log (once), and lets calls of its function
        take the native fast path (`arm`)."""
        if h.fn_id in self.written:
            return
        try:
            blob = h.spec()
        except Exception as e:
            raise RegistryError(f"handler {h.name!r} cannot be sent to workers: {e!r}") from e
        if self.attached and self.logged.get(h.fn_id) == blob:  # the pool has it already
            self.written.add(h.fn_id)
            if arm:
                self.arm_fast_path(h)
            return
        try:
            self.segment.write_registry(h.fn_id, blob)
        except ValueError as e:
            raise RegistryError(str(e).removeprefix("mpop: ")) from None
        self.written.add(h.fn_id)
        if arm:
            self.arm_fast_path(h)

    def arm_fast_path(self, h: Handler) -> None:
        # Calls of the function itself may now take the native path, which does what
        # resolve() and check_args() do for them: the argument count is all it checks.
        if not h.slot_mode and not h.needs_kw and self.registry.resolves_directly(h):
            self.fast.add(h.fn, h.fn_id, h.min_pos, -1 if h.max_pos == float("inf") else int(h.max_pos))

    def replace_handler(self, h: Handler, old: Handler) -> None:
        """`h` registered again under its fn_id, replacing `old`. The new record first, then
        the epoch: a worker that sees the epoch move drops what it loaded and reads the log
        again, and every task enqueued after this call is claimed after the bump. Only then
        may calls take the fast path."""
        self.fast.discard(old.fn)
        self.written.discard(h.fn_id)
        self.write_handler(h, arm=False)
        self.segment.bump_registry_epoch()
        self.arm_fast_path(h)

    # -- workers ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the supervisor runs (the workers are started or starting)."""
        if self.pool is not None:
            return self.pool.alive()
        return self.supervisor is not None and self.supervisor.running

    def start(self, workers: int) -> None:
        """Starts the supervisor and `workers` workers, and the feeding of the backlog."""
        c = self.config
        levels = log_levels()  # workers take the owner's logging levels as they are now
        if levels != self.boot["log_levels"]:
            self.boot["log_levels"] = levels
            self.segment.write_registry(BOOT_FN_ID, pickle.dumps(self.boot, protocol=5))
        if c.persistent:
            self._start_pool(workers)
            return
        argv, env = self.worker_command()
        entry = None
        if c.start_method == "fork":
            from ._worker import forked_main

            entry = functools.partial(forked_main, self.segment.name)
        elif c.start_method == "forkserver":
            if self.forkserver is None:
                from ._worker import ForkServer

                self.forkserver = ForkServer(self.segment.name, argv[:-1])
            entry = self.forkserver.spawn
        self.failed, self.error = False, None
        sup = _core.Supervisor(self.segment, workers, c.max_retries, float(c.task_timeout or 0.0),
                               c.start_method, argv, env, entry)
        try:
            sup.start()
        except RuntimeError as e:
            if self.forkserver is not None:
                self.forkserver.close()
            self.failed = True
            err = startup_error(str(e))
            raise err from err.__cause__  # the worker's traceback, if it sent one
        self.supervisor = sup
        self.producer.start_feeding()
        self.router.start_background()
        self.fast.armed = True

    def _start_pool(self, workers: int) -> None:
        """start() of a persistent pool: its supervisor process, which owns the segment from
        then on (and removes it when the pool stops); for an attached handle, the one that
        runs."""
        from ._persistent import PoolProcess

        self.failed, self.error = False, None
        try:
            if self.attached:
                self.pool = PoolProcess.current(self.segment)
            else:
                self.pool = PoolProcess.launch(self.segment, workers)
        except MpopError:
            self.failed = True
            raise
        self.segment.set_unlink_on_close(False)
        self.producer.start_feeding()
        self.router.start_background()
        self.fast.armed = True

    def worker_command(self) -> tuple[list[str], list[str]]:
        """The argv (without worker id and generation) and environment of a spawned worker."""
        from ._worker import spawn_command

        return spawn_command(self.segment.name)

    def check_workers(self) -> None:
        """Raises MpopError (after stopping the workers) when they cannot run: e.g. every
        attempt to start one failed; WorkerInitError when an initializer raised. Every
        check raises it until the workers are started again, and the futures waiting then
        fail with it (a wait() or as_completed() that never checks would wait for ever)."""
        if self.error is not None:
            raise self.error
        failure = self._failure()
        if failure is None:
            return
        self.stop_workers(graceful=False)
        self.failed = True
        self.error = failure()
        self.router.fail_all(failure)
        raise self.error

    def _failure(self) -> Callable[[], MpopError] | None:
        """What makes the error of workers that cannot run (each call a new exception),
        or None while they can."""
        if self.pool is not None:
            if self.pool.alive():
                return None
            return None if self._recover_pool() else self.pool.error
        sup = self.supervisor
        if sup is not None and sup.last_error:
            text = sup.last_error
            return lambda: startup_error(text)
        return None

    def _recover_pool(self) -> bool:
        """A persistent pool's supervisor process died while this handle was attached: a
        new one adopts the workers that run (they wait orphan_timeout for it). True once
        one runs."""
        from ._persistent import PoolProcess

        if any(w["start_error"] for w in self.segment.workers_status()):
            return False  # the workers cannot start: nothing to adopt
        try:
            self.pool = PoolProcess.current(self.segment)
        except MpopError as e:
            log.debug("could not start a new supervisor for %s: %r", self.segment.name, e)
            return False
        return True

    def stop_workers(self, graceful: bool, timeout: float = 10.0) -> None:
        """Stops the supervisor and its workers (gracefully: after their local queues). A
        Ctrl-C during a graceful stop kills them, then is raised."""
        self.fast.armed = False  # calls take the Python path, which restarts workers
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.stop(graceful, timeout)
            return
        sup, self.supervisor = self.supervisor, None
        if sup is not None:
            try:
                sup.stop(graceful, timeout)
            finally:
                # The fork server dies with the supervisor's thread: a later start makes a
                # new one.
                if self.forkserver is not None:
                    self.forkserver.close()

    def queue_status(self) -> dict:
        """status()["queue"]: the rings, the backlog, the counts and the supervisor's
        counters, and percentiles of the latest results' timings."""
        q = dict(self.segment.queue_status())
        q["backlog"] = self.producer.backlog
        q["submitted"] = self.producer.submitted
        q["finished"] = self.router.finished
        q["in_flight"] = q["submitted"] - q["finished"]
        q.update(self.counters())
        timings = list(self.router.timings)  # the latest results, of every kind
        if timings:
            q.update(timing_percentiles((t[0] for t in timings), (t[1] for t in timings)))
        return q

    def counters(self) -> dict:
        """The supervisor's counters (crashes, retries, ...), or {} when it is stopped."""
        return self.supervisor.counters() if self.supervisor is not None else {}

    def scale(self, n: int) -> None:
        if self.pool is not None:
            raise MpopError("scale() of a persistent pool is not supported yet: its supervisor process "
                            "takes the worker count at start()")
        if self.supervisor is not None:
            self.supervisor.scale(n)

    def kill_worker(self, worker_id: int) -> bool:
        if self.pool is not None:  # the supervisor process sees it die and replaces it
            for w in self.segment.workers_status():
                if w["id"] == worker_id and w["live"] and w["state"] != "exiting" and w["pid"]:
                    os.kill(w["pid"], signal.SIGKILL)
                    return True
            return False
        return self.supervisor is not None and self.supervisor.kill_worker(worker_id)

    def kill_task(self, seq: int) -> bool:
        """Kills the worker running task `seq` (the supervisor posts the task as cancelled);
        False when no worker runs it. A persistent pool's client asks the supervisor
        process through the worker's record; it acts on its next round (within 0.25 s)."""
        if self.supervisor is not None:
            return self.supervisor.kill_task(seq)
        return self.client is not None and self.segment.request_kill(seq)

    def cancel_pending(self, everyone: bool = False) -> int:
        """Cancels every task no worker has started: those in the backlog and the ring, and
        (through the cancel horizon) those in workers' local queues. Returns how many were
        taken out of the backlog and the ring. A persistent pool's client cancels only its
        own tasks, through its own cancel horizon (the workers end those they take as
        cancelled: the count is of its backlog's only), unless `everyone` (the pool is being
        stopped): then the pool's horizon takes every client's."""
        if self.client is None:
            self.segment.cancel_below(self.producer.last_seq + 1)
        elif everyone:
            self.segment.cancel_below(2**64 - 1)
        cancelled = self.producer.cancel_queued(only_own=self.client is not None)
        if self.client is None:  # a client's come back through its mailbox
            for seq, tsk_id, fn_id, route in cancelled:
                self.router.deliver_cancellation(seq, tsk_id, fn_id, route)
        return len(cancelled)

    def own_plain_pending(self) -> bool:
        """Whether this handle's own plain mailbox holds a result."""
        return self.plain_source is not None and self.plain_source.has_published

    def adopt(self) -> None:
        """Takes over the results of the pool's clients that are gone (see _clients): they
        come out of this handle's results()."""
        for i, lease in _clients.adopt(self.segment, self.client):
            self.adopted[i] = lease
            # Only while the record stays gone under that lease (nobody freed and took it)
            held = functools.partial(_lease_is, self.segment, i, lease)
            self.router.add_plain_source(_core.Collector(self.segment, i, plain=True, track=False), i, held)
            self.router.add_plain_source(_core.Collector(self.segment, i, plain=False, track=False), i, held)

    def adopted_settled(self) -> bool:
        """Whether every adopted client's results were handed out; frees their records."""
        for i, lease in list(self.adopted.items()):
            info = self.segment.client_info(i)
            if info["lease"] != lease or _clients.settled(info):
                self.router.drop_plain_sources(i)
                del self.adopted[i]
                self.segment.release_client(i, lease, False)
        return not self.adopted

    def release_client(self) -> None:
        """This handle lets go of its client record: gone while results of its tasks are
        still due or waiting (the next client to attach gets them), free otherwise."""
        if self.client is None:
            return
        # Settled as this handle knows it: every task's result (or its acknowledgement) came
        # through its live mailbox, and none waits in its plain one. (The forwarder records
        # what it forwarded only after the handover.)
        r = self.router
        settled = r.complete_below > self.producer.last_seq and not self.own_plain_pending()
        i, self.client = self.client, None
        try:
            self.segment.release_client(i, self.lease, not settled)
        except Exception as e:  # the segment may be gone with the pool
            log.debug("could not release client record %s: %r", i, e)

    # -- the end ----------------------------------------------------------------------------

    def abandon(self) -> None:
        """In a fork() child: this runtime is the parent's. The child never stops, closes or
        drains it (the native objects' destructors leave it alone too); calls raise."""
        self.inherited = True
        self.fast.armed = False
        self.router.inherited = True

    def close(self) -> None:
        """Stops everything at once and releases the segment (idempotent). A running
        persistent pool is not stopped: this handle lets go of it (detach)."""
        if self.closed or self.inherited:
            return
        if self.pool is not None and self.pool.alive():
            self.detach()
            return
        self.closed = True
        self.fast.armed = False
        # First the result thread: at interpreter exit a daemon thread still inside native
        # code would be killed while retaking the GIL, which aborts the process.
        self.router.stop_background()
        self.release_client()
        # No future stays pending (it would also keep the router alive: a future's class
        # refers to it).
        self.router.fail_all(lambda: ShutdownError("the app was shut down before this task finished"))
        self.producer.close()
        self.segment.set_shutdown()
        try:
            self.stop_workers(graceful=False, timeout=2.0)
        finally:  # even after a Ctrl-C there (the workers are gone by then)
            self._release()

    def detach(self) -> None:
        """Lets go of a running persistent pool: its workers, queued tasks and results stay;
        this process's futures still pending fail with ShutdownError. Tasks still in this
        process's backlog (the ring was full) are handed to the ring first."""
        while self.producer.backlog and self.pool.alive():
            time.sleep(0.005)
        self.closed = True
        self.fast.armed = False
        self.router.stop_background()
        self.router.fail_all(lambda: ShutdownError("this handle detached from its persistent pool before "
                                                   "this task finished"))
        self.producer.close()
        self.pool = None
        self.release_client()
        self._release()

    def _release(self) -> None:
        if self.forkserver is not None:
            self.forkserver.close()
        self.segment.leave()
        # Let go of every Python object the native ones hold (the router's futures dict,
        # future class and bound methods), so that nothing keeps the router, and through it
        # the unlinked segment's mapping, alive after shutdown: futures the caller keeps
        # refer to the router through their class.
        self.router.release()
        self.fast.release()


class Lifecycle:
    """An app's hold on its Runtime: creates it on first use (under a lock), knows whether
    the app was shut down or inherited through fork(), and raises accordingly."""

    def __init__(self, config: Config, registry: Registry, labels: Iterator[int],
                 hooks: bytes | None = None, attach_to: str | None = None) -> None:
        """`attach_to`: the segment of a running persistent pool to attach to (mpop.attach)."""
        self.config = config
        self.registry = registry
        self.labels = labels
        self.hooks = hooks
        self.exit_results: list = []  # worker_exit values, across runtimes
        self.side = OwnerSide(self.exit_results)
        self.runtime: Runtime | None = None
        # Shared with the app's finalizer, which closes what it holds at garbage collection
        # or interpreter exit without keeping the app alive.
        self.runtime_ref: list = [None]
        self.shut_down = False
        self.detached = False
        self.inherited = False
        self.owner_pid = os.getpid()
        self.workers = config.workers  # the live target (scale() changes it)
        self.started_at: float | None = None
        self.lock = threading.RLock()
        self.attach_to = attach_to

    def check_owner(self) -> None:
        if self.inherited:
            raise MpopError(f"this MpopApi belongs to process {self.owner_pid}; process {os.getpid()} "
                            f"inherited it through fork() and cannot use it: create a new MpopApi here")

    def check_open(self) -> None:
        self.check_owner()
        if self.detached:
            raise ShutdownError("this MpopApi detached from its persistent pool; the pool runs on")
        if self.shut_down:
            raise ShutdownError("this MpopApi was shut down; create a new one")

    def ensure(self) -> Runtime:
        """The runtime, created now if there is none."""
        rt = self.runtime
        if rt is not None:
            return rt
        with self.lock:
            if self.runtime is None:
                self.check_open()
                rt = Runtime(self.config, self.registry, self.labels, self.hooks, self.side, self.attach_to)
                self.runtime_ref[0] = rt
                self.runtime = rt  # published last: with the router and handlers in place
            return self.runtime

    @property
    def running(self) -> bool:
        rt = self.runtime
        return rt is not None and rt.running

    def start(self) -> Runtime:
        """Starts the workers (idempotent) and returns the runtime."""
        self.check_open()
        rt = self.ensure()
        with self.lock:
            if not rt.running:
                rt.start(self.workers)
                if self.started_at is None:
                    self.started_at = time.monotonic()
        return rt

    def stop_workers(self, graceful: bool = True) -> None:
        """Stops the workers; the runtime stays for a later start()."""
        rt = self.runtime
        if rt is None:
            return
        with self.lock:
            rt.stop_workers(graceful)
            rt.producer.pause_feeding()
            rt.router.drain_rest()  # the retired workers' last output and exit values

    def detach(self) -> None:
        """MpopApi.detach (see there)."""
        self.check_open()
        if not self.config.persistent:
            raise MpopError("detach() is for persistent pools (MpopApi(persistent=True, name=...))")
        with self.lock:
            rt = self.runtime
            self.detached = self.shut_down = True
            if rt is not None:
                rt.close()  # a running pool is let go; one never started is removed
                self.runtime = None
                self.runtime_ref[0] = None

    def disown(self) -> None:
        """In a fork() child, for every app it inherited (see MpopApi)."""
        self.inherited = True
        if self.runtime is not None:
            self.runtime.abandon()

    def shutdown(self, wait: bool, cancel_pending: bool, wait_all: Callable[[], bool]) -> None:
        """MpopApi.shutdown (see there); `wait_all()` waits for every task enqueued."""
        if self.shut_down:
            return
        if self.inherited:  # a fork() child's copy: the parent's to stop, not ours
            self.shut_down = True
            return
        rt = self.runtime
        graceful = wait
        try:
            if rt is not None:
                if cancel_pending:
                    rt.cancel_pending()
                if rt.failed:
                    rt.cancel_pending()  # the workers could not start: end the rest, do not retry
                elif wait and rt.producer.submitted != rt.router.finished:
                    try:
                        wait_all()
                    except MpopError:
                        rt.cancel_pending()  # the workers cannot run (fail to start): end the rest
        except BaseException:
            graceful = False  # a Ctrl-C while waiting: stop now, without waiting for tasks
            raise
        finally:
            self.shut_down = True
            if rt is not None:
                self._stop(rt, graceful)

    def _stop(self, rt: Runtime, graceful: bool) -> None:
        rt.router.stop_background()
        try:
            rt.stop_workers(graceful=graceful, timeout=10.0 if graceful else 2.0)
            rt.router.drain_rest()  # the retired workers' last output and exit values
        finally:  # a Ctrl-C during a graceful stop is raised once the workers are gone
            rt.close()
            self.runtime = None
            self.runtime_ref[0] = None

    def status(self, config: dict) -> dict:
        """MpopApi.status, with `config` as its "config" part."""
        self.check_owner()
        rt = self.runtime
        queue: dict = {"capacity": self.config.queue_slots, "queued": 0, "backlog": 0,
                       "submitted": 0, "finished": 0, "in_flight": 0}
        workers: list = []
        if rt is not None:
            queue.update(rt.queue_status())
            workers = rt.segment.workers_status()
        config["segment"] = rt.segment.name if rt is not None else None
        config["running"] = self.running
        out = {"config": config, "queue": queue, "workers": workers}
        if self.config.persistent:
            pool = rt.pool if rt is not None else None
            out["supervisor"] = {"pid": pool.pid if pool is not None else None,
                                 "alive": pool is not None and pool.alive()}
            out["clients"] = _clients.describe(rt.segment) if rt is not None else []
            out["client"] = rt.client if rt is not None else None
        return out


def _lease_is(segment, index: int, lease: int) -> bool:
    return segment.client_lease(index) == lease


def weakly(method: Callable) -> Callable[..., None]:
    """`method` called through a weak reference to its object (a no-op once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: object) -> None:
        m = ref()
        if m is not None:
            m(*args)

    return call


def finalize(runtime_ref: list) -> None:
    """An app's finalizer: closes its runtime if it still has one."""
    if runtime_ref and runtime_ref[0] is not None:
        runtime_ref[0].close()
