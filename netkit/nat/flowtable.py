"""A table of connectionless flows (UDP, ICMP echo): capped in total and per guest, least
recently used first out, and closed after a quiet period.

Each flow has an owner (the guest's switch port). A guest at its share
(``max_flows_per_owner``) makes room by evicting its own least recently used flow; when
the whole table is full, the flow evicted is the least recently used one of the owner
holding the most flows. So one guest's flood only ever evicts its own flows, never
those of a guest holding fewer. ``get`` and ``add`` stay O(1): each owner keeps its
flows in LRU order, and owners are kept in buckets by how many flows they hold.

Flows carry ``last_active`` (the runtime updates it on traffic either way). Expiry runs
on one ``TimerHeap``: when a flow's deadline passes, it is closed if it stayed quiet,
else re-armed for ``last_active + idle_timeout``, so traffic never touches the heap.
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Hashable, Iterator, Protocol, TypeVar

from ..timers import TimerHeap

__all__ = ["IdleFlowTable"]


class _Flow(Protocol):
    last_active: float


K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=_Flow)


def _no_owner(flow) -> None:
    return None


class IdleFlowTable(Generic[K, F]):
    """Counters it moves: ``flows-opened``, ``flows-expired``, ``flows-evicted`` (all
    evictions), of which ``flows-evicted-guest-share`` (an owner over its share evicted
    its own) and ``flows-evicted-table-full`` (the biggest owner gave one up)."""

    def __init__(self, *, max_flows: int, idle_timeout: float, release: Callable[[F], None],
                 counters: collections.Counter, max_flows_per_owner: int | None = None,
                 owner: Callable[[F], Hashable] = _no_owner) -> None:
        self.max_flows = max_flows
        self.max_flows_per_owner = min(max_flows, max_flows_per_owner or max_flows)
        self.idle_timeout = idle_timeout
        self._release = release
        self._counters = counters
        self._owner_of = owner
        self._flows: dict[K, F] = {}
        #: flow -> (key, owner), so removal never recomputes either.
        self._entries: dict[F, tuple[K, Hashable]] = {}
        #: owner -> its flows, least recently used first.
        self._by_owner: dict[Hashable, collections.OrderedDict[K, F]] = {}
        #: flow count -> owners holding that many (for "the owner with the most" in O(1)).
        self._owners_by_count: dict[int, dict[Hashable, None]] = {}
        self._most = 0
        self._expiry: TimerHeap[F] = TimerHeap()

    def get(self, key: K) -> F | None:
        """The flow for ``key`` (now its owner's most recently used), or None."""
        flow = self._flows.get(key)
        if flow is not None:
            self._by_owner[self._entries[flow][1]].move_to_end(key)
        return flow

    def add(self, key: K, flow: F, now: float) -> None:
        """Insert a new flow, first evicting as the owner's share and the total cap demand."""
        owner = self._owner_of(flow)
        mine = self._by_owner.get(owner)
        while mine and len(mine) >= self.max_flows_per_owner:
            self._counters["flows-evicted-guest-share"] += 1
            self._evict_oldest(mine)
        while len(self._flows) >= self.max_flows:
            self._counters["flows-evicted-table-full"] += 1
            self._evict_oldest(self._by_owner[next(iter(self._owners_by_count[self._most]))])
        mine = self._by_owner.get(owner)
        if mine is None:
            mine = self._by_owner[owner] = collections.OrderedDict()
        else:
            self._unbucket(owner, len(mine))
        mine[key] = flow
        self._bucket(owner, len(mine))
        self._flows[key] = flow
        self._entries[flow] = (key, owner)
        self._counters["flows-opened"] += 1
        self._expiry.schedule(flow, now + self.idle_timeout)

    def _evict_oldest(self, flows: collections.OrderedDict[K, F]) -> None:
        self._counters["flows-evicted"] += 1
        self.remove(next(iter(flows.values())))

    def remove(self, flow: F) -> None:
        """Forget ``flow`` and release it (close its socket). Idempotent."""
        entry = self._entries.pop(flow, None)
        if entry is None:
            return
        key, owner = entry
        del self._flows[key]
        mine = self._by_owner[owner]
        self._unbucket(owner, len(mine))
        del mine[key]
        if mine:
            self._bucket(owner, len(mine))
        else:
            del self._by_owner[owner]
        self._expiry.cancel(flow)
        self._release(flow)

    def _bucket(self, owner: Hashable, count: int) -> None:
        self._owners_by_count.setdefault(count, {})[owner] = None
        if count > self._most:
            self._most = count

    def _unbucket(self, owner: Hashable, count: int) -> None:
        owners = self._owners_by_count[count]
        del owners[owner]
        if not owners:
            del self._owners_by_count[count]
            if count == self._most:
                # The caller re-buckets this owner at count + 1 or count - 1 (or, from
                # 1, forgets it), so count - 1 is right until _bucket raises it.
                self._most = count - 1

    def remove_if(self, predicate: Callable[[F], bool]) -> None:
        """Remove every flow ``predicate`` picks (a removed forward's, a failed client's)."""
        for flow in list(self._flows.values()):
            if predicate(flow):
                self.remove(flow)

    def remove_owner(self, owner: Hashable) -> None:
        """Remove every flow of ``owner`` (a detached port's)."""
        for flow in list(self._by_owner.get(owner, {}).values()):
            self.remove(flow)

    def clear(self) -> None:
        self.remove_if(lambda flow: True)

    def values(self) -> Iterator[F]:
        return iter(list(self._flows.values()))

    def owner_count(self, owner: Hashable) -> int:
        """How many flows ``owner`` holds."""
        return len(self._by_owner.get(owner, ()))

    def __len__(self) -> int:
        return len(self._flows)

    async def run(self) -> None:
        """Close flows that stay quiet for ``idle_timeout`` (run for the table's life)."""
        await self._expiry.run(self._expire)

    def _expire(self, flow: F, now: float) -> None:
        if flow not in self._entries:
            return
        idle_until = flow.last_active + self.idle_timeout
        if idle_until > now:
            self._expiry.schedule(flow, idle_until)
            return
        self._counters["flows-expired"] += 1
        self.remove(flow)
