"""mpop.joblib: a joblib backend, so that joblib.Parallel (and scikit-learn's n_jobs) runs
on mpop workers.

    import joblib, mpop.joblib
    mpop.joblib.register_backend()                   # as "mpop"
    with joblib.parallel_config(backend="mpop", n_jobs=4):
        joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

Each batch joblib makes (a BatchedCalls) is one mpop task, submitted as a future; its done
callback hands the result to joblib. The app lives as long as the backend instance: every
Parallel call under one parallel_config reuses it, and it is shut down when that instance
is discarded or at interpreter exit. Importing this module imports joblib; ``import mpop``
does not import this module."""

from __future__ import annotations

import os
import sys
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable

import joblib
from joblib._parallel_backends import AutoBatchingMixin, FallbackToBackend, ParallelBackendBase, SequentialBackend

from ._api import MpopApi
from ._builtins import with_state
from ._config import available_cpus
from ._errors import ConfigError

__all__ = ["MpopBackend", "register_backend"]

# What Parallel passes to configure() for joblib's own process backends (memmapping of
# large arrays, a multiprocessing context): mpop sends arguments through its own shared
# argument pool and starts its workers its own way, so these are accepted and not used.
_JOBLIB_POOL_KWARGS = frozenset({"max_nbytes", "temp_folder", "mmap_mode", "prefer", "require", "verbose",
                                 "context", "idle_worker_timeout"})


def register_backend(name: str = "mpop", make_default: bool = False) -> None:
    """Registers MpopBackend with joblib under `name`, so that
    ``joblib.parallel_config(backend=name, n_jobs=N, **options)`` (and
    ``Parallel(backend=name)``) runs on mpop; `options` are MpopApi parameters (see
    MpopBackend). `make_default`: also make it joblib's default backend. Idempotent.
    Raises TypeError when `name` is not a non-empty string."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_backend(name=...) needs a non-empty string, got {name!r}")
    joblib.register_parallel_backend(name, MpopBackend, make_default=make_default)


def run_batch(batch: Callable[[], list]) -> list:
    """The handler every joblib batch runs as, in a worker: calls the BatchedCalls (its
    exception, if one of its calls raises, is the task's)."""
    return batch()


def limit_threads(env: dict, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    """The worker initializer of an MpopBackend app: sets the thread-limiting environment
    variables joblib gives its own workers (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, ...) for
    the libraries loaded from now on, limits through threadpoolctl the ones this worker
    has loaded already (a forked worker inherits its owner's), then runs the user's
    `initializer(*initargs)`, if any."""
    os.environ.update(env)
    limit = env.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and any(m in sys.modules for m in ("numpy", "scipy", "sklearn", "torch")):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # without threadpoolctl, only libraries loaded later are limited
            pass
        else:
            threadpool_limits(limits=int(limit))
    if initializer is not None:
        with_state(initializer)(*initargs)


class MpopBackend(AutoBatchingMixin, ParallelBackendBase):
    """A joblib parallel backend that runs each batch of calls as an mpop task.

    ``MpopBackend(**options)``: `options` are MpopApi parameters for the app (any of them
    but `workers`, which is the Parallel call's n_jobs; `auto_terminate` is always False;
    `worker_batch_size` defaults to 1, each worker taking one batch at a time as joblib
    expects).
    joblib passes them from ``parallel_config(backend="mpop", **options)``; a bad value
    raises ConfigError when the first Parallel call starts the app. `nesting_level` and
    `inner_max_num_threads` are joblib's: the latter sets the BLAS/OpenMP threads each
    worker may use (default: CPUs // n_jobs, unless the variable is set in this process,
    as joblib's own process backends do).

    - n_jobs -1 or None: the CPUs this process may use; -2 one fewer, and so on. n_jobs=1
      runs the calls in this process (joblib's sequential backend), as joblib's process
      backends do.
    - One app per backend instance, started by the first Parallel call and reused by the
      calls after it that ask for as many workers (a call with another n_jobs replaces it).
      It is shut down when the instance is discarded (leaving the parallel_config block
      that made it, once nothing else refers to it) or at interpreter exit.
    - A call's exception is raised in the caller as itself (the handler's type and
      message, with the worker's traceback as ``__cause__``). When joblib aborts a call
      (a batch raised, or a generator was abandoned), its batches still queued are
      cancelled and those running are stopped (their workers are replaced).
    - Nested Parallel calls inside a task use joblib's threads backend one level deep, then
      run sequentially (joblib's rule for process backends)."""

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    supports_timeout = True
    uses_threads = False
    supports_sharedmem = False
    default_n_jobs = -1  # Parallel() without n_jobs: every CPU this process may use

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 **options: Any) -> None:
        if "workers" in options:
            raise ConfigError("MpopBackend takes its workers from n_jobs, not from workers=")
        options.pop("auto_terminate", None)
        # joblib keeps about two batches a worker in flight (pre_dispatch): a worker that
        # claimed several at once would run them one after another while another idles.
        options.setdefault("worker_batch_size", 1)
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self.options = options
        self.parallel = None
        self._app: MpopApi | None = None
        self._app_jobs = 0
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()
        self._in_flight: set[Future] = set()  # this call's batches not done yet

    @property
    def app(self) -> MpopApi | None:
        """The MpopApi running this backend's batches (None before the first Parallel call,
        and after terminate_app())."""
        return self._app

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many workers `n_jobs` means: -1 or None every CPU this process may use, -2
        one fewer, ...; at least 1. Raises ValueError for 0, as joblib does."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return available_cpus()
        if n_jobs < 0:
            return max(available_cpus() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: str | None = None,
                  require: str | None = None, **backend_kwargs: Any) -> int:
        """Called by Parallel at the start of a call: starts the app for `n_jobs` workers (or
        keeps the one that has as many) and returns the number of workers. Falls back to
        joblib's sequential backend for one worker. Raises ConfigError for bad options and
        TypeError for a keyword neither joblib's nor mpop's."""
        unknown = set(backend_kwargs) - _JOBLIB_POOL_KWARGS
        if unknown:
            raise TypeError(f"MpopBackend.configure() got unexpected keyword(s): {', '.join(sorted(unknown))}")
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        if self._app is None or self._app_jobs != n:
            self.terminate_app()
            self._start_app(n)
        return n

    def _start_app(self, n: int) -> None:
        options = dict(self.options)
        init = (self._prepare_worker_env(n), options.pop("initializer", None), tuple(options.pop("initargs", ())))
        app = MpopApi(workers=n, auto_terminate=False, initializer=limit_threads, initargs=init, **options)
        try:
            app.start()
        except BaseException:
            app.shutdown(wait=False)
            raise
        self._app, self._app_jobs = app, n
        # The app goes with this instance: weakref.finalize also runs at interpreter exit.
        self._finalizer = weakref.finalize(self, _discard, app)

    def submit(self, func: Callable[[], list], callback: Callable[[Future], Any] | None = None) -> Future:
        """Runs one batch (`func`, a joblib BatchedCalls) as a task; `callback(future)` is
        called when it is done. Returns the task's future. Raises RuntimeError when no
        Parallel call configured the backend, ValueError (naming pool_bytes) for a batch
        larger than the app's argument pool, and what MpopApi.submit raises."""
        app = self._app
        if app is None:
            raise RuntimeError("MpopBackend.submit() before configure(): joblib.Parallel starts the backend")
        try:
            fut = app.submit(run_batch, func)
        except ValueError as e:
            raise ValueError(f"a joblib batch does not fit mpop's argument pool: {e}; with joblib, e.g. "
                             f"joblib.parallel_config(backend='mpop', pool_bytes=1 << 30)") from e
        with self._lock:
            self._in_flight.add(fut)
        fut.add_done_callback(self._forget)
        if callback is not None:
            fut.add_done_callback(callback)
        return fut

    apply_async = submit  # joblib before 1.5 calls apply_async

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._in_flight.discard(fut)

    def retrieve_result_callback(self, out: Future) -> list:
        """The batch's results (a list), or its exception raised: the call's own."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """joblib gave up on the current call: its queued batches are cancelled and its running
        ones stopped (their workers replaced), so that the app is free for the next call.
        The app stays up either way (`ensure_ready` is joblib's, and is always met)."""
        app = self._app
        with self._lock:
            outstanding = list(self._in_flight)
            self._in_flight.clear()
        for fut in outstanding:
            if not fut.cancel() and app is not None and not fut.done():
                app.kill_task(fut)

    def terminate(self) -> None:
        """The end of a Parallel call: the app stays up for the next call (see the class);
        the auto-batching statistics start afresh."""
        self.parallel = None  # no cycle Parallel <-> backend keeps the app alive
        self.reset_batch_stats()

    def terminate_app(self) -> None:
        """Shuts the app down now (a later Parallel call starts a new one). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._app = None
        self._app_jobs = 0


def _discard(app: MpopApi) -> None:
    """Shuts down the app of a discarded backend: its calls are over, so what is still
    queued is cancelled and the workers are stopped without waiting. The results thread of
    that app cannot stop itself: when the backend happens to be freed there, another thread
    does it."""
    if threading.current_thread().name == "mpop-results":
        threading.Thread(target=_discard, args=(app,), name="mpop-joblib-discard").start()
        return
    app.shutdown(wait=False, cancel_pending=True)
