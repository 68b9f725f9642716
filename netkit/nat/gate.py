"""One gate out: every host socket netkit opens on a guest's behalf is made here.

``HostGate`` joins the three things every outbound path needs, in one order:

1. translation: the host alias becomes host loopback (or nothing, with
   ``--no-host-loopback``), ``--nat`` virtual IPs their real ones, the gateway and
   loopback/0.0.0.0 addressed by a guest nothing;
2. the policy (``Policy.check_flow``: deny/allow rules, default deny, the hook), with
   the guest's identity and the path that asks (``via``);
3. the socket, from the injectable ``HostNetwork``.

The NAT asks ``route()`` once per flow (TCP) or per flow and destination (UDP, ICMP)
and sends only to the ``Route`` it returns. The HTTP proxy (explicit, transparent, and
its connections to an upstream proxy) calls ``open_proxy_stream()``, which resolves
origin names on the host, applies the policy to every address the name resolved to
(a name that resolves to 169.254.169.254 or a denied network is refused: no DNS
rebinding) and connects only to an address that passed. A refusal is a ``Refusal``
(NAT: RST or ICMP) or a raised ``netkit.policy.Refused`` (proxy: 403 or 502).
"""

from __future__ import annotations

import collections
import errno
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import trio

from ..config import Config
from ..policy import UNKNOWN_ADDRESS, Policy, Refused
from .host import LOOPBACK, HostNetwork, is_host_local, translate_destination

__all__ = ["HostGate", "Route", "Refusal", "Refused"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where the gate lets one guest flow go: the real host address and port (IPv6 only
    for an operator's upstream proxy)."""

    address: IPv4Address | IPv6Address
    port: int
    #: The policy redirected the flow (the transparent proxy then leaves it alone).
    redirected: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the gate refused: "denied" (policy) or "unreachable" (no such destination)."""

    reason: str

    def error(self, message: str) -> Refused:
        return Refused(self.reason, message)


DENIED = Refusal("denied")
UNREACHABLE = Refusal("unreachable")

#: Routes a connectionless flow (UDP, ICMP echo) remembers, one per destination; a flow
#: spraying more destinations starts over (and is asked again), so memory stays bounded.
MAX_ROUTES_PER_FLOW = 256


class HostGate:
    """Translation + policy + host socket, for every path out (see the module doc)."""

    def __init__(self, config: Config, policy: Policy, host: HostNetwork | None = None) -> None:
        self.config = config
        self.policy = policy
        self.host = host if host is not None else HostNetwork()
        #: Host connections opened and refused, by path ("proxy-connects", "proxy-denied"...).
        self.counters: collections.Counter[str] = collections.Counter()
        #: Guest -> host name lookups it has in progress (the host resolver runs in a
        #: bounded pool of threads: one guest's slow names must not hold all of them).
        self._lookups: dict[IPv4Address, int] = {}

    # ------------------------------------------------------------------ NAT
    def route(self, protocol: str, guest: IPv4Address, destination: IPv4Address, port: int, *,
              switch_port: int | None = None) -> Route | Refusal:
        """Where a NAT flow from ``guest`` to ``destination:port`` (as the guest addressed
        it) may go, or why not. Asked once per flow (and destination), not per packet."""
        real = translate_destination(self.config, destination)
        if real is None:
            return UNREACHABLE
        decision = self.policy.check_flow(protocol, guest, destination, port, switch_port=switch_port)
        if decision.action == "deny":
            return DENIED
        if decision.action == "redirect":
            return Route(decision.address, decision.port or port, True)
        return Route(real, port)

    async def connect_tcp(self, route: Route) -> socket.socket:
        """A connected non-blocking TCP socket along ``route`` (OSError on failure)."""
        return await self.host.connect_tcp(route.address, route.port)

    def udp_socket(self) -> socket.socket:
        """An unconnected UDP socket for one guest flow; it sends only to routes."""
        return self.host.udp_socket()

    def icmp_echo_socket(self) -> tuple[socket.socket, bool]:
        return self.host.icmp_echo_socket()

    # ------------------------------------------------------------------ HTTP proxy
    async def open_proxy_stream(self, guest: IPv4Address, host: str, port: int, *, via: str = "proxy",
                                upstream: tuple[str, int] | None = None,
                                switch_port: int | None = None) -> trio.SocketStream:
        """A TCP stream for a proxy request of ``guest`` to the origin ``host:port`` (as
        the guest named it), or to ``upstream`` (the operator's upstream proxy) on the
        origin's behalf. Raises ``Refused`` or ``OSError``; the caller applies timeouts.

        The policy is asked about the origin, for each address it stands for:

        - an IP literal: as NAT would (the host alias, ``--nat``...); a loopback or
          0.0.0.0 literal means the host itself and is checked as the host alias;
        - netkit's host names: the host alias;
        - another name: every IPv4 address the host's resolver gives, each as a guest
          would see it (loopback as the host alias, ``--nat`` real IPs as their virtual
          ones). Any denied address refuses the request; the socket goes only to an
          address that passed, never to the name (a second lookup could answer
          differently).

        Through an upstream proxy the origin is checked the same way when the host can
        resolve it. A name the host cannot resolve (the upstream's own network, a
        corporate DNS) is checked as ``UNKNOWN_ADDRESS`` (0.0.0.0): allowed unless an
        allow list is in force (rules that cover 0.0.0.0 aside) or the hook says no.
        A redirect decision sends the socket to its address instead (of the origin or
        the upstream). The upstream's own address is the operator's and is not checked.
        """
        name = None if _literal(host) is not None else host.lower().rstrip(".")
        upstream_text = f"{upstream[0]}:{upstream[1]}" if upstream is not None else None
        try:
            candidates = await self._origin_addresses(guest, host)
        except Refused as refused:
            if upstream is None or refused.reason != "unresolved":
                self._refused(via, refused.reason)
                raise
            candidates = [(UNKNOWN_ADDRESS, None)]
        targets: list[Route] = []
        for view, real in candidates:
            decision = self.policy.check_flow("tcp", guest, view, port, via=via, name=name,
                                              switch_port=switch_port, upstream=upstream_text)
            if decision.action == "deny":
                self._refused(via, "denied")
                shown = host if name is None or view == UNKNOWN_ADDRESS else f"{host} ({view})"
                raise Refused("denied", f"connections to {shown} port {port} are refused by netkit's "
                                        "outbound policy")
            if decision.action == "redirect":
                targets.append(Route(decision.address, decision.port or port, True))
            elif upstream is None:
                targets.append(Route(real, port))
        if upstream is not None and not targets:
            stream = await self._connect_upstream(*upstream)
        else:
            stream = await self._connect_first(targets)
        self.counters[f"{via}-connects"] += 1
        return stream

    def _refused(self, via: str, reason: str) -> None:
        self.counters[f"{via}-{reason}"] += 1

    async def _origin_addresses(self, guest: IPv4Address, host: str) -> list[tuple[IPv4Address, IPv4Address | None]]:
        """(address as a guest sees it, real address to connect to) for each address
        ``host`` stands for. Raises ``Refused`` ("unreachable", "unresolved", "busy")."""
        config = self.config
        literal = _literal(host)
        if literal is None and host.lower().rstrip(".") in {n.lower() for n in config.host_names}:
            literal = config.host_ip
        if literal is not None:
            if isinstance(literal, IPv6Address):
                raise Refused("unreachable", f"{host} is an IPv6 address; the proxy reaches IPv4 only")
            view = self._guest_view(literal, host) if is_host_local(literal) else literal
            real = translate_destination(config, view)
            if real is None:
                raise Refused("unreachable", f"{host} is not reachable from the proxy")
            return [(view, real)]
        held = self._lookups.get(guest, 0)
        if held >= config.http_proxy_max_lookups_per_guest:
            self.counters["lookups-busy"] += 1
            raise Refused("busy", f"too many name lookups in progress for {guest} "
                                  f"(limit {config.http_proxy_max_lookups_per_guest})")
        self._lookups[guest] = held + 1
        try:
            addresses = await self.host.resolve(host)
        except OSError as e:
            raise Refused("unresolved", f"cannot resolve {host}: {e.strerror or e}") from None
        finally:
            remaining = self._lookups[guest] - 1
            if remaining:
                self._lookups[guest] = remaining
            else:
                del self._lookups[guest]
        if not addresses:
            raise Refused("unresolved", f"{host} has no IPv4 address")
        out = []
        for address in addresses:
            view = self._guest_view(address, host)
            # As for a literal: the same translation NAT applies (the virtual subnet,
            # the gateway and the like are never host destinations).
            real = translate_destination(config, view)
            if real is None:
                raise Refused("unreachable", f"{host} ({address}) is not reachable from the proxy")
            out.append((view, real))
        return out

    def _guest_view(self, address: IPv4Address, host: str) -> IPv4Address:
        """The address a guest would use for the host address ``address``."""
        if is_host_local(address):
            if not self.config.host_loopback:
                raise Refused("unreachable", f"{host} is the host's loopback, which guests may not reach "
                                             "(--no-host-loopback)")
            return self.config.host_ip
        for virtual, real in self.config.nat:
            if address == real:
                return virtual
        return address

    async def _connect_first(self, targets: list[Route]) -> trio.SocketStream:
        """Connect to the first target that answers (in the resolver's order)."""
        error: OSError | None = None
        for target in targets:
            try:
                sock = await self.host.connect_tcp(target.address, target.port)
            except OSError as e:
                error = e
                continue
            return _stream(sock)
        raise error if error is not None else OSError(errno.EHOSTUNREACH, "no address to connect to")

    async def _connect_upstream(self, host: str, port: int) -> trio.SocketStream:
        literal = _literal(host)
        addresses = [literal] if literal is not None else await self.host.resolve(host)
        return await self._connect_first([Route(a, port) for a in addresses])


def _literal(host: str) -> IPv4Address | IPv6Address | None:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.is_loopback:
            return LOOPBACK
    return address


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
