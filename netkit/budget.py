"""Budgets for bytes netkit buffers on behalf of guests: per guest and in total.

A :class:`BufferBudget` holds the limits and the running total; each guest (a switch
port) has one :class:`BufferAccount` that every buffer kept for that guest charges. The
TCP engine charges its send buffer (host data waiting for the guest), its receive queue
(guest data waiting for the host socket) and its out-of-order queue directly, at the
point each one grows or shrinks, so the numbers are exact at every moment and every
update is O(1): two integer additions, no search.

What happens at the limit is the owner's decision (see ``netkit.tcp.connection``): the
TCP engine stops advancing its receive window, takes no more host data for the flow,
drops out-of-order segments, and the NAT refuses new flows. To avoid deadlock, a flow
that holds nearly nothing is always allowed a small floor (one MSS each way), so the
worst case is ``limit + flows x floor``; the flow count is itself bounded
(``Config.max_connections_per_guest``). Pure data: no I/O, no clock, no trio.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Hashable

__all__ = ["BufferBudget", "BufferAccount", "return_freed_memory"]

_malloc_trim = None


def return_freed_memory() -> bool:
    """Ask the C allocator to hand freed heap memory back to the OS (glibc's
    ``malloc_trim``); returns False where that is not available.

    Buffered payloads are ``bytes`` objects of a few KiB to 256 KiB that glibc serves
    from its heap; once freed, the memory stays in the process unless trimmed, so a
    guest that made netkit buffer a lot would leave RSS high after it left (measured:
    +300 MB kept). Cheap enough to call when a guest leaves; never on a hot path.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_trim = libc.malloc_trim
            _malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


class BufferAccount:
    """One guest's share of a :class:`BufferBudget`.

    ``used`` is the bytes currently charged; ``flows`` the flows (connections) holding
    the account, which the runtime maintains for per-guest connection limits.
    """

    __slots__ = ("total", "guest", "limit", "used", "flows")

    def __init__(self, total: "BufferBudget", guest: Hashable, limit: int) -> None:
        #: The budget this account belongs to (its ``used`` includes ours).
        self.total = total
        self.guest = guest
        self.limit = limit
        self.used = 0
        self.flows = 0

    def room(self) -> int:
        """Bytes that may still be charged before this guest or the total is over its
        limit (negative when over)."""
        r = self.limit - self.used
        t = self.total
        s = t.limit - t.used
        return r if r < s else s

    def charge(self, n: int) -> None:
        """Add ``n`` bytes (negative ``n`` releases)."""
        self.used += n
        self.total.used += n

    def __repr__(self) -> str:
        return f"<BufferAccount {self.guest!r} used={self.used}/{self.limit} flows={self.flows}>"


class BufferBudget:
    """Limits and totals; :meth:`account` gives each guest its :class:`BufferAccount`.

    Counters (plain ints, bumped by whoever enforces the limit):
    ``window_limited`` advertised windows cut short by the budget; ``send_limited``
    times a flow's host side was left unread for lack of budget; ``ooo_dropped`` /
    ``ooo_dropped_bytes`` out-of-order segments dropped at the limit; ``rcv_dropped`` /
    ``rcv_dropped_bytes`` in-order segments (or their tails) dropped at the limit;
    ``refused`` new flows refused.
    """

    __slots__ = ("limit", "guest_limit", "admit_room", "used", "accounts", "window_limited", "send_limited",
                 "ooo_dropped", "ooo_dropped_bytes", "rcv_dropped", "rcv_dropped_bytes", "refused")

    def __init__(self, guest_limit: int, limit: int) -> None:
        if guest_limit < 1 or limit < 1:
            raise ValueError("budget limits must be positive")
        self.limit = limit
        #: A guest never gets more than the total.
        self.guest_limit = min(guest_limit, limit)
        #: Room a guest (or the total) must have left to open a new flow: 64 KiB, one
        #: maximum-size segment.
        self.admit_room = min(65536, self.guest_limit // 16)
        self.used = 0
        self.accounts: dict[Hashable, BufferAccount] = {}
        self.window_limited = 0
        self.send_limited = 0
        self.ooo_dropped = 0
        self.ooo_dropped_bytes = 0
        self.rcv_dropped = 0
        self.rcv_dropped_bytes = 0
        self.refused = 0

    def account(self, guest: Hashable) -> BufferAccount:
        """The account of ``guest`` (created on first use)."""
        acct = self.accounts.get(guest)
        if acct is None:
            acct = self.accounts[guest] = BufferAccount(self, guest, self.guest_limit)
        return acct

    def forget(self, guest: Hashable) -> None:
        """Drop ``guest``'s account once it holds nothing (its last flow closed)."""
        acct = self.accounts.get(guest)
        if acct is not None and acct.used == 0 and acct.flows == 0:
            del self.accounts[guest]

    def admits(self, acct: BufferAccount) -> bool:
        """May ``acct``'s guest open another flow? No once its own share is used up (less
        than :attr:`admit_room` left: a flow needs some room to be of use, and out-of-order
        data stops just short of the limit). When only the total is used up, guests
        holding no more than a fair share (the total divided among the guests with an
        account) may still open flows, so a guest that buffers little is not locked out
        by the others."""
        need = self.admit_room
        if acct.limit - acct.used < need:
            return False
        if self.limit - self.used >= need:
            return True
        return acct.used * len(self.accounts) <= self.limit

    def statistics(self) -> dict:
        return {
            "buffered-bytes": self.used,
            "guest-limit": self.guest_limit,
            "total-limit": self.limit,
            "guests": {str(getattr(a.guest, "id", a.guest)): a.used for a in self.accounts.values() if a.used},
        }

    def counters(self) -> dict[str, int]:
        """The enforcement counters under the names ``statistics()`` of the owner shows."""
        return {
            "budget-window-limited": self.window_limited,
            "budget-send-limited": self.send_limited,
            "budget-ooo-dropped": self.ooo_dropped,
            "budget-ooo-dropped-bytes": self.ooo_dropped_bytes,
            "budget-rcv-dropped": self.rcv_dropped,
            "budget-rcv-dropped-bytes": self.rcv_dropped_bytes,
            "budget-refused": self.refused,
        }
