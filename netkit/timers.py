"""One task, one heap: deadlines for many protocol machines.

Protocol machines expose ``get_timer()``; instead of a task (or a trio timeout) per
connection, a runtime keeps one ``TimerHeap`` and one task running ``run(fire)``.
Re-scheduling pushes a new entry and leaves the old one to be skipped when it surfaces
(lazy deletion), so scheduling is O(log n) and never searches the heap.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Generic, Hashable, TypeVar

import trio

__all__ = ["TimerHeap"]

T = TypeVar("T", bound=Hashable)


class TimerHeap(Generic[T]):
    """Deadlines keyed by item; ``run(fire)`` calls ``fire(item, now)`` when one passes.

    A superseded or cancelled entry stays in the heap until it surfaces, but it lets go
    of its item at once (the heapq "mark as removed" recipe), so a cancelled item -- a
    closed flow and its buffers -- is never kept alive by a far deadline.
    """

    def __init__(self) -> None:
        self._heap: list[list] = []  # [deadline, seq, item or None once superseded]
        self._current: dict[T, list] = {}
        self._seq = itertools.count()
        self._wakeup = trio.Event()
        self._target = float("inf")

    def schedule(self, item: T, deadline: float | None) -> None:
        """Set (or with None, clear) ``item``'s deadline."""
        entry = self._current.get(item)
        if entry is not None:
            if deadline == entry[0]:
                return
            entry[2] = None
        elif deadline is None:
            return
        if deadline is None:
            del self._current[item]
            return
        entry = [deadline, next(self._seq), item]
        self._current[item] = entry
        heapq.heappush(self._heap, entry)
        if deadline < self._target:
            self._wakeup.set()

    def cancel(self, item: T) -> None:
        entry = self._current.pop(item, None)
        if entry is not None:
            entry[2] = None

    def __len__(self) -> int:
        return len(self._current)

    async def run(self, fire: Callable[[T, float], None]) -> None:
        heap = self._heap
        current = self._current
        while True:
            # Drop superseded entries so the target is a live deadline.
            while heap and heap[0][2] is None:
                heapq.heappop(heap)
            self._wakeup = trio.Event()
            self._target = heap[0][0] if heap else float("inf")
            with trio.move_on_at(self._target):
                await self._wakeup.wait()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, item = heapq.heappop(heap)
                if item is None:
                    continue
                del current[item]
                fire(item, now)
