"""The DHCP lease table: who holds which address, until when, and who held it before.

Sans-I/O: every method that depends on time takes ``now`` (monotonic seconds) and the
table never reads a clock. Expired leases are dropped lazily whenever a method that
takes ``now`` runs, and reported (once) by :meth:`LeaseTable.expire`.

Address choice for a client, in the order RFC 2131 section 4.3.1 gives:

1. its static address from the config (by MAC, or by vpnkit UUID once
   :meth:`LeaseTable.associate_uuid` linked the UUID to the MAC) -- and nothing else;
2. its current lease (offered or bound);
3. the address it held last, if no one else took it since (the history);
4. the address it asks for (option 50), if free;
5. a free, never-used address found by hashing the MAC into the pool and scanning
   forward from there -- deterministic, so a netkit restarted without saved state still
   tends to give each guest the address it had;
6. failing that, the free address whose previous holder left longest ago.

Memory is bounded by the pool: live leases, history and quarantine are all keyed by
address, and each MAC holds at most one lease.

DHCPDECLINE quarantine (RFC 2131 section 4.3.3: the server marks a declined address as
not available) is bounded so that declines cannot take the pool away from other
guests: one client (the gateway passes the switch port) keeps at most
``Config.decline_max_per_port`` addresses in quarantine and the table at most
``Config.decline_max_pool_fraction`` of the pool; beyond either, the oldest quarantined
address (of that client, then overall) goes back to the pool early. Quarantine is not
saved by :meth:`LeaseTable.to_json`: after a restart a conflicting address is simply
found again by the client's own check.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import math
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from ..config import Config, format_mac, parse_mac

__all__ = ["Lease", "LeaseTable", "LeaseError", "OFFERED", "BOUND"]

OFFERED = "offered"
BOUND = "bound"

#: Version of the document :meth:`LeaseTable.to_json` writes.
_JSON_VERSION = 1

#: Most expired/displaced leases kept for :meth:`LeaseTable.expire` to report; beyond
#: this the oldest reports are dropped (the leases themselves are gone either way).
_MAX_UNREPORTED = 4096


def _seconds(value: Any) -> float:
    """A saved duration: a finite, non-negative number (NaN would break the heap)."""
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"bad duration {value!r}")
    return seconds


class LeaseError(ValueError):
    """An address cannot be reserved; the message says why."""


@dataclass(slots=True)
class Lease:
    """One client's claim on one address.

    ``expires`` is in the caller's monotonic seconds; ``math.inf`` marks a lease made by
    :meth:`LeaseTable.reserve`, which lasts until released. ``static`` marks an address
    from ``Config.static_leases``.
    """

    mac: bytes
    ip: IPv4Address
    expires: float
    state: str  # OFFERED | BOUND
    hostname: str | None = None
    client_id: bytes | None = None
    uuid: str | None = None
    static: bool = False

    @property
    def pinned(self) -> bool:
        """True for a reserved lease that never expires (static guest configuration)."""
        return self.expires == math.inf


class LeaseTable:
    """All DHCP leases of one subnet. See the module docstring for the policy."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._pool = config.pool()
        #: Addresses never handed to a guest, whatever the pool bounds say.
        self._never = frozenset({config.gateway_ip, config.host_ip, config.subnet.network_address,
                                 config.subnet.broadcast_address})
        self._static_by_mac: dict[bytes, IPv4Address] = {}
        self._static_by_uuid: dict[str, IPv4Address] = {}
        for static in config.static_leases:
            if static.mac is not None:
                self._static_by_mac[static.mac] = static.ip
            elif static.uuid is not None:
                self._static_by_uuid[static.uuid] = static.ip
        self._static_ips = frozenset(s.ip for s in config.static_leases)

        self._by_mac: dict[bytes, Lease] = {}
        self._by_ip: dict[IPv4Address, Lease] = {}
        #: (expires, tiebreak, lease) for every finite expiry ever set; entries whose lease
        #: was renewed or removed since are stale and skipped (see _evict_expired).
        self._expiry_heap: list[tuple[float, int, Lease]] = []
        self._tiebreak = itertools.count()
        #: Last holder of each address no one holds now, and the reverse map. Insertion
        #: order is age (oldest first), used when the pool has no never-used address left.
        self._previous_holder: dict[IPv4Address, bytes] = {}
        self._previous_ip: dict[bytes, IPv4Address] = {}
        #: Address -> (end of its quarantine after a DHCPDECLINE, the client that declined
        #: it). Insertion order is expiry order, since every quarantine lasts the same time.
        self._quarantine: dict[IPv4Address, tuple[float, object]] = {}
        #: Most addresses in quarantine at once: never the whole pool.
        self._max_quarantine = int(len(self._pool) * config.decline_max_pool_fraction)
        #: Quarantined addresses returned to the pool early because a cap was reached.
        self.quarantine_evictions = 0
        #: vpnkit UUID <-> MAC; insertion order is age, for the size bound.
        self._uuid_to_mac: dict[str, bytes] = {}
        self._mac_to_uuid: dict[bytes, str] = {}
        # Each live guest (at most one per switch port) needs its association; the pool
        # size covers guests that come and go.
        self._max_uuids = max(len(self._pool) + len(config.static_leases), config.max_ports)
        #: Leases that ended without their client asking (expired, or displaced), not yet
        #: returned by expire().
        self._unreported: collections.deque[Lease] = collections.deque(maxlen=_MAX_UNREPORTED)

    # ----- queries -----
    def lookup_mac(self, mac: bytes) -> Lease | None:
        """The lease ``mac`` holds, if any (possibly expired if no method taking ``now``
        ran since it expired)."""
        return self._by_mac.get(bytes(mac))

    def lookup_ip(self, ip: IPv4Address) -> Lease | None:
        """The lease on ``ip``, if any (same caveat as :meth:`lookup_mac`)."""
        return self._by_ip.get(IPv4Address(ip))

    def leases(self) -> list[Lease]:
        """All current leases, offered and bound."""
        return list(self._by_mac.values())

    def static_ip_for(self, mac: bytes) -> IPv4Address | None:
        """The address the config fixes for ``mac`` (directly, or through its UUID)."""
        ip = self._static_by_mac.get(mac)
        if ip is None:
            uuid = self._mac_to_uuid.get(mac)
            if uuid is not None:
                ip = self._static_by_uuid.get(uuid)
        return ip

    def is_quarantined(self, ip: IPv4Address, now: float) -> bool:
        """True while ``ip`` is out of the pool after a DHCPDECLINE."""
        entry = self._quarantine.get(IPv4Address(ip))
        return entry is not None and entry[0] > now

    def next_expiry(self) -> float | None:
        """When the next lease expires (for the caller's timer), or None if none will."""
        heap = self._expiry_heap
        while heap and not self._heap_entry_current(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # ----- the DHCP operations -----
    def offer(self, mac: bytes, now: float, *, requested_ip: IPv4Address | None = None,
              client_id: bytes | None = None) -> Lease | None:
        """Pick an address for ``mac`` and hold it for ``Config.offer_seconds``.

        A client that already holds a bound lease keeps it unchanged (and gets its
        address again). Returns None when no address is free.
        """
        mac = bytes(mac)
        self._evict_expired(now)
        ip = self._choose_ip(mac, now, requested_ip)
        if ip is None:
            return None
        lease = self._by_mac.get(mac)
        if lease is not None and lease.ip == ip:
            if lease.state == OFFERED:
                self._set_expiry(lease, now + self._config.offer_seconds)
            if client_id is not None:
                lease.client_id = client_id
            return lease
        if lease is not None:  # e.g. its UUID now maps to a static address
            self._remove(lease)
        lease = Lease(mac, ip, now + self._config.offer_seconds, OFFERED, client_id=client_id,
                      uuid=self._mac_to_uuid.get(mac), static=ip in self._static_ips)
        self._install(lease)
        return lease

    def bind(self, mac: bytes, ip: IPv4Address, now: float, *, hostname: str | None = None,
             client_id: bytes | None = None) -> Lease | None:
        """Bind ``ip`` to ``mac`` for ``Config.lease_seconds`` (DHCPREQUEST -> DHCPACK).

        Succeeds if ``ip`` is the client's static address, or (for a client without
        one) a pool address no one else holds and not in quarantine; a lease the client
        held on another address is dropped. Returns None if the client may not have
        ``ip`` (the server answers DHCPNAK).
        """
        mac = bytes(mac)
        ip = IPv4Address(ip)
        self._evict_expired(now)
        static_ip = self.static_ip_for(mac)
        if static_ip is not None:
            if ip != static_ip or self._held_by_other(ip, mac):
                return None
        elif not self._available(ip, mac, now):
            return None
        lease = self._by_mac.get(mac)
        if lease is not None and lease.ip != ip:
            self._remove(lease)
            lease = None
        if lease is None:
            lease = Lease(mac, ip, now + self._config.lease_seconds, BOUND,
                          uuid=self._mac_to_uuid.get(mac), static=ip in self._static_ips)
            self._install(lease)
        else:
            lease.state = BOUND
            if not lease.pinned:
                self._set_expiry(lease, now + self._config.lease_seconds)
        if hostname is not None:
            lease.hostname = hostname
        if client_id is not None:
            lease.client_id = client_id
        return lease

    def release(self, mac: bytes, ip: IPv4Address) -> bool:
        """Drop ``mac``'s lease on ``ip`` (DHCPRELEASE, or a guest going away).

        The address is remembered as ``mac``'s, so it gets it back if it returns before
        anyone else takes it. Returns False if ``mac`` holds no lease on ``ip``.
        """
        lease = self._by_mac.get(bytes(mac))
        if lease is None or lease.ip != IPv4Address(ip):
            return False
        self._remove(lease, remember=True)
        return True

    def decline(self, mac: bytes, ip: IPv4Address, now: float, *, client: object = None) -> bool:
        """``mac`` found ``ip`` in use by someone else (DHCPDECLINE): drop the lease and
        keep the address out of the pool for ``Config.decline_seconds``, within the caps
        (see the module docstring); ``client`` names who declined (the switch port).

        Only the client holding the lease may decline it, so a guest cannot take other
        guests' addresses out of the pool. Returns False if ignored for that reason.
        """
        mac = bytes(mac)
        ip = IPv4Address(ip)
        self._evict_expired(now)
        lease = self._by_mac.get(mac)
        if lease is None or lease.ip != ip:
            return False
        self._remove(lease)
        if not lease.static:  # a static address cannot go to anyone else anyway
            self._add_quarantine(ip, now, client if client is not None else mac)
        return True

    def release_mac(self, mac: bytes) -> Lease | None:
        """Drop whatever lease ``mac`` holds, offered or bound, reserved included (its
        port now speaks with another MAC: one port, one identity). The address is
        remembered as ``mac``'s, as by :meth:`release`. Returns the lease dropped."""
        lease = self._by_mac.get(bytes(mac))
        if lease is not None:
            self._remove(lease, remember=True)
        return lease

    def reserve(self, mac: bytes, now: float, *, ip: IPv4Address | None = None,
                uuid: str | None = None) -> Lease:
        """Bind an address to ``mac`` without a DHCP exchange, until released.

        For guests configured statically (``netkit run``) and vpnkit's Preferred_ipv4
        command. With ``uuid``, first links it to ``mac`` (see :meth:`associate_uuid`).
        With ``ip``, binds exactly that address; otherwise chooses one as
        :meth:`offer` would. Raises :class:`LeaseError` if ``ip`` is outside the
        subnet or pool, is the gateway's or host's, belongs to another guest (leased,
        or static in the config), is in quarantine, or if no address is free.
        """
        mac = bytes(mac)
        self._evict_expired(now)
        if uuid is not None:
            self.associate_uuid(uuid, mac)
        static_ip = self.static_ip_for(mac)
        if ip is None:
            chosen = self._choose_ip(mac, now, None)
            if chosen is None:
                raise LeaseError("no free address in the DHCP pool")
        else:
            chosen = IPv4Address(ip)
            self._check_reservable(chosen, mac, static_ip, now)
        lease = self._by_mac.get(mac)
        if lease is not None and lease.ip != chosen:
            self._remove(lease)
            lease = None
        if lease is None:
            lease = Lease(mac, chosen, math.inf, BOUND, static=chosen in self._static_ips)
            self._install(lease)
        lease.state = BOUND
        lease.expires = math.inf  # stale heap entries are skipped: see _heap_entry_current
        lease.uuid = self._mac_to_uuid.get(mac)
        return lease

    def associate_uuid(self, uuid: str, mac: bytes) -> None:
        """Record that the vpnkit guest ``uuid`` uses ``mac``.

        A static lease by UUID then applies to ``mac``. A different MAC that held the
        UUID's static address loses its lease (the UUID names the guest; a guest that
        restarts with a new MAC is still the same guest).
        """
        mac = bytes(mac)
        old_mac = self._uuid_to_mac.pop(uuid, None)
        if old_mac is not None:
            self._mac_to_uuid.pop(old_mac, None)
        old_uuid = self._mac_to_uuid.pop(mac, None)
        if old_uuid is not None:
            self._uuid_to_mac.pop(old_uuid, None)
        self._uuid_to_mac[uuid] = mac
        self._mac_to_uuid[mac] = uuid
        affected = [mac, old_mac]
        while len(self._uuid_to_mac) > self._max_uuids:
            stale_uuid = next(iter(self._uuid_to_mac))
            affected.append(self._uuid_to_mac.pop(stale_uuid))
            self._mac_to_uuid.pop(affected[-1], None)
        static_ip = self._static_by_uuid.get(uuid)
        if static_ip is not None:
            holder = self._by_ip.get(static_ip)
            if holder is not None and holder.mac != mac:
                affected.append(holder.mac)
        for affected_mac in affected:
            if affected_mac is not None:
                self._drop_unentitled_static_lease(affected_mac)
        lease = self._by_mac.get(mac)
        if lease is not None:
            lease.uuid = uuid

    def expire(self, now: float) -> list[Lease]:
        """Drop leases that expired by ``now``; return them, together with any lease
        that ended since the last call without its client asking (expired during another
        operation, or displaced by :meth:`associate_uuid`). Each is returned once."""
        self._evict_expired(now)
        ended = list(self._unreported)
        self._unreported.clear()
        return ended

    # ----- persistence -----
    def to_json(self, now: float) -> dict[str, Any]:
        """The table's state as a JSON-compatible dict.

        Times are stored as seconds remaining after ``now``, because monotonic clocks
        do not survive a restart; pinned leases store ``null``. Offers are not saved:
        they are meant to last seconds.
        """
        self._evict_expired(now)

        def remaining(expires: float) -> float | None:
            return None if expires == math.inf else max(0.0, expires - now)

        return {
            "version": _JSON_VERSION,
            "leases": [
                {
                    "mac": format_mac(lease.mac),
                    "ip": str(lease.ip),
                    "remaining": remaining(lease.expires),
                    "hostname": lease.hostname,
                    "client_id": lease.client_id.hex() if lease.client_id is not None else None,
                    "uuid": lease.uuid,
                }
                for lease in self._by_mac.values() if lease.state == BOUND
            ],
            "history": [[format_mac(mac), str(ip)] for ip, mac in self._previous_holder.items()],
            "uuids": [[uuid, format_mac(mac)] for uuid, mac in self._uuid_to_mac.items()],
        }

    @classmethod
    def from_json(cls, config: Config, data: dict[str, Any], now: float) -> "LeaseTable":
        """Rebuild a table saved by :meth:`to_json`, with times relative to ``now``.

        Entries that no longer fit ``config`` (address outside the subnet or pool,
        taken by a static lease of another guest, duplicates) are skipped, so a changed
        config never fails the load. Raises :class:`LeaseError` if ``data`` is not a
        document :meth:`to_json` wrote.
        """
        table = cls(config)
        try:
            if data.get("version") != _JSON_VERSION:
                raise LeaseError(f"lease state: unsupported version {data.get('version')!r}")
            for uuid, mac in data.get("uuids", []):
                table.associate_uuid(str(uuid), parse_mac(mac))
            for mac_text, ip_text in data.get("history", []):
                mac, ip = parse_mac(mac_text), IPv4Address(ip_text)
                if table._in_pool(ip) and ip not in table._static_ips and ip not in table._by_ip:
                    table._remember(mac, ip)
            # "quarantine" (written by earlier versions) is ignored: a DECLINE is not a
            # lock-out that outlives the process.
            for item in data.get("leases", []):
                mac, ip = parse_mac(item["mac"]), IPv4Address(item["ip"])
                remaining = item.get("remaining")
                client_id = item.get("client_id")
                if remaining is None:
                    try:
                        lease = table.reserve(mac, now, ip=ip)
                    except LeaseError:
                        continue
                else:
                    lease = table.bind(mac, ip, now)
                    if lease is None:
                        continue
                    table._set_expiry(lease, now + _seconds(remaining))
                lease.hostname = item.get("hostname")
                lease.client_id = bytes.fromhex(client_id) if client_id is not None else None
                if item.get("uuid") is not None and lease.uuid is None:
                    lease.uuid = str(item["uuid"])
        except LeaseError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LeaseError(f"lease state: malformed document ({e})") from None
        return table

    # ----- internals -----
    def _in_pool(self, ip: IPv4Address) -> bool:
        return int(ip) in self._pool and ip not in self._never

    def _held_by_other(self, ip: IPv4Address, mac: bytes) -> bool:
        holder = self._by_ip.get(ip)
        return holder is not None and holder.mac != mac

    def _available(self, ip: IPv4Address, mac: bytes, now: float) -> bool:
        """May ``mac`` (a client without a static address) have pool address ``ip``?"""
        return (self._in_pool(ip)
                and ip not in self._static_ips
                and not self._held_by_other(ip, mac)
                and not self.is_quarantined(ip, now))

    def _choose_ip(self, mac: bytes, now: float, requested: IPv4Address | None) -> IPv4Address | None:
        static_ip = self.static_ip_for(mac)
        if static_ip is not None:
            return None if self._held_by_other(static_ip, mac) else static_ip
        current = self._by_mac.get(mac)
        if current is not None and current.ip not in self._static_ips:
            return current.ip
        previous = self._previous_ip.get(mac)
        if previous is not None and self._available(previous, mac, now):
            return previous
        if requested is not None:
            requested = IPv4Address(requested)
            if self._available(requested, mac, now):
                return requested
        pool = self._pool
        # Every address this scan skips is held, reserved, quarantined or in the history,
        # so the scan is bounded by the size of those tables, not by the pool.
        start = self._hash_index(mac)
        for index in itertools.chain(range(start, len(pool)), range(start)):
            ip = IPv4Address(pool[index])
            if ip not in self._previous_holder and self._available(ip, mac, now):
                return ip
        for ip in self._previous_holder:  # oldest first
            if self._available(ip, mac, now):
                return ip
        return None

    def _drop_unentitled_static_lease(self, mac: bytes) -> None:
        """Drop ``mac``'s lease if it is on a static address that is no longer ``mac``'s
        (its UUID moved to another MAC, or another UUID took its MAC)."""
        lease = self._by_mac.get(mac)
        if lease is not None and lease.ip in self._static_ips and self.static_ip_for(mac) != lease.ip:
            self._remove(lease)
            self._unreported.append(lease)

    def _hash_index(self, mac: bytes) -> int:
        # A keyed hash would change per process; sha256 keeps the first candidate for a
        # MAC the same across restarts and machines.
        digest = hashlib.sha256(mac).digest()
        return int.from_bytes(digest[:8], "big") % len(self._pool)

    def _check_reservable(self, ip: IPv4Address, mac: bytes, static_ip: IPv4Address | None,
                          now: float) -> None:
        if ip not in self._config.subnet:
            raise LeaseError(f"{ip} is outside the subnet {self._config.subnet}")
        if ip in self._never:
            raise LeaseError(f"{ip} is the gateway, host, network or broadcast address")
        if static_ip is not None and ip != static_ip:
            raise LeaseError(f"{format_mac(mac)} has the static address {static_ip}")
        if static_ip is None:
            if int(ip) not in self._pool:
                raise LeaseError(f"{ip} is outside the DHCP pool {self._config.lowest_ip}-{self._config.highest_ip}")
            if ip in self._static_ips:
                raise LeaseError(f"{ip} is a static address of another guest")
            if self.is_quarantined(ip, now):
                raise LeaseError(f"{ip} is in quarantine: a guest reported it in use")
        holder = self._by_ip.get(ip)
        if holder is not None and holder.mac != mac:
            raise LeaseError(f"{ip} is leased to {format_mac(holder.mac)}")

    def _install(self, lease: Lease) -> None:
        self._by_mac[lease.mac] = lease
        self._by_ip[lease.ip] = lease
        # While a lease is live it is the record; history is only for addresses at rest.
        self._forget_history(lease.mac, lease.ip)
        self._quarantine.pop(lease.ip, None)
        if lease.expires != math.inf:
            self._push_expiry(lease)

    def _remove(self, lease: Lease, *, remember: bool = False) -> None:
        del self._by_mac[lease.mac]
        del self._by_ip[lease.ip]
        if remember and not lease.static:
            self._remember(lease.mac, lease.ip)

    def _remember(self, mac: bytes, ip: IPv4Address) -> None:
        self._forget_history(mac, ip)
        self._previous_holder[ip] = mac
        self._previous_ip[mac] = ip

    def _forget_history(self, mac: bytes, ip: IPv4Address) -> None:
        old_ip = self._previous_ip.pop(mac, None)
        if old_ip is not None:
            del self._previous_holder[old_ip]
        old_mac = self._previous_holder.pop(ip, None)
        if old_mac is not None:
            del self._previous_ip[old_mac]

    def _set_expiry(self, lease: Lease, expires: float) -> None:
        lease.expires = expires
        self._push_expiry(lease)

    def _push_expiry(self, lease: Lease) -> None:
        heap = self._expiry_heap
        heapq.heappush(heap, (lease.expires, next(self._tiebreak), lease))
        # Renewals leave stale entries behind; rebuild when they dominate so a client
        # renewing in a tight loop cannot grow the heap without bound.
        if len(heap) > 2 * len(self._by_mac) + 64:
            self._expiry_heap = [entry for entry in heap if self._heap_entry_current(entry)]
            heapq.heapify(self._expiry_heap)

    def _heap_entry_current(self, entry: tuple[float, int, Lease]) -> bool:
        expires, _, lease = entry
        return lease.expires == expires and self._by_mac.get(lease.mac) is lease

    def _evict_expired(self, now: float) -> None:
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._heap_entry_current(entry):
                lease = entry[2]
                self._remove(lease, remember=True)
                self._unreported.append(lease)
        quarantine = self._quarantine
        while quarantine:
            ip, (until, _) = next(iter(quarantine.items()))
            if until > now:
                break
            del quarantine[ip]

    def _add_quarantine(self, ip: IPv4Address, now: float, client: object) -> None:
        quarantine = self._quarantine
        quarantine.pop(ip, None)  # re-inserted at the end: keeps expiry order
        mine = [held for held, (_, who) in quarantine.items() if who == client]
        while mine and len(mine) >= self._config.decline_max_per_port:
            del quarantine[mine.pop(0)]  # this client's oldest
            self.quarantine_evictions += 1
        while quarantine and len(quarantine) >= self._max_quarantine:
            del quarantine[next(iter(quarantine))]  # the oldest overall
            self.quarantine_evictions += 1
        if self._config.decline_max_per_port > 0 and self._max_quarantine > 0:
            quarantine[ip] = (now + self._config.decline_seconds, client)
        else:
            self.quarantine_evictions += 1
