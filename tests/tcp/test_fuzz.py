"""Hostile input: random segments and calls never raise and never grow memory past the caps."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netkit.tcp import Closed, Segment, TcpConnection, TcpSettings, TcpState
from netkit.wire.tcp import TcpOptions

from .helpers import FIN, OUR_ISS, PEER_ISS, SYN, active, passive, seg

M = 0xFFFFFFFF
SMALL = TcpSettings(mss=536, rcv_buffer=6000, snd_buffer=5000, max_ooo_bytes=3000,
                    max_ooo_segments=20, window_scaling=False, challenge_ack_limit=5)


def _pending(s):
    return TcpConnection.from_syn(seg(PEER_ISS, 0, SYN, sack_permitted=True, timestamps=(5, 0),
                                      wscale=3, mss=1000), 0.0, s, iss=OUR_ISS)


def _syn_received(s):
    c = _pending(s)
    c.accept(0.0)
    return c


def _syn_sent(s):
    return TcpConnection.connect(0.0, s, iss=OUR_ISS)


def _est_passive(s):
    return passive(s, sack=True, ts=True, wscale=2).conn


def _est_plain(s):
    return passive(s).conn


def _est_active_with_data(s):
    p = active(s, sack=True, ts=True, wscale=7, window=100)
    p.conn.send(b"d" * 4000, 0.0)
    p.conn.take_outgoing()
    return p.conn


def _fin_wait(s):
    p = passive(s, sack=True)
    p.conn.send(b"f" * 700, 0.0)
    p.conn.shutdown(0.0)
    p.conn.take_outgoing()
    return p.conn


def _close_wait(s):
    p = passive(s, ts=True)
    p.send(b"abc", flags=FIN | 0x10)
    p.conn.take_outgoing()
    return p.conn


def _time_wait(s):
    p = passive(s)
    p.conn.shutdown(0.0)
    p.out()
    p.send(flags=FIN | 0x10)
    p.out()
    return p.conn


STARTS = [_pending, _syn_received, _syn_sent, _est_passive, _est_plain, _est_active_with_data,
          _fin_wait, _close_wait, _time_wait]

rel = st.one_of(st.integers(-3, 3), st.integers(-70000, 70000), st.integers(0, M))
u32 = st.integers(0, M) | st.integers(0, 5) | st.integers(M - 5, M)


@st.composite
def options(draw):
    blocks = draw(st.lists(st.tuples(rel, rel), max_size=6))
    return TcpOptions(
        mss=draw(st.none() | st.integers(0, 65535)),
        wscale=draw(st.none() | st.integers(0, 30)),
        sack_permitted=draw(st.booleans()),
        sack_blocks=tuple(blocks),
        timestamps=draw(st.none() | st.tuples(u32, u32)))


@st.composite
def actions(draw):
    kind = draw(st.sampled_from(["seg"] * 6 + ["time", "send", "consume", "shutdown", "abort"]))
    if kind == "seg":
        return ("seg", draw(rel), draw(rel), draw(st.integers(0, 255)),
                draw(st.integers(0, 65535)), draw(options()),
                draw(st.binary(max_size=2000) | st.just(b"")))
    if kind == "time":
        return ("time", draw(st.floats(0, 200, allow_nan=False)))
    if kind == "send":
        return ("send", draw(st.integers(0, 9000)))
    if kind == "consume":
        return ("consume", draw(st.integers(0, 10000)))
    if kind == "abort":
        return ("abort", draw(st.integers(0, 20)))   # mostly a no-op so runs stay long
    return (kind,)


def check_invariants(c: TcpConnection, s: TcpSettings) -> None:
    assert c._rcvq.size <= s.rcv_buffer + (1 << c._rcv_wscale)
    assert c._ooo.size <= s.ooo_cap and c._ooo.npieces <= s.max_ooo_segments
    assert c._ooo.nblocks <= 256
    assert len(c._sndbuf) <= s.snd_buffer
    assert len(c._sb.starts) <= 32
    if c.state in (TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.CLOSE_WAIT):
        assert ((c.snd_nxt - c.snd_una) & M) <= ((c.snd_max - c.snd_una) & M) < 0x80000000
        assert c.cwnd >= 1 and c.rto >= s.rto_min


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.sampled_from(STARTS), small=st.booleans(), acts=st.lists(actions(), max_size=40))
def test_random_segments_never_raise(start, small, acts):
    s = SMALL if small else TcpSettings(max_ooo_segments=50)
    c = start(s)
    c.take_outgoing()
    c.take_events()
    now = 0.0
    closed = 0
    for a in acts:
        if a[0] == "seg":
            _, dseq, dack, flags, window, opts, payload = a
            sg = Segment((c.rcv_nxt + dseq) & M, (c.snd_una + dack) & M, flags, window, opts,
                         memoryview(payload))
            c.receive_segment(sg, now)
        elif a[0] == "time":
            now += a[1]
            t = c.get_timer()
            if t is not None and t <= now:
                c.handle_timer(now)
        elif a[0] == "send":
            c.send(b"s" * a[1], now)
        elif a[0] == "consume":
            c.consume(min(a[1], c.received_size), now)
        elif a[0] == "shutdown":
            c.shutdown(now)
        elif a[0] == "abort":
            if a[1] == 0:
                c.abort(now)
        out = c.take_outgoing()
        assert len(out) <= 16 + s.snd_buffer // 40
        for o in out:
            assert 0 <= o.seq <= M and 0 <= o.ack <= M and 0 <= o.window <= 0xFFFF
            assert len(o.payload) <= max(s.mss, s.tso_size or 0)
            o.options.emit()                 # every emitted option set is encodable
        ev = c.take_events()
        closed += sum(isinstance(e, Closed) for e in ev)
        assert closed <= 1
        check_invariants(c, s)
        t = c.get_timer()
        assert t is None or t >= now - 1e-9 or c.state is TcpState.CLOSED


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.binary(min_size=1, max_size=700)), max_size=60))
def test_reassembly_matches_first_writer_model(pieces):
    """Whatever order and overlap segments arrive in, each byte is the first one received
    for its position, and nothing past a gap is delivered."""
    s = TcpSettings(rcv_buffer=20000, window_scaling=False, max_ooo_segments=10000)
    p = passive(s)
    c = p.conn
    model: dict[int, int] = {}
    for off, data in pieces:
        c.receive_segment(seg(PEER_ISS + 1 + off, OUR_ISS + 1, 0x10, 65535, data), 0.0)
        for i, b in enumerate(data):
            model.setdefault(off + i, b)
    expect = bytearray()
    while len(expect) in model:
        expect.append(model[len(expect)])
    assert bytes(c.received()) == bytes(expect)
