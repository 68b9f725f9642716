"""Middleware: pcap capture, seeded fault injection, filtering."""

from __future__ import annotations

import io
import struct
from collections import Counter

import dpkt
import pytest
import trio

from netkit.links import (
    CountingFilter,
    FaultInjector,
    LinkClosed,
    PcapCapture,
    PcapWriter,
    TxOffload,
    memory_link_pair,
)


def eth(i: int, size: int = 80) -> bytes:
    """A distinct Ethernet-looking frame: broadcast dst, a src MAC, IPv4 type, an index."""
    body = struct.pack(">I", i) + bytes(size - 18)
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + body


def read_pcap(data: bytes) -> list[tuple[float, bytes]]:
    reader = dpkt.pcap.Reader(io.BytesIO(data))
    assert reader.datalink() == dpkt.pcap.DLT_EN10MB
    return list(reader)


# ----- pcap -----
async def test_pcap_records_received_and_sent_frames(tmp_path):
    a, b = memory_link_pair()
    path = tmp_path / "cap.pcap"
    cap = PcapCapture(b, path)
    assert cap.name == b.name and cap.offload is False and cap.mtu == 1500
    a.send(eth(1))
    a.send(eth(2))
    assert await cap.receive_batch() == [eth(1), eth(2)]
    assert cap.send(eth(3, 1514))
    assert await a.receive_batch() == [eth(3, 1514)]
    assert cap.stats is b.stats and cap.stats.frames_received == 2
    await cap.aclose()
    assert b.closed and cap.closed
    records = read_pcap(path.read_bytes())
    assert [frame for _, frame in records] == [eth(1), eth(2), eth(3, 1514)]
    timestamps = [ts for ts, _ in records]
    assert timestamps == sorted(timestamps) and timestamps[0] > 1e9
    assert isinstance(dpkt.ethernet.Ethernet(records[0][1]), dpkt.ethernet.Ethernet)
    await a.aclose()


async def test_pcap_shared_file_object_has_one_header(tmp_path):
    path = tmp_path / "shared.pcap"
    with open(path, "wb") as f:
        a1, b1 = memory_link_pair()
        a2, b2 = memory_link_pair()
        cap1, cap2 = PcapCapture(b1, f), PcapCapture(b2, f)
        cap1.send(eth(1))
        cap2.send(eth(2))
        cap1.send(eth(3))
        for link in (cap1, cap2, a1, a2):
            await link.aclose()
        assert not f.closed  # not ours to close
    assert [frame for _, frame in read_pcap(path.read_bytes())] == [eth(1), eth(2), eth(3)]


async def test_pcap_shared_writer_snaplen_and_size_limit():
    buf = io.BytesIO()
    writer = PcapWriter(buf, snaplen=100, max_bytes=24 + 3 * (16 + 100))
    a, b = memory_link_pair()
    cap = PcapCapture(b, writer)
    for i in range(5):
        cap.send(eth(i, 1000))
    assert writer.stats.frames == 3 and writer.stats.stopped
    await cap.aclose()
    reader = dpkt.pcap.Reader(io.BytesIO(buf.getvalue()))
    frames = [frame for _, frame in reader]
    assert frames == [eth(i, 1000)[:100] for i in range(3)]
    # orig_len keeps the real size
    assert struct.unpack_from("<I", buf.getvalue(), 24 + 12)[0] == 1000
    await a.aclose()


async def test_pcap_failing_file_never_breaks_the_link():
    f = io.BytesIO()
    a, b = memory_link_pair()
    cap = PcapCapture(b, f)
    f.close()
    assert cap.send(eth(1))
    assert cap.capture_stats.stopped
    assert await a.receive_batch() == [eth(1)]
    await cap.aclose()
    await a.aclose()


# ----- fault injection -----
async def run_receive_faults(seed, count=2000, **probabilities):
    a, b = memory_link_pair(capacity_bytes=10**7)
    # Every frame is already waiting, so a held frame is always overtaken at once; the
    # long hold_time only guards against a slow machine releasing it early.
    faulty = FaultInjector(b, seed=seed, hold_time=1.0, **probabilities)
    for i in range(count):
        a.send(eth(i))
    await a.aclose()
    out = []
    with pytest.raises(LinkClosed):
        while True:
            out.extend(await faulty.receive_batch())
    await faulty.aclose()
    return out, faulty.faults.receive


async def test_fault_counts_are_reproducible_and_consistent():
    probabilities = dict(drop=0.1, duplicate=0.1, reorder=0.1, corrupt=0.1)
    out1, counts1 = await run_receive_faults(42, **probabilities)
    out2, counts2 = await run_receive_faults(42, **probabilities)
    out3, counts3 = await run_receive_faults(43, **probabilities)
    assert out1 == out2 and counts1 == counts2
    assert out1 != out3
    assert len(out1) == 2000 - counts1.dropped + counts1.duplicated
    for kind in ("dropped", "duplicated", "reordered", "corrupted"):
        assert 100 < getattr(counts1, kind) < 300, (kind, counts1)


async def test_reorder_never_loses_a_frame():
    out, counts = await run_receive_faults(7, reorder=0.5)
    assert counts.reordered > 500
    assert sorted(out) == [eth(i) for i in range(2000)]
    assert out != [eth(i) for i in range(2000)]
    # A held frame is passed on right after the one that overtook it: nothing moves
    # by more than one place.
    index = [struct.unpack_from(">I", f, 14)[0] for f in out]
    assert all(abs(position - i) <= 1 for position, i in enumerate(index))


async def test_corrupt_flips_one_byte_beyond_the_ethernet_header():
    out, counts = await run_receive_faults(3, count=300, corrupt=1.0)
    assert counts.corrupted == 300
    for i, frame in enumerate(out):
        diff = [k for k, (x, y) in enumerate(zip(frame, eth(i))) if x != y]
        assert len(diff) == 1 and diff[0] >= 14


async def test_duplicate_delivers_twice():
    out, counts = await run_receive_faults(5, count=100, duplicate=1.0)
    assert counts.duplicated == 100
    assert out == [eth(i) for i in range(100) for _ in range(2)]


async def test_drop_everything_on_receive():
    a, b = memory_link_pair()
    faulty = FaultInjector(b, seed=1, drop=1.0)
    for i in range(50):
        a.send(eth(i))
    with trio.move_on_after(0.05) as scope:
        await faulty.receive_batch()
    assert scope.cancelled_caught
    assert faulty.faults.receive.dropped == 50
    await faulty.aclose()
    await a.aclose()


async def test_drop_everything_on_send():
    a, b = memory_link_pair()
    faulty = FaultInjector(a, seed=1, drop=1.0, directions=("send",))
    for i in range(50):
        assert faulty.send(eth(i))  # lost "on the wire": the sender is not told
    assert faulty.faults.send.dropped == 50 and faulty.faults.receive.dropped == 0
    b_got = []
    with trio.move_on_after(0.02):
        b_got.extend(await b.receive_batch())
    assert b_got == []
    await faulty.aclose()
    await b.aclose()


async def test_held_frame_is_released_when_nothing_follows():
    a, b = memory_link_pair()
    faulty = FaultInjector(b, seed=0, reorder=1.0, hold_time=0.01, directions=("receive",))
    a.send(eth(1))
    with trio.fail_after(1):
        assert await faulty.receive_batch() == [eth(1)]
    await faulty.aclose()
    await a.aclose()


async def test_send_side_reorder_and_release_by_run_sender():
    a, b = memory_link_pair()
    faulty = FaultInjector(a, seed=0, reorder=1.0, hold_time=0.01, directions=("send",))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(faulty.run_sender)
        faulty.send(eth(1), None)
        faulty.send(eth(2), TxOffload(0, 0))  # the offload travels with its frame
        assert await b.receive_batch() == [eth(2), eth(1)]
        faulty.send(eth(3))  # held, and nothing follows: run_sender releases it
        with trio.fail_after(1):
            assert await b.receive_batch() == [eth(3)]
        nursery.cancel_scope.cancel()
    assert faulty.faults.send.reordered == 2
    await faulty.aclose()
    await b.aclose()


async def test_send_side_counts_are_reproducible():
    async def run():
        a, b = memory_link_pair(capacity_bytes=10**7)
        faulty = FaultInjector(a, seed="abc", drop=0.2, duplicate=0.2, corrupt=0.2, directions=("send",))
        for i in range(500):
            faulty.send(eth(i))
        await faulty.aclose()
        got = []
        with pytest.raises(LinkClosed):
            while True:
                got.extend(await b.receive_batch())
        await b.aclose()
        return got, faulty.faults.send

    assert await run() == await run()


def test_bad_probabilities_are_refused():
    a, b = memory_link_pair()
    with pytest.raises(ValueError):
        FaultInjector(a, seed=1, drop=1.5)
    with pytest.raises(ValueError):
        FaultInjector(a, seed=1, directions=("sideways",))


# ----- filter -----
async def test_counting_filter_drops_and_counts_both_ways():
    a, b = memory_link_pair()

    def allow(frame) -> bool:
        return frame[12:14] == b"\x08\x00"  # IPv4 only; raises on nothing, but see below

    filtered = CountingFilter(b, allow)
    arp = eth(9)[:12] + b"\x08\x06" + eth(9)[14:]
    a.send(arp)
    a.send(eth(1))
    a.send(arp)
    assert await filtered.receive_batch() == [eth(1)]
    assert filtered.filter_stats.receive_rejected == 2
    assert not filtered.send(arp)
    assert filtered.send(eth(2))
    assert await a.receive_batch() == [eth(2)]
    assert filtered.filter_stats.send_rejected == 1
    await filtered.aclose()
    await a.aclose()


async def test_a_predicate_that_raises_counts_as_a_rejection():
    a, b = memory_link_pair()

    def allow(frame) -> bool:
        return frame[100] == 0  # IndexError on short frames

    filtered = CountingFilter(b, allow, directions=("receive",))
    a.send(b"short" * 10)
    a.send(eth(1, 200))
    assert await filtered.receive_batch() == [eth(1, 200)]
    assert filtered.filter_stats.receive_rejected == 1
    await filtered.aclose()
    await a.aclose()


async def test_wrappers_stack():
    a, b = memory_link_pair()
    buf = io.BytesIO()
    stacked = PcapCapture(CountingFilter(FaultInjector(b, seed=1), lambda f: True), buf)
    assert stacked.name == b.name and stacked.stats is b.stats
    a.send(eth(1))
    assert await stacked.receive_batch() == [eth(1)]
    await stacked.aclose()
    assert b.closed
    await a.aclose()
    assert Counter(f for _, f in read_pcap(buf.getvalue())) == Counter([eth(1)])
