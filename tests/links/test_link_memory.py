"""The in-process link pair."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from netkit.links import LinkClosed, memory_link_pair


def frame(i: int, size: int = 100) -> bytes:
    return bytes([i % 256]) * size


async def test_frames_cross_both_ways_in_one_batch():
    a, b = memory_link_pair()
    for i in range(10):
        assert a.send(frame(i))
    assert await b.receive_batch() == [frame(i) for i in range(10)]
    for i in range(3):
        assert b.send(frame(i + 50))
    assert await a.receive_batch() == [frame(i + 50) for i in range(3)]
    assert a.stats.frames_sent == 10 and b.stats.frames_received == 10
    assert a.stats.bytes_sent == 1000
    await a.aclose()
    await b.aclose()


async def test_batches_are_capped_and_nothing_is_lost():
    a, b = memory_link_pair()
    for i in range(150):
        a.send(frame(i, 60))
    got = []
    sizes = []
    while len(got) < 150:
        batch = await b.receive_batch()
        sizes.append(len(batch))
        got.extend(batch)
    assert got == [frame(i, 60) for i in range(150)]
    assert max(sizes) == 64
    await a.aclose()
    await b.aclose()


async def test_receive_waits_for_frames():
    a, b = memory_link_pair()
    async with trio.open_nursery() as nursery:
        got = []

        async def reader():
            got.extend(await b.receive_batch())

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # the reader waits in receive_batch
        assert got == []
        a.send(b"x" * 60)
    assert got == [b"x" * 60]
    await a.aclose()
    await b.aclose()


async def test_mutable_buffers_are_copied():
    a, b = memory_link_pair()
    buf = bytearray(b"y" * 64)
    a.send(buf)
    buf[:] = b"z" * 64
    assert await b.receive_batch() == [b"y" * 64]
    await a.aclose()
    await b.aclose()


async def test_full_inbox_makes_sender_queue_then_run_sender_delivers():
    a, b = memory_link_pair(capacity_bytes=1000)
    assert a.send(frame(1, 400))
    assert a.send(frame(2, 400))
    assert a.send(frame(3, 400))  # over capacity: queued on a's side
    assert a.stats.queued_bytes == 400
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run_sender)
        assert await b.receive_batch() == [frame(1, 400), frame(2, 400)]
        assert await b.receive_batch() == [frame(3, 400)]
        assert a.stats.queued_bytes == 0
        nursery.cancel_scope.cancel()
    await a.aclose()
    await b.aclose()


async def test_send_queue_is_bounded_when_peer_never_reads():
    a, b = memory_link_pair(capacity_bytes=10_000, send_queue_bytes=5_000)
    accepted = sum(a.send(frame(i, 1000)) for i in range(100))
    # 10 frames fill b's inbox, 5 more fit a's queue, the rest are dropped and counted.
    assert accepted == 15
    assert a.stats.send_dropped == 85
    assert a.stats.queued_bytes <= 5_000
    await a.aclose()
    await b.aclose()


async def test_oversized_frame_is_dropped_unless_offload():
    a, b = memory_link_pair(mtu=1500)
    assert not a.send(b"x" * 1519)
    assert a.stats.send_dropped == 1
    assert a.send(b"x" * 1518)
    await a.aclose()
    await b.aclose()
    c, d = memory_link_pair(mtu=1500, offload=True)
    assert c.offload and d.offload
    assert c.send(b"x" * 60000)
    assert [len(f) for f in await d.receive_batch()] == [60000]
    await c.aclose()
    await d.aclose()


async def test_close_drains_then_raises_on_the_other_end():
    a, b = memory_link_pair()
    a.send(b"last" * 20)
    await a.aclose()
    assert a.closed
    assert await b.receive_batch() == [b"last" * 20]
    with pytest.raises(LinkClosed):
        await b.receive_batch()
    with pytest.raises(LinkClosed):
        await a.receive_batch()
    assert not b.send(b"z" * 60)
    assert b.stats.send_dropped == 1
    await b.aclose()


async def test_close_wakes_a_blocked_reader_and_a_blocked_sender():
    a, b = memory_link_pair(capacity_bytes=100)
    a.send(b"a" * 100)
    a.send(b"b" * 100)  # queued: b never reads
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run_sender)

        async def reader():
            with pytest.raises(LinkClosed):
                await a.receive_batch()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # reader and sender both wait
        await b.aclose()  # wakes a's reader (LinkClosed) and a's sender (peer gone)
        await trio.testing.wait_all_tasks_blocked()  # both have seen it
        await a.aclose()  # run_sender returns
    assert a.stats.send_dropped == 1


async def test_receive_is_cancel_safe():
    a, b = memory_link_pair()
    with trio.move_on_after(0.01):
        await b.receive_batch()
    a.send(b"q" * 60)
    assert await b.receive_batch() == [b"q" * 60]
    await a.aclose()
    await b.aclose()
