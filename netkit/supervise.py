"""One supervision point for per-flow work.

Every unit of work netkit does on a guest's behalf — a NAT flow's task, a service
connection, a DNS query, a port forward's connection, a guest port's reader — runs
under one ``Supervisor``. An exception in a unit ends that unit only: it is counted
(``flow-errors``, and per kind of unit), logged once with its traceback, and the
unit's own cleanup runs (flow closed, host socket closed, the guest gets RST or
nothing). The switch and every other guest go on.

Cancellation and other ``BaseException``\\ s pass through untouched: they are how the
switch shuts down, not failures.

``open_switch`` creates the one supervisor of a switch and hands it to each component
(a constructor argument, never a global). Synchronous per-packet paths (UDP services on
the gateway, the gateway's frame handlers) report their failures with ``failed``.
"""

from __future__ import annotations

import collections
import logging
import traceback
from typing import Awaitable, Callable

import trio

__all__ = ["Supervisor", "FLOW_ERRORS"]

log = logging.getLogger("netkit.supervise")

#: The counter every failed unit moves.
FLOW_ERRORS = "flow-errors"
#: Distinct failure sites whose traceback is logged at error level; repeats of a known
#: site are logged without it (a guest that can trigger a bug must not flood the log).
_MAX_KNOWN_SITES = 256


class Supervisor:
    """Runs per-flow tasks in one nursery; a failure ends, counts and logs only its unit."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        #: ``flow-errors`` (all units) and ``flow-errors/<unit>`` (by kind of unit).
        self.counters: collections.Counter[str] = collections.Counter()
        self._known_sites: set[tuple] = set()

    @property
    def errors(self) -> int:
        """How many units have failed."""
        return self.counters[FLOW_ERRORS]

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args, unit: str,
                   on_error: Callable[[], object] | None = None, name: object = None) -> None:
        """Run ``await fn(*args)`` as one supervised unit of kind ``unit`` (``"udp-nat"``,
        ``"dns"``...). If it raises an ``Exception``, ``on_error()`` cleans up after it."""
        self._nursery.start_soon(self._run, fn, args, unit, on_error, name=name or getattr(fn, "__name__", unit))

    async def _run(self, fn, args, unit: str, on_error) -> None:
        try:
            await fn(*args)
        except* Exception as group:
            # except*: a unit with a nursery of its own may fail with a group that also
            # carries Cancelled; the Exception part is handled here, the rest re-raised.
            self.failed(unit, _innermost(group))
            if on_error is not None:
                try:
                    on_error()
                except Exception as cleanup_error:
                    self.failed(f"{unit}-cleanup", cleanup_error)

    def failed(self, unit: str, error: BaseException) -> None:
        """Count and log one unit's failure (also for synchronous per-packet work that
        catches its own exceptions)."""
        self.counters[FLOW_ERRORS] += 1
        self.counters[f"{FLOW_ERRORS}/{unit}"] += 1
        site = _site(unit, error)
        if site in self._known_sites:
            log.debug("%s failed again (%s: %s); counted, traceback logged before", unit, type(error).__name__, error)
            return
        if len(self._known_sites) < _MAX_KNOWN_SITES:
            self._known_sites.add(site)
        log.error("%s failed; that unit was ended, everything else goes on", unit,
                  exc_info=(type(error), error, error.__traceback__))

    def statistics(self) -> dict:
        return {FLOW_ERRORS: self.counters[FLOW_ERRORS],
                f"{FLOW_ERRORS}-by-unit": {key.partition("/")[2]: n for key, n in self.counters.items() if "/" in key}}


def _innermost(error: BaseException) -> BaseException:
    """The one exception a group wraps (through nested nurseries), or the group itself."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _site(unit: str, error: BaseException) -> tuple:
    """Where a failure came from: the unit, the exception type and the innermost frame."""
    tb = error.__traceback__
    frames = traceback.extract_tb(tb) if tb is not None else []
    last = (frames[-1].filename, frames[-1].lineno) if frames else None
    return (unit, type(error).__name__, last)
