"""The vpnkit/hyperkit protocol: handshake, Disconnect, timeout, u16 LE framing."""

from __future__ import annotations

import socket
import struct
import uuid as uuid_module
from ipaddress import IPv4Address

import pytest
import trio

from netkit.links import AllocationError, LinkClosed, VpnkitHandshakeError, VpnkitListener, vpnkit_connect
from netkit.links.vpnkit import decode_command, encode_command, encode_init

UUID = "8c1f5bda-8f6c-4f0c-9a39-d3d1f0b4a7e1"


class Allocator:
    """Gives each UUID a stable MAC; refuses UUIDs it is told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, IPv4Address | None]] = []
        self.macs: dict[str, bytes] = {}
        self.refuse: dict[str, str] = {}

    def __call__(self, uuid: str, preferred_ip: IPv4Address | None) -> bytes:
        self.calls.append((uuid, preferred_ip))
        if uuid in self.refuse:
            raise AllocationError(self.refuse[uuid])
        return self.macs.setdefault(uuid, bytes([0x02, 0, 0, 0, 0, len(self.macs) + 1]))


class Server:
    def __init__(self, listener: VpnkitListener) -> None:
        self.listener = listener
        self.links: list = []
        self.every_link: list = []  # closed at teardown

    async def on_link(self, link) -> None:
        self.links.append(link)
        self.every_link.append(link)

    async def next_link(self):
        with trio.fail_after(2):
            while not self.links:
                await trio.sleep(0.001)
        return self.links.pop(0)


@pytest.fixture
async def vpnkit(sock_dir):
    allocate = Allocator()
    path = str(sock_dir / "vpnkit.sock")
    srv = Server(VpnkitListener(path, mtu=1500, allocate=allocate, handshake_timeout=0.3))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.listener.serve, srv.on_link)
        yield path, srv, allocate
        nursery.cancel_scope.cancel()  # stop accepting before closing what was accepted
    for link in srv.every_link:
        await link.aclose()


async def raw_connect(path: str):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return sock


async def recv_exactly(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(bytes(buf))
        buf += chunk
    return bytes(buf)


async def test_handshake_and_frames_both_ways(vpnkit):
    path, srv, allocate = vpnkit
    client, mac, mtu = await vpnkit_connect(path, UUID)
    server_link = await srv.next_link()
    assert mtu == 1500 and mac == b"\x02\x00\x00\x00\x00\x01"
    assert allocate.calls == [(UUID, None)]
    assert server_link.uuid == UUID and server_link.mac == mac and server_link.mtu == 1500
    assert server_link.name.startswith(f"vpnkit:{UUID}")
    for i in range(10):
        client.send(bytes([i]) * 1514)
    got = []
    while len(got) < 10:
        got.extend(await server_link.receive_batch())
    assert got == [bytes([i]) * 1514 for i in range(10)]
    server_link.send(b"r" * 60)
    assert await client.receive_batch() == [b"r" * 60]
    assert srv.listener.stats.handshakes == 1
    await client.aclose()
    with pytest.raises(LinkClosed):
        await server_link.receive_batch()


async def test_wire_bytes_match_vpnkit(vpnkit):
    path, srv, allocate = vpnkit
    sock = await raw_connect(path)
    init = b"VMN3T" + struct.pack("<I", 22) + b"0123456789012345678901234567890123456789"
    assert len(init) == 49
    await sock.send(init)
    server_init = await recv_exactly(sock, 49)
    assert server_init[:5] == b"VMN3T" and struct.unpack_from("<I", server_init, 5)[0] == 22
    assert server_init[9:].isascii()
    # Preferred_ipv4 (8): uuid, then the address as a number, little-endian.
    command = bytes([8]) + UUID.encode() + struct.pack("<I", int(IPv4Address("192.168.65.9")))
    assert len(command) == 41
    await sock.send(command)
    response = await recv_exactly(sock, 258)
    assert response[0] == 1
    assert struct.unpack_from("<HH", response, 1) == (1500, 1550)
    assert response[5:11] == b"\x02\x00\x00\x00\x00\x01"
    assert response[11:] == bytes(258 - 11)
    assert allocate.calls == [(UUID, IPv4Address("192.168.65.9"))]
    link = await srv.next_link()
    assert link.preferred_ip == IPv4Address("192.168.65.9")
    # Frames: u16 LE length, then the frame; split arbitrarily across writes.
    data = struct.pack("<H", 60) + b"a" * 60 + struct.pack("<H", 1514) + b"b" * 1514
    await sock.send(data[:70])
    assert await link.receive_batch() == [b"a" * 60]
    await sock.send(data[70:])
    assert await link.receive_batch() == [b"b" * 1514]
    link.send(b"c" * 42)
    assert await recv_exactly(sock, 44) == struct.pack("<H", 42) + b"c" * 42
    sock.close()


async def test_allocation_error_sends_disconnect(vpnkit):
    path, srv, allocate = vpnkit
    allocate.refuse[UUID] = "address 192.168.65.9 is taken"
    with pytest.raises(VpnkitHandshakeError) as info:
        await vpnkit_connect(path, UUID, "192.168.65.9")
    assert info.value.reason == "address 192.168.65.9 is taken"
    assert allocate.calls == [(UUID, IPv4Address("192.168.65.9"))]
    with trio.fail_after(2):  # the server counts it just after sending the Disconnect
        while srv.listener.stats.refused == 0:
            await trio.sleep(0.001)
    assert srv.links == []


async def test_disconnect_wire_format(vpnkit):
    path, srv, allocate = vpnkit
    allocate.refuse[UUID] = "no"
    sock = await raw_connect(path)
    await sock.send(encode_init())
    await recv_exactly(sock, 49)
    await sock.send(encode_command(UUID))
    response = await recv_exactly(sock, 258)
    assert response == bytes([2, 2]) + b"no" + bytes(254)
    assert await sock.recv(1) == b""  # and the server hung up
    sock.close()


async def test_reconnect_with_same_uuid_gets_what_allocate_returns(vpnkit):
    path, srv, allocate = vpnkit
    first, mac1, _ = await vpnkit_connect(path, UUID)
    await first.aclose()
    second, mac2, _ = await vpnkit_connect(path, UUID)
    other, mac3, _ = await vpnkit_connect(path, str(uuid_module.uuid4()))
    assert mac1 == mac2 != mac3
    assert [c[0] for c in allocate.calls][:2] == [UUID, UUID]
    await second.aclose()
    await other.aclose()


async def test_async_allocate_is_awaited(sock_dir, nursery):
    async def allocate(uuid, ip):
        await trio.sleep(0)
        return b"\x02\xaa\xbb\xcc\xdd\xee"

    path = str(sock_dir / "v.sock")
    srv = Server(VpnkitListener(path, mtu=9000, allocate=allocate))
    await nursery.start(srv.listener.serve, srv.on_link)
    link, mac, mtu = await vpnkit_connect(path, UUID)
    assert (mac, mtu) == (b"\x02\xaa\xbb\xcc\xdd\xee", 9000)
    await link.aclose()
    await (await srv.next_link()).aclose()


async def test_silent_client_times_out(vpnkit):
    path, srv, _ = vpnkit
    sock = await raw_connect(path)
    with trio.fail_after(2):
        assert await sock.recv(100) == b""  # closed by the server after 0.3 s
    assert srv.listener.stats.handshake_timeouts == 1
    sock.close()


async def test_client_that_stalls_after_init_times_out(vpnkit):
    path, srv, _ = vpnkit
    sock = await raw_connect(path)
    await sock.send(encode_init())
    assert len(await recv_exactly(sock, 49)) == 49
    with trio.fail_after(2):
        assert await sock.recv(100) == b""
    assert srv.listener.stats.handshake_timeouts == 1
    sock.close()


async def test_wrong_version_gets_our_init_then_close(vpnkit):
    path, srv, _ = vpnkit
    sock = await raw_connect(path)
    await sock.send(b"VMN3T" + struct.pack("<I", 2) + bytes(40))
    reply = await recv_exactly(sock, 49)
    assert struct.unpack_from("<I", reply, 5)[0] == 22
    assert await sock.recv(10) == b""
    assert srv.listener.stats.handshake_errors == 1
    sock.close()


@pytest.mark.parametrize(
    "command, reason",
    [
        (bytes([6]) + bytes(40), "Unsupported command Bind_ipv4"),
        (bytes([9]) + UUID.encode() + bytes(4), "Unknown command: 9"),
        (bytes([1]) + b"not-a-uuid".ljust(36, b"x") + bytes(4), "Invalid UUID: not-a-uuid"),
    ],
)
async def test_bad_commands_get_a_disconnect(vpnkit, command, reason):
    path, srv, allocate = vpnkit
    sock = await raw_connect(path)
    await sock.send(encode_init())
    await recv_exactly(sock, 49)
    await sock.send(command)
    response = await recv_exactly(sock, 258)
    assert response[0] == 2
    assert response[2 : 2 + response[1]].decode().startswith(reason)
    assert allocate.calls == []
    sock.close()


async def test_all_zero_uuid_gets_one_made_up(vpnkit):
    path, srv, allocate = vpnkit
    sock = await raw_connect(path)
    await sock.send(encode_init())
    await recv_exactly(sock, 49)
    await sock.send(bytes([1]) + bytes(36) + bytes(4))
    assert (await recv_exactly(sock, 258))[0] == 1
    (made_up, ip), = allocate.calls
    assert str(uuid_module.UUID(made_up)) == made_up and ip is None
    sock.close()


async def test_eof_during_handshake_is_counted(vpnkit):
    path, srv, _ = vpnkit
    sock = await raw_connect(path)
    await sock.send(b"VMN3T")
    sock.close()
    with trio.fail_after(2):
        while srv.listener.stats.handshake_errors == 0:
            await trio.sleep(0.001)


async def test_frames_above_max_packet_size_are_dropped_on_send(vpnkit):
    path, srv, _ = vpnkit
    client, _, _ = await vpnkit_connect(path, UUID)
    link = await srv.next_link()
    assert not link.send(b"x" * 1551)
    assert link.send(b"x" * 1550)
    assert await client.receive_batch() == [b"x" * 1550]
    await client.aclose()


async def test_from_socket_serves_on_any_listening_socket(sock_dir, nursery):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(sock_dir / "given.sock")
    await sock.bind(path)
    sock.listen()
    srv = Server(VpnkitListener.from_socket(sock, mtu=1500, allocate=Allocator()))
    await nursery.start(srv.listener.serve, srv.on_link)
    link, _, _ = await vpnkit_connect(path, UUID)
    await link.aclose()
    await (await srv.next_link()).aclose()


def test_command_codec_round_trips():
    cmd = decode_command(encode_command(UUID, IPv4Address("10.0.0.7")))
    assert (cmd.kind, cmd.uuid, cmd.preferred_ip) == (8, UUID, IPv4Address("10.0.0.7"))
    cmd = decode_command(encode_command(UUID.upper()))
    assert (cmd.kind, cmd.uuid, cmd.preferred_ip) == (1, UUID, None)
    with pytest.raises(ValueError):
        encode_command("short")
