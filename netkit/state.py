"""Lease state that survives a restart: guests keep their addresses.

The file is JSON: the lease table (``LeaseTable.to_json``, times relative to when it
was written) plus the wall-clock time it was written, so the time netkit was down is
subtracted on load. Writes are atomic (temporary file, fsync, rename) and debounced: a
change marks the state dirty and one task writes at most every ``interval`` seconds. A
file that cannot be read or parsed is reported and renamed aside
(``FILE.corrupt-TIMESTAMP``), never fatal: netkit starts with empty leases.
"""

from __future__ import annotations

import json
import logging
import os
import time

import trio

from .config import Config
from .dhcp.leases import LeaseError, LeaseTable

__all__ = ["load_leases", "save_leases", "LeaseStateWriter"]

log = logging.getLogger("netkit.state")

_FORMAT = "netkit-leases"


def load_leases(path: str, config: Config, now: float, *, wall_clock=time.time) -> LeaseTable | None:
    """The table saved in ``path`` (None when there is no file, or it was set aside)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.error("cannot read lease state %s: %s; starting with no leases", path, e.strerror)
        return None
    try:
        document = json.loads(raw)
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise LeaseError("not a netkit lease state file")
        downtime = max(0.0, wall_clock() - float(document["saved_at"]))
        return LeaseTable.from_json(config, document["leases"], now - downtime)
    except (ValueError, KeyError, TypeError, LeaseError) as e:
        aside = f"{path}.corrupt-{int(wall_clock())}"
        try:
            os.replace(path, aside)
        except OSError:
            aside = "(could not be moved)"
        log.error("lease state %s is corrupt (%s); set aside as %s, starting with no leases", path, e, aside)
        return None


def save_leases(path: str, table: LeaseTable, now: float, *, wall_clock=time.time) -> None:
    """Write atomically: readers see the old file or the new one, never half of one."""
    document = {"format": _FORMAT, "saved_at": wall_clock(), "leases": table.to_json(now)}
    data = json.dumps(document, indent=1).encode()
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash too
    finally:
        os.close(dir_fd)


class LeaseStateWriter:
    """Writes the lease table to ``path`` soon after it changes (``mark_dirty``)."""

    def __init__(self, path: str, table: LeaseTable, *, interval: float = 1.0) -> None:
        self.path = path
        self.table = table
        self.interval = interval
        self._dirty = trio.Event()
        self.writes = 0
        self.errors = 0

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        try:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                self._write()
                await trio.sleep(self.interval)
        finally:
            if self._dirty.is_set():
                self._write()  # the last change before shutdown

    def _write(self) -> None:
        try:
            # File I/O here is a few kilobytes, rare and debounced: done inline.
            save_leases(self.path, self.table, trio.current_time())
            self.writes += 1
        except OSError as e:
            self.errors += 1
            log.error("cannot write lease state %s: %s", self.path, e.strerror)
