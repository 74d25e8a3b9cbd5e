"""The clients of a persistent pool: the handles (in any processes) attached to it.

Each handle takes one of the segment's client records for as long as it is attached. The
record gives it a seq space of its own (its tasks' results come back to it alone, through
the two mailboxes the pool's forwarder fills: see forwarder.hpp) and says whether it still
lives. A handle that lets go with results still due, or whose process dies, leaves its
record gone; the next handle to attach adopts it and hands those results out through its
own results(). A gone record with nothing left is free again."""

from __future__ import annotations

from ._core import CLIENT_STATE, lease_state
from ._errors import MpopError

__all__ = ["FREE", "ATTACHED", "GONE", "STATE_NAMES", "claim", "adopt", "reap", "settled", "describe"]

# ClientState (segment.hpp). A record's lease is its state and how many handles took it:
# every change of hands is a compare-and-swap on the lease as it was read.
FREE, ATTACHED, GONE, CLAIMING = (CLIENT_STATE[k] for k in ("FREE", "ATTACHED", "GONE", "CLAIMING"))
STATE_NAMES = {FREE: "free", ATTACHED: "attached", GONE: "gone", CLAIMING: "claiming"}

MAX_CLIENTS = 16  # client records of a persistent pool
CLIENT_SLOTS = 4096  # cells of each of a client's two mailboxes


def alive(info: dict) -> bool:
    """Whether the process of an attached record still runs."""
    from ._persistent import running

    return info["pid"] > 0 and running(info["pid"], info["start_time"])


def settled(info: dict) -> bool:
    """Whether every task of the record's client has its result handed out: none still
    due from the workers, none waiting in its mailboxes."""
    return info["complete_below"] > info["last_seq"] and not info["live_pending"] and not info["plain_pending"]


def reap(segment) -> list[int]:
    """Marks the records of attached clients whose process died as gone (or free when
    nothing of theirs is left); returns their indices."""
    out = []
    for i in range(segment.client_count):
        info = segment.client_info(i)
        if info["state"] == ATTACHED and not alive(info) and segment.release_client(i, info["lease"],
                                                                                      not settled(info)):
            out.append(i)
    return out


def claim(segment) -> int:
    """Takes a free client record for this process's handle; raises MpopError when every
    record is in use."""
    reap(segment)
    for i in range(segment.client_count):
        info = segment.client_info(i)
        if info["state"] == GONE and info["adopter"] < 0 and settled(info):
            segment.release_client(i, info["lease"], False)  # nothing left to hand out: free again
    for i in range(segment.client_count):
        lease = segment.client_lease(i)
        if lease_state(lease) == FREE and segment.claim_client(i, lease):
            return i
    raise MpopError(f"the persistent pool {segment.name} has {segment.client_count} client records and all are "
                    f"in use (attached, or holding results of a client that is gone)")


def adopt(segment, me: int) -> list[tuple[int, int]]:
    """Takes over the records of gone clients that no live client adopted; returns their
    indices and leases (their results go to this handle's results() while the lease
    holds)."""
    out = []
    for i in range(segment.client_count):
        info = segment.client_info(i)
        if info["state"] != GONE or i == me:
            continue
        a = info["adopter"]
        if a >= 0:
            holder = segment.client_info(a)
            if holder["state"] == ATTACHED and alive(holder):
                continue  # a live client has it
        if segment.adopt_client(i, me, a + 1):
            out.append((i, info["lease"]))
    return out


def describe(segment) -> list[dict]:
    """status()["clients"]: the records in use."""
    out = []
    for i in range(segment.client_count):
        info = segment.client_info(i)
        if info["state"] == FREE:
            continue
        out.append({"index": i, "state": STATE_NAMES.get(info["state"], "?"),
                    "pid": info["pid"] or None, "alive": info["state"] == ATTACHED and alive(info),
                    "adopted_by": info["adopter"] if info["adopter"] >= 0 else None,
                    "submitted": info["last_seq"] - info["seq_base"],
                    "results_waiting": info["live_pending"] + info["plain_pending"]})
    return out
