"""The shared segment is private (0600, unguessable name), workers refuse a foreign or
mismatched segment, and a worker runs only registered fn_ids."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import mpop
from mpop import _core


def test_segment_is_0600_with_64_random_bits():
    names = set()
    for _ in range(3):
        with mpop.MpopApi(workers=1, name="sec") as app:
            app.enqueue(pow, args=(2, 2))
            name = app.segment_name
            mode = stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode)
            assert mode == 0o600
            assert re.fullmatch(r"sec_[0-9a-f]{16}", name)
            names.add(name)
            app.run()
    assert len(names) == 3


def test_attach_refuses_a_file_that_is_not_an_mpop_segment():
    path = "/dev/shm/mpop_not_a_segment_test"
    with open(path, "wb") as f:
        f.write(b"\0" * 65536)
    try:
        with pytest.raises(_core.LayoutMismatch, match="bad magic"):
            _core.Segment.attach("mpop_not_a_segment_test")
    finally:
        os.unlink(path)


def test_attach_refuses_a_layout_version_mismatch():
    with mpop.MpopApi(workers=1) as app:
        app.enqueue(pow, args=(2, 2))
        name = app.segment_name
        with open(f"/dev/shm/{name}", "r+b") as f:
            f.seek(8)
            version = f.read(4)
            f.seek(8)
            f.write((999).to_bytes(4, "little"))
        try:
            with pytest.raises(_core.LayoutMismatch, match="layout version 999"):
                _core.Segment.attach(name)
        finally:
            with open(f"/dev/shm/{name}", "r+b") as f:
                f.seek(8)
                f.write(version)
        assert app.run().values() == [4]


def test_worker_refuses_a_mismatched_segment_with_a_clear_error():
    env = dict(os.environ, PYTHONPATH=str(Path(mpop.__file__).parents[1]))
    path = "/dev/shm/mpop_bad_for_worker"
    with open(path, "wb") as f:
        f.write(b"\0" * 65536)
    try:
        proc = subprocess.run([sys.executable, "-m", "mpop._worker", "mpop_bad_for_worker", "0", "1"],
                              capture_output=True, text=True, env=env, timeout=60)
    finally:
        os.unlink(path)
    assert proc.returncode != 0
    assert "not an mpop segment" in proc.stderr


def test_worker_runs_only_registered_fn_ids():
    with mpop.MpopApi(workers=1) as app:
        app.start()
        rt = app._lifecycle.runtime
        # Bypass the API's registry check: the native worker must still refuse.
        seq = rt.producer.enqueue(0x7777, 1, (1,))
        assert seq > 0
        result = app.run()
        (r,) = result.results
        assert not r.success
        assert isinstance(r.error, mpop.RegistryError)
        assert "0x7777" in str(r.error) or "30583" in str(r.error)
