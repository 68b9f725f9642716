"""vsock: the vpnkit protocol on an AF_VSOCK listener.

This kernel has no vsock loopback, so the protocol path is tested over a unix socket
injected through ``socket_factory``; AF_VSOCK itself is only created (or refused with a
clear error).
"""

from __future__ import annotations

import socket

import pytest
import trio

from netkit.links import VsockListener, VsockUnavailable, vpnkit_connect
from netkit.links.vsock import VMADDR_CID_ANY, open_vsock_listener


def test_creating_a_vsock_listener_works_or_says_why():
    try:
        sock = open_vsock_listener(0x4E4B, VMADDR_CID_ANY)  # "NK"
    except VsockUnavailable as e:
        assert "vsock" in str(e).lower()
    else:
        assert sock.family == socket.AF_VSOCK
        sock.close()


def test_a_listener_that_is_never_served_can_be_closed():
    try:
        listener = VsockListener(0x4E4C, mtu=1500, allocate=lambda u, ip: b"\x02" * 6)
    except VsockUnavailable:
        pytest.skip("no AF_VSOCK here")
    listener.close()


async def test_vpnkit_protocol_through_the_vsock_code_path(sock_dir):
    path = str(sock_dir / "vsock-standin.sock")
    made = []

    def unix_factory(port: int, cid: int) -> socket.socket:
        made.append((port, cid))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        return sock

    links = []

    async def on_link(link):
        links.append(link)

    listener = VsockListener(1234, mtu=1500, allocate=lambda u, ip: b"\x02\x01\x02\x03\x04\x05",
                             socket_factory=unix_factory)
    assert made == [(1234, VMADDR_CID_ANY)]
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.serve, on_link)
        client, mac, mtu = await vpnkit_connect(path, "5b4f1d0e-8a7b-4c3d-9e2f-1a2b3c4d5e6f")
        assert (mac, mtu) == (b"\x02\x01\x02\x03\x04\x05", 1500)
        client.send(b"v" * 100)
        with trio.fail_after(2):
            while not links:
                await trio.sleep(0.001)
        assert await links[0].receive_batch() == [b"v" * 100]
        assert listener.listener.stats.handshakes == 1
        nursery.cancel_scope.cancel()
    await client.aclose()
    await links[0].aclose()
