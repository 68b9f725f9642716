"""Sequence-number arithmetic modulo 2**32 (RFC 9293 section 3.4, RFC 1982).

``a`` is "less than" ``b`` when ``b`` lies in the half of the number circle that
follows ``a``. The hot paths in :mod:`netkit.tcp.connection` inline these expressions;
these helpers are the readable reference and what tests use.
"""

from __future__ import annotations

__all__ = ["MASK", "HALF", "seq_add", "seq_diff", "seq_lt", "seq_leq", "seq_gt", "seq_geq",
           "seq_in_window"]

MASK = 0xFFFFFFFF
HALF = 0x80000000


def seq_add(a: int, n: int) -> int:
    return (a + n) & MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` in the range [-2**31, 2**31)."""
    return ((a - b + HALF) & MASK) - HALF


def seq_lt(a: int, b: int) -> bool:
    return a != b and ((b - a) & MASK) < HALF


def seq_leq(a: int, b: int) -> bool:
    return ((b - a) & MASK) < HALF


def seq_gt(a: int, b: int) -> bool:
    return a != b and ((a - b) & MASK) < HALF


def seq_geq(a: int, b: int) -> bool:
    return ((a - b) & MASK) < HALF


def seq_in_window(x: int, left: int, size: int) -> bool:
    """``left <= x < left + size`` on the sequence circle."""
    return ((x - left) & MASK) < size
