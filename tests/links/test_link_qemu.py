"""QEMU stream framing (4-byte big-endian length) and the unix listener."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
import trio
import trio.testing

from netkit.links import LinkClosed, QemuListener, StreamFramedLink, qemu_connect


def frame(i: int, size: int = 200) -> bytes:
    return struct.pack(">I", i) + bytes([i % 251]) * (size - 4)


class Server:
    """A QemuListener running in a nursery, collecting the links it accepts."""

    def __init__(self, path: str, **kwargs) -> None:
        self.path = path
        self.listener = QemuListener(path, **kwargs)
        self.links: list[StreamFramedLink] = []
        self.every_link: list[StreamFramedLink] = []  # closed at teardown
        self._arrived = trio.Event()

    async def on_link(self, link) -> None:
        self.links.append(link)
        self.every_link.append(link)
        self._arrived.set()

    async def next_link(self):
        while not self.links:
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self.links.pop(0)

    async def aclose_all(self) -> None:
        for link in self.every_link:
            await link.aclose()


@pytest.fixture
async def server(sock_dir):
    srv = Server(str(sock_dir / "qemu.sock"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.listener.serve, srv.on_link)
        yield srv
        nursery.cancel_scope.cancel()  # stop accepting before closing what was accepted
    await srv.aclose_all()


async def raw_client(path: str):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return sock


async def recv_exactly(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


async def test_frames_round_trip_both_ways_in_batches(server):
    client = await qemu_connect(server.path)
    link = await server.next_link()
    assert link.name.startswith("qemu:") and link.name.endswith("#1")
    for i in range(20):
        assert client.send(frame(i))
    got = []
    while len(got) < 20:
        got.extend(await link.receive_batch())
    assert got == [frame(i) for i in range(20)]
    for i in range(5):
        link.send(frame(100 + i, 1514))
    got = []
    while len(got) < 5:
        got.extend(await client.receive_batch())
    assert got == [frame(100 + i, 1514) for i in range(5)]
    assert link.stats.frames_received == 20 and link.stats.frames_sent == 5
    await client.aclose()
    await link.aclose()


async def test_wire_format_is_be32_length_then_frame(server):
    sock = await raw_client(server.path)
    link = await server.next_link()
    # Two frames in one write, a third split across writes: framing is by length only.
    f1, f2, f3 = b"\x01" * 60, b"\x02" * 1500, b"\x03" * 9000
    data = struct.pack(">I", 60) + f1 + struct.pack(">I", 1500) + f2 + struct.pack(">I", 9000) + f3
    await sock.send(data[:-5000])
    batch = await link.receive_batch()
    assert batch == [f1, f2]
    await sock.send(data[-5000:])
    assert await link.receive_batch() == [f3]
    link.send(b"\xaa" * 64)
    assert await recv_exactly(sock, 68) == struct.pack(">I", 64) + b"\xaa" * 64
    sock.close()
    with pytest.raises(LinkClosed):
        await link.receive_batch()
    await link.aclose()


async def test_oversized_length_prefix_is_counted_and_closes_the_connection(sock_dir, nursery):
    srv = Server(str(sock_dir / "q.sock"), max_frame=10000)
    await nursery.start(srv.listener.serve, srv.on_link)
    sock = await raw_client(srv.path)
    link = await srv.next_link()
    good = struct.pack(">I", 100) + b"g" * 100
    await sock.send(good + struct.pack(">I", 10001) + b"junk" * 100)
    assert await link.receive_batch() == [b"g" * 100]
    with pytest.raises(LinkClosed):
        await link.receive_batch()
    assert link.stats.receive_errors == 1
    assert await sock.recv(10) == b""  # the connection was shut down
    sock.close()
    await link.aclose()


async def test_zero_length_is_counted_and_skipped_truncated_tail_is_counted(server):
    sock = await raw_client(server.path)
    link = await server.next_link()
    await sock.send(struct.pack(">I", 0) + struct.pack(">I", 3) + b"abc" + struct.pack(">I", 50) + b"short")
    assert await link.receive_batch() == [b"abc"]
    assert link.stats.receive_errors == 1
    sock.close()  # EOF in the middle of the 50-byte frame
    with pytest.raises(LinkClosed):
        await link.receive_batch()
    assert link.stats.receive_errors == 2
    await link.aclose()


async def test_partial_writes_under_a_slow_reader_deliver_exact_bytes(server):
    client = await qemu_connect(server.path)
    link = await server.next_link()
    frames = [frame(i, 60000) for i in range(60)]  # ~3.6 MB: far beyond the socket buffer
    # The reader is not reading: every send returns at once, the socket fills, a frame is
    # split (its tail kept), and the rest wait in the bounded queue.
    started = time.perf_counter()
    for f in frames:
        assert link.send(f)
    assert time.perf_counter() - started < 1  # send never blocks in a syscall
    assert link._has_pending()
    assert link.stats.queued_bytes > 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run_sender)
        got = []
        with trio.fail_after(10):
            while len(got) < len(frames):
                got.extend(await client.receive_batch())
        nursery.cancel_scope.cancel()
    assert got == frames
    assert link.stats.queued_bytes == 0 and not link._has_pending()
    await client.aclose()
    await link.aclose()


async def test_a_partially_written_last_frame_is_finished_by_run_sender(server):
    # The split frame is the last one sent: nothing is queued behind it, so run_sender
    # must be woken by the partial write itself.
    client = await qemu_connect(server.path)
    link = await server.next_link()
    sent = []
    while not link._has_pending():
        f = frame(len(sent), 50000)
        assert link.send(f)
        sent.append(f)
    assert link.stats.queued_bytes == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run_sender)
        got = []
        with trio.fail_after(5):
            while len(got) < len(sent):
                got.extend(await client.receive_batch())
        nursery.cancel_scope.cancel()
    assert got == sent
    await client.aclose()
    await link.aclose()


async def test_send_queue_is_bounded_when_the_peer_never_reads(sock_dir, nursery):
    srv = Server(str(sock_dir / "q.sock"), send_queue_bytes=256 * 1024)
    await nursery.start(srv.listener.serve, srv.on_link)
    sock = await raw_client(srv.path)
    link = await srv.next_link()
    for i in range(200):
        link.send(frame(i, 60000))
    assert link.stats.send_dropped > 0
    assert link.stats.queued_bytes <= 256 * 1024
    assert link.stats.frames_sent + link.stats.send_dropped + len(link._queue) == 200
    sock.close()
    await link.aclose()


async def test_eof_and_reset_raise_link_closed(server):
    client = await qemu_connect(server.path)
    link = await server.next_link()
    client.send(b"bye" * 30)
    await client.aclose()
    assert await link.receive_batch() == [b"bye" * 30]
    with pytest.raises(LinkClosed):
        await link.receive_batch()
    # Sending to the vanished peer is counted as dropped, never raised.
    for _ in range(3):
        link.send(b"x" * 100)
    assert link.stats.send_dropped >= 1
    await link.aclose()
    with pytest.raises(LinkClosed):
        await link.receive_batch()
    assert not link.send(b"x" * 100)


async def test_local_close_wakes_reader_and_sender(server):
    client = await qemu_connect(server.path)
    link = await server.next_link()
    for i in range(100):
        link.send(frame(i, 60000))  # fill the socket and queue so run_sender waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run_sender)

        async def reader():
            with pytest.raises(LinkClosed):
                await link.receive_batch()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # reader and sender both wait
        with trio.fail_after(2):
            await link.aclose()
    await client.aclose()


async def test_stale_socket_is_replaced_and_path_removed_on_exit(sock_dir):
    path = str(sock_dir / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    listener = QemuListener(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.serve, lambda link: link.aclose())
        assert os.path.exists(path)
        client = await qemu_connect(path)
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)


async def test_live_listener_path_is_not_stolen(server):
    with pytest.raises(OSError):
        await QemuListener(server.path).serve(lambda link: link.aclose())
    assert os.path.exists(server.path)


async def test_regular_file_is_not_deleted(sock_dir):
    path = sock_dir / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        await QemuListener(str(path)).serve(lambda link: link.aclose())
    assert path.read_text() == "keep me"


async def test_failing_on_link_closes_that_link_only(sock_dir, nursery):
    path = str(sock_dir / "q.sock")
    calls = []

    async def on_link(link):
        calls.append(link)
        if len(calls) == 1:
            raise RuntimeError("boom")
        await link.aclose()

    await nursery.start(QemuListener(path).serve, on_link)
    first = await qemu_connect(path)
    with trio.fail_after(2):
        with pytest.raises(LinkClosed):
            await first.receive_batch()  # the server closed its end
    second = await qemu_connect(path)
    with trio.fail_after(2):
        while len(calls) < 2:
            await trio.sleep(0.001)
    assert calls[0].closed
    await first.aclose()
    await second.aclose()


async def test_on_link_may_run_for_the_lifetime_of_the_link(sock_dir, nursery):
    path = str(sock_dir / "q.sock")
    echoed = []

    async def echo(link):
        async with link:
            try:
                while True:
                    for f in await link.receive_batch():
                        link.send(f)
                        echoed.append(f)
            except LinkClosed:
                pass

    await nursery.start(QemuListener(path).serve, echo)
    clients = [await qemu_connect(path) for _ in range(3)]
    for i, c in enumerate(clients):
        c.send(frame(i))
    for i, c in enumerate(clients):
        assert await c.receive_batch() == [frame(i)]
        await c.aclose()
    with trio.fail_after(2):
        while len(echoed) < 3:
            await trio.sleep(0.001)


async def test_from_fds_over_a_socketpair():
    a, b = socket.socketpair()
    fa, fb = a.detach(), b.detach()
    left = StreamFramedLink.from_fds(fa, fa, name="left")
    right = StreamFramedLink.from_fds(fb, fb, name="right")
    left.send(b"hello" * 20)
    assert await right.receive_batch() == [b"hello" * 20]
    await left.aclose()
    with pytest.raises(LinkClosed):
        await right.receive_batch()
    await right.aclose()
