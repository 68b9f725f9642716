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
    """Deadlines keyed by item; ``run(fire)`` calls ``fire(item, now)`` when one passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._current: dict[T, float] = {}
        self._seq = itertools.count()
        self._wakeup = trio.Event()
        self._target = float("inf")

    def schedule(self, item: T, deadline: float | None) -> None:
        """Set (or with None, clear) ``item``'s deadline."""
        current = self._current.get(item)
        if deadline == current:
            return
        if deadline is None:
            del self._current[item]
            return
        self._current[item] = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), item))
        if deadline < self._target:
            self._wakeup.set()

    def cancel(self, item: T) -> None:
        self._current.pop(item, None)

    def __len__(self) -> int:
        return len(self._current)

    async def run(self, fire: Callable[[T, float], None]) -> None:
        heap = self._heap
        current = self._current
        while True:
            # Drop superseded entries so the target is a live deadline.
            while heap and current.get(heap[0][2]) != heap[0][0]:
                heapq.heappop(heap)
            self._wakeup = trio.Event()
            self._target = heap[0][0] if heap else float("inf")
            with trio.move_on_at(self._target):
                await self._wakeup.wait()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                deadline, _, item = heapq.heappop(heap)
                if current.get(item) != deadline:
                    continue
                del current[item]
                fire(item, now)
