"""Outbound policy: which destinations guests may reach, asked once per new flow.

Rules come from config (``--allow`` / ``--deny``, each ``[PROTO:]CIDR[:PORTS]``, PORTS
like ``80,443`` or ``1000-2000``):

1. an explicit ``deny`` rule that matches refuses;
2. if any ``allow`` rules exist, only destinations they match are allowed;
3. ``default_deny`` (169.254.169.254, the cloud metadata address, as gvproxy does)
   refuses unless an ``allow`` rule matches it;
4. otherwise the flow is allowed.

Library users may install ``policy.hook``: ``hook(request) -> Decision | None`` is asked
about every host connection netkit opens for a guest and every DNS query, after the
rules (None keeps the rules' answer). ``FlowRequest.via`` says which path asks: "nat"
(TCP/UDP/ICMP NAT), "proxy" (the explicit HTTP proxy: absolute-form requests and
CONNECT) or "transparent-proxy" (guest port 80/443 routed by Host header or TLS SNI);
proxy requests carry the ``name`` the guest asked for, and ``upstream`` when the
connection goes to an upstream proxy. It runs when a flow or host connection is
created, never per packet of an established flow. Refusals are counted by protocol,
and for proxy paths by path too, in ``policy.counters``.

Every one of those questions comes from ``netkit.nat.gate.HostGate``, the one place
host sockets for guests are made; ``Refused`` is what it raises when it will not.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Callable

__all__ = ["Rule", "Decision", "FlowRequest", "DnsRequest", "Policy", "PolicyError", "Refused", "parse_rule",
           "ALLOW", "DENY", "UNKNOWN_ADDRESS", "VIAS"]

log = logging.getLogger("netkit.policy")

PROTOCOLS = ("tcp", "udp", "icmp")
#: The paths that open host connections for guests (``FlowRequest.via``).
VIAS = ("nat", "proxy", "transparent-proxy")
#: ``FlowRequest.destination`` when the address is not known: an origin name that does
#: not resolve on the host, asked for through an upstream proxy (which resolves it).
#: Only rules that cover 0.0.0.0 (``0.0.0.0/0``...) match it, so an allow list refuses
#: such names and deny rules on specific networks do not.
UNKNOWN_ADDRESS = IPv4Address("0.0.0.0")


class Refused(Exception):
    """The gate will not open a host connection for a guest.

    ``reason`` is "denied" (the policy refused: the proxy answers 403), "unreachable"
    (no such destination from a guest: the gateway, a disabled host alias, IPv6),
    "unresolved" (the name has no IPv4 address on the host) or "busy" (the guest has too
    many name lookups in progress: 503)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class PolicyError(ValueError):
    """A rule could not be parsed."""


@dataclass(frozen=True, slots=True)
class Rule:
    network: IPv4Network
    #: Inclusive port ranges; empty means every port.
    ports: tuple[tuple[int, int], ...] = ()
    #: None means every protocol.
    protocol: str | None = None

    def matches(self, protocol: str, address: IPv4Address, port: int) -> bool:
        if self.protocol is not None and self.protocol != protocol:
            return False
        if address not in self.network:
            return False
        return not self.ports or any(low <= port <= high for low, high in self.ports)


def parse_rule(text: str) -> Rule:
    """``[tcp:|udp:|icmp:]CIDR[:PORTS]``, e.g. ``10.0.0.0/8``, ``tcp:1.2.3.4:80,443``."""
    rest = text.strip()
    protocol = None
    head, sep, tail = rest.partition(":")
    if sep and head.lower() in PROTOCOLS:
        protocol, rest = head.lower(), tail
    network_text, sep, ports_text = rest.partition(":")
    try:
        network = IPv4Network(network_text, strict=False)
    except ValueError:
        raise PolicyError(f"{text!r}: {network_text!r} is not an IPv4 address or CIDR") from None
    ports: list[tuple[int, int]] = []
    if sep:
        for part in ports_text.split(","):
            low, dash, high = part.partition("-")
            try:
                lo, hi = int(low), int(high) if dash else int(low)
            except ValueError:
                raise PolicyError(f"{text!r}: bad port {part!r}") from None
            if not (0 <= lo <= hi <= 65535):
                raise PolicyError(f"{text!r}: port range {part!r} is out of order or out of range")
            ports.append((lo, hi))
    return Rule(network, tuple(ports), protocol)


@dataclass(frozen=True, slots=True)
class Decision:
    """``allow``; ``deny`` (TCP: RST, UDP/ICMP: ICMP administratively prohibited, DNS:
    NXDOMAIN); or ``redirect`` to ``address`` (and ``port``, for TCP/UDP)."""

    action: str
    address: IPv4Address | None = None
    port: int | None = None

    @classmethod
    def redirect(cls, address: IPv4Address | str, port: int | None = None) -> "Decision":
        return cls("redirect", IPv4Address(address), port)


ALLOW = Decision("allow")
DENY = Decision("deny")


@dataclass(frozen=True, slots=True)
class FlowRequest:
    protocol: str  # "tcp", "udp" or "icmp"
    guest: IPv4Address
    #: As the guest addressed it (before NAT translation). Proxy requests: the address
    #: the name resolved to on the host, as a guest would see it (host loopback is the
    #: host alias); ``UNKNOWN_ADDRESS`` for a name only an upstream proxy can resolve.
    destination: IPv4Address
    port: int  # 0 for ICMP
    #: Which path opens the connection: "nat", "proxy" or "transparent-proxy".
    via: str = "nat"
    #: The host name the guest asked the proxy for (None for NAT and IP literals).
    name: str | None = None
    #: The switch port (``Port.id``) the guest is attached to, when known.
    switch_port: int | None = None
    #: "host:port" of the upstream proxy the connection goes to instead (None: direct).
    upstream: str | None = None


@dataclass(frozen=True, slots=True)
class DnsRequest:
    guest: IPv4Address
    name: str  # lower case, no trailing dot
    qtype: str  # "A", "AAAA", ...


class Policy:
    def __init__(self, allow: tuple[str, ...] = (), deny: tuple[str, ...] = (),
                 default_deny: tuple[str, ...] = ("169.254.169.254/32",)) -> None:
        self.allow = tuple(parse_rule(r) for r in allow)
        self.deny = tuple(parse_rule(r) for r in deny)
        self.default_deny = tuple(parse_rule(r) for r in default_deny)
        self.hook: Callable[[FlowRequest | DnsRequest], Decision | None] | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    def check_flow(self, protocol: str, guest: IPv4Address, destination: IPv4Address, port: int, *,
                   via: str = "nat", name: str | None = None, switch_port: int | None = None,
                   upstream: str | None = None) -> Decision:
        decision = self._rules(protocol, destination, port)
        if self.hook is not None:
            decision = self._ask(FlowRequest(protocol, guest, destination, port, via, name, switch_port, upstream),
                                 decision)
        if decision.action == "deny":
            self.counters[f"{protocol}-denied"] += 1
            if via != "nat":
                self.counters[f"{via}-denied"] += 1
        elif decision.action == "redirect":
            self.counters[f"{protocol}-redirected"] += 1
            if via != "nat":
                self.counters[f"{via}-redirected"] += 1
        return decision

    def check_dns(self, guest: IPv4Address, name: str, qtype: str) -> Decision:
        if self.hook is None:
            return ALLOW
        decision = self._ask(DnsRequest(guest, name.lower().rstrip("."), qtype), ALLOW)
        if decision.action != "allow":
            self.counters[f"dns-{decision.action}"] += 1
        return decision

    def _rules(self, protocol: str, destination: IPv4Address, port: int) -> Decision:
        if any(rule.matches(protocol, destination, port) for rule in self.deny):
            return DENY
        allowed = any(rule.matches(protocol, destination, port) for rule in self.allow)
        if self.allow and not allowed:
            return DENY
        if not allowed and any(rule.matches(protocol, destination, port) for rule in self.default_deny):
            return DENY
        return ALLOW

    def _ask(self, request, fallback: Decision) -> Decision:
        try:
            answer = self.hook(request)
        except Exception:
            # A broken hook must not open the gate: refuse, and say why in the log.
            self.counters["hook-errors"] += 1
            log.exception("policy hook failed on %r; refusing", request)
            return DENY
        if answer is None:
            return fallback
        if not isinstance(answer, Decision) or answer.action not in ("allow", "deny", "redirect"):
            self.counters["hook-errors"] += 1
            log.error("policy hook returned %r for %r; refusing", answer, request)
            return DENY
        return answer

    def statistics(self) -> dict:
        return dict(self.counters)
