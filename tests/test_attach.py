"""Clients of a persistent pool: mpop.attach(name) from any process, several clients at
once each receiving only its own results, and the results of clients that are gone
(detached, or killed) handed to the next client that attaches, each exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import mpop
from _helpers import REPO, env_with_pythonpath, leak_check, pid_alive, pool_name_fixture, run_python, wait_until
from mpop._core import Segment

TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


name = pool_name_fixture("mpop-atest")


@pytest.fixture
def pool(name):
    app = mpop.MpopApi(name=name, persistent=True, workers=2)
    app.start()
    yield app
    app.shutdown(wait=False)


def slow_square(x, delay=0.002):
    time.sleep(delay)
    return x * x


def tag(client, i):
    return (client, i)


def client_script(tmp_path, name: str, body: str) -> list[str]:
    """The command of a Python script that attaches to pool `name` as `app` and runs `body`
    (run_python takes its arguments without the interpreter)."""
    path = tmp_path / f"client_{uuid.uuid4().hex[:6]}.py"
    path.write_text(f"import sys, os, time\nsys.path.insert(0, {str(REPO / 'tests')!r})\nimport mpop\n"
                    f"app = mpop.attach({name!r}, timeout=30)\n" + textwrap.dedent(body))
    return [str(path)]


# -- attach -----------------------------------------------------------------------------------


def test_attach_to_an_unknown_name_raises_mpoperror_naming_it():
    with pytest.raises(mpop.MpopError, match="no live persistent pool named 'mpop-nosuch-pool'"):
        mpop.attach("mpop-nosuch-pool")


def test_attach_waits_up_to_its_timeout_for_the_pool_to_appear(name):
    t = time.monotonic()
    with pytest.raises(mpop.MpopError, match=r"waited 0.3 s"):
        mpop.attach(name, timeout=0.3)
    assert time.monotonic() - t >= 0.3


def test_attach_rejects_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match="pool name"):
        mpop.attach(None)


def test_an_attached_handle_has_the_whole_api(pool, name):
    b = mpop.attach(name)
    try:
        assert b.submit(pow, 3, 3).result(timeout=TIMEOUT) == 27
        assert list(b.map(abs, range(-3, 3))) == [3, 2, 1, 0, 1, 2]
        assert sorted(b.map(abs, range(-3, 3), ordered=False)) == [0, 1, 1, 2, 2, 3]
        for i in range(5):
            b.enqueue(slow_square, args=(i,), tsk_id=i)
        assert sorted((r.tsk_id, r.value) for r in b.results(timeout=TIMEOUT)) == [(i, i * i) for i in range(5)]
        b.enqueue(slow_square, args=(7,), tsk_id=7)
        run = b.run(timeout=TIMEOUT)
        assert [(r.tsk_id, r.value) for r in run.results] == [(7, 49)]
        b.enqueue(pow, args=(2, 5))
        assert b.wait(timeout=TIMEOUT)
        assert [r.value for r in b.results(timeout=TIMEOUT)] == [32]
        st = b.status()
        assert st["supervisor"]["alive"] and st["supervisor"]["pid"] == pool.status()["supervisor"]["pid"]
        clients = {c["index"]: c for c in st["clients"]}
        assert clients[st["client"]]["pid"] == os.getpid() and clients[st["client"]]["state"] == "attached"
        assert st["client"] != pool.status()["client"]
    finally:
        b.detach()


def test_a_function_sent_by_value_from_an_attached_client_runs(pool, name):
    b = mpop.attach(name)
    try:
        k = 5
        assert b.submit(lambda x: x + k, 1).result(timeout=TIMEOUT) == 6
        assert pool.submit(lambda x: x * k, 2).result(timeout=TIMEOUT) == 10  # the creator's own, another id
        assert b.submit(lambda x: x - k, 1).result(timeout=TIMEOUT) == -4
    finally:
        b.detach()


def test_errors_come_back_to_the_attached_client_as_themselves(pool, name):
    b = mpop.attach(name)
    try:
        with pytest.raises(ZeroDivisionError):
            b.submit(divmod, 1, 0).result(timeout=TIMEOUT)
    finally:
        b.detach()


# -- several clients ------------------------------------------------------------------------------


def test_clients_in_several_processes_each_receive_only_their_own_results(pool, name, tmp_path):
    body = """
        me = int(sys.argv[1])
        from test_attach import tag
        fs = [app.submit(tag, me, i) for i in range(3000)]
        for i in range(2000):
            app.enqueue(tag, args=(me, i), tsk_id=i)
        got = [f.result(timeout=60) for f in fs]
        assert got == [(me, i) for i in range(3000)], got[:5]
        plain = sorted(r.value for r in app.results(timeout=60))
        assert plain == [(me, i) for i in range(2000)], plain[:5]
        assert list(app.map(tag, [me] * 500, range(500))) == [(me, i) for i in range(500)]
        app.detach()
        print("ok", me)
    """
    cmd = client_script(tmp_path, name, body)
    procs = [subprocess.Popen([sys.executable, *cmd, str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env_with_pythonpath()) for k in range(4)]
    for k, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.split() == ["ok", str(k)]
    # meanwhile the creator's own work is untouched
    assert pool.submit(tag, "creator", 1).result(timeout=TIMEOUT) == ("creator", 1)


def test_client_records_are_reused_after_clients_leave(pool, name):
    from mpop._clients import MAX_CLIENTS

    for i in range(MAX_CLIENTS + 4):
        b = mpop.attach(name)
        assert b.submit(pow, i, 2).result(timeout=TIMEOUT) == i * i
        b.detach()
    assert [c["state"] for c in pool.status()["clients"]] == ["attached"]


def test_every_record_in_use_gives_a_clear_error(pool, name):
    from mpop._clients import MAX_CLIENTS

    handles = []
    try:
        for _ in range(MAX_CLIENTS - 1):
            handles.append(mpop.attach(name))
        with pytest.raises(mpop.MpopError, match=f"has {MAX_CLIENTS} client records and all are in use"):
            mpop.attach(name)
    finally:
        for h in handles:
            h.detach()
    mpop.attach(name).detach()  # free again


# -- results of clients that are gone -----------------------------------------------------------


def test_results_of_a_sigkilled_creator_reach_the_next_client_exactly_once(tmp_path, name):
    script = tmp_path / "creator.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        import mpop
        from test_attach import slow_square
        app = mpop.MpopApi(name={name!r}, persistent=True, workers=2)
        app.start()
        for i in range(300):
            app.enqueue(slow_square, args=(i,), tsk_id=i)
        futures = [app.submit(slow_square, 1000 + i) for i in range(50)]
        print(app.segment_name, flush=True)
        os.kill(os.getpid(), 9)
    """))
    proc = run_python([str(script)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    b = mpop.attach(name, timeout=10)
    try:
        got = list(b.results(timeout=TIMEOUT))
        # every enqueue()d task once; the futures nobody settled come as TaskResults too
        assert all(r.success for r in got)
        plain = sorted((r.tsk_id, r.value) for r in got if r.value < 1000 ** 2)
        assert plain == [(i, i * i) for i in range(300)]
        submitted = sorted(r.value for r in got if r.value >= 1000 ** 2)
        assert submitted == [(1000 + i) ** 2 for i in range(50)]
        assert len({r.seq for r in got}) == len(got) == 350
        assert list(b.results(timeout=1)) == []  # nothing twice
        states = {c["index"]: c["state"] for c in b.status()["clients"]}
        assert list(states.values()) == ["attached"]  # the creator's record was freed once empty
    finally:
        b.shutdown()


CLIENT_PUSH_RESERVED = 29  # FaultStep::kClientPushReserved (fault.hpp)


def mark_and_sleep(path: str, delay: float) -> int:
    with open(path, "a") as f:
        f.write("run\n")
    time.sleep(delay)
    return 1


def test_kill_task_stops_a_running_task_of_a_persistent_pool(pool, tmp_path):
    # The client asks the supervisor process through the worker's record: the worker is
    # killed and replaced, the task ends cancelled, having run once, and the pool goes on.
    marker = tmp_path / "runs"
    slow = pool.submit(mark_and_sleep, str(marker), 30.0)
    assert wait_until(lambda: marker.exists(), 20)
    pid = next(w["pid"] for w in pool.status()["workers"] if w["running_seq"])
    assert pool.kill_task(slow)
    assert slow.cancelled()
    assert marker.read_text().count("run") == 1
    assert wait_until(lambda: not pid_alive(pid), 10)
    assert [pool.submit(slow_square, i).result(timeout=TIMEOUT) for i in range(4)] == [0, 1, 4, 9]
    assert not pool.kill_task(slow)  # over


def test_a_client_killed_in_the_middle_of_a_push_does_not_stall_the_pool(pool, name, tmp_path):
    # It dies with a task cell reserved and not written. The next reaper (the supervisor,
    # every second) fills that cell with a void task, the workers move past it, and the
    # tasks the client did queue reach the next client, once each.
    body = f"""
        from test_attach import slow_square
        app._lifecycle.runtime.segment.inject_fault({CLIENT_PUSH_RESERVED}, 31)
        for i in range(40):
            app.enqueue(slow_square, args=(i,), tsk_id=i)
    """
    proc = run_python(client_script(tmp_path, name, body))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    futures = [pool.submit(slow_square, i) for i in range(50)]  # queued behind the dead cell
    assert [f.result(timeout=TIMEOUT) for f in futures] == [i * i for i in range(50)]
    b = mpop.attach(name)
    try:
        got = sorted((r.tsk_id, r.value) for r in b.results(timeout=TIMEOUT))
        assert got == [(i, i * i) for i in range(30)]  # its 31st push died reserving
        assert list(b.results(timeout=1)) == []
    finally:
        b.detach()


def test_results_finishing_after_the_next_client_attached_reach_it(pool, name, tmp_path):
    body = """
        from test_attach import slow_square
        for i in range(40):
            app.enqueue(slow_square, args=(i, 0.05), tsk_id=i)
        print(app.status()["client"], flush=True)
        os.kill(os.getpid(), 9)
    """
    proc = run_python(client_script(tmp_path, name, body))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    b = mpop.attach(name)
    try:
        # most of the 2 s of work is still to run: results() waits for it
        got = sorted((r.tsk_id, r.value) for r in b.results(timeout=TIMEOUT))
        assert got == [(i, i * i) for i in range(40)]
    finally:
        b.detach()


def test_a_detached_clients_outstanding_results_go_to_the_next_client(pool, name):
    a = mpop.attach(name)
    for i in range(20):
        a.enqueue(slow_square, args=(i, 0.01), tsk_id=i)
    a.detach()
    b = mpop.attach(name)
    try:
        assert sorted(r.tsk_id for r in b.results(timeout=TIMEOUT)) == list(range(20))
    finally:
        b.detach()


def test_a_detached_client_with_nothing_outstanding_leaves_nothing_behind(pool, name):
    a = mpop.attach(name)
    a.submit(pow, 2, 2).result(timeout=TIMEOUT)
    a.detach()
    assert [c["state"] for c in pool.status()["clients"]] == ["attached"]


# -- the pool for every client ------------------------------------------------------------------


def test_shutdown_from_an_attached_client_stops_the_pool_for_everyone(name):
    app = mpop.MpopApi(name=name, persistent=True, workers=2)
    app.start()
    segment = app.segment_name
    app.detach()
    b = mpop.attach(name)
    b.enqueue(slow_square, args=(3,))
    b.shutdown()
    assert wait_until(lambda: segment not in os.listdir("/dev/shm"), 10)
    with pytest.raises(mpop.MpopError, match="no live persistent pool"):
        mpop.attach(name)


def test_status_command_lists_the_attached_clients(pool, name):
    b = mpop.attach(name)
    try:
        out = run_python(["-m", "mpop", "status", name, "--once"])
        assert out.returncode == 0, out.stderr
        assert "clients" in out.stdout
        assert str(os.getpid()) in out.stdout
    finally:
        b.detach()


def test_a_worker_killed_mid_task_gives_each_task_one_result_through_the_forwarder(pool, name):
    b = mpop.attach(name)
    try:
        fs = [b.submit(slow_square, i, 0.01) for i in range(200)]
        assert wait_until(lambda: any(w["running_seq"] for w in b.status()["workers"]), 10)
        busy = next(w["id"] for w in b.status()["workers"] if w["running_seq"])
        assert b.kill_worker(busy)
        assert [f.result(timeout=TIMEOUT) for f in fs] == [i * i for i in range(200)]
        for i in range(50):
            b.enqueue(slow_square, args=(i, 0.0), tsk_id=i)
        assert sorted(r.tsk_id for r in b.results(timeout=TIMEOUT)) == list(range(50))
    finally:
        b.detach()


def test_a_segment_of_a_persistent_pool_stays_private_to_its_user(pool):
    mode = os.stat(f"/dev/shm/{pool.segment_name}").st_mode & 0o777
    assert mode == 0o600
    seg = Segment.attach(pool.segment_name)
    try:
        assert seg.client_count > 0
    finally:
        seg.leave()


# -- the command line ---------------------------------------------------------------------------


def test_serve_starts_a_pool_that_clients_attach_to_by_name(name, tmp_path):
    (tmp_path / "served_handlers.py").write_text(textwrap.dedent("""
        def triple(x):
            return 3 * x

        HANDLERS = {0xC000: triple}
    """))
    out = run_python(["-m", "mpop", "serve", name, "--workers", "2", "--handler-module", "served_handlers"],
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"serving persistent pool {name!r}" in out.stdout and "2 workers" in out.stdout
    body = """
        assert app.submit(0xC000, 5).result(timeout=30) == 15
        assert app.submit("triple", 2).result(timeout=30) == 6
        print("ok")
    """
    client = run_python(client_script(tmp_path, name, body), cwd=tmp_path)
    assert client.returncode == 0, client.stderr
    assert client.stdout.split() == ["ok"]
    again = run_python(["-m", "mpop", "serve", name], cwd=tmp_path)
    assert again.returncode == 1 and "already running" in again.stderr
    stop = run_python(["-m", "mpop", "shutdown", name])
    assert stop.returncode == 0, stop.stderr
    assert not [s for s in os.listdir("/dev/shm") if s.startswith(name)]
