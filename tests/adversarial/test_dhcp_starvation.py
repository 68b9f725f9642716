"""Attack 6 (DHCP part) of issue 12: one port rotating MACs, DISCOVER/REQUEST floods and
bind+DECLINE must not starve the other guests of addresses.

Before: 252 DISCOVERs from rotating MACs emptied the pool in 8 s, and bind+DECLINE put
the whole pool in quarantine for 600 s, saved in the --state file. Now one port is one
identity (a new MAC releases the old MAC's lease and offer), and quarantine is capped
per port and to a share of the pool, and never saved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from ipaddress import IPv4Address

import pytest
import trio
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netkit import Config
from netkit.config import format_mac
from netkit.netns import UDHCPC_SCRIPT
from netkit.testing import require_tool
from netkit.testing.fake_guest import random_mac

from .conftest import LOOPBACK_ONLY

GATEWAY = "192.168.65.1"
ROTATIONS = 300


@pytest.fixture
def netkit_config(tmp_path) -> Config:
    return Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY, state_file=str(tmp_path / "leases.json"))


def dhcp_frame(mac: bytes, message_type: str, *options) -> bytes:
    mac_text = format_mac(mac)
    return bytes(Ether(src=mac_text, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") /
                 UDP(sport=68, dport=67) / BOOTP(op=1, chaddr=mac, xid=0x4242) /
                 DHCP(options=[("message-type", message_type), *options, "end"]))


async def wait_for(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


class RunningUdhcpc:
    """busybox udhcpc kept running in a netns guest, so the test can make it renew
    (SIGUSR1: a unicast DHCPREQUEST for the address it holds) as a real client would."""

    def __init__(self, guest) -> None:
        self.guest = guest
        self.log = tempfile.NamedTemporaryFile(prefix="netkit-udhcpc-", suffix=".env")
        self.proc = None

    def events(self) -> list[str]:
        with open(self.log.name) as f:
            return [line.split()[0] for line in f if line.startswith(("bound ip=", "renew ip="))]

    def address(self) -> str:
        with open(self.log.name) as f:
            return [line.split("=", 1)[1].strip() for line in f if " ip=" in line][-1]

    async def __aenter__(self) -> "RunningUdhcpc":
        env = dict(os.environ, NETKIT_UDHCPC_LOG=self.log.name)
        argv = self.guest.netns.exec_args(["busybox", "udhcpc", "-i", self.guest.ifname, "-s", UDHCPC_SCRIPT,
                                           "-f", "-t", "5", "-T", "1"])
        self.proc = await trio.lowlevel.open_process(argv, env=env, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)
        await wait_for(lambda: self.events() == ["bound"])
        return self

    async def renew(self) -> str:
        before = len(self.events())
        self.proc.send_signal(signal.SIGUSR1)
        await wait_for(lambda: len(self.events()) > before)
        assert self.events()[-1] == "renew"
        return self.address()

    async def __aexit__(self, *exc) -> None:
        self.proc.kill()
        with trio.CancelScope(shield=True):
            await self.proc.wait()
        self.log.close()


def attacker_leases(switch, victim_macs) -> list:
    return [lease for lease in switch.leases() if lease.mac not in victim_macs]


@pytest.mark.privileged
@pytest.mark.parametrize("via", ["memory", "qemu"])
async def test_mac_rotation_cannot_exhaust_the_pool(netkit_switch, netns_guest, hostile_factory, victim_factory,
                                                    via):
    require_tool("busybox")
    async with RunningUdhcpc(netns_guest) as client:
        victim_ip = client.address()
        victim_macs = {netns_guest.netns.mac_of(netns_guest.ifname)}
        attacker = await hostile_factory(via=via)
        dhcp = netkit_switch.gateway.dhcp.stats
        discovers, requests = dhcp["discover"], dhcp["request"]  # the victim's own
        pool = [str(IPv4Address(a)) for a in netkit_switch.config.pool()]
        most_held = 0
        # Phase 1: DISCOVERs only, each from a new MAC (each used to hold an offer for 30 s).
        for n in range(ROTATIONS):
            attacker.send(dhcp_frame(random_mac(), "discover"))
            if n % 50 == 49:
                await wait_for(lambda: dhcp["discover"] - discovers == n + 1)
                most_held = max(most_held, len(attacker_leases(netkit_switch, victim_macs)))
        assert dhcp["pool_exhausted"] == 0  # before: exhausted after 252
        # Phase 2: take addresses outright (INIT-REBOOT), as a client that remembers one.
        for n in range(ROTATIONS):
            mac = random_mac()
            attacker.send(dhcp_frame(mac, "request", ("requested_addr", pool[n % len(pool)])))
            if n % 50 == 49:
                await wait_for(lambda: dhcp["request"] - requests == n + 1)
                most_held = max(most_held, len(attacker_leases(netkit_switch, victim_macs)))
        await wait_for(lambda: dhcp["request"] - requests == ROTATIONS)
        held = attacker_leases(netkit_switch, victim_macs)
        assert len(held) <= 1 and most_held <= 1
        assert dhcp["pool_exhausted"] == 0
        assert netkit_switch.macs_relearned >= 2 * ROTATIONS - 1
        # The victim renews its address, and a new guest still gets one.
        assert await client.renew() == victim_ip
        newcomer = await victim_factory()
        assert IPv4Address(newcomer.ip) in netkit_switch.config.subnet


@pytest.mark.privileged
@pytest.mark.parametrize("via", ["memory", "qemu"])
async def test_bind_and_decline_flood_quarantines_only_a_bounded_share(netkit_switch, netns_guest, hostile_factory,
                                                                       victim_factory, via):
    require_tool("busybox")
    config = netkit_switch.config
    async with RunningUdhcpc(netns_guest) as client:
        victim_ip = client.address()
        attacker = await hostile_factory(via=via)
        dhcp = netkit_switch.gateway.dhcp.stats
        leases = netkit_switch.gateway.leases
        pool = [str(IPv4Address(a)) for a in config.pool() if str(IPv4Address(a)) != victim_ip]
        for n in range(ROTATIONS):
            mac = random_mac()
            address = pool[n % len(pool)]
            attacker.send(dhcp_frame(mac, "request", ("requested_addr", address)))
            attacker.send(dhcp_frame(mac, "decline", ("requested_addr", address), ("server_id", GATEWAY)))
            if n % 50 == 49:
                await wait_for(lambda: dhcp["decline"] == n + 1)
        await wait_for(lambda: dhcp["decline"] == ROTATIONS)
        now = trio.current_time()
        quarantined = [a for a in config.pool() if leases.is_quarantined(IPv4Address(a), now)]
        assert 0 < len(quarantined) <= config.decline_max_per_port  # before: the whole pool, for 600 s
        assert leases.quarantine_evictions >= ROTATIONS - config.decline_max_per_port
        assert await client.renew() == victim_ip
        newcomer = await victim_factory()
        assert IPv4Address(newcomer.ip) in config.subnet
    # Nothing of it is a lock-out in the state file.
    with trio.fail_after(10):
        while not os.path.exists(config.state_file):
            await trio.sleep(0.05)
    assert "quarantine" not in json.load(open(config.state_file))["leases"]


async def test_many_ports_declining_never_take_more_than_the_pool_share(netkit_switch, hostile_factory,
                                                                        victim_factory):
    config = netkit_switch.config
    attackers = [await hostile_factory(via="memory") for _ in range(20)]
    dhcp = netkit_switch.gateway.dhcp.stats
    leases = netkit_switch.gateway.leases
    pool = [str(IPv4Address(a)) for a in config.pool()]
    n = 0
    for _ in range(config.decline_max_per_port):
        for attacker in attackers:
            mac = random_mac()
            attacker.send(dhcp_frame(mac, "request", ("requested_addr", pool[n])))
            attacker.send(dhcp_frame(mac, "decline", ("requested_addr", pool[n]), ("server_id", GATEWAY)))
            n += 1
    await wait_for(lambda: dhcp["decline"] == n)
    now = trio.current_time()
    quarantined = [a for a in config.pool() if leases.is_quarantined(IPv4Address(a), now)]
    assert len(quarantined) == int(len(config.pool()) * config.decline_max_pool_fraction)
    newcomer = await victim_factory()
    assert IPv4Address(newcomer.ip) in config.subnet
