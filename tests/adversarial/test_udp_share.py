"""Attack 6 (UDP flow table): one guest's flood must not evict another guest's flows.

With one global LRU, a guest opening 9000 flows pushed every other guest's flows out:
their host source port changed (NAT mappings, hole punches and "connected" peers
broke). Each guest now has a share (``udp_max_flows_per_guest``) and evicts only its own
least recently used flows; a full table takes from the guest holding the most.
"""

from __future__ import annotations

import pytest

from netkit import Config

from .conftest import LOOPBACK_ONLY
from .flowhelpers import HOST_ALIAS, UdpEcho, send_udp, udp_roundtrip, wait_until

TOTAL = 512
SHARE = 128
FLOOD = 9000
VICTIM_PORT = 5300


@pytest.fixture
def netkit_config() -> Config:
    return Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY, udp_max_flows=TOTAL,
                  udp_max_flows_per_guest=SHARE)


async def _victim_flow(switch, victim, echo, n: int):
    await udp_roundtrip(victim, switch.config.gateway_mac, HOST_ALIAS, echo.port, VICTIM_PORT, b"victim %d" % n)
    return switch.udp_nat.flows.get((victim.ip, VICTIM_PORT))


async def test_a_flood_of_9000_source_ports_evicts_only_the_attackers_flows(netkit_switch, hostile_factory,
                                                                             victim_factory):
    switch = netkit_switch
    counters = switch.udp_nat.counters
    victim = await victim_factory()
    attacker = await hostile_factory(via="qemu", lease=True)
    with UdpEcho() as echo:
        before = await _victim_flow(switch, victim, echo, 0)
        opened = counters["flows-opened"]
        for n in range(FLOOD):
            send_udp(attacker, switch.config.gateway_mac, HOST_ALIAS, 9, 10000 + n, b"flood")
        await wait_until(lambda: counters["flows-opened"] - opened >= FLOOD, timeout=60, what="the flood opened")
        after = await _victim_flow(switch, victim, echo, 1)
        assert after is before  # never evicted
        assert len(echo.sources(b"victim")) == 1  # the host saw the same source port before and after
        assert switch.udp_nat.flows.owner_count(attacker_port(switch, attacker)) == SHARE
        assert counters["flows-evicted-guest-share"] >= FLOOD - SHARE
        assert counters["flows-evicted-table-full"] == 0


async def test_a_full_table_takes_from_the_biggest_guest_never_the_small_one(netkit_switch, hostile_factory,
                                                                              victim_factory):
    switch = netkit_switch
    counters = switch.udp_nat.counters
    victim = await victim_factory()
    attackers = [await hostile_factory(via="memory", lease=True) for _ in range(5)]
    with UdpEcho() as echo:
        before = await _victim_flow(switch, victim, echo, 0)
        opened = counters["flows-opened"]
        for a, attacker in enumerate(attackers):  # 5 x 200 > 512: the table fills up
            for n in range(200):
                send_udp(attacker, switch.config.gateway_mac, HOST_ALIAS, 9, 10000 + n, b"flood")
        await wait_until(lambda: counters["flows-opened"] - opened >= 1000, timeout=60, what="the flood opened")
        assert len(switch.udp_nat.flows) == TOTAL
        assert counters["flows-evicted-table-full"] > 0
        after = await _victim_flow(switch, victim, echo, 1)
        assert after is before
        assert len(echo.sources(b"victim")) == 1
        for attacker in attackers:
            assert switch.udp_nat.flows.owner_count(attacker_port(switch, attacker)) <= SHARE


def attacker_port(switch, guest):
    return switch.port_for_mac(guest.mac)
