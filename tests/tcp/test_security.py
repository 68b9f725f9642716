"""Hostile and odd segments: RFC 5961 checks, PAWS, timestamp wrap-around."""

from netkit.tcp import Reset, TcpSettings, TcpState

from .helpers import ACK, FIN, OUR_ISS, PEER_ISS, RST, SYN, passive

S = TcpState
B = PEER_ISS + 1
D = OUR_ISS + 1


# ---------------------------------------------------------------- RST (RFC 5961 3)

def test_rst_exactly_at_rcv_nxt_resets():
    p = passive()
    p.send(b"abc")
    assert p.send(flags=RST, seq=B + 3, ack=0) == []
    assert p.conn.state is S.CLOSED
    assert Reset() in p.conn.take_events()


def test_rst_in_window_but_not_exact_gets_challenge_ack():
    p = passive()
    c = p.conn
    out = p.send(flags=RST, seq=B + 1000, advance=False)
    assert [(x.flags, x.seq, x.ack) for x in out] == [(ACK, D, B)]
    assert c.state is S.ESTABLISHED and c.stats.challenge_acks == 1
    # the legitimate peer answers the challenge with an exact RST
    p.send(flags=RST, seq=out[0].ack)
    assert c.state is S.CLOSED


def test_rst_out_of_window_is_silently_dropped():
    p = passive()
    for seq in (B - 1, B + 70000, B + 0x80000000):
        assert p.send(flags=RST, seq=seq, advance=False) == []
    assert p.conn.state is S.ESTABLISHED and p.conn.stats.challenge_acks == 0


def test_rst_accepted_with_zero_receive_window():
    p = passive(TcpSettings(rcv_buffer=2000, window_scaling=False, mss=1000))
    p.send(b"z" * 2000)
    assert p.conn._rcv_adv == p.conn.rcv_nxt
    p.send(flags=RST)
    assert p.conn.state is S.CLOSED


def test_challenge_acks_are_rate_limited():
    p = passive(TcpSettings(challenge_ack_limit=3))
    c = p.conn
    n = 0
    for i in range(10):
        n += len(p.send(flags=RST, seq=B + 10 + i, advance=False))
    assert n == 3
    assert c.stats.challenge_acks == 3 and c.stats.challenge_acks_suppressed == 7
    p.now += 1.0
    assert len(p.send(flags=RST, seq=B + 10, advance=False)) == 1


# ---------------------------------------------------------------- SYN (RFC 5961 4)

def test_syn_in_synchronized_state_gets_challenge_ack():
    p = passive()
    c = p.conn
    for seq in (B, B + 500, B - 5000):
        out = p.send(flags=SYN, seq=seq, ack=0, advance=False)
        assert [(x.flags, x.ack) for x in out] == [(ACK, B)]
        assert c.state is S.ESTABLISHED
    assert c.stats.challenge_acks == 2        # the out-of-window one gets a plain dup ACK
    out = p.send(flags=SYN | ACK, seq=B + 1, advance=False)
    assert c.state is S.ESTABLISHED and [x.flags for x in out] == [ACK]


# ---------------------------------------------------------------- ACK (RFC 5961 5)

def test_ack_of_unsent_data_is_answered_and_dropped():
    p = passive()
    c = p.conn
    out = p.send(b"payload", ack=D + 100)
    assert [(x.flags, x.ack) for x in out] == [(ACK, B)]
    assert c.received_size == 0 and c.stats.bad_ack == 1
    assert c.snd_una == D


def test_ack_too_old_is_dropped():
    p = passive(window=1000)
    c = p.conn
    out = p.send(b"data", ack=D - 5000)
    assert c.received_size == 0 and c.stats.bad_ack == 1
    assert [x.flags for x in out] == [ACK]


def test_old_duplicate_ack_within_window_still_delivers_data():
    p = passive()
    c = p.conn
    c.send(b"x" * 100, 0.0)
    p.out()
    p.send(ack=D + 100)
    p.send(b"hello", ack=D + 50)        # an older ACK: ignored, data accepted
    assert bytes(c.received()) == b"hello"
    assert c.snd_una == D + 100


# ---------------------------------------------------------------- PAWS / timestamps

def test_paws_drops_old_timestamp():
    p = passive(ts=True)
    c = p.conn
    p.tsval = 1000
    p.send(b"new")
    p.tsval = 999
    out = p.send(b"old", advance=False)
    assert c.stats.paws_dropped == 1
    assert [(x.flags, x.ack) for x in out] == [(ACK, B + 3)]
    assert bytes(c.received()) == b"new"
    # PAWS never applies to RST
    p.send(flags=RST)
    assert c.state is S.CLOSED


def test_timestamp_wraparound_of_peer():
    p = passive(ts=True)
    c = p.conn
    steps = (0x70000000, 0xE0000000, 0xFFFFFFFF, 0, 5, 0x50000000)
    for v in steps:                      # each step forward by less than 2**31
        p.tsval = v
        p.send(b"b")
        p.tick()                         # the delayed ACK: TS.Recent follows the left edge
    assert c.stats.paws_dropped == 0 and c.received_size == len(steps)
    assert c._ts_recent == 0x50000000
    p.tsval = 0xE0000000                 # now "older" than TS.Recent modulo 2**32
    p.send(b"c", advance=False)
    assert c.stats.paws_dropped == 1 and c.received_size == len(steps)


def test_our_timestamp_clock_wraps_and_rtt_stays_sane():
    p = passive(ts=True)
    c = p.conn
    c._ts_offset = 0xFFFFFFFF - 100      # our TSval wraps 100 ms from now
    c.send(b"w", 0.0)
    [d] = p.out()
    p.now = 0.3
    c.send(b"w", 0.3)
    [d2] = p.out()
    assert d2.options.timestamps[0] < d.options.timestamps[0]     # wrapped
    p.now = 0.35
    p.send(timestamps=(10, d2.options.timestamps[0]))
    assert abs(c.srtt - 0.05) < 0.05


def test_bogus_tsecr_does_not_poison_rtt():
    p = passive(ts=True)
    c = p.conn
    c.send(b"w", 0.0)
    p.out()
    p.send(timestamps=(10, 123456))      # echoes a time we never sent
    assert c.rto <= 1.0


def test_paws_idle_timestamp_resync():
    p = passive(ts=True)
    c = p.conn
    p.tsval = 1000
    p.send(b"x")
    p.now = 25 * 86400.0
    p.tsval = 5                          # peer rebooted its clock; ts_recent is stale
    p.send(b"y")
    assert c.stats.paws_dropped == 0 and c.received_size == 2


def test_segment_without_timestamp_after_negotiation_is_accepted():
    p = passive(ts=True)
    c = p.conn
    p.conn.receive_segment(
        __import__("netkit.tcp", fromlist=["Segment"]).Segment(B, D, ACK, 65535, payload=b"n"), 0.0)
    assert c.received_size == 1


def test_fin_beyond_window_ignored():
    p = passive(TcpSettings(rcv_buffer=1000, window_scaling=False, mss=500))
    c = p.conn
    p.send(b"f" * 1001, flags=FIN | ACK, advance=False)
    assert c.state is S.ESTABLISHED       # the last byte and the FIN lay past the window
    assert c.received_size == 1000
    c.consume(1000, p.now)
    p.send(b"f", seq=B + 1000, flags=FIN | ACK, advance=False)
    assert c.state is S.CLOSE_WAIT
