"""The hostile-guest fixture itself: frames it sends reach the switch over both links."""

import pytest
from scapy.layers.l2 import ARP, Ether


@pytest.mark.parametrize("via", ["memory", "qemu"])
async def test_hostile_guest_frames_reach_the_gateway(hostile_factory, netkit_switch, via):
    attacker = await hostile_factory(via=via)
    before = netkit_switch.gateway.counters["arp-replies"]
    attacker.send(Ether(src=attacker.mac, dst="ff:ff:ff:ff:ff:ff") /
                  ARP(op=1, hwsrc=attacker.mac, psrc="0.0.0.0", pdst="192.168.65.1"))
    reply = await attacker.wait_frame(lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02")
    assert reply[22:28] == netkit_switch.config.gateway_mac
    assert netkit_switch.gateway.counters["arp-replies"] == before + 1
