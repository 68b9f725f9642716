"""vfkit: one frame per unix datagram, peer learned from the first datagram."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from netkit.links import LinkClosed, VfkitLink
from netkit.testing.wait import wait_until


class FakeVfkit:
    """A datagram socket bound at its own path, like vfkit's end."""

    def __init__(self, path: str, link_path: str) -> None:
        self.path = path
        self.link_path = link_path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    async def start(self) -> "FakeVfkit":
        await self.sock.bind(self.path)
        return self

    async def send(self, data: bytes) -> None:
        await self.sock.sendto(data, self.link_path)

    async def recv(self) -> bytes:
        return await self.sock.recv(70000)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def vfkit(sock_dir):
    link = VfkitLink.bind(str(sock_dir / "vfkit.sock"))
    peer = await FakeVfkit(str(sock_dir / "vm.sock"), link.path).start()
    yield link, peer
    peer.close()
    await link.aclose()


async def test_magic_is_swallowed_and_frames_round_trip(vfkit):
    link, vm = vfkit
    await vm.send(b"VFKT")
    for i in range(5):
        await vm.send(bytes([i]) * 1500)
    batch = await link.receive_batch()
    assert batch == [bytes([i]) * 1500 for i in range(5)]
    assert link.peer == vm.path
    for i in range(3):
        assert link.send(bytes([i + 10]) * 64)
    assert [await vm.recv() for _ in range(3)] == [bytes([i + 10]) * 64 for i in range(3)]
    assert link.stats.frames_sent == 3 and link.stats.frames_received == 5


async def test_peer_learned_from_first_frame_without_magic(vfkit):
    link, vm = vfkit
    await vm.send(b"f" * 100)
    assert await link.receive_batch() == [b"f" * 100]
    assert link.peer == vm.path


async def test_large_frames_pass_whole(vfkit):
    link, vm = vfkit
    await vm.send(b"L" * 65000)
    assert await link.receive_batch() == [b"L" * 65000]
    link.send(b"M" * 65000)
    assert await vm.recv() == b"M" * 65000


async def test_send_before_any_peer_is_dropped(vfkit):
    link, _ = vfkit
    assert not link.send(b"x" * 60)
    assert link.stats.send_dropped == 1


async def test_other_senders_are_counted_and_ignored(vfkit, sock_dir):
    link, vm = vfkit
    await vm.send(b"VFKT")
    stranger = await FakeVfkit(str(sock_dir / "other.sock"), link.path).start()
    await stranger.send(b"s" * 80)
    await vm.send(b"v" * 80)
    assert await link.receive_batch() == [b"v" * 80]
    assert link.stats.receive_errors == 1
    assert link.peer == vm.path
    stranger.close()


async def test_vfkt_from_a_new_address_retargets(vfkit, sock_dir):
    link, vm = vfkit
    await vm.send(b"a" * 60)
    assert await link.receive_batch() == [b"a" * 60]
    restarted = await FakeVfkit(str(sock_dir / "vm2.sock"), link.path).start()
    await restarted.send(b"VFKT")
    await restarted.send(b"b" * 60)
    assert await link.receive_batch() == [b"b" * 60]
    assert link.peer == restarted.path
    link.send(b"c" * 60)
    assert await restarted.recv() == b"c" * 60
    restarted.close()


async def test_unbound_sender_is_counted(vfkit):
    link, vm = vfkit
    anon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    anon.sendto(b"n" * 60, link.path)
    anon.close()
    await vm.send(b"ok" * 30)
    assert await link.receive_batch() == [b"ok" * 30]
    assert link.stats.receive_errors == 1


async def test_send_queue_is_bounded_when_peer_never_reads(sock_dir):
    link = VfkitLink.bind(str(sock_dir / "v.sock"), send_queue_bytes=100_000)
    vm = await FakeVfkit(str(sock_dir / "vm.sock"), link.path).start()
    await vm.send(b"VFKT")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.receive_batch)  # learns the peer (no frame arrives)
        await wait_until(lambda: link.peer == vm.path, timeout=5)
        nursery.cancel_scope.cancel()
    for _ in range(2000):
        link.send(b"z" * 1500)
    assert link.stats.send_dropped > 0
    assert link.stats.queued_bytes <= 100_000
    # Once the peer drains, run_sender delivers the queue.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run_sender)
        with trio.fail_after(5):
            while link.stats.queued_bytes:
                try:
                    await vm.recv()
                except BlockingIOError:  # pragma: no cover
                    pass
        nursery.cancel_scope.cancel()
    vm.close()
    await link.aclose()


async def test_close_unlinks_path_and_wakes_reader(sock_dir):
    path = str(sock_dir / "v.sock")
    link = VfkitLink.bind(path)
    assert os.path.exists(path)
    async with trio.open_nursery() as nursery:

        async def reader():
            with pytest.raises(LinkClosed):
                await link.receive_batch()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # the reader waits in receive_batch
        await link.aclose()
    assert not os.path.exists(path)
    with pytest.raises(LinkClosed):
        await link.receive_batch()


async def test_stale_path_is_replaced(sock_dir):
    """A socket file left behind by a previous run (nobody bound to it) is replaced by
    the link's own: frames sent to the path reach the link, and closing removes it."""
    path = str(sock_dir / "v.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old.bind(path)
    old.close()  # the file stays behind
    link = VfkitLink.bind(path)
    try:
        vm = await FakeVfkit(str(sock_dir / "vm.sock"), path).start()
        try:
            await vm.send(b"VFKT")
            await vm.send(b"s" * 60)
            with trio.fail_after(5):
                assert await link.receive_batch() == [b"s" * 60]
            assert link.peer == vm.path
        finally:
            vm.close()
    finally:
        await link.aclose()
    assert not os.path.exists(path)


async def test_live_path_is_not_stolen(sock_dir):
    """A path another process is still bound to is not stale: bind refuses, and that
    process keeps its socket."""
    path = str(sock_dir / "v.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as live:
        live.bind(path)
        with pytest.raises(OSError):
            VfkitLink.bind(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"still mine", path)
        assert live.recv(100) == b"still mine"


async def test_a_new_sender_takes_over_once_the_peer_is_gone(vfkit, sock_dir):
    """A VM restarted with a new socket path and no VFKT: the link follows it once the
    old peer's socket is gone (while it is alive, strangers are ignored: see above)."""
    link, vm = vfkit
    await vm.send(b"a" * 60)
    assert await link.receive_batch() == [b"a" * 60]
    vm.close()  # the old VM is gone; its path stays behind, unbound
    restarted = await FakeVfkit(str(sock_dir / "vm2.sock"), link.path).start()
    await restarted.send(b"b" * 60)
    assert await link.receive_batch() == [b"b" * 60]
    assert link.peer == restarted.path and link.stats.receive_errors == 0
    link.send(b"c" * 60)
    assert await restarted.recv() == b"c" * 60
    restarted.close()
