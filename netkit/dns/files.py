"""Host files the DNS service follows: resolv.conf (default upstreams) and a hosts file.

Both are re-read when they change. There is no thread and no inotify: :class:`WatchedFile`
stats the file when asked, at most once per ``interval`` seconds of the injected clock,
and parses it again only if its size, mtime, ctime or inode changed. A stat of a local
file is a few microseconds, so doing it on the event loop once a second is harmless.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from dnslib import DNSLabel

from ..config import ConfigError, parse_dns_server

__all__ = ["WatchedFile", "parse_resolv_conf", "parse_hosts", "HostsTable"]

log = logging.getLogger("netkit.dns")

T = TypeVar("T")

#: A hosts file or resolv.conf bigger than this is not read (it would be a mistake).
MAX_FILE_BYTES = 16 * 1024 * 1024


class WatchedFile(Generic[T]):
    """The parsed contents of a file, refreshed when the file changes.

    ``parse`` turns the file's text into a value; a missing or unreadable file gives
    ``empty``. ``get()`` never raises.
    """

    def __init__(self, path: str, parse: Callable[[str], T], empty: T, *,
                 clock: Callable[[], float], interval: float = 1.0) -> None:
        self.path = path
        self._parse = parse
        self._empty = empty
        self._clock = clock
        self._interval = interval
        self._checked: float | None = None
        self._signature: tuple | None = None
        self._value: T = empty
        #: How many times the file was (re)loaded, for tests and statistics.
        self.loads = 0

    def get(self) -> T:
        now = self._clock()
        if self._checked is None or now - self._checked >= self._interval or now < self._checked:
            self._checked = now
            self._refresh()
        return self._value

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            signature = None
        if signature == self._signature:
            return
        self._signature = signature
        if signature is None:
            if self._value is not self._empty:
                log.warning("dns: %s is gone; using nothing from it", self.path)
            self._value = self._empty
            return
        try:
            if st.st_size > MAX_FILE_BYTES:
                raise OSError(f"bigger than {MAX_FILE_BYTES} bytes")
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_FILE_BYTES)
            self._value = self._parse(text)
            self.loads += 1
        except Exception as e:  # a parse bug must not take DNS down
            log.warning("dns: cannot read %s: %s", self.path, e)
            self._value = self._empty


def parse_resolv_conf(text: str) -> tuple[tuple[str, int], ...]:
    """The nameservers of a resolv.conf, in order, as (address, 53).

    Lines other than ``nameserver`` (search, options, domain, sortlist) do not concern a
    forwarder. A nameserver that is not an IP literal is skipped, as glibc does. Unlike
    glibc, no nameserver at all means no upstream (SERVFAIL), not 127.0.0.1.
    """
    servers: list[tuple[str, int]] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            address = words[1]
            try:
                host, port = parse_dns_server(f"[{address}]" if ":" in address else address)
            except ConfigError:
                continue
            if (host, port) not in servers:
                servers.append((host, port))
    return tuple(servers)


@dataclass
class HostsTable:
    """Names and addresses from a hosts file."""

    #: name key -> addresses (IPv4Address / IPv6Address), in file order.
    addresses: dict[tuple[bytes, ...], list] = field(default_factory=dict)
    #: name key -> the name as written (for answers).
    names: dict[tuple[bytes, ...], DNSLabel] = field(default_factory=dict)
    #: address -> the first name given for it (for PTR).
    canonical: dict = field(default_factory=dict)


def parse_hosts(text: str) -> HostsTable:
    """Parse /etc/hosts syntax: ``ADDRESS NAME [ALIAS...]`` with ``#`` comments. Lines
    with a bad address or name are skipped (the first names on a line still count)."""
    from .message import name_key  # local import: message imports nothing from here

    table = HostsTable()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        try:
            address = ipaddress.ip_address(words[0].split("%", 1)[0])
        except ValueError:
            continue
        for word in words[1:]:
            label = _label_or_none(word)
            if label is None:
                continue
            key = name_key(label)
            table.names.setdefault(key, label)
            addresses = table.addresses.setdefault(key, [])
            if address not in addresses:
                addresses.append(address)
            table.canonical.setdefault(address, label)
    return table


def _label_or_none(text: str) -> DNSLabel | None:
    text = text.rstrip(".")
    if not text or len(text) > 253:
        return None
    try:
        label = DNSLabel(text)
    except Exception:  # idna rejects empty or over-long labels
        return None
    if not label.label or any(not 0 < len(part) <= 63 for part in label.label):
        return None
    return label
