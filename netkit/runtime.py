"""``open_switch``: the library entry point that wires switch, gateway and services together."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from typing import AsyncIterator

import trio

from .config import Config
from .dns.server import DnsService
from .files import serve_9p
from .http_proxy import GateConnector, HttpProxy, ProxySettings
from .ntp import SntpServer
from .forward import PortForwarder, parse_forward_spec
from .gateway import Gateway
from .nat.gate import HostGate
from .nat.host import HostNetwork
from .nat.icmp import IcmpNat
from .nat.tcp import TcpNat
from .nat.udp import UdpNat
from .policy import Policy
from .state import LeaseStateWriter, load_leases
from .supervise import Supervisor
from .switch import Switch
from .wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP

__all__ = ["open_switch", "LEASE_EXPIRY_INTERVAL"]

log = logging.getLogger("netkit")

DNS_PORT = 53
SNTP_PORT = 123
NINEP_PORT = 564

#: How often expired DHCP leases are swept (seconds).
LEASE_EXPIRY_INTERVAL = 10.0


async def _sweep_leases(gateway: Gateway) -> None:
    while True:
        await trio.sleep(LEASE_EXPIRY_INTERVAL)
        gateway.expire_leases()


def _wire(switch: Switch, gateway: Gateway, tcp_nat: TcpNat, udp_nat: UdpNat, icmp_nat: IcmpNat) -> None:
    """Who hands frames and events to whom, all in one place (no component registers
    itself with another from its constructor)."""
    switch.gateway = gateway  # frames to the gateway's MAC, and broadcasts
    gateway.nat[PROTO_TCP] = tcp_nat.input  # packets to destinations beyond the gateway
    gateway.nat[PROTO_UDP] = udp_nat.input
    gateway.nat[PROTO_ICMP] = icmp_nat.input
    gateway.unclaimed[PROTO_TCP] = tcp_nat.input  # the gateway's own ports no service owns: RST
    gateway.unclaimed[PROTO_UDP] = udp_nat.port_unreachable
    switch.on_batch_done(tcp_nat.flush)  # one ACK for a batch of segments
    switch.on_mac_replaced(gateway.mac_replaced)  # the old MAC's lease is released
    for component in (gateway, tcp_nat, udp_nat, icmp_nat):
        switch.on_detach(component.port_detached)
    for nat in (tcp_nat, udp_nat, icmp_nat):
        switch.on_address_unbound(nat.address_unbound)


def _start_dns(config: Config, gateway: Gateway, tcp_nat: TcpNat, policy: Policy,
               supervisor: Supervisor) -> DnsService:
    """DNS on the gateway: UDP and TCP port 53."""
    dns = DnsService(config)
    dns.policy = policy
    # --vm-names resolve to the asking guest's own address: the service's default, since
    # port security only lets a guest send from its leased address.

    async def answer(query: bytes, client, reply) -> None:
        response = await dns.handle_query(query, client=client, transport="udp")
        if response is not None:
            reply(response)

    def datagram(payload, client, reply) -> None:
        # One task per query: a slow upstream must never hold up the next question, and
        # a query that fails ends alone (counted; the guest gets no answer and retries).
        supervisor.start_soon(answer, bytes(payload), client, reply, unit="dns")

    gateway.register_udp_service(DNS_PORT, datagram)
    tcp_nat.register_service(DNS_PORT, dns.serve_tcp)
    return dns


def _start_sntp(gateway: Gateway) -> SntpServer:
    """SNTP on the gateway, UDP port 123, answering from the host clock (DHCP option 42
    points guests here)."""
    sntp = SntpServer()

    def datagram(payload, client, reply) -> None:
        answer = sntp.handle_untrusted(bytes(payload), received_at=time.time())
        if answer is not None:
            reply(answer)

    gateway.register_udp_service(SNTP_PORT, datagram)
    return sntp


class FileService:
    """The 9P2000.L file service on the gateway, TCP port 564, for ``config.shares``;
    its counters (messages, errors, ``setid_stripped``, ``privilege_refused``...) add up
    over every connection."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.shares = config.shares_by_name()
        self.stats: collections.Counter[str] = collections.Counter()

    async def serve(self, stream, client) -> None:
        config = self.config
        await serve_9p(stream, self.shares, msize_max=config.files_msize_max, max_fids=config.files_max_fids,
                       max_outstanding=config.files_max_outstanding, stats=self.stats)

    def statistics(self) -> dict:
        return dict(self.stats)


async def _start_http_proxy(config: Config, gateway: Gateway, tcp_nat: TcpNat, nursery: trio.Nursery,
                            gate: HostGate) -> HttpProxy:
    """The HTTP proxy on the gateway (explicit on ``http_proxy_port``; transparent for
    the ports its settings list). Every connection it makes goes through ``gate`` with
    the guest's identity, like NAT's (names that mean the host reach the host's loopback,
    as the host alias, and never go through an upstream proxy)."""
    host_names = set(config.host_names) | {str(config.host_ip)}

    def port_of(guest: IPv4Address) -> int | None:
        mac = gateway.mac_for_ip(guest.packed)
        port = gateway.switch.port_for_mac(mac) if mac is not None else None
        return port.id if port is not None else None

    settings = ProxySettings.from_environment(os.environ)
    settings = dataclasses.replace(
        settings, direct=tuple(sorted(host_names)), max_connections=config.http_proxy_max_connections,
        max_connections_per_client=config.http_proxy_max_connections_per_guest,
        header_timeout=config.http_proxy_header_timeout)
    proxy = HttpProxy(settings, connect=GateConnector(gate, port_of))
    if config.http_proxy_file:
        await nursery.start(proxy.watch_file, config.http_proxy_file)
    tcp_nat.register_service(config.http_proxy_port, proxy.handle_client)

    def intercept(destination: IPv4Address, port: int):
        kind = proxy.settings.transparent_kind(port)
        if kind is None:
            return None

        async def transparent(stream, client) -> None:
            await proxy.handle_transparent(stream, client, (str(destination), port), kind == "https")

        return transparent

    tcp_nat.intercept = intercept
    return proxy


def _keep_lease_state(config: Config, gateway: Gateway, nursery: trio.Nursery) -> None:
    restored = load_leases(config.state_file, config, trio.current_time())
    if restored is not None:
        gateway.use_lease_table(restored)
        log.info("restored %d leases from %s", len(restored.leases()), config.state_file)
    writer = LeaseStateWriter(config.state_file, gateway.leases)
    gateway.lease_listeners.append(writer.mark_dirty)
    writer.mark_dirty()
    nursery.start_soon(writer.run, name="lease-state")


@asynccontextmanager
async def open_switch(config: Config | None = None, *, host: HostNetwork | None = None) -> AsyncIterator[Switch]:
    """Run a switch with its gateway for the duration of the ``async with`` block.

    ``switch.attach(link)`` plugs guests in; ``switch.listen(listener)`` serves a
    listener (qemu, vfkit, vpnkit...) whose connections become ports. Leaving the block
    closes every link. ``host`` creates the host sockets for guest flows (inject a
    subclass to simulate refused, unreachable or slow destinations).
    """
    config = config or Config()
    try:
        async with trio.open_nursery() as nursery:
            # Every flow, service connection, query and port task runs under this one
            # supervisor: a failure ends that unit only (counted as flow-errors).
            supervisor = Supervisor(nursery)
            switch = Switch(config, nursery, supervisor)
            gateway = Gateway(config, switch, trio.current_time, supervisor)
            # The one way out for every guest flow and proxy connection.
            gate = HostGate(config, switch.policy, host)
            tcp_nat = TcpNat(config, gateway, nursery, supervisor, gate)
            udp_nat = UdpNat(config, gateway, nursery, supervisor, gate)
            icmp_nat = IcmpNat(config, gateway, nursery, supervisor, gate)
            _wire(switch, gateway, tcp_nat, udp_nat, icmp_nat)
            forwarder = PortForwarder(config, gateway, tcp_nat, udp_nat, nursery, supervisor)
            dns = _start_dns(config, gateway, tcp_nat, switch.policy, supervisor)
            sntp = _start_sntp(gateway)
            files = None
            if config.shares:
                files = FileService(config)
                tcp_nat.register_service(NINEP_PORT, files.serve)
            http_proxy = None
            if config.http_proxy_port:
                http_proxy = await _start_http_proxy(config, gateway, tcp_nat, nursery, gate)
            # The run-time handles (README "As a library"; the control API reads them):
            # set here, once, from what this function built.
            switch.tcp_nat, switch.udp_nat, switch.icmp_nat = tcp_nat, udp_nat, icmp_nat
            switch.forwarder, switch.dns, switch.sntp = forwarder, dns, sntp
            switch.files, switch.http_proxy = files, http_proxy
            if config.state_file:
                _keep_lease_state(config, gateway, nursery)
            try:
                for spec in config.forwards:
                    switch.forwarder.add(*parse_forward_spec(spec))
                nursery.start_soon(_sweep_leases, gateway, name="lease-sweeper")
                yield switch
            finally:
                nursery.cancel_scope.cancel()
                # Flows' host sockets belong to the switch: close them with it.
                switch.forwarder.close()
                switch.tcp_nat.close()
                switch.udp_nat.close()
                switch.icmp_nat.close()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the caller's block raised; give them their own
        # exception back when it is the only one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
