"""Workloads shared by the demo and the benchmarks (module-level, so every pool can
import them by reference)."""

from __future__ import annotations

__all__ = ["inc", "lcg_rounds", "light", "medium", "heavy", "array_sum"]


def inc(x: int) -> int:
    return x + 1


def lcg_rounds(x: int, rounds: int) -> int:
    for _ in range(rounds):
        x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 2654435761) & 0xFFFFFFFF
        x ^= x >> 13
    return x


def light(x: int) -> int:
    """The prototype's light workload."""
    return lcg_rounds(x, 30)


def medium(x: int) -> int:
    """The prototype's medium workload: 300 rounds of the mixing step."""
    return lcg_rounds(x, 300)


def heavy(x: int) -> int:
    """The prototype's heavy workload."""
    return lcg_rounds(x, 3000)


def array_sum(a) -> float:
    """The sum of a numpy array (the large-argument benchmark's task)."""
    return float(a.sum())
