"""When the owning process dies, even by SIGKILL, its workers exit promptly and the last one
out removes the shared-memory segment; `python -m mpop cleanup` removes leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mpop

REPO = Path(__file__).resolve().parents[1]

OWNER = textwrap.dedent("""
    import os, signal, sys, time
    import mpop

    def slow(x):
        time.sleep(x)
        return x

    app = mpop.MpopApi(workers=2, auto_terminate=False, start_method=sys.argv[1])
    app.start()
    app.submit(slow, 0.01).result()
    app.submit(slow, 60)  # one worker stays inside a long handler
    time.sleep(0.3)
    pids = [w["pid"] for w in app.status()["workers"]]
    print(app.segment_name, *pids, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(mpop.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_owner_sigkill_workers_exit_and_segment_removed(tmp_path, method):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    proc = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    name, *pids = proc.stdout.split()
    died_at = time.monotonic()
    while time.monotonic() - died_at < 2.0 and not all(_gone(int(p)) for p in pids):
        time.sleep(0.02)
    assert all(_gone(int(p)) for p in pids), "workers outlived their owner by 2 s"
    while time.monotonic() - died_at < 3.0 and os.path.exists(f"/dev/shm/{name}"):
        time.sleep(0.02)
    assert not os.path.exists(f"/dev/shm/{name}")
    assert "resource_tracker" not in proc.stderr


def test_exit_without_shutdown_leaves_nothing(tmp_path):
    script = tmp_path / "forget.py"
    script.write_text(textwrap.dedent("""
        import mpop
        app = mpop.MpopApi(workers=2, auto_terminate=False)
        print(app.submit(pow, 2, 10).result(), app.segment_name,
              *[w["pid"] for w in app.status()["workers"]], flush=True)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    value, name, *pids = proc.stdout.split()
    assert value == "1024"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not all(_gone(int(p)) for p in pids):
        time.sleep(0.02)
    assert all(_gone(int(p)) for p in pids)
    assert not os.path.exists(f"/dev/shm/{name}")
    assert proc.stderr == ""


LEAK = textwrap.dedent("""
    import os, signal, mpop
    app = mpop.MpopApi(workers=1)
    app.enqueue(pow, args=(2, 3))
    print(app.segment_name, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _leak_a_segment(tmp_path) -> str:
    # An owner killed before its workers start leaves its segment behind (no worker exists
    # to remove it).
    script = tmp_path / "leak.py"
    script.write_text(LEAK)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(),
                          timeout=60)
    name = proc.stdout.split()[0]
    assert os.path.exists(f"/dev/shm/{name}")
    return name


def test_cleanup_removes_segments_of_dead_owners_only(tmp_path):
    with mpop.MpopApi(workers=1) as live:
        live.enqueue(pow, args=(2, 3))
        live_name = live.segment_name
        dead_name = _leak_a_segment(tmp_path)
        out = subprocess.run([sys.executable, "-m", "mpop", "cleanup"], capture_output=True, text=True,
                             env=_env(), timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"removed {dead_name}" in out.stdout
        assert f"kept    {live_name}" in out.stdout
        assert not os.path.exists(f"/dev/shm/{dead_name}")
        assert os.path.exists(f"/dev/shm/{live_name}")
        assert live.run().values() == [8]


def test_next_start_cleans_up_after_a_dead_owner(tmp_path):
    dead_name = _leak_a_segment(tmp_path)
    script = tmp_path / "next.py"
    script.write_text("import mpop\nwith mpop.MpopApi(workers=1) as app:\n"
                      "    app.enqueue(pow, args=(2, 5))\n    print(app.run().values())\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(),
                          timeout=60)
    assert proc.stdout.strip() == "[32]", proc.stderr
    assert not os.path.exists(f"/dev/shm/{dead_name}")


def test_cleanup_leaves_a_segment_still_being_created_alone():
    # Its creator writes the magic number last, so a sweep that runs meanwhile (another
    # process's start-up, `mpop cleanup`) does not take a half-written header for a dead
    # owner's segment.
    from mpop import _cleanup

    name = f"mpop-creating{os.getpid()}"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.write(b"\0" * 65536)  # sized, header not yet written
    try:
        assert name not in _cleanup.segments()
        assert name not in _cleanup.remove_dead_segments()
        assert os.path.exists(path)
    finally:
        os.unlink(path)
