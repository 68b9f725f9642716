"""A table of connectionless flows (UDP, ICMP echo): capped, least recently used first
out, and closed after a quiet period.

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


class IdleFlowTable(Generic[K, F]):
    def __init__(self, *, max_flows: int, idle_timeout: float, release: Callable[[F], None],
                 counters: collections.Counter) -> None:
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self._release = release
        self._counters = counters
        self._flows: collections.OrderedDict[K, F] = collections.OrderedDict()
        self._keys: dict[F, K] = {}
        self._expiry: TimerHeap[F] = TimerHeap()

    def get(self, key: K) -> F | None:
        """The flow for ``key`` (now the most recently used), or None."""
        flow = self._flows.get(key)
        if flow is not None:
            self._flows.move_to_end(key)
        return flow

    def add(self, key: K, flow: F, now: float) -> None:
        """Insert a new flow, evicting the least recently used ones beyond ``max_flows``."""
        while len(self._flows) >= self.max_flows:
            _key, victim = next(iter(self._flows.items()))
            self._counters["flows-evicted"] += 1
            self.remove(victim)
        self._flows[key] = flow
        self._keys[flow] = key
        self._counters["flows-opened"] += 1
        self._expiry.schedule(flow, now + self.idle_timeout)

    def remove(self, flow: F) -> None:
        """Forget ``flow`` and release it (close its socket). Idempotent."""
        key = self._keys.pop(flow, None)
        if key is None:
            return
        del self._flows[key]
        self._expiry.cancel(flow)
        self._release(flow)

    def remove_if(self, predicate: Callable[[F], bool]) -> None:
        """Remove every flow ``predicate`` picks (a detached port's, a removed forward's)."""
        for flow in list(self._flows.values()):
            if predicate(flow):
                self.remove(flow)

    def clear(self) -> None:
        self.remove_if(lambda flow: True)

    def values(self) -> Iterator[F]:
        return iter(list(self._flows.values()))

    def __len__(self) -> int:
        return len(self._flows)

    async def run(self) -> None:
        """Close flows that stay quiet for ``idle_timeout`` (run for the table's life)."""
        await self._expiry.run(self._expire)

    def _expire(self, flow: F, now: float) -> None:
        if flow not in self._keys:
            return
        idle_until = flow.last_active + self.idle_timeout
        if idle_until > now:
            self._expiry.schedule(flow, idle_until)
            return
        self._counters["flows-expired"] += 1
        self.remove(flow)
