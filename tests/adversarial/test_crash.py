"""Attack 1: crash the whole switch — and the supervision point that contains any flow's failure.

The UDP teardown race: a flow released (its guest disconnected, its port detached, the
flow evicted, the switch shut down) while its reader is already scheduled because the
socket had data used to touch the closed socket (``ValueError: file descriptor cannot
be a negative integer``, or ``BusyResourceError`` once the fd number was reused), and the
exception ended the whole switch. ICMP ping-socket flows had the same pattern.

Then a forced exception in each NAT, each service and each forward: it ends that unit
only, is counted in ``flow-errors``, and the victim guest goes on.
"""

from __future__ import annotations

import os
import socket
import struct
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import pytest
import trio

from netkit import Config, open_switch
from netkit.links.memory import memory_link_pair
from netkit.nat.host import HostNetwork
from netkit.testing.fake_guest import FakeGuest, attach_fake_guest

from .conftest import LOOPBACK_ONLY
from .flowhelpers import (GATEWAY, HOST_ALIAS, Streamer, UdpEcho, is_echo_reply, send_ping, send_udp, udp_roundtrip,
                          wait_udp, wait_until)

ROUNDS = 200
ATTACKER_MAC = bytes.fromhex("02aa00000001")
#: The attacker's own flood that evicts its streaming flow: more ports than its share.
SHARE = 16
VICTIM_PORT = 5300


@pytest.fixture
def netkit_config() -> Config:
    return Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY, udp_max_flows_per_guest=SHARE,
                  icmp_max_flows_per_guest=SHARE)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _victim_still_works(victim: FakeGuest, gateway_mac: bytes, echo: UdpEcho, n: int) -> None:
    await victim.ping(GATEWAY, timeout=5)
    await udp_roundtrip(victim, gateway_mac, HOST_ALIAS, echo.port, VICTIM_PORT, b"victim %d" % n)


# ------------------------------------------------------------------ the teardown race (UDP)
async def test_udp_flow_released_while_its_reader_is_scheduled_on_disconnect(netkit_switch, hostile_factory,
                                                                              victim_factory):
    switch = netkit_switch
    gw = switch.config.gateway_mac
    victim = await victim_factory()
    with Streamer() as streamer, UdpEcho() as echo:
        await _victim_still_works(victim, gw, echo, 0)
        ports = len(switch.ports())
        for n in range(ROUNDS):
            attacker = await hostile_factory(via="qemu", mac=ATTACKER_MAC, lease=True)
            send_udp(attacker, gw, HOST_ALIAS, streamer.port, 40000, b"stream to me")
            await wait_udp(attacker, 40000)  # the flow's socket is being flooded now
            await attacker.disconnect()  # its port detaches and the flow is released mid-stream
            await wait_until(lambda: len(switch.ports()) == ports, what="the attacker's port detached")
            if n % 20 == 0:
                await _victim_still_works(victim, gw, echo, n)
        await _victim_still_works(victim, gw, echo, ROUNDS)
    # The victim's one flow kept its host source port throughout.
    assert len(echo.sources(b"victim")) == 1
    assert switch.udp_nat.counters["flows-opened"] >= ROUNDS + 1
    assert switch.statistics()["flow-errors"] == 0


async def test_udp_flow_evicted_while_its_reader_is_scheduled(netkit_switch, hostile_factory, victim_factory):
    switch = netkit_switch
    gw = switch.config.gateway_mac
    victim = await victim_factory()
    attacker = await hostile_factory(via="qemu", lease=True)
    with Streamer() as streamer, UdpEcho() as echo:
        await _victim_still_works(victim, gw, echo, 0)
        evicted = switch.udp_nat.counters["flows-evicted-guest-share"]
        for n in range(ROUNDS):
            sport = 20000 + n
            send_udp(attacker, gw, HOST_ALIAS, streamer.port, sport, b"stream to me")
            await wait_udp(attacker, sport)
            # Its own flood past its share evicts the streaming flow, mid-stream.
            for i in range(SHARE):
                send_udp(attacker, gw, HOST_ALIAS, 9, 30000 + i, b"x")
            await wait_until(lambda: switch.udp_nat.flows.get((attacker.ip, sport)) is None,
                             what="the streaming flow evicted")
            if n % 20 == 0:
                await _victim_still_works(victim, gw, echo, n)
        await _victim_still_works(victim, gw, echo, ROUNDS)
    assert switch.udp_nat.counters["flows-evicted-guest-share"] - evicted >= ROUNDS
    assert len(echo.sources(b"victim")) == 1
    assert switch.statistics()["flow-errors"] == 0


async def test_udp_flows_released_mid_stream_at_shutdown(netkit_config):
    """Leaving ``open_switch`` while flows are being flooded closes them quietly."""
    fds = _fds()
    with Streamer() as streamer:
        for n in range(50):
            async with open_switch(netkit_config) as switch:
                guest_end, switch_end = memory_link_pair(mtu=switch.config.mtu)
                switch.attach(switch_end)
                guest = FakeGuest(guest_end)
                async with trio.open_nursery() as guests:
                    await guests.start(guest.run)
                    await guest.dhcp()
                    send_udp(guest, switch.config.gateway_mac, HOST_ALIAS, streamer.port, 40000, b"stream")
                    await wait_udp(guest, 40000)
                    guests.cancel_scope.cancel()
            await trio.lowlevel.checkpoint()
    assert _fds() <= fds + 1


# ------------------------------------------------------------------ the teardown race (ICMP ping sockets)
class _PingLike(socket.socket):
    """A UDP socket standing in for an unprivileged ping socket (which this host's
    ping_group_range may forbid): echo requests go to a loopback server, and what comes
    back is read as echo replies."""

    server: tuple[str, int] = ("127.0.0.1", 9)

    def sendto(self, data, *args):
        return super().sendto(data, self.server)


class PingSocketHost(HostNetwork):
    """Ping sockets (not a raw socket) for ICMP echo, each a ``_PingLike`` to ``server``."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port

    def icmp_echo_socket(self):
        sock = _PingLike(socket.AF_INET, socket.SOCK_DGRAM)
        sock.server = ("127.0.0.1", self.server_port)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        return sock, False


def _echo_reply_payload() -> bytes:
    return struct.pack("!BBHHH", 0, 0, 0, 0, 0) + b"pong"


@asynccontextmanager
async def _switch_with_guests(config: Config, host: HostNetwork | None, n_guests: int = 1):
    async with open_switch(config, host=host) as switch:
        async with trio.open_nursery() as nursery:
            guests = []
            for _ in range(n_guests):
                guests.append(await attach_fake_guest(switch, nursery))
            yield switch, guests, nursery
            nursery.cancel_scope.cancel()


async def test_icmp_flow_released_while_its_reader_is_scheduled(netkit_config):
    with Streamer(payload=_echo_reply_payload()) as streamer, UdpEcho() as echo:
        host = PingSocketHost(streamer.port)
        async with _switch_with_guests(netkit_config, host) as (switch, (victim,), nursery):
            gw = switch.config.gateway_mac
            ports = len(switch.ports())
            for n in range(ROUNDS):
                attacker = await attach_fake_guest(switch, nursery)
                send_ping(attacker, gw, HOST_ALIAS, ident=7)
                await attacker.wait_frame(lambda f: is_echo_reply(f, 7))  # replies stream in now
                await attacker.link.aclose()
                await wait_until(lambda: len(switch.ports()) == ports, what="the attacker's port detached")
                if n % 20 == 0:
                    await _victim_still_works(victim, gw, echo, n)
            assert switch.icmp_nat.statistics()["mode"] == "ping"
            assert switch.icmp_nat.counters["flows-opened"] >= ROUNDS
            assert switch.statistics()["flow-errors"] == 0
            await _victim_still_works(victim, gw, echo, ROUNDS)


# ------------------------------------------------------------------ forced per-flow exceptions
class InjectedFailure(RuntimeError):
    """What a broken host socket (or service) raises in these tests."""


class _RaisingStreamSocket(socket.socket):
    def recv(self, *args):
        raise InjectedFailure("recv on a broken host socket")


class _RaisingSendSocket(socket.socket):
    def send(self, *args):
        raise InjectedFailure("send on a broken host socket")


class _RaisingDatagramSocket(socket.socket):
    def recvfrom(self, *args):
        raise InjectedFailure("recvfrom on a broken host socket")


class _RaisingPingLike(_PingLike):
    def recvfrom(self, *args):
        raise InjectedFailure("recvfrom on a broken ping socket")


def _adopt(cls, sock: socket.socket) -> socket.socket:
    broken = cls(fileno=sock.detach())
    broken.setblocking(False)
    return broken


class BreakingHost(HostNetwork):
    """Host sockets as usual, but the next ``fail_next[kind]`` sockets of a kind ("tcp",
    "udp", "icmp") raise inside their read path. ICMP uses ping-like sockets to
    ``ping_server``, so echo works without a raw socket or the ping_group_range."""

    def __init__(self, ping_server: int) -> None:
        self.fail_next = {"tcp": 0, "tcp-send": 0, "udp": 0, "icmp": 0}
        self.ping_server = ping_server

    def _armed(self, kind: str) -> bool:
        if self.fail_next[kind]:
            self.fail_next[kind] -= 1
            return True
        return False

    async def connect_tcp(self, address, port):
        sock = await super().connect_tcp(address, port)
        if self._armed("tcp-send"):
            return _adopt(_RaisingSendSocket, sock)
        return _adopt(_RaisingStreamSocket, sock) if self._armed("tcp") else sock

    def udp_socket(self):
        sock = super().udp_socket()
        return _adopt(_RaisingDatagramSocket, sock) if self._armed("udp") else sock

    def icmp_echo_socket(self):
        sock = (_RaisingPingLike if self._armed("icmp") else _PingLike)(socket.AF_INET, socket.SOCK_DGRAM)
        sock.server = ("127.0.0.1", self.ping_server)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        return sock, False


def _as_echo_reply(data: bytes) -> bytes:
    return b"\0" + data[1:]


@asynccontextmanager
async def _broken_world(tmp_path, **changes):
    """A switch whose host sockets can be broken on demand, an attacker and a victim
    guest, a UDP echo server and a ping server on loopback."""
    from netkit.config import Share

    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    config = Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY, shares=(Share("s", str(share)),), **changes)
    with UdpEcho() as echo, UdpEcho(transform=_as_echo_reply) as pings:
        host = BreakingHost(pings.port)
        async with _switch_with_guests(config, host, n_guests=2) as (switch, (attacker, victim), nursery):
            yield switch, host, attacker, victim, echo, nursery


def _errors(switch, unit: str | None = None) -> int:
    stats = switch.statistics()
    return stats["flow-errors"] if unit is None else stats["flow-errors-by-unit"].get(unit, 0)


async def _victim_unaffected(switch, victim, echo) -> None:
    gw = switch.config.gateway_mac
    await _victim_still_works(victim, gw, echo, 1)
    send_ping(victim, gw, HOST_ALIAS, ident=99)
    await victim.wait_frame(lambda f: is_echo_reply(f, 99))


async def test_forced_udp_nat_failures_end_their_flow_only_200_times(tmp_path):
    async with _broken_world(tmp_path) as (switch, host, attacker, victim, echo, _nursery):
        gw = switch.config.gateway_mac
        await _victim_unaffected(switch, victim, echo)
        fds = _fds()
        for n in range(ROUNDS):
            host.fail_next["udp"] = 1
            send_udp(attacker, gw, HOST_ALIAS, echo.port, 10000 + n, b"break me")  # the echo makes it readable
            await wait_until(lambda: _errors(switch, "udp-nat") == n + 1, what="the failure counted")
            assert switch.udp_nat.flows.get((attacker.ip, 10000 + n)) is None  # released, socket closed
            if n % 40 == 0:
                await _victim_still_works(victim, gw, echo, n)
        await _victim_unaffected(switch, victim, echo)
        assert _fds() <= fds  # every failed flow's socket was closed
        assert len(echo.sources(b"victim")) == 1  # the victim's flow was never disturbed
        assert "flow-errors" in switch.statistics()


async def test_forced_tcp_nat_failure_resets_that_connection_only(tmp_path):
    async with _broken_world(tmp_path) as (switch, host, attacker, victim, echo, nursery):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]

        async def greet(stream):
            async with stream:
                await stream.send_all(b"hello")
                await trio.sleep_forever()

        nursery.start_soon(trio.serve_listeners, greet, [listener])
        host.fail_next["tcp"] = 1
        stream = await attacker.open_tcp_stream(HOST_ALIAS, port)
        await wait_until(lambda: _errors(switch, "tcp-nat") == 1, what="the failure counted")
        assert not [flow for flow in switch.tcp_nat.flows() if flow.guest_ip == attacker.ip]
        with trio.fail_after(5):
            try:
                data = await stream.receive_some()
            except Exception:
                data = b""
        assert data == b""  # the attacker's connection was reset, not left hanging
        good = await victim.open_tcp_stream(HOST_ALIAS, port)
        with trio.fail_after(5):
            assert await good.receive_some() == b"hello"
        await _victim_unaffected(switch, victim, echo)


async def test_forced_failure_in_the_tcp_batch_path_resets_that_connection_only(tmp_path):
    """Guest data is written to the host socket synchronously at the end of a batch of
    frames (``TcpNat.flush``); a failure there ends that connection, not the guest's port
    nor the rest of the batch."""
    async with _broken_world(tmp_path) as (switch, host, attacker, victim, echo, nursery):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]

        async def echo_stream(stream):
            async with stream:
                try:
                    async for data in stream:
                        await stream.send_all(data)
                except trio.BrokenResourceError:
                    pass  # the broken connection is reset

        nursery.start_soon(trio.serve_listeners, echo_stream, [listener])
        kept = await attacker.open_tcp_stream(HOST_ALIAS, port)
        host.fail_next["tcp-send"] = 1
        broken = await attacker.open_tcp_stream(HOST_ALIAS, port)
        await broken.send_all(b"break me")
        await wait_until(lambda: _errors(switch, "tcp-flush") == 1, what="the failure counted")
        with trio.fail_after(5):
            try:
                data = await broken.receive_some()
            except Exception:
                data = b""
        assert data == b""  # reset, not left hanging
        # The same guest's other connection, and its port, carry on.
        await kept.send_all(b"still here")
        with trio.fail_after(5):
            assert await kept.receive_some() == b"still here"
        assert len(switch.ports()) == 2 and _errors(switch) == 1
        await _victim_unaffected(switch, victim, echo)


async def test_forced_icmp_nat_failure_ends_that_flow_only(tmp_path):
    async with _broken_world(tmp_path) as (switch, host, attacker, victim, echo, _nursery):
        gw = switch.config.gateway_mac
        host.fail_next["icmp"] = 2  # the first socket only probes the mode
        send_ping(attacker, gw, HOST_ALIAS, ident=5)
        await wait_until(lambda: _errors(switch, "icmp-nat") == 1, what="the failure counted")
        assert switch.icmp_nat.flows.get((attacker.ip, 5)) is None
        await _victim_unaffected(switch, victim, echo)
        send_ping(attacker, gw, HOST_ALIAS, ident=6)  # the attacker's next flow is a fresh one
        await attacker.wait_frame(lambda f: is_echo_reply(f, 6))


def _fail_tcp_service_for(switch, port: int, guest: FakeGuest) -> None:
    """Make the gateway's TCP service on ``port`` raise for ``guest``'s connections only."""
    real = switch.tcp_nat.services[port]

    async def handler(stream, client):
        if client[0] == IPv4Address(guest.ip):
            raise InjectedFailure(f"service on port {port}")
        await real(stream, client)

    switch.tcp_nat.services[port] = handler


async def _reset_quickly(stream) -> None:
    with trio.fail_after(5):
        try:
            assert await stream.receive_some() == b""
        except (trio.BrokenResourceError, ConnectionError):
            pass


@pytest.mark.parametrize("port", [53, 564, 3128], ids=["dns-tcp", "9p", "http-proxy"])
async def test_forced_tcp_service_failure_ends_that_connection_only(tmp_path, port):
    async with _broken_world(tmp_path) as (switch, _host, attacker, victim, echo, _nursery):
        _fail_tcp_service_for(switch, port, attacker)
        stream = await attacker.open_tcp_stream(GATEWAY, port)
        await wait_until(lambda: _errors(switch, "tcp-service") == 1, what="the failure counted")
        await _reset_quickly(stream)
        assert not [flow for flow in switch.tcp_nat.flows() if flow.guest_ip == attacker.ip]
        await _victim_unaffected(switch, victim, echo)
        if port == 53:  # the victim's own DNS-over-TCP connection is served
            import dnslib

            query = dnslib.DNSRecord.question("host.docker.internal").pack()
            good = await victim.open_tcp_stream(GATEWAY, 53)
            await good.send_all(struct.pack("!H", len(query)) + query)
            with trio.fail_after(5):
                answer = b""
                while len(answer) < 2 or len(answer) < 2 + struct.unpack("!H", answer[:2])[0]:
                    answer += await good.receive_some()
            assert dnslib.DNSRecord.parse(answer[2:]).rr


async def test_forced_dns_query_failure_ends_that_query_only(tmp_path):
    import dnslib

    async with _broken_world(tmp_path) as (switch, _host, attacker, victim, echo, _nursery):
        dns = switch.dns
        real = dns.handle_query

        async def handle_query(query, *, client, transport):
            if client[0] == IPv4Address(attacker.ip):
                raise InjectedFailure("dns query")
            return await real(query, client=client, transport=transport)

        dns.handle_query = handle_query
        query = dnslib.DNSRecord.question("host.docker.internal").pack()
        send_udp(attacker, switch.config.gateway_mac, GATEWAY, 53, 3333, query)
        await wait_until(lambda: _errors(switch, "dns") == 1, what="the failure counted")
        send_udp(victim, switch.config.gateway_mac, GATEWAY, 53, 3334, query)
        reply = await wait_udp(victim, 3334)
        assert dnslib.DNSRecord.parse(bytes(reply[42:])).rr
        await _victim_unaffected(switch, victim, echo)


async def test_forced_sntp_failure_is_counted_and_the_service_goes_on(tmp_path):
    async with _broken_world(tmp_path) as (switch, _host, attacker, victim, echo, _nursery):
        sntp = switch.sntp
        real = sntp.handle_untrusted

        def handle_untrusted(payload, received_at):
            if payload[1:2] == b"\xee":  # the attacker's poison
                raise InjectedFailure("sntp")
            return real(payload, received_at=received_at)

        sntp.handle_untrusted = handle_untrusted
        request = b"\x23" + b"\0" * 47
        send_udp(attacker, switch.config.gateway_mac, GATEWAY, 123, 1230, b"\x23\xee" + b"\0" * 46)
        await wait_until(lambda: _errors(switch, "udp-service-123") == 1, what="the failure counted")
        assert switch.gateway.drops["handler-error"] == 0  # contained in the service, not the frame path
        send_udp(victim, switch.config.gateway_mac, GATEWAY, 123, 1231, request)
        reply = await wait_udp(victim, 1231)
        assert len(reply) >= 42 + 48
        await _victim_unaffected(switch, victim, echo)


async def test_forced_tcp_forward_failure_ends_that_connection_only(tmp_path):
    async with _broken_world(tmp_path) as (switch, _host, attacker, victim, echo, _nursery):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
        probe.close()
        switch.forwarder.add("tcp", f"127.0.0.1:{local}", f"{_dotted(attacker.ip)}:80")
        tcp_nat = switch.tcp_nat
        real = tcp_nat.open_to_guest

        def open_to_guest(*args):
            raise InjectedFailure("forwarded connection")

        tcp_nat.open_to_guest = open_to_guest
        client = trio.socket.socket()
        await client.connect(("127.0.0.1", local))
        await wait_until(lambda: _errors(switch, "forward-tcp") == 1, what="the failure counted")
        with trio.fail_after(5):
            try:
                assert await client.recv(10) == b""
            except ConnectionResetError:
                pass  # reset, as a refused forward is
        client.close()
        tcp_nat.open_to_guest = real
        assert [f.local for f in switch.forwarder.forwards()] == [f"127.0.0.1:{local}"]  # still serving
        await _victim_unaffected(switch, victim, echo)


def _dotted(packed: bytes) -> str:
    return str(IPv4Address(packed))


async def test_forced_udp_forward_failure_ends_that_flow_only(tmp_path):
    async with _broken_world(tmp_path) as (switch, _host, attacker, victim, echo, _nursery):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
        probe.close()
        switch.forwarder.add("udp", f"127.0.0.1:{local}", f"{_dotted(victim.ip)}:7000")
        forwarder = switch.forwarder
        real = forwarder._udp_to_guest

        def udp_to_guest(forward, client, data):
            if data == b"poison":
                raise InjectedFailure("udp forward flow")
            real(forward, client, data)

        forwarder._udp_to_guest = udp_to_guest
        bad = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await bad.sendto(b"poison", ("127.0.0.1", local))
        await wait_until(lambda: _errors(switch, "forward-udp") == 1, what="the failure counted")
        good = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await good.sendto(b"fine", ("127.0.0.1", local))
        frame = await victim.wait_frame(lambda f: f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x1b\x58")
        assert frame.endswith(b"fine")
        bad.close()
        good.close()
        await _victim_unaffected(switch, victim, echo)


async def test_flow_errors_in_stats_and_metrics(tmp_path):
    from netkit.api.views import render_metrics, stats_view

    async with _broken_world(tmp_path) as (switch, host, attacker, _victim, echo, _nursery):
        host.fail_next["udp"] = 1
        send_udp(attacker, switch.config.gateway_mac, HOST_ALIAS, echo.port, 4444, b"x")
        await wait_until(lambda: _errors(switch) == 1, what="the failure counted")
        view = stats_view(switch)
        assert view["flow_errors"] == {"total": 1, "by_unit": {"udp-nat": 1}}
        metrics = render_metrics(switch)
        assert "netkit_flow_errors_total 1" in metrics
        assert 'netkit_flow_errors_by_unit_total{unit="udp-nat"} 1' in metrics


async def test_a_failing_guest_link_ends_that_port_only(tmp_path):
    """A per-guest task (the port's reader) that raises detaches that port alone."""
    async with _broken_world(tmp_path) as (switch, _host, _attacker, victim, echo, nursery):
        broken = await attach_fake_guest(switch, nursery)
        port = switch.port_for_mac(broken.mac)
        link = port.link

        async def receive_batch():
            raise InjectedFailure("the link's reader")

        link.receive_batch = receive_batch
        send_ping(broken, switch.config.gateway_mac, GATEWAY, ident=1)  # wakes the reader into the failure
        await wait_until(lambda: _errors(switch, "port") == 1, what="the failure counted")
        await wait_until(lambda: port.detached, what="the port detached")
        assert port not in switch.ports()
        await _victim_unaffected(switch, victim, echo)
