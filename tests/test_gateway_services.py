"""Services on the gateway and the fake guest's TCP client, through the real switch path."""

import hashlib
import os
import socket

import pytest
import trio

from netkit.wire.ipv4 import PROTO_UDP


async def echo_service(stream, client):
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def test_fake_guest_tcp_to_gateway_service(fake_guest, netkit_switch):
    netkit_switch.tcp_nat.register_service(7, echo_service)
    stream = await fake_guest.open_tcp_stream(netkit_switch.config.gateway_ip, 7)
    payload = os.urandom(300_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        received = bytearray()
        with trio.fail_after(10):
            while len(received) < len(payload):
                received += await stream.receive_some(65536)
    assert bytes(received) == payload
    await stream.send_eof()
    with trio.fail_after(5):
        assert await stream.receive_some() == b""
    await stream.aclose()


async def test_fake_guest_tcp_through_nat_to_host_loopback(fake_guest, netkit_switch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    payload = os.urandom(1 << 20)

    async def host_side():
        await trio.lowlevel.wait_readable(listener)
        conn, _ = listener.accept()
        conn = trio.socket.from_stdlib_socket(conn)
        h = hashlib.sha256()
        while data := await conn.recv(1 << 16):
            h.update(data)
        await conn.send(h.hexdigest().encode())
        conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(host_side)
        stream = await fake_guest.open_tcp_stream(netkit_switch.config.host_ip, port)
        await stream.send_all(payload)
        await stream.send_eof()
        reply = b""
        with trio.fail_after(10):
            while data := await stream.receive_some():
                reply += data
    listener.close()
    assert reply.decode() == hashlib.sha256(payload).hexdigest()


async def test_fake_guest_refused(fake_guest, netkit_switch):
    with pytest.raises(ConnectionRefusedError):
        await fake_guest.open_tcp_stream(netkit_switch.config.gateway_ip, 9999)


async def test_udp_service_replies(fake_guest, netkit_switch):
    from netkit.wire import EthernetView, Ipv4View, UdpView, udp_frame

    seen = []

    def handler(payload, client, reply):
        seen.append((bytes(payload), client))
        reply(b"pong:" + bytes(payload))

    netkit_switch.gateway.register_udp_service(9, handler)
    gw = netkit_switch.config
    fake_guest.send_frame(udp_frame(gw.gateway_mac, fake_guest.mac, fake_guest.ip, gw.gateway_ip.packed, 5555, 9,
                                    b"ping"))

    def is_reply(frame):
        try:
            ip = Ipv4View(EthernetView(memoryview(frame)).payload)
            return ip.protocol == PROTO_UDP and UdpView(ip.payload).dst_port == 5555
        except Exception:
            return False

    frame = await fake_guest.wait_frame(is_reply)
    assert bytes(UdpView(Ipv4View(EthernetView(memoryview(frame)).payload).payload).payload) == b"pong:ping"
    assert seen[0][1][1] == 5555
