"""Data transfer: ACK policy, reassembly, windows, persist, keepalive, segmentation."""

import pytest

from netkit.tcp import DataReceived, SendSpace, TcpSettings, TcpState

from .helpers import ACK, FIN, OUR_ISS, PEER_ISS, PSH, active, passive, seg

S = TcpState
B = PEER_ISS + 1     # first data sequence number of the peer


# ---------------------------------------------------------------- ACK policy

def test_delayed_ack_single_segment():
    p = passive()
    c = p.conn
    assert p.send(b"a" * 100) == []
    assert c.get_timer() == pytest.approx(0.04)
    assert c.take_events() == [DataReceived()]
    out = p.tick()
    assert [(x.flags, x.ack) for x in out] == [(ACK, B + 100)]
    assert p.now == pytest.approx(0.04)
    assert c.get_timer() is None


def test_ack_every_second_full_segment():
    p = passive()
    assert p.send(b"a" * 1460) == []
    out = p.send(b"b" * 1460)
    assert [(x.flags, x.ack) for x in out] == [(ACK, B + 2920)]
    assert p.conn.get_timer() is None
    assert p.send(b"c" * 1460) == []


def test_acks_coalesce_until_taken():
    p = passive()
    c = p.conn
    for i in range(10):
        c.receive_segment(seg(B + i * 1460, OUR_ISS + 1, ACK, 65535, b"x" * 1460), 0.0)
    out = c.take_outgoing()
    assert [(x.flags, x.ack) for x in out] == [(ACK, B + 14600)]


def test_ack_piggybacks_on_data():
    p = passive()
    c = p.conn
    p.send(b"question")
    c.send(b"answer", 0.01)
    [d] = p.out()
    assert d.ack == B + 8 and bytes(d.payload) == b"answer"
    assert c.get_timer() != pytest.approx(0.04)   # delayed ACK cancelled; RTO armed
    p.send()
    assert c.get_timer() is None


def test_out_of_order_gets_immediate_dup_acks_and_fill_acks_immediately():
    p = passive()
    c = p.conn
    out = p.send(b"B" * 100, seq=B + 100, advance=False)
    assert [(x.flags, x.ack) for x in out] == [(ACK, B)]
    out = p.send(b"C" * 100, seq=B + 200, advance=False)
    assert [(x.flags, x.ack) for x in out] == [(ACK, B)]
    assert c.received_size == 0
    out = p.send(b"A" * 100)
    assert [(x.flags, x.ack) for x in out] == [(ACK, B + 300)]
    assert bytes(c.received()) == b"A" * 100 + b"B" * 100 + b"C" * 100


def test_dup_acks_stay_distinct_in_one_batch():
    p = passive()
    c = p.conn
    for i in range(1, 4):
        c.receive_segment(seg(B + i * 100, OUR_ISS + 1, ACK, 65535, b"z" * 100), 0.0)
    out = c.take_outgoing()
    assert [(x.flags, x.ack) for x in out] == [(ACK, B)] * 3


def test_sack_blocks_emitted_for_out_of_order_data():
    p = passive(sack=True)
    out = p.send(b"B" * 100, seq=B + 100, advance=False)
    assert out[0].options.sack_blocks == ((B + 100, B + 200),)
    out = p.send(b"D" * 100, seq=B + 300, advance=False)
    assert out[0].options.sack_blocks == ((B + 300, B + 400), (B + 100, B + 200))
    out = p.send(b"C" * 100, seq=B + 200, advance=False)
    assert out[0].options.sack_blocks == ((B + 100, B + 400),)
    out = p.send(b"A" * 100)
    assert out[0].ack == B + 400 and not out[0].options.sack_blocks


def test_sack_blocks_with_timestamps_limited_to_three():
    p = passive(sack=True, ts=True)
    for i in range(6):
        p.tsval += 1
        out = p.send(b"x", seq=B + 10 + 2 * i, advance=False)
    assert len(out[0].options.sack_blocks) == 3
    assert out[0].options.sack_blocks[0] == (B + 20, B + 21)
    assert out[0].options.timestamps is not None


# ---------------------------------------------------------------- reassembly

def test_overlapping_retransmissions_with_different_bytes_first_wins():
    p = passive()
    c = p.conn
    p.send(b"0123456789")                                   # in order
    p.send(b"XXXXXXXXXXabcde", seq=B, advance=False)        # overlaps 10 old bytes
    assert bytes(c.received()) == b"0123456789abcde"
    # out-of-order overlap: first stored bytes win
    p.send(b"PPPPP", seq=B + 20, advance=False)
    p.send(b"qqqqqqqqqqqqqqq", seq=B + 18, advance=False)  # covers 18..33, keeps 20..25 = P
    p.send(b"fghij", seq=B + 15, advance=False)             # fills 15..18 only
    assert bytes(c.received()) == b"0123456789abcdefghqqPPPPP" + b"q" * 8
    # the in-order segment that covers a stored block keeps the block's bytes
    p.send(b"RRRR", seq=B + 40, advance=False)
    p.send(b"s" * 10, seq=B + 33, advance=False)
    assert bytes(c.received())[33:] == b"sssssssRRRR"
    assert c.rcv_nxt == B + 44


def test_ooo_cap_drops_and_counts():
    p = passive(TcpSettings(max_ooo_bytes=1000))
    c = p.conn
    for i in range(20):
        p.send(b"y" * 100, seq=B + 100 + i * 100, advance=False)
    assert c._ooo.size == 1000
    assert c.stats.ooo_dropped == 1000
    p.send(b"x" * 100)
    assert c.received_size == 1100
    # the dropped range is accepted once it becomes in-order
    p.send(b"z" * 1000, seq=B + 1100, advance=False)
    assert c.received_size == 2100


def test_ooo_piece_cap():
    p = passive(TcpSettings(max_ooo_segments=5))
    c = p.conn
    for i in range(10):
        p.send(b"y", seq=B + 10 + 3 * i, advance=False)
    assert c._ooo.npieces == 5


def test_out_of_window_data_is_acked_and_dropped():
    p = passive(window=65535)
    c = p.conn
    out = p.send(b"far", seq=B + 70000, advance=False)
    assert [(x.flags, x.ack) for x in out] == [(ACK, B)]
    assert c.stats.out_of_window == 1
    out = p.send(b"old", seq=B - 10, advance=False)
    assert [(x.flags, x.ack) for x in out] == [(ACK, B)]
    assert c.received_size == 0 and not c._ooo


def test_data_beyond_window_is_trimmed():
    s = TcpSettings(rcv_buffer=4000, window_scaling=False)
    p = passive(s)
    c = p.conn
    out = p.send(b"a" * 5000)
    assert c.received_size == 4000
    assert [(x.ack, x.window) for x in out] == [(B + 4000, 0)]


def test_fin_out_of_order_is_remembered():
    p = passive()
    c = p.conn
    p.send(b"tail", seq=B + 4, flags=FIN | ACK, advance=False)
    assert c.state is S.ESTABLISHED
    out = p.send(b"head")
    assert c.state is S.CLOSE_WAIT
    assert out[-1].ack == B + 9
    assert bytes(c.received()) == b"headtail"


# ---------------------------------------------------------------- receive window

def test_window_shrinks_with_slow_app_and_reopens():
    s = TcpSettings(rcv_buffer=10000, window_scaling=False, mss=1000)
    p = passive(s)
    c = p.conn
    p.send(b"a" * 1000)
    out = p.send(b"a" * 1000)
    assert out[-1].window == 8000
    for _ in range(8):
        out = p.send(b"a" * 1000)
    assert out[-1].window == 0 and c.received_size == 10000
    # a zero-window probe / more data is not accepted
    out = p.send(b"b", advance=False)
    assert out[-1].window == 0 and c.received_size == 10000
    # the app consumes a little: SWS avoidance, no update yet
    c.consume(500, p.now)
    assert p.out() == []
    c.consume(500, p.now)          # one MSS free: window update
    [u] = p.out()
    assert (u.ack, u.window) == (B + 10000, 1000)
    c.consume(9000, p.now)
    [u] = p.out()
    assert u.window == 10000


def test_right_edge_never_moves_left():
    s = TcpSettings(rcv_buffer=10000, window_scaling=False, mss=1000)
    p = passive(s)
    c = p.conn
    out = p.send(b"a" * 3000)
    edge = out[-1].ack + out[-1].window
    for i in range(7):
        out = p.send(b"b" * 1000) or p.tick()
        assert out[-1].ack + out[-1].window >= edge
        edge = out[-1].ack + out[-1].window


def test_window_update_not_sent_when_plenty_open():
    s = TcpSettings(rcv_buffer=65535, window_scaling=False, mss=1000)
    p = passive(s)
    c = p.conn
    p.send(b"a" * 1000)
    p.tick()
    c.consume(1000, p.now)
    assert p.out() == []           # the peer still sees most of the buffer


def test_scaled_window_rounding_never_shrinks():
    p = passive(wscale=2)
    c = p.conn
    assert c._rcv_wscale == 5
    for i in range(20):
        out = p.send(b"q" * 7) or p.tick()
        last = out[-1]
        assert last.ack + (last.window << 5) >= c._rcv_adv - 0  # consistent
    assert c._rcv_adv - c.rcv_nxt <= (1 << 20) + 32


# ---------------------------------------------------------------- sending

def test_segmentation_at_peer_mss():
    p = passive(mss=500)
    c = p.conn
    assert c.send(b"z" * 1600, 0.0) == 1600
    out = p.out()
    assert [len(x.payload) for x in out] == [500, 500, 500, 100]
    assert [x.seq for x in out] == [OUR_ISS + 1 + 500 * i for i in range(4)]
    assert out[-1].flags & PSH and not out[0].flags & PSH


def test_tiny_mss():
    p = passive(mss=64)
    c = p.conn
    c.send(bytes(range(200)), 0.0)
    out = p.out()
    assert all(len(x.payload) <= 64 for x in out)
    # initial window: min(10*mss, max(2*mss, 14600)) = 640 bytes
    assert sum(len(x.payload) for x in out) == 200


def test_mss_accounts_for_timestamps():
    p = passive(mss=1000, ts=True)
    p.conn.send(b"t" * 3000, 0.0)
    assert [len(x.payload) for x in p.out()] == [988, 988, 988, 36]


def test_tso_size_emits_large_segments():
    p = passive(TcpSettings(mss=1460, tso_size=65000), mss=1460, wscale=7, window=4000)
    c = p.conn
    assert c.send_mss == 1460
    c.cwnd = 10 ** 6
    c.send(b"g" * 200000, 0.0)
    out = p.out()
    assert [len(x.payload) for x in out] == [65000, 65000, 65000, 5000]


def test_send_buffer_limit_and_send_space_event():
    p = passive(TcpSettings(snd_buffer=10000), window=65535)
    c = p.conn
    assert c.send(b"a" * 25000, 0.0) == 10000
    assert c.send_space() == 0 and c.send(b"b", 0.0) == 0
    p.out()
    p.send(ack=OUR_ISS + 1 + 3000)
    assert c.send_space() == 3000
    assert c.take_events() == [SendSpace()]
    p.send(ack=OUR_ISS + 1 + 4000)
    assert c.take_events() == [SendSpace()]


def test_sender_respects_peer_window_and_cwnd():
    p = passive(window=3000)
    c = p.conn
    c.send(b"w" * 10000, 0.0)
    # two full segments; the 80-byte sliver waits (sender SWS avoidance)
    assert [len(x.payload) for x in p.out()] == [1460, 1460]
    out = p.send(ack=OUR_ISS + 1 + 1460)
    assert [len(x.payload) for x in out] == [1460]
    # nothing in flight any more: a small window is used rather than deadlock
    out = p.send(ack=OUR_ISS + 1 + 4380, window=500)
    assert [len(x.payload) for x in out] == [500]


def test_sender_sws_avoidance():
    p = passive(window=65535)
    c = p.conn
    c.cwnd = 100000
    c.send(b"w" * 100000, 0.0)
    out = p.out()
    assert len(out) == 44 and all(len(x.payload) == 1460 for x in out)   # 1295 bytes held
    # each ACK opens the window by a sliver: no slivers while data is in flight
    assert p.send(ack=OUR_ISS + 1 + 100) == []          # 1395 bytes of room: wait
    out = p.send(ack=OUR_ISS + 1 + 200)                  # 1495: a full segment
    assert [len(x.payload) for x in out] == [1460]


# ---------------------------------------------------------------- zero window / persist

def test_zero_window_persist_probes_back_off_and_never_give_up():
    s = TcpSettings(max_retries=3)
    p = passive(s, window=0)
    c = p.conn
    c.send(b"p" * 5000, 0.0)
    assert p.out() == []
    times = []
    for i in range(12):
        out = p.tick()
        times.append(p.now)
        [probe] = out
        assert probe.seq == OUR_ISS and not probe.payload and probe.flags == ACK
        # the peer answers, window still zero
        assert p.send(window=0, advance=False) == []
    assert c.state is S.ESTABLISHED
    gaps = [round(b - a, 6) for a, b in zip([0.0] + times, times)]
    assert c.rto == 0.2                       # RTT ~0 measured on the handshake
    assert gaps[:4] == [0.2, 0.4, 0.8, 1.6]
    assert max(gaps) == 60.0
    assert c.stats.persist_probes == 12
    # the window opens: data flows
    out = p.send(window=2000, advance=False)
    assert [len(x.payload) for x in out] == [1460]      # the 540-byte sliver waits
    out = p.send(ack=OUR_ISS + 1 + 1460, window=2000, advance=False)
    assert [len(x.payload) for x in out] == [1460]


def test_unanswered_persist_probes_time_out():
    s = TcpSettings(max_retries=3)
    p = passive(s, window=0)
    c = p.conn
    c.send(b"p" * 10, 0.0)
    for i in range(3):
        assert len(p.tick()) == 1
    p.tick()
    assert c.state is S.CLOSED


def test_window_update_lost_recovered_by_probe():
    p = passive(window=1000)
    c = p.conn
    c.send(b"d" * 3000, 0.0)
    assert sum(len(x.payload) for x in p.out()) == 1000
    p.send(window=0)                       # acks all, window closes
    assert c.get_timer() is not None
    [probe] = p.tick()
    out = p.send(window=5000, advance=False)  # the probe's answer carries the open window
    assert sum(len(x.payload) for x in out) == 2000


def test_fin_waits_for_window():
    p = passive(window=0)
    c = p.conn
    c.shutdown(0.0)
    assert p.out() == []
    [probe] = p.tick()
    out = p.send(window=100, advance=False)
    assert [x.flags for x in out] == [ACK | FIN]


# ---------------------------------------------------------------- keepalive

def test_keepalive_probe_is_answered():
    p = passive()
    c = p.conn
    p.send(b"abc")
    p.tick()
    out = p.send(seq=B + 3 - 1, advance=False)
    assert [(x.flags, x.ack, x.seq) for x in out] == [(ACK, B + 3, OUR_ISS + 1)]
    out = p.send(b"\x00", seq=B + 3 - 1, advance=False)   # BSD-style garbage byte
    assert [(x.flags, x.ack) for x in out] == [(ACK, B + 3)]
    assert bytes(c.received()) == b"abc"
    assert c.state is S.ESTABLISHED


def test_active_side_bulk_both_directions():
    p = active()
    c = p.conn
    c.send(b"req" * 1000, 0.0)
    out = p.out()
    assert sum(len(x.payload) for x in out) == 3000
    out = p.send(b"resp" * 100)
    assert bytes(c.received()) == b"resp" * 100
    assert c.send_buffered == 0


def test_ack_every_second_segment_with_timestamps():
    p = passive(ts=True)
    assert p.send(b"a" * 1448) == []
    out = p.send(b"b" * 1448)
    assert [x.ack for x in out] == [B + 2896]


def test_fin_with_data_past_it_is_ignored():
    p = passive()
    c = p.conn
    p.send(b"later", seq=B + 10, advance=False)
    p.send(b"0123456789", flags=FIN | ACK, advance=False)   # claims to end at B+10
    assert c.state is S.ESTABLISHED and c.rcv_nxt == B + 15
    p.send(flags=FIN | ACK, seq=B + 15, advance=False)
    assert c.state is S.CLOSE_WAIT


def test_congestion_avoidance_growth():
    p = passive(window=65535)
    c = p.conn
    c.ssthresh = 2920
    c.cwnd = 2920
    c.send(b"c" * 200000, 0.0)
    acked = OUR_ISS + 1
    grows = []
    out = p.out()
    for i in range(8):
        acked += sum(len(x.payload) for x in out)
        before = c.cwnd
        out = p.send(ack=acked)
        grows.append(c.cwnd - before)
    # one MSS per window's worth of ACKed data (byte counting), never exponential
    assert grows == [1460] * 8


def test_api_conveniences():
    p = passive()
    c = p.conn
    one, two = b"1" * 600, b"2" * 600
    p.send(one)
    p.send(two)
    assert [bytes(x) for x in c.received_buffers()] == [one, two]
    assert c.read(p.now, max_bytes=601) == one + b"2"
    assert c.read(p.now) == two[1:] and c.received_buffers() == []
    # tiny segments are merged into one chunk (not an object per segment)
    p.send(b"one")
    p.send(b"two")
    assert [bytes(x) for x in c.received_buffers()] == [b"onetwo"]
    assert c.read(p.now) == b"onetwo"
    assert c.statistics() is c.stats and c.stats.as_dict()["bytes_in"] == 1206
    assert "ESTABLISHED" in repr(c)
    assert not c.peer_finished and not c.is_closed
    p.send(flags=FIN | ACK)
    assert c.peer_finished
    c.abort(p.now)
    assert c.is_closed
