"""The engine's segments survive encoding with netkit.wire.tcp and parsing back."""

import random

from netkit.tcp import Segment, TcpConnection, TcpSettings, TcpState
from netkit.wire.tcp import TcpView, build_tcp_header


def to_wire(seg: Segment, sport: int, dport: int) -> bytes:
    hdr = build_tcp_header(sport, dport, seg.seq, seg.ack, seg.flags, seg.window,
                           seg.options.emit())
    return bytes(hdr) + bytes(seg.payload)


def from_wire(frame: bytes) -> Segment:
    v = TcpView(memoryview(frame))
    return Segment(v.seq, v.ack, v.flags, v.window, v.options(), v.payload)


def test_two_engines_through_the_wire_format():
    rng = random.Random(7)
    s = TcpSettings(mss=1000, rcv_buffer=50000)
    a = TcpConnection.connect(0.0, s)
    [syn] = a.take_outgoing()
    b = TcpConnection.from_syn(from_wire(to_wire(syn, 40000, 80)), 0.0, s)
    b.accept(0.0)
    data_a = rng.randbytes(300000)
    data_b = rng.randbytes(100000)
    got_a = bytearray()
    got_b = bytearray()
    sent_a = sent_b = 0
    now = 0.0
    for step in range(20000):
        now += 0.001
        sent_a += a.send(data_a[sent_a:sent_a + 7000], now)
        sent_b += b.send(data_b[sent_b:sent_b + 5000], now)
        if sent_a == len(data_a):
            a.shutdown(now)
        if sent_b == len(data_b):
            b.shutdown(now)
        ab = a.take_outgoing()
        ba = b.take_outgoing()
        for x in ab:
            if rng.random() < 0.03:
                continue                           # a little loss, for SACK blocks
            b.receive_segment(from_wire(to_wire(x, 40000, 80)), now)
        for x in ba:
            a.receive_segment(from_wire(to_wire(x, 80, 40000)), now)
        got_a += a.received()
        a.consume(a.received_size, now)
        got_b += b.received()
        b.consume(b.received_size, now)
        for c in (a, b):
            t = c.get_timer()
            if t is not None and t <= now:
                c.handle_timer(now)
        if a.state is TcpState.CLOSED and b.state is TcpState.CLOSED:
            break
        if not ab and not ba:
            ts = [t for t in (a.get_timer(), b.get_timer()) if t is not None]
            if ts:
                now = max(now, min(ts))
                for c in (a, b):
                    c.handle_timer(now)
    assert bytes(got_b) == data_a and bytes(got_a) == data_b
    assert a.sack_permitted and a.timestamps_enabled and a._snd_wscale == b._rcv_wscale
    assert b.stats.ooo_segments > 0
