"""Names netkit answers itself, sans-I/O: zones added at run time, the hosts file, the
built-in names (host, gateway, vm) and PTR records for the addresses behind them.

Lookup order for a name (the first source that has the name answers for all its types):

1. records of zones added with :meth:`LocalNames.add_zone` (the most specific zone
   first);
2. the hosts file;
3. the built-in names: ``host_names`` -> host_ip, ``gateway_names`` -> gateway_ip,
   ``vm_names`` -> the asking guest's own address;
4. reverse names (PTR) of every address above; a reverse name inside netkit's subnet
   with no name is NXDOMAIN (those addresses exist only inside netkit, so asking the
   host's resolver would only leak them);
5. ``*`` wildcards of the zones (RFC 4592: from the closest encloser); any other name
   inside a zone is NXDOMAIN (NODATA for an empty non-terminal).

A name found with no record of the asked type is NOERROR with no answers, never
NXDOMAIN: a guest asking AAAA for host.docker.internal must not conclude that the name
does not exist. A CNAME is followed through local data; if its target is not local the
caller resolves the target upstream (``LocalAnswer.chase``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Callable

from dnslib import AAAA, CLASS, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel, DNSRecord

from ..config import Config
from .files import HostsTable
from .message import name_key

__all__ = ["LocalNames", "LocalAnswer", "Zone", "LOCAL_TTL", "reverse_name", "address_of_reverse"]

#: TTL of answers made from the hosts file and the built-in names. Zero, as dnsmasq does
#: for local names: the hosts file can change at any time, and vm names differ per guest.
LOCAL_TTL = 0
#: Most CNAMEs followed through local data.
MAX_CNAME_CHAIN = 8
_Key = tuple[bytes, ...]
_V4_REVERSE = (b"in-addr", b"arpa")
_V6_REVERSE = (b"ip6", b"arpa")


@dataclass
class LocalAnswer:
    rcode: int = RCODE.NOERROR
    answers: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    #: A CNAME target outside local data; the caller resolves it and appends its answers.
    chase: DNSLabel | None = None


def reverse_name(address: IPv4Address | IPv6Address) -> DNSLabel:
    return DNSLabel(address.reverse_pointer)


def address_of_reverse(key: _Key) -> IPv4Address | IPv6Address | None:
    """The address a full reverse name (``4.3.2.1.in-addr.arpa``) stands for, or None."""
    try:
        if len(key) == 6 and key[4:] == _V4_REVERSE:
            octets = [int(x) for x in reversed(key[:4])]
            if all(x.isdigit() and len(x) <= 3 for x in key[:4]) and all(o <= 255 for o in octets):
                return IPv4Address(bytes(octets))
        elif len(key) == 34 and key[32:] == _V6_REVERSE:
            nibbles = b"".join(reversed(key[:32]))
            if all(len(n) == 1 for n in key[:32]):
                return IPv6Address(int(nibbles, 16))
    except ValueError:
        pass
    return None


class Zone:
    """A zone added at run time: records by owner name, and the zone's SOA."""

    def __init__(self, apex: DNSLabel, records: list[RR]) -> None:
        self.apex = apex
        self.apex_key = name_key(apex)
        self.records: dict[_Key, list[RR]] = {}
        for rr in records:
            self.records.setdefault(name_key(rr.rname), []).append(rr)
        #: Every name that exists in the zone, owners and their ancestors up to the apex
        #: (so empty non-terminals are NODATA, not NXDOMAIN).
        self.existing: set[_Key] = {self.apex_key}
        for key in self.records:
            for i in range(len(key) - len(self.apex_key) + 1):
                self.existing.add(key[i:])
        soa = [rr for rr in self.records.get(self.apex_key, []) if rr.rtype == QTYPE.SOA]
        self.soa = soa[0] if soa else RR(
            apex, QTYPE.SOA, ttl=LOCAL_TTL,
            rdata=SOA(apex, DNSLabel("hostmaster").add(apex), (1, 3600, 600, 86400, LOCAL_TTL)))
        #: address -> owner, for PTR of the zone's A and AAAA records.
        self.reverse: dict[IPv4Address | IPv6Address, DNSLabel] = {}
        for rr in records:
            if rr.rtype in (QTYPE.A, QTYPE.AAAA):
                self.reverse.setdefault(ipaddress.ip_address(str(rr.rdata)), rr.rname)

    def contains(self, key: _Key) -> bool:
        return len(key) >= len(self.apex_key) and key[len(key) - len(self.apex_key):] == self.apex_key

    def find(self, key: _Key) -> list[RR] | None:
        """Records at ``key`` (exact, else from the wildcard at its closest encloser)."""
        found = self.records.get(key)
        if found is not None:
            return found
        if key in self.existing:
            return []
        for i in range(1, len(key) - len(self.apex_key) + 1):
            encloser = key[i:]
            if encloser in self.existing:
                return self.records.get((b"*",) + encloser)
        return None


def parse_zone(name: str, records: list[tuple[str, str, str]] | str) -> Zone:
    """Build a :class:`Zone`; raise ValueError naming what is wrong."""
    apex = _label(name, "zone name")
    rrs: list[RR] = []
    if isinstance(records, str):
        origin = str(apex)
        try:
            rrs = RR.fromZone(records + "\n", origin=origin, ttl=LOCAL_TTL)
        except Exception as e:
            raise ValueError(f"zone {name}: cannot parse zone text: {e}") from None
    else:
        for item in records:
            try:
                owner, rtype, value = item
                rrs.append(_record(apex, str(owner), str(rtype).upper(), str(value)))
            except ValueError as e:
                raise ValueError(f"zone {name}: bad record {item!r}: {e}") from None
            except Exception as e:
                raise ValueError(f"zone {name}: bad record {item!r}: {type(e).__name__}: {e}") from None
    zone = Zone(apex, rrs)
    for key, owned in zone.records.items():
        if not zone.contains(key):
            raise ValueError(f"zone {name}: {owned[0].rname} is outside the zone")
        if any(rr.rtype == QTYPE.CNAME for rr in owned) and len(owned) > 1:
            raise ValueError(f"zone {name}: {owned[0].rname} has a CNAME and other records")
        if any(len(label) > 63 for label in key) or len(owned[0].rname) > 253:
            raise ValueError(f"zone {name}: {owned[0].rname} is too long a name")
    try:
        DNSRecord(rr=list(rrs)).pack()
    except Exception as e:
        raise ValueError(f"zone {name}: a record cannot be encoded: {e}") from None
    return zone


def _label(text: str, what: str) -> DNSLabel:
    text = text.strip()
    stripped = text.rstrip(".")
    try:
        label = DNSLabel(stripped)
    except Exception:
        raise ValueError(f"{what}: not a DNS name: {text!r}") from None
    if any(not 0 < len(part) <= 63 for part in label.label) or len(stripped) > 253:
        raise ValueError(f"{what}: not a DNS name: {text!r}")
    return label


def _record(apex: DNSLabel, owner: str, rtype: str, value: str) -> RR:
    apex_key = name_key(apex)
    if owner.strip() == "@":
        rname = apex
    else:
        rname = _label(owner, "owner")
        key = name_key(rname)
        if key[len(key) - len(apex_key):] != apex_key or len(key) < len(apex_key):
            if owner.strip().endswith("."):
                raise ValueError(f"{owner} is outside the zone")
            rname = DNSLabel(rname.label + apex.label)  # relative to the zone
    try:
        type_code = getattr(QTYPE, rtype)
    except Exception:
        raise ValueError(f"unknown type {rtype}") from None
    if type_code in (QTYPE.OPT, QTYPE.ANY, QTYPE.AXFR, QTYPE.IXFR):
        raise ValueError(f"{rtype} is not a record type")
    if type_code == QTYPE.TXT and not value.lstrip().startswith('"'):
        return RR(rname, type_code, ttl=LOCAL_TTL, rdata=TXT(value))
    # Names in values are absolute (a trailing dot is optional), so parse against the root.
    line = f"{rname} {LOCAL_TTL} IN {rtype} {value}\n"
    parsed = RR.fromZone(line)
    if len(parsed) != 1:
        raise ValueError("not one record")
    return parsed[0]


class LocalNames:
    """See the module docstring."""

    def __init__(self, config: Config, hosts: Callable[[], HostsTable] | None = None) -> None:
        self.config = config
        self._hosts = hosts
        self.zones: dict[_Key, Zone] = {}
        self._builtin: dict[_Key, str] = {}
        for kind, names in (("vm", config.vm_names), ("gateway", config.gateway_names),
                            ("host", config.host_names)):
            for text in names:  # later kinds win, so a name in two lists is the host's
                self._builtin[name_key(text.rstrip("."))] = kind
        self._subnet = config.subnet

    # --- zones ---

    def add_zone(self, name: str, records: list[tuple[str, str, str]] | str) -> Zone:
        zone = parse_zone(name, records)
        self.zones[zone.apex_key] = zone
        return zone

    def remove_zone(self, name: str) -> bool:
        try:
            key = name_key(_label(name, "zone name"))
        except ValueError:
            return False
        return self.zones.pop(key, None) is not None

    def _zones_for(self, key: _Key) -> list[Zone]:
        """Zones containing ``key``, the most specific first."""
        return [self.zones[key[i:]] for i in range(len(key) + 1) if key[i:] in self.zones]

    # --- lookup ---

    def lookup(self, qname: DNSLabel, qtype: int, qclass: int = CLASS.IN, *,
               vm_address: Callable[[], IPv4Address | None] = lambda: None) -> LocalAnswer | None:
        """The local answer for a question, or None if the name is not local."""
        if qclass not in (CLASS.IN, QTYPE.ANY):
            return None
        hosts = self._hosts() if self._hosts is not None else None
        answer = LocalAnswer()
        name = qname
        seen: set[_Key] = set()
        for _ in range(MAX_CNAME_CHAIN + 1):
            key = name_key(name)
            if key in seen:
                break  # a CNAME loop: answer with what we have
            seen.add(key)
            found = self._records(name, key, hosts, vm_address)
            if found is None:
                if name is qname:
                    return None
                answer.chase = name
                return answer
            rcode, records, authority = found
            if rcode != RCODE.NOERROR:
                answer.rcode = rcode
                answer.authority = authority
                return answer
            if qtype == QTYPE.ANY:
                answer.answers.extend(records)
                return answer
            matching = [rr for rr in records if rr.rtype == qtype]
            if matching or qtype == QTYPE.CNAME:
                answer.answers.extend(matching)
                return answer
            cnames = [rr for rr in records if rr.rtype == QTYPE.CNAME]
            if not cnames:
                answer.authority = authority  # NODATA
                return answer
            answer.answers.append(cnames[0])
            name = cnames[0].rdata.label
        return answer

    def _records(self, name: DNSLabel, key: _Key, hosts: HostsTable | None,
                 vm_address: Callable[[], IPv4Address | None]) -> tuple[int, list[RR], list[RR]] | None:
        zones = self._zones_for(key)
        for zone in zones:
            found = zone.records.get(key)
            if found is not None:
                return RCODE.NOERROR, [_owned(rr, name) for rr in found], [zone.soa]
        if hosts is not None and key in hosts.addresses:
            return RCODE.NOERROR, [_address_rr(name, a) for a in hosts.addresses[key]], []
        kind = self._builtin.get(key)
        if kind is not None:
            address = {"host": lambda: self.config.host_ip, "gateway": lambda: self.config.gateway_ip,
                       "vm": vm_address}[kind]()
            return RCODE.NOERROR, [_address_rr(name, address)] if address is not None else [], []
        address = address_of_reverse(key)
        if address is not None:
            target = self._name_of(address, hosts, vm_address)
            if target is not None:
                return RCODE.NOERROR, [RR(name, QTYPE.PTR, ttl=LOCAL_TTL, rdata=PTR(target))], []
            if address in self._subnet:
                return RCODE.NXDOMAIN, [], []
        for zone in zones:
            found = zone.find(key)
            if found is not None:
                return RCODE.NOERROR, [_owned(rr, name) for rr in found], [zone.soa]
        if zones:
            return RCODE.NXDOMAIN, [], [zones[0].soa]
        return None

    def _name_of(self, address, hosts: HostsTable | None,
                 vm_address: Callable[[], IPv4Address | None]) -> DNSLabel | None:
        if hosts is not None and address in hosts.canonical:
            return hosts.canonical[address]
        for zone in self.zones.values():
            if address in zone.reverse:
                return zone.reverse[address]
        config = self.config
        if address == config.host_ip and config.host_names:
            return DNSLabel(config.host_names[0].rstrip("."))
        if address == config.gateway_ip and config.gateway_names:
            return DNSLabel(config.gateway_names[0].rstrip("."))
        if config.vm_names and isinstance(address, IPv4Address) and address in self._subnet:
            if address == vm_address():
                return DNSLabel(config.vm_names[0].rstrip("."))
        return None


def _address_rr(name: DNSLabel, address) -> RR:
    if isinstance(address, IPv4Address):
        return RR(name, QTYPE.A, ttl=LOCAL_TTL, rdata=A(str(address)))
    return RR(name, QTYPE.AAAA, ttl=LOCAL_TTL, rdata=AAAA(str(address)))


def _owned(rr: RR, name: DNSLabel) -> RR:
    """``rr`` with ``name`` (the case the client asked in, or a wildcard's match) as owner."""
    return RR(name, rr.rtype, rr.rclass, rr.ttl, rr.rdata)
