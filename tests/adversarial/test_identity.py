"""Attacks 2 and 7 of issue 12: impersonation, and the virtual subnet reaching the host.

Identity comes from bindings: a port may source IPv4 only from its bound address (or
0.0.0.0 for DHCP) and ARP only for it; the gateway's neighbour table is the binding
table. A packet to a virtual-subnet address the gateway does not own is answered with
ICMP host unreachable and never becomes a host ``connect()``.

Every test here runs on a switch whose ``HostNetwork`` records each host socket it is
asked for (and otherwise behaves normally, within the allow-list policy).
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from ipaddress import IPv4Address

import pytest
import trio
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

import netkit
from netkit.config import format_mac
from netkit.links.base import Link, LinkClosed
from netkit.links.tap import TapLink, stable_tap_mac
from netkit.links.vfkit import VfkitLink
from netkit.nat.host import HostNetwork
from netkit.netns import Netns, udhcpc, unique_name
from netkit.testing import FakeGuest, require_privileged, require_tool
from netkit.testing.fake_guest import random_mac

GATEWAY = "192.168.65.1"
HOST_ALIAS = "192.168.65.2"
UNASSIGNED = "192.168.65.71"
BROADCAST = "ff:ff:ff:ff:ff:ff"


class RecordingHost(HostNetwork):
    """The real host network, recording every socket a guest flow asks for."""

    def __init__(self) -> None:
        self.tcp_connects: list[tuple[str, int]] = []
        self.udp_sockets = 0
        self.icmp_sockets = 0

    async def connect_tcp(self, address, port):
        self.tcp_connects.append((str(address), port))
        return await super().connect_tcp(address, port)

    def udp_socket(self):
        self.udp_sockets += 1
        return super().udp_socket()

    def icmp_echo_socket(self):
        self.icmp_sockets += 1
        return super().icmp_echo_socket()


@pytest.fixture
def recording_host() -> RecordingHost:
    return RecordingHost()


@pytest.fixture
async def netkit_switch(netkit_config, recording_host):
    async with netkit.open_switch(netkit_config, host=recording_host) as switch:
        yield switch


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def mac_text(mac: bytes) -> str:
    return format_mac(mac)


async def neigh_lladdr(guest, address: str) -> str | None:
    out = await guest.run(["ip", "-j", "neigh", "show", address])
    entries = json.loads(out.stdout or b"[]")
    return entries[0].get("lladdr") if entries else None


# ----------------------------------------------------------------------------- attack 2: ARP
@pytest.mark.privileged
@pytest.mark.parametrize("via", ["memory", "qemu"])
async def test_arp_replies_claiming_the_gateway_never_reach_the_victim(netkit_switch, netns_guest,
                                                                       hostile_factory, via):
    require_tool("busybox")
    require_tool("ping")
    lease = await netns_guest.udhcpc()
    victim_ip = lease["ip"]
    victim_mac = netns_guest.netns.mac_of(netns_guest.ifname)
    for target in (GATEWAY, HOST_ALIAS):
        assert (await netns_guest.run(["ping", "-c", "1", "-W", "2", target])).returncode == 0
    gateway_mac = mac_text(netkit_switch.config.gateway_mac)
    assert await neigh_lladdr(netns_guest, GATEWAY) == gateway_mac

    attacker = await hostile_factory(via=via)
    drops = netkit_switch.drops
    rounds = 0
    for leased in (False, True):  # before it has an address, and after
        if leased:
            await attacker.dhcp()
        for claimed in (GATEWAY, HOST_ALIAS):
            for dst in (BROADCAST, mac_text(victim_mac)):
                attacker.send(Ether(src=attacker.mac, dst=dst) /
                              ARP(op=2, hwsrc=attacker.mac, psrc=claimed, hwdst=mac_text(victim_mac), pdst=victim_ip))
                attacker.send(Ether(src=attacker.mac, dst=dst) /  # gratuitous request form
                              ARP(op=1, hwsrc=attacker.mac, psrc=claimed, hwdst="00:00:00:00:00:00", pdst=claimed))
                rounds += 2
    await wait_for(lambda: drops["spoofed-arp-gateway"] == rounds)
    # Frames are dropped synchronously; a victim that got them would have updated at once.
    assert await neigh_lladdr(netns_guest, GATEWAY) == gateway_mac
    assert await neigh_lladdr(netns_guest, HOST_ALIAS) == gateway_mac
    assert (await netns_guest.run(["ping", "-c", "1", "-W", "2", GATEWAY])).returncode == 0


@pytest.mark.privileged
@pytest.mark.parametrize("via", ["memory", "qemu"])
async def test_a_forward_still_reaches_the_victim_after_arp_and_ip_poisoning(netkit_switch, netns_guest,
                                                                            hostile_factory, via):
    require_tool("busybox")
    lease = await netns_guest.udhcpc()
    victim_ip = lease["ip"]
    server = await trio.lowlevel.open_process(netns_guest.netns.exec_args([
        sys.executable, "-c",
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 8080)); s.listen(8)\n"
        "while True:\n"
        "    c, _ = s.accept(); c.sendall(b'victim'); c.close()\n"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(10):
            while ":8080 " not in (await netns_guest.run(["ss", "-H", "-tln"])).stdout.decode():
                await trio.sleep(0.05)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            host_port = probe.getsockname()[1]
        netkit_switch.forwarder.add("tcp", f"127.0.0.1:{host_port}", f"{victim_ip}:8080")

        attacker = await hostile_factory(via=via)
        gw_mac = mac_text(netkit_switch.config.gateway_mac)
        for leased in (False, True):
            if leased:
                await attacker.dhcp()
            for _ in range(5):
                # "victim_ip is at attacker.mac", to the gateway and to everyone
                for dst in (gw_mac, BROADCAST):
                    attacker.send(Ether(src=attacker.mac, dst=dst) /
                                  ARP(op=2, hwsrc=attacker.mac, psrc=victim_ip, hwdst=gw_mac, pdst=GATEWAY))
                # and IPv4 from the victim's address (the old learning path)
                attacker.send(Ether(src=attacker.mac, dst=gw_mac) / IP(src=victim_ip, dst=GATEWAY) /
                              ICMP(type=8, id=7, seq=1))
        drops = netkit_switch.drops
        await wait_for(lambda: drops["spoofed-arp-guest"] == 20 and drops["spoofed-ip-guest"] == 10)
        assert netkit_switch.gateway.mac_for_ip(IPv4Address(victim_ip).packed) == \
            netns_guest.netns.mac_of(netns_guest.ifname)

        async def fetch() -> bytes:
            stream = await trio.open_tcp_stream("127.0.0.1", host_port)
            async with stream:
                data = b""
                with trio.fail_after(10):
                    while chunk := await stream.receive_some(100):
                        data += chunk
                return data

        assert await fetch() == b"victim"
    finally:
        server.kill()
        with trio.CancelScope(shield=True):
            await server.wait()


# ----------------------------------------------------------------------------- attack 2: NAT identity
@pytest.mark.parametrize("via", ["memory", "qemu"])
async def test_made_up_and_stolen_source_ips_are_dropped_before_nat(netkit_switch, hostile_factory,
                                                                    victim_factory, recording_host, via):
    victim = await victim_factory()
    victim_ip = str(IPv4Address(victim.ip))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    try:
        attacker = await hostile_factory(via=via)
        gw_mac = mac_text(netkit_switch.config.gateway_mac)
        made_up = ([GATEWAY, HOST_ALIAS] + [f"192.168.65.{n}" for n in range(100, 250)]
                   + [f"10.9.{n // 250}.{n % 250 + 1}" for n in range(150)])
        sent = 0
        for leased in (False, True):
            if leased:
                await attacker.dhcp()
            mine = (victim_ip, str(IPv4Address(attacker.ip)))
            for n, source in enumerate(made_up):
                if source in mine:
                    continue
                attacker.send(Ether(src=attacker.mac, dst=gw_mac) / IP(src=source, dst=HOST_ALIAS) /
                              TCP(sport=40000 + n, dport=port, flags="S", seq=1))
                attacker.send(Ether(src=attacker.mac, dst=gw_mac) / IP(src=source, dst=HOST_ALIAS) /
                              UDP(sport=40000 + n, dport=port) / b"x")
                sent += 2
            attacker.send(Ether(src=attacker.mac, dst=gw_mac) / IP(src=victim_ip, dst=HOST_ALIAS) /
                          TCP(sport=41000, dport=port, flags="S", seq=1))
        drops = netkit_switch.drops
        await wait_for(lambda: drops["spoofed-ip-unassigned"] + drops["spoofed-ip-gateway"] == sent
                       and drops["spoofed-ip-guest"] == 2)
        assert drops["spoofed-ip-gateway"] == 8
        tcp_nat = netkit_switch.tcp_nat
        assert tcp_nat.flow_count == 0 and not any(acct.flows for acct in tcp_nat.budget.accounts.values())
        assert recording_host.tcp_connects == [] and recording_host.udp_sockets == 0
        # The victim's own connections are untouched, under its own per-guest count.
        stream = await victim.open_tcp_stream(HOST_ALIAS, port)
        await stream.aclose()
        assert recording_host.tcp_connects == [("127.0.0.1", port)]
    finally:
        listener.close()


async def test_neighbour_table_stays_bounded(netkit_switch, hostile_factory, victim_factory):
    """The old gateway learned a neighbour per source IP (1M sources: +136 MB)."""
    victim = await victim_factory()
    attacker = await hostile_factory(via="memory")
    await attacker.dhcp()
    gw_mac = netkit_switch.config.gateway_mac
    template = bytes(Ether(src=attacker.mac, dst=gw_mac) / IP(src="10.0.0.1", dst=HOST_ALIAS, ttl=64) /
                     UDP(sport=1000, dport=9) / b"x")
    arp_template = bytes(Ether(src=attacker.mac, dst=gw_mac) /
                         ARP(op=2, hwsrc=attacker.mac, psrc="10.0.0.1", hwdst=gw_mac, pdst=GATEWAY))
    frames_per_kind = 30000
    drops = netkit_switch.drops
    for start in range(0, frames_per_kind, 1000):
        for n in range(start, start + 1000):
            source = (0x0A000000 + n + 1).to_bytes(4, "big")
            frame = bytearray(template)
            frame[26:30] = source  # the switch drops before any checksum is looked at
            attacker.send(bytes(frame))
            arp = bytearray(arp_template)
            arp[28:32] = source
            attacker.send(bytes(arp))
        await wait_for(lambda: drops["spoofed-ip-unassigned"] == start + 1000
                       and drops["spoofed-arp-unassigned"] == start + 1000)
    neighbours = netkit_switch.gateway.neighbors
    assert neighbours == {victim.ip: victim.mac, attacker.ip: attacker.mac}
    bound = len(netkit_switch.config.pool()) + len(netkit_switch.config.static_leases)
    assert netkit_switch.statistics()["bindings"] == 2 <= bound


async def test_a_mac_owned_by_another_port_is_still_refused(netkit_switch, hostile_factory, victim_factory):
    victim = await victim_factory()
    attacker = await hostile_factory(via="memory")
    gw_mac = mac_text(netkit_switch.config.gateway_mac)
    attacker.send(Ether(src=victim.mac, dst=gw_mac) / IP(src=str(IPv4Address(victim.ip)), dst=GATEWAY) /
                  ICMP(type=8))
    await wait_for(lambda: netkit_switch.drops["spoofed-mac"] == 1)
    assert netkit_switch.port_for_mac(victim.mac) is not None
    assert netkit_switch.leases()[0].mac == victim.mac
    assert await victim.ping(GATEWAY)


async def test_rogue_dhcp_server_and_other_ethertypes_are_not_switched(netkit_switch, hostile_factory,
                                                                       victim_factory):
    victim = await victim_factory()
    attacker = await hostile_factory(via="memory")
    await attacker.dhcp()
    before = victim.unclaimed_frames
    attacker.send(Ether(src=attacker.mac, dst=BROADCAST) /
                  IP(src=str(IPv4Address(attacker.ip)), dst="255.255.255.255") / UDP(sport=67, dport=68) / b"offer")
    attacker.send(Ether(src=attacker.mac, dst=mac_text(victim.mac), type=0x8100) / (b"\x00\x01\x08\x06" + b"\0" * 28))
    await wait_for(lambda: netkit_switch.drops["rogue-dhcp-server"] == 1 and netkit_switch.drops["ethertype"] == 1)
    assert victim.unclaimed_frames == before


# ----------------------------------------------------------------------------- attack 7
def _icmp_unreachable_about(attacker, destination: str):
    want = IPv4Address(destination).packed

    def match(frame: bytes) -> bool:
        # IPv4, ICMP type 3 code 1, quoting a packet to ``destination``
        return (frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[34] == 3 and frame[35] == 1
                and frame[42 + 16:42 + 20] == want)

    return attacker.wait_frame(match)


@pytest.mark.parametrize("via", ["memory", "qemu"])
async def test_virtual_subnet_addresses_are_never_host_connects(netkit_switch, hostile_factory, victim_factory,
                                                                recording_host, via):
    victim = await victim_factory()
    victim_ip = str(IPv4Address(victim.ip))
    attacker = await hostile_factory(via=via)
    gw_mac = mac_text(netkit_switch.config.gateway_mac)
    # Unleased: nothing from it is routed at all.
    attacker.send(Ether(src=attacker.mac, dst=gw_mac) / IP(src=UNASSIGNED, dst=UNASSIGNED) / TCP(dport=80, flags="S"))
    await wait_for(lambda: netkit_switch.drops["spoofed-ip-unassigned"] == 1)
    await attacker.dhcp()
    me = str(IPv4Address(attacker.ip))
    probes = [TCP(sport=1234, dport=80, flags="S", seq=5), UDP(sport=1234, dport=53) / b"q", ICMP(type=8, id=1)]
    for destination in (UNASSIGNED, "192.168.65.0", victim_ip):
        for probe in probes:
            waiter = _icmp_unreachable_about(attacker, destination)
            attacker.send(Ether(src=attacker.mac, dst=gw_mac) / IP(src=me, dst=destination) / probe)
            reply = await waiter
            assert reply[26:30] == netkit_switch.config.gateway_ip.packed
    drops = netkit_switch.gateway.drops
    assert drops["to-unassigned"] == 6 and drops["to-guest-via-gateway"] == 3
    # An ICMP error is never answered with another.
    attacker.send(Ether(src=attacker.mac, dst=gw_mac) / IP(src=me, dst=UNASSIGNED) / ICMP(type=3, code=1))
    await wait_for(lambda: drops["to-unassigned"] == 7)
    assert netkit_switch.gateway.counters["icmp-host-unreachable"] == 9
    assert recording_host.tcp_connects == []
    assert recording_host.udp_sockets == 0 and recording_host.icmp_sockets == 0
    assert netkit_switch.tcp_nat.flow_count == 0


@pytest.mark.privileged
async def test_kernel_guest_routed_to_an_unassigned_address_gets_host_unreachable(netkit_switch, netns_guest,
                                                                                 recording_host):
    require_tool("busybox")
    lease = await netns_guest.udhcpc()
    # An address of the subnet nobody holds (not the guest's own, whatever it leased).
    held = {str(other.ip) for other in netkit_switch.leases()} | {lease["ip"]}
    unassigned = next(str(a) for a in netkit_switch.config.subnet.hosts()
                      if a >= IPv4Address(UNASSIGNED) and str(a) not in held)
    # Through the gateway, as a guest with a /32 route (or a static ARP entry) would send it.
    netns_guest.netns.ip("route", "add", f"{unassigned}/32", "via", GATEWAY)
    out = await netns_guest.run([sys.executable, "-c", f"""
import socket
s = socket.socket()
s.settimeout(10)
try:
    s.connect(("{unassigned}", 80))
    print("connected", s.getsockname(), s.getpeername())
except OSError as e:
    print(e.errno)
"""])
    route = (await netns_guest.run(["ip", "route", "get", unassigned])).stdout.decode()
    assert out.stdout.decode().strip() == str(errno.EHOSTUNREACH), (
        out, lease, route, dict(netkit_switch.drops), dict(netkit_switch.gateway.drops),
        netkit_switch.tcp_nat.statistics(), [f.describe() for f in netkit_switch.tcp_nat.flows()])
    assert recording_host.tcp_connects == []
    assert netkit_switch.gateway.drops["to-unassigned"] >= 1


# ----------------------------------------------------------------------------- one port, one identity
@pytest.mark.privileged
async def test_kernel_guest_changing_its_mac_gets_a_new_lease(netkit_switch, netns_guest):
    require_tool("busybox")
    first = await netns_guest.udhcpc()
    old_mac = netns_guest.netns.mac_of(netns_guest.ifname)
    new_mac = random_mac()
    ip = netns_guest.netns.ip
    ip("link", "set", "dev", netns_guest.ifname, "down")
    ip("link", "set", "dev", netns_guest.ifname, "address", mac_text(new_mac))
    ip("link", "set", "dev", netns_guest.ifname, "up")
    second = await netns_guest.udhcpc()  # before: NAKed/dropped as spoofed-mac until the old lease expired (2 h)
    leases = {lease.mac: lease for lease in netkit_switch.leases()}
    assert old_mac not in leases
    assert str(leases[new_mac].ip) == second["ip"] and leases[new_mac].state == "bound"
    assert netkit_switch.drops["spoofed-mac"] == 0
    assert netkit_switch.gateway.counters["leases-released-mac-replaced"] == 1
    assert netkit_switch.gateway.mac_for_ip(IPv4Address(first["ip"]).packed) in (None, new_mac)
    assert (await netns_guest.run(["ping", "-c", "1", "-W", "2", GATEWAY])).returncode == 0


@pytest.mark.privileged
async def test_a_netkit_tap_keeps_its_mac_and_address_across_a_restart_with_state(tmp_path):
    require_privileged()
    require_tool("busybox")
    state = str(tmp_path / "leases.json")
    config = netkit.Config(state_file=state, dns_upstreams=("127.0.0.1:9",))
    ns = Netns.create(unique_name("nkid"))
    tap_name = "nkstable0"
    try:
        macs, addresses = [], []
        for run in range(2):
            async with netkit.open_switch(config) as switch:
                link = TapLink.create(tap_name, netns=ns.name, mtu=config.mtu)
                port = switch.attach(link)
                macs.append(ns.mac_of(tap_name))
                # First run: ask for an address the MAC's hash would not give, so only the
                # restored state can give it back.
                extra = ("-r", "192.168.65.77") if run == 0 else ()
                lease = await udhcpc(ns, tap_name, extra=extra)
                addresses.append(lease["ip"])
                await link.aclose()
                with trio.move_on_after(5):
                    await port.wait_detached()
        assert macs[0] == macs[1] == stable_tap_mac(tap_name, ns.name)
        assert addresses == ["192.168.65.77", "192.168.65.77"]
    finally:
        ns.delete()


class VfkitGuestLink(Link):
    """vfkit's end of a vfkit link: a datagram socket bound at its own path."""

    def __init__(self, path: str, switch_path: str) -> None:
        super().__init__()
        self.name = f"vfkit-guest:{path}"
        self.switch_path = switch_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(path)

    async def _receive_batch(self):
        while True:
            if self._closed:
                raise LinkClosed(self.name)
            try:
                return [self.sock.recv(70000)]
            except BlockingIOError:
                pass
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except (trio.ClosedResourceError, OSError):
                raise LinkClosed(self.name) from None

    def _try_send(self, frame, offload):
        try:
            self.sock.sendto(bytes(frame), self.switch_path)
        except BlockingIOError:
            return False
        return True

    async def _wait_send_ready(self):
        await trio.lowlevel.wait_writable(self.sock)

    async def _close(self):
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        await trio.lowlevel.checkpoint()


async def test_a_vfkit_vm_restarted_on_a_new_socket_path_replaces_the_old_binding(netkit_switch, nursery, tmp_path):
    link = VfkitLink.bind(str(tmp_path / "vfkit.sock"))
    netkit_switch.attach(link)
    first = FakeGuest(VfkitGuestLink(str(tmp_path / "vm1.sock"), link.path))
    await nursery.start(first.run)
    await first.dhcp()
    await first.link.aclose()  # the VM goes away; its socket with it
    second = FakeGuest(VfkitGuestLink(str(tmp_path / "vm2.sock"), link.path))  # new path, new MAC, no VFKT
    await nursery.start(second.run)
    await second.dhcp()  # before: every datagram counted in receive_errors, no lease
    assert await second.ping(GATEWAY)
    assert link.peer == str(tmp_path / "vm2.sock")
    assert [lease.mac for lease in netkit_switch.leases()] == [second.mac]
    assert netkit_switch.gateway.counters["leases-released-mac-replaced"] == 1
    await second.link.aclose()
