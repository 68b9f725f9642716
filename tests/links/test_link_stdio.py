"""stdio framing: u16 LE length over a pair of fds (pipes here)."""

from __future__ import annotations

import os
import struct
import time

import pytest
import trio
import trio.testing

from netkit.links import LinkClosed, StdioLink


class Peer:
    """The other process's ends of the two pipes, read and written raw."""

    def __init__(self) -> None:
        self.link_in_r, self.write_fd = os.pipe()  # peer writes -> link reads
        self.read_fd, self.link_out_w = os.pipe()  # link writes -> peer reads
        os.set_blocking(self.read_fd, False)
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    async def read_frames(self, count: int) -> list[bytes]:
        frames: list[bytes] = []
        while len(frames) < count:
            while len(self._buf) >= 2 and len(self._buf) >= 2 + struct.unpack_from("<H", self._buf)[0]:
                n = struct.unpack_from("<H", self._buf)[0]
                frames.append(bytes(self._buf[2 : 2 + n]))
                del self._buf[: 2 + n]
            if len(frames) >= count:
                break
            await trio.lowlevel.wait_readable(self.read_fd)
            self._buf += os.read(self.read_fd, 1 << 20)
        return frames

    def close(self) -> None:
        for fd in (self.write_fd, self.read_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def framed(data: bytes) -> bytes:
    return struct.pack("<H", len(data)) + data


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


async def test_round_trip_both_ways(peer):
    link = StdioLink(peer.link_in_r, peer.link_out_w, close_fds=True)
    peer.write(b"".join(framed(bytes([i]) * 100) for i in range(8)))
    assert await link.receive_batch() == [bytes([i]) * 100 for i in range(8)]
    for i in range(4):
        link.send(bytes([i]) * 1500)
    assert await peer.read_frames(4) == [bytes([i]) * 1500 for i in range(4)]
    await link.aclose()


async def test_partial_writes_into_a_full_pipe_lose_nothing(peer):
    link = StdioLink(peer.link_in_r, peer.link_out_w, close_fds=True)
    frames = [struct.pack("<I", i) + os.urandom(30000) for i in range(40)]  # 1.2 MB >> 64 KiB pipe
    started = time.perf_counter()
    for f in frames:
        assert link.send(f)
    assert time.perf_counter() - started < 1  # send never blocks in a syscall
    assert link._has_pending() or link.stats.queued_bytes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run_sender)
        with trio.fail_after(10):
            got = await peer.read_frames(len(frames))
        nursery.cancel_scope.cancel()
    assert got == frames
    await link.aclose()


async def test_frames_over_65535_cannot_be_framed_and_are_dropped(peer):
    link = StdioLink(peer.link_in_r, peer.link_out_w, close_fds=True)
    assert not link.send(b"x" * 65536)
    assert link.stats.send_dropped == 1
    assert link.send(b"x" * 65535)
    await link.aclose()


async def test_eof_raises_link_closed_and_zero_length_is_counted(peer):
    link = StdioLink(peer.link_in_r, peer.link_out_w, close_fds=True)
    peer.write(struct.pack("<H", 0) + framed(b"z" * 70))
    os.close(peer.write_fd)
    assert await link.receive_batch() == [b"z" * 70]
    with pytest.raises(LinkClosed):
        await link.receive_batch()
    assert link.stats.receive_errors == 1
    await link.aclose()


async def test_without_close_fds_the_fds_stay_open_and_blocking_again(peer):
    assert os.get_blocking(peer.link_in_r)
    link = StdioLink(peer.link_in_r, peer.link_out_w)
    assert not os.get_blocking(peer.link_in_r)
    await link.aclose()
    assert os.get_blocking(peer.link_in_r) and os.get_blocking(peer.link_out_w)
    os.close(peer.link_in_r)
    os.close(peer.link_out_w)


async def test_close_wakes_a_waiting_reader(peer):
    link = StdioLink(peer.link_in_r, peer.link_out_w, close_fds=True)
    async with trio.open_nursery() as nursery:

        async def reader():
            with pytest.raises(LinkClosed):
                await link.receive_batch()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # the reader waits in receive_batch
        await link.aclose()
