"""Finding mpop segments in /dev/shm and removing those whose owner is dead (used by
`python -m mpop cleanup` and, once per process, when the first app starts)."""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["segments", "remove_dead_segments", "live_workers"]

SHM_DIR = "/dev/shm"


def segments() -> list[str]:
    """Names of the mpop segments here, recognised by their magic number (whatever
    name= prefix their app used)."""
    from . import _core

    names = []
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:  # pragma: no cover
        return []
    for n in sorted(entries):
        try:
            with open(os.path.join(SHM_DIR, n), "rb") as f:
                if int.from_bytes(f.read(8), "little") == _core.SEGMENT_MAGIC:
                    names.append(n)
        except OSError:
            continue
    return names


def _mapped_by_any_process(name: str) -> bool:
    """Whether any process maps or holds open /dev/shm/NAME (read from /proc)."""
    path = os.path.join(SHM_DIR, name)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(line.rstrip().endswith(path) for line in f):
                    return True
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return True
        except OSError:
            continue
    return False


def live_workers(seg) -> list[int]:
    """Pids of the segment's workers still running (the very processes its records name)."""
    from ._persistent import running

    return [w["pid"] for w in seg.workers_status()
            if w["pid"] and w["live"] and running(w["pid"], w["start_time"])]


def remove_dead_segments(report: Callable[[str], None] = lambda line: None) -> list[str]:
    """Removes every mpop segment whose owner is dead; returns their names. Any workers
    still attached are told to leave."""
    from . import _core

    removed = []
    for name in segments():
        try:
            seg = _core.Segment.attach(name)
        except _core.LayoutMismatch:
            # Made by another mpop version: its header cannot be read here, but a segment
            # that no process maps any more is garbage.
            if _mapped_by_any_process(name):
                report(f"kept    {name}: another mpop version's segment, still in use")
            else:
                _core.Segment.remove(name)
                removed.append(name)
                report(f"removed {name}: another mpop version's segment, no longer in use")
            continue
        except Exception as e:
            report(f"skipped {name}: {e}")
            continue
        if _core.owner_alive(seg):
            report(f"kept    {name}: owner pid {seg.owner_pid} is alive")
            seg.leave()
            continue
        if seg.supervised and live_workers(seg):
            report(f"kept    {name}: a persistent pool whose workers wait for a new supervisor "
                   f"(python -m mpop supervise)")
            seg.leave()
            continue
        seg.set_shutdown()  # any worker left behind leaves now
        seg.leave()
        _core.Segment.remove(name)
        removed.append(name)
        report(f"removed {name}: owner pid {seg.owner_pid} is gone")
    return removed
