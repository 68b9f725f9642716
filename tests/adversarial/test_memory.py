"""Attack 5 of issue 12: a hostile guest makes netkit buffer without bound.

Before budgets: 300 downloads the guest never reads took netkit from 49 to 361 MB RSS,
600 connections filled with out-of-order data to 765 MB. Now every byte buffered for a
guest (a switch port) is charged to its account (``guest_buffer_bytes``, small here to
keep the test fast) and to a total; at the limit windows stop opening, host sockets are
left unread, out-of-order data is dropped and new connections get RST, all counted. A
victim guest on the same switch still downloads, and everything is given back when the
attacker leaves.
"""

from __future__ import annotations

import os
import weakref

import pytest
import trio

from netkit import Config
from netkit.wire import udp_frame
from netkit.wire.checksum import checksum
from netkit.wire.ethernet import ETHERTYPE_IPV4, ethernet_header
from netkit.wire.frames import fragment_frames

from .memory_attack import MB, RawTcpAttacker, rss_bytes, start_server, wait_until

GUEST_BUDGET = 4 * MB
FILE_SIZE = 8 * MB
#: What a flow holding next to nothing may still take from its host socket (one MSS).
SEND_FLOOR = 1460
RSS_SLACK = 20 * MB


@pytest.fixture
def netkit_config() -> Config:
    return Config(dns_upstreams=("127.0.0.1:9",), allow=("192.168.65.2/32", "127.0.0.1/8"),
                  guest_buffer_bytes=GUEST_BUDGET, total_buffer_bytes=64 * MB)


@pytest.fixture
def server():
    proc, ports = start_server(FILE_SIZE)
    yield ports
    proc.kill()
    proc.wait()


async def _download(victim, host: str, port: int) -> int:
    stream = await victim.open_tcp_stream(host, port)
    got = 0
    with trio.fail_after(60):
        while data := await stream.receive_some(1 << 20):
            got += len(data)
    await stream.aclose()
    return got


async def _attack_and_leave(switch, attacker, victim, server, attack) -> None:
    """Run ``attack(raw) -> (flows, limit)``, check the budget held, the victim still
    downloads, the attacker is refused new flows; then the attacker leaves and everything
    comes back."""
    nat = switch.tcp_nat
    config = switch.config
    raw = RawTcpAttacker(attacker, config.gateway_mac, config.host_ip.packed)
    baseline = rss_bytes()
    flows, limit = await attack(raw)
    port = switch.port_for_mac(attacker.mac)
    account = nat.budget.accounts[port]
    peak = rss_bytes()
    assert account.used <= limit, (account.used, limit)
    assert account.used >= GUEST_BUDGET - 64 * 1024, "the attack did not fill the budget"
    assert peak - baseline <= GUEST_BUDGET + RSS_SLACK, (peak - baseline) / MB
    # the attacker is refused new connections, and told so
    before = nat.statistics()["budget-refused"]
    resets = raw.resets
    await raw.open(1, server.idle, window=65535, first_port=40000)
    assert raw.resets == resets + 1 and nat.statistics()["budget-refused"] == before + 1
    # the victim, on the same switch, is not affected
    assert await _download(victim, str(config.host_ip), server.file) == FILE_SIZE
    # the attacker leaves: every flow closes, every byte is given back, nothing keeps
    # the flows (and their buffers) alive
    refs = [weakref.ref(f) for f in flows]
    del flows
    await attacker.disconnect()
    await wait_until(lambda: port not in nat.budget.accounts and nat.budget.used == 0, 10, "budget back to 0")
    await wait_until(lambda: nat.flow_count == 0, 10, "flows closed")
    assert sum(r() is not None for r in refs) == 0
    assert rss_bytes() - baseline <= RSS_SLACK


async def test_zero_window_downloads_stay_within_budget(netkit_switch, hostile_factory, victim_factory, server):
    """300 connections to a host that sends as fast as it can; the guest never reads
    (window 0)."""
    nat = netkit_switch.tcp_nat
    victim = await victim_factory()
    attacker = await hostile_factory(lease=True)

    async def attack(raw):
        await raw.open(300, server.flood, window=0)
        # The first connections fill the budget while the others are being opened; once
        # it is used up, the rest are refused (RST, counted).
        assert raw.established + raw.resets == 300 and raw.established >= 4
        assert nat.statistics()["budget-refused"] == raw.resets
        flows = [f for f in nat.flows() if f.guest_ip == attacker.ip]
        assert len(flows) == raw.established
        # netkit reads each host socket until the flow may hold no more
        await wait_until(lambda: all(f.conn.send_space() == 0 for f in flows), 30, "host reads to stop")
        assert nat.statistics()["budget-send-limited"] >= 1
        return flows, GUEST_BUDGET + len(flows) * SEND_FLOOR

    await _attack_and_leave(netkit_switch, attacker, victim, server, attack)


async def test_out_of_order_flood_stays_within_budget(netkit_switch, hostile_factory, victim_factory, server):
    """600 connections, each sent 64 segments beyond a gap that is never filled."""
    nat = netkit_switch.tcp_nat
    victim = await victim_factory()
    attacker = await hostile_factory(lease=True)
    segments = 64

    async def attack(raw):
        conns = await raw.open(600, server.idle, window=65535, wscale=7)
        assert raw.established == 600 and not raw.resets
        flows = [f for f in nat.flows() if f.guest_ip == attacker.ip]
        await raw.send_with_gaps(conns, segments)  # 56 MB of out-of-order data offered
        await wait_until(lambda: sum(f.conn.stats.ooo_segments + f.conn.stats.out_of_window for f in flows)
                         >= 600 * segments, 30, "every segment processed")
        stats = nat.statistics()
        assert stats["budget-ooo-dropped"] > 0 and stats["budget-ooo-dropped-bytes"] > 20 * MB
        # out-of-order data gets no progress floor: the budget is a hard limit for it
        return flows, GUEST_BUDGET

    await _attack_and_leave(netkit_switch, attacker, victim, server, attack)


def _first_fragment(src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, ident: int, size: int = 1480) -> bytes:
    """The first fragment of a UDP datagram that never completes."""
    import struct

    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + size, ident, 0x2000, 64, 17, 0, src, dst))
    struct.pack_into("!H", header, 10, checksum(header))
    return ethernet_header(dst_mac, src_mac, ETHERTYPE_IPV4) + bytes(header) + bytes(size)


async def test_fragment_flood_keeps_to_the_guests_share(netkit_switch, hostile_factory, victim_factory):
    """One guest floods incomplete fragments (several times the whole reassembly limit)
    while another guest's fragmented datagram is half way: the victim's datagram still
    completes and reaches its host destination."""
    config = netkit_switch.config
    reassembler = netkit_switch.gateway.reassembler
    victim = await victim_factory()
    attacker = await hostile_factory(lease=True)
    attacker_port = netkit_switch.port_for_mac(attacker.mac)
    receiver = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await receiver.bind(("127.0.0.1", 0))
    host_port = receiver.getsockname()[1]
    payload = os.urandom(6000)
    pieces = fragment_frames(udp_frame(config.gateway_mac, victim.mac, victim.ip, config.host_ip.packed, 5555,
                                       host_port, payload, ident=4242), 1500)
    assert len(pieces) == 5
    for frame in pieces[:-1]:
        victim.send_frame(frame)
    raw = RawTcpAttacker(attacker, config.gateway_mac, config.host_ip.packed)  # only for pacing
    flood = config.reassembly_max_bytes * 2 // 1480
    for ident in range(flood):
        attacker.send(_first_fragment(attacker.mac, config.gateway_mac, attacker.ip, config.host_ip.packed, ident))
        if ident % 200 == 199:
            await raw.pace()
    await raw.pace()
    await wait_until(lambda: reassembler.stats["guest-evicted"] >= flood - 1000, 10, "the flood to be processed")
    assert reassembler.held_by(attacker_port) <= config.reassembly_guest_bytes
    assert reassembler.held_bytes <= config.reassembly_max_bytes
    victim.send_frame(pieces[-1])
    with trio.fail_after(5):
        data, _ = await receiver.recvfrom(65536)
    assert data == payload
    assert netkit_switch.gateway.statistics()["reassembly"]["guest-evicted"] >= flood - 1000
    await attacker.disconnect()
    await wait_until(lambda: reassembler.held_by(attacker_port) == 0, 10, "the attacker's fragments dropped")
    receiver.close()


async def test_connection_limit_counts_per_port(netkit_switch, hostile_factory, victim_factory, server):
    """``max_connections_per_guest`` is a per-port (per-guest) limit: one guest at its
    limit gets RST (counted) and another guest is unaffected."""
    import dataclasses

    nat = netkit_switch.tcp_nat
    nat.config = dataclasses.replace(nat.config, max_connections_per_guest=5)
    config = netkit_switch.config
    victim = await victim_factory()
    attacker = await hostile_factory(lease=True)
    raw = RawTcpAttacker(attacker, config.gateway_mac, config.host_ip.packed)
    await raw.open(8, server.idle, window=65535)
    assert raw.established == 5 and raw.resets == 3
    assert nat.statistics()["guest-connection-limit"] == 3
    port = netkit_switch.port_for_mac(attacker.mac)
    assert nat.budget.accounts[port].flows == 5
    streams = [await victim.open_tcp_stream(str(config.host_ip), server.idle) for _ in range(5)]
    assert nat.statistics()["guest-connection-limit"] == 3
    for stream in streams:
        await stream.aclose()
    await attacker.disconnect()
    await wait_until(lambda: port not in nat.budget.accounts, 10, "the attacker's account dropped")
