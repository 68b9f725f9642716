"""Flows belong to the identity that opened them: when an address stops being a guest's
(its MAC replaced on the port, its lease released or expired), the flows opened from it
end at once. Otherwise the next holder of that address would collide with them (its
packets counted as ``wrong-port``) or a departed guest's host sockets would live on."""

from __future__ import annotations

import socket

import pytest
import trio
from scapy.layers.l2 import ARP, Ether

from netkit.testing.wait import wait_until
from netkit.wire import udp_frame

HOST_ALIAS = "192.168.65.2"


async def test_flows_of_an_address_end_when_its_binding_does(hostile_factory, victim_factory, netkit_switch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    udp_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_server.bind(("127.0.0.1", 0))
    try:
        guest = await hostile_factory(lease=True)
        bystander = await victim_factory()
        streams = [await g.open_tcp_stream(HOST_ALIAS, listener.getsockname()[1]) for g in (guest, bystander)]
        config = netkit_switch.config
        for g, sport in ((guest, 5000), (bystander, 5001)):
            g.send_frame(udp_frame(config.gateway_mac, g.mac, g.ip, config.host_ip.packed, sport,
                                   udp_server.getsockname()[1], b"hello"))
        tcp_nat, udp_nat = netkit_switch.tcp_nat, netkit_switch.udp_nat
        await wait_until(lambda: tcp_nat.flow_count == 2 and len(udp_nat.flows) == 2)
        host_sides = [listener.accept()[0] for _ in streams]  # the guest's, then the bystander's

        # The guest's port speaks from a new MAC (a VM restarted on the same socket):
        # the old MAC's lease is released, and with it the address its flows came from.
        new_mac = bytes.fromhex("02aabbccddee")
        guest.send(Ether(src=new_mac, dst="ff:ff:ff:ff:ff:ff") /
                   ARP(op=1, hwsrc=new_mac, psrc="0.0.0.0", pdst=str(config.gateway_ip)))
        await wait_until(lambda: tcp_nat.flow_count == 1 and len(udp_nat.flows) == 1)
        assert tcp_nat.counters["connections-reset-address-unbound"] == 1
        survivors = [flow.guest_ip for flow in tcp_nat.flows()] + [flow.guest_ip for flow in udp_nat.flows.values()]
        assert survivors == [bystander.ip, bystander.ip]
        # The guest's host connection was reset; the bystander's still carries data.
        for conn in host_sides:
            conn.settimeout(5)
        with pytest.raises(ConnectionResetError):
            await trio.to_thread.run_sync(host_sides[0].recv, 100)
        await streams[1].send_all(b"still here")
        assert await trio.to_thread.run_sync(host_sides[1].recv, 100) == b"still here"
        for conn in host_sides:
            conn.close()
    finally:
        listener.close()
        udp_server.close()
