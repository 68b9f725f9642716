"""Guests are hosts, never routers: a hostile guest's IPv6 Router Advertisement (which
would make it the victim's default router and, through RDNSS, its DNS server), Redirect
or DHCPv6 server reply never reaches another guest, however it is wrapped in extension
headers or fragments (RFC 6105 RA guard, RFC 7113 evasions). Ordinary IPv6 between
guests (neighbour discovery, echo) is still switched."""

from __future__ import annotations

import pytest
import trio
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6ND_Redirect,
                                ICMPv6NDOptPrefixInfo, ICMPv6NDOptRDNSS, ICMPv6NDOptSrcLLAddr, IPv6, IPv6ExtHdrDestOpt,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop)
from scapy.layers.l2 import Ether

from netkit.testing import require_privileged

ATTACKER_LL = "fe80::bad"
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"


def rogue_ra():
    return (ICMPv6ND_RA(routerlifetime=1800) /
            ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad::", prefixlen=64, L=1, A=1) /
            ICMPv6NDOptRDNSS(dns=["2001:db8:bad::53"]))


def attacks(mac, dst_mac=ALL_NODES_MAC):
    eth = Ether(src=mac, dst=dst_mac)
    ip = IPv6(src=ATTACKER_LL, dst=ALL_NODES, hlim=255)
    ra = rogue_ra()
    whole = bytes(ip / IPv6ExtHdrFragment(id=7, m=0, offset=0) / ra)
    # The same RA in two fragments, the first holding only a destination-options header
    # (the ICMPv6 header is in the second): the classic RA-guard evasion.
    split_ip = IPv6(src=ATTACKER_LL, dst=ALL_NODES, hlim=255)
    inner = bytes(IPv6ExtHdrDestOpt(options=[]) / ra)
    first = split_ip / IPv6ExtHdrFragment(nh=60, id=8, m=1, offset=0) / inner[:8]
    second = split_ip / IPv6ExtHdrFragment(nh=60, id=8, m=0, offset=1) / inner[8:]
    return {
        "plain RA": eth / ip / ra,
        "RA behind hop-by-hop": eth / ip / IPv6ExtHdrHopByHop() / ra,
        "RA behind dest-opts x3": eth / ip / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / ra,
        "RA in one fragment": eth / IPv6(whole),
        "RA split over fragments": [eth / first, eth / second],
        "redirect": eth / ip / ICMPv6ND_Redirect(tgt="fe80::bad", dst="2001:db8::1"),
        "DHCPv6 advertise": eth / IPv6(src=ATTACKER_LL, dst="fe80::1") / UDP(sport=547, dport=546) / b"\x02abc",
    }


class LinkLocal:
    def __init__(self, address: str, mac: str) -> None:
        import ipaddress

        self.address = address
        self.mac = mac
        packed = ipaddress.IPv6Address(address).packed
        self.solicited_node = str(ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + packed[13:]))
        self.mac_tail = "".join(f":{b:02x}" for b in packed[13:])


async def wait_for_link_local(guest) -> LinkLocal:
    """The kernel guest's link-local address once duplicate address detection is done."""
    found: list[LinkLocal] = []

    async def ready() -> bool:
        out = (await guest.run(["ip", "-o", "-6", "addr", "show", "dev", guest.ifname, "scope", "link"])).stdout
        link = (await guest.run(["cat", f"/sys/class/net/{guest.ifname}/address"])).stdout.decode().strip()
        for line in out.decode().splitlines():
            if "tentative" not in line:
                found.append(LinkLocal(line.split()[3].split("/")[0], link))
                return True
        return False

    with trio.fail_after(10):
        while not await ready():
            await trio.sleep(0.1)
    return found[0]


def is_marker(frame: bytes) -> bool:
    return frame[12:14] == b"\x86\xdd" and frame[20] == 58 and frame[54] == 128 and frame.endswith(b"marker")


async def test_rogue_router_messages_never_reach_another_guest(hostile_factory, victim_factory, netkit_switch):
    victim = await victim_factory()
    attacker = await hostile_factory(lease=True)
    received: list[bytes] = []

    def is_rogue(frame: bytes) -> bool:
        if frame[12:14] == b"\x86\xdd" and frame[6:12] == attacker.mac and not is_marker(frame):
            received.append(frame)
        return False

    watching = trio.CancelScope()

    async def watch():
        with watching:
            await victim.wait_frame(is_rogue, timeout=60)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        drops_before = sum(netkit_switch.drops.values())
        # Unicast to the victim (a solicited RA is unicast; the fake guest, like a NIC,
        # takes only its own and broadcast frames).
        for name, frames in attacks(attacker.mac, victim.mac).items():
            for frame in frames if isinstance(frames, list) else [frames]:
                attacker.send(frame)
        # Ordinary IPv6 still flows: a neighbour solicitation and, last, an echo request
        # the victim must see. The link keeps order, so once the marker is in, every
        # attack frame before it has been delivered or dropped.
        attacker.send(Ether(src=attacker.mac, dst=victim.mac) /
                      IPv6(src=ATTACKER_LL, dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt="fe80::1"))
        attacker.send(Ether(src=attacker.mac, dst=victim.mac) / IPv6(src=ATTACKER_LL, dst=ALL_NODES) /
                      ICMPv6EchoRequest(data=b"marker"))
        await victim.wait_frame(is_marker)
        watching.cancel()
    drops = netkit_switch.drops
    # The second fragment of the split RA is switched (alone it is nothing: its first
    # fragment, without the ICMPv6 header, was dropped) and so is the NS.
    delivered = [IPv6(f[14:]) for f in received]
    assert all(p.haslayer(ICMPv6ND_NS) or (p.haslayer(IPv6ExtHdrFragment) and p[IPv6ExtHdrFragment].offset)
               for p in delivered), [p.summary() for p in delivered]
    assert drops["rogue-router-advert"] == 4, dict(drops)
    assert drops["rogue-redirect"] == 1 and drops["rogue-dhcpv6-server"] == 1
    assert drops["malformed-ipv6"] == 1  # the first fragment without its upper-layer header
    assert sum(drops.values()) - drops_before == 7


@pytest.mark.privileged
async def test_kernel_guest_keeps_no_rogue_router(hostile_factory, netns_guest, netkit_switch):
    """A Linux guest that accepts router advertisements (the default for a host) gets
    no default route, no address from the rogue prefix: the RA never reached it."""
    require_privileged()
    victim = netns_guest
    # (through /proc, not sysctl(8): procps is not part of a minimal Debian)
    await victim.run(["sh", "-c", f"echo 2 > /proc/sys/net/ipv6/conf/{victim.ifname}/accept_ra"], check=True)
    await victim.run(["ip", "link", "set", victim.ifname, "up"], check=True)
    link_local = await wait_for_link_local(victim)
    attacker = await hostile_factory(lease=True)
    for frames in attacks(attacker.mac).values():
        for frame in frames if isinstance(frames, list) else [frames]:
            attacker.send(frame)
    # Then a neighbour solicitation (which teaches the victim the attacker's MAC) and an
    # echo request: the victim handles frames in order, so by its echo reply every RA
    # before them has been seen -- or, as it must be, never arrived.
    attacker.send(Ether(src=attacker.mac, dst="33:33:ff" + link_local.mac_tail) /
                  IPv6(src=ATTACKER_LL, dst=link_local.solicited_node, hlim=255) /
                  ICMPv6ND_NS(tgt=link_local.address) / ICMPv6NDOptSrcLLAddr(lladdr=attacker.mac))
    attacker.send(Ether(src=attacker.mac, dst=link_local.mac) / IPv6(src=ATTACKER_LL, dst=link_local.address) /
                  ICMPv6EchoRequest(id=1, data=b"marker"))
    await attacker.wait_frame(lambda f: f[12:14] == b"\x86\xdd" and f[20] == 58 and f[54] == 129, timeout=10)
    routes = (await victim.run(["ip", "-6", "route", "show"], check=True)).stdout.decode()
    addresses = (await victim.run(["ip", "-6", "addr", "show", "dev", victim.ifname], check=True)).stdout.decode()
    assert "default" not in routes and "2001:db8:bad" not in routes, routes
    assert "2001:db8:bad" not in addresses, addresses
    assert netkit_switch.drops["rogue-router-advert"] == 4
