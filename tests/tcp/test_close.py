"""Closing: half-close both ways, simultaneous close, TIME-WAIT, abort, resets, CLOSED."""

from netkit.tcp import (Closed, PeerFinished, Reset, TcpConnection, TcpSettings,
                        TcpState, rst_for)

from .helpers import ACK, FIN, OUR_ISS, PEER_ISS, PSH, RST, SYN, active, passive, seg

S = TcpState


def test_active_close_through_time_wait():
    p = passive()
    c = p.conn
    c.send(b"bye", 0.0)
    c.shutdown(0.0)
    assert c.state is S.FIN_WAIT_1
    [d] = p.out()         # the partial tail waits for the batch's end: the FIN rides on it
    assert d.flags == ACK | PSH | FIN and bytes(d.payload) == b"bye"
    assert p.send() == []                   # ACK of data and FIN
    assert c.state is S.FIN_WAIT_2
    assert c.get_timer() is None
    out = p.send(flags=FIN | ACK)
    assert [(x.flags, x.ack) for x in out] == [(ACK, PEER_ISS + 2)]
    assert c.state is S.TIME_WAIT
    assert c.take_events() == [PeerFinished()]
    assert c.get_timer() == 2.0
    p.tick()
    assert c.state is S.CLOSED and c.take_events() == [Closed()]


def test_time_wait_reacks_fin_and_stays_bounded():
    p = passive()
    c = p.conn
    c.shutdown(0.0)
    p.out()
    p.send()
    p.send(flags=FIN | ACK)
    assert c.state is S.TIME_WAIT
    for t in (1.0, 2.5, 3.5, 3.9):
        p.now = t
        out = p.send(flags=FIN | ACK, seq=PEER_ISS + 1, advance=False)
        assert [(x.flags, x.ack) for x in out] == [(ACK, PEER_ISS + 2)]
    # restarted by each FIN, but never beyond twice time_wait from entry
    assert c.get_timer() == 4.0
    p.tick()
    assert c.state is S.CLOSED


def test_passive_close_last_ack():
    p = passive()
    c = p.conn
    out = p.send(b"last words", flags=FIN | ACK | PSH)
    assert [(x.flags, x.ack) for x in out] == [(ACK, PEER_ISS + 1 + 10 + 1)]
    assert c.state is S.CLOSE_WAIT
    assert c.take_events()[-1] == PeerFinished()
    assert bytes(c.received()) == b"last words"
    # we can still send (half-close)
    c.send(b"reply", 0.0)
    [d] = p.out()
    assert bytes(d.payload) == b"reply"
    p.send()
    c.shutdown(0.0)
    assert c.state is S.LAST_ACK
    [f] = p.out()
    assert f.flags == ACK | FIN and f.seq == OUR_ISS + 1 + 5
    p.send()
    assert c.state is S.CLOSED
    assert c.take_events() == [Closed()]
    assert bytes(c.received()) == b"last words"   # unread data survives the close


def test_half_close_peer_keeps_receiving_our_data():
    """We shut down; the peer keeps sending for a long time (FIN_WAIT_2 has no timeout)."""
    p = passive()
    c = p.conn
    c.shutdown(0.0)
    p.out()
    p.send()
    assert c.state is S.FIN_WAIT_2
    got = b""
    for i in range(50):
        p.now += 10
        p.send(b"x" * 100)
        got += c.read(p.now)
        p.out()
    assert got == b"x" * 5000 and c.state is S.FIN_WAIT_2
    p.send(flags=FIN | ACK)
    assert c.state is S.TIME_WAIT


def test_fin_waits_for_queued_data():
    p = passive(window=1000)
    c = p.conn
    c.send(b"a" * 3000, 0.0)
    c.shutdown(0.0)
    out = p.out()
    assert sum(len(x.payload) for x in out) == 1000 and not any(x.flags & FIN for x in out)
    p.send()
    out = p.out() + p.send()
    p.send()
    out += p.out()
    p.send()
    assert c.state is S.FIN_WAIT_2
    fins = [x for x in out if x.flags & FIN]
    assert len(fins) == 1 and fins[0].seq + len(fins[0].payload) == OUR_ISS + 1 + 3000


def test_simultaneous_close():
    s = TcpSettings()
    a = TcpConnection.connect(0.0, s, iss=100)
    b = TcpConnection.from_syn(a.take_outgoing()[0], 0.0, s, iss=900)
    b.accept(0.0)
    for x in b.take_outgoing():
        a.receive_segment(x, 0.0)
    for x in a.take_outgoing():
        b.receive_segment(x, 0.0)
    a.shutdown(1.0)
    b.shutdown(1.0)
    [fa] = a.take_outgoing()
    [fb] = b.take_outgoing()
    a.receive_segment(fb, 1.0)
    b.receive_segment(fa, 1.0)
    assert a.state is S.CLOSING and b.state is S.CLOSING
    for x in a.take_outgoing():
        b.receive_segment(x, 1.0)
    for x in b.take_outgoing():
        a.receive_segment(x, 1.0)
    assert a.state is S.TIME_WAIT and b.state is S.TIME_WAIT
    a.handle_timer(a.get_timer())
    b.handle_timer(b.get_timer())
    assert a.state is S.CLOSED and b.state is S.CLOSED


def test_fin_and_ack_of_our_fin_together():
    p = passive()
    c = p.conn
    c.shutdown(0.0)
    p.out()
    out = p.send(flags=FIN | ACK)     # acks our FIN and carries the peer's
    assert c.state is S.TIME_WAIT
    assert [x.flags for x in out] == [ACK]


def test_abort_sends_rst():
    p = passive()
    c = p.conn
    c.send(b"data", 0.0)
    p.out()
    c.abort(0.0)
    [r] = p.out()
    assert r.flags == RST | ACK and r.seq == OUR_ISS + 1 + 4 and r.ack == PEER_ISS + 1
    assert c.state is S.CLOSED and c.take_events() == [Closed()]
    assert c.send(b"more", 0.0) == 0 and c.send_space() == 0
    c.abort(0.0)
    assert p.out() == []


def test_abort_in_syn_sent_and_time_wait_is_silent():
    c = TcpConnection.connect(0.0, iss=OUR_ISS)
    c.take_outgoing()
    c.abort(0.1)
    assert c.take_outgoing() == [] and c.state is S.CLOSED
    p = passive()
    p.conn.shutdown(0.0)
    p.out()
    p.send(flags=FIN | ACK)
    p.out()
    p.conn.abort(0.5)
    assert p.out() == [] and p.conn.state is S.CLOSED


def test_abort_pending_refuses():
    c = TcpConnection.from_syn(seg(PEER_ISS, 0, SYN), 0.0, iss=OUR_ISS)
    c.abort(0.0)
    [r] = c.take_outgoing()
    assert r.flags == RST | ACK and r.ack == PEER_ISS + 1


def test_closed_connection_answers_with_rst():
    p = passive()
    c = p.conn
    c.abort(0.0)
    p.out()
    out = p.send(b"late")
    assert [(x.flags, x.seq) for x in out] == [(RST, c.snd_max)]
    assert p.send(flags=RST) == []


def test_rst_for():
    assert rst_for(seg(5, 0, RST)) is None
    assert rst_for(seg(5, 0, RST | ACK)) is None
    r = rst_for(seg(5, 77, ACK, payload=b"abc"))
    assert (r.seq, r.ack, r.flags) == (77, 0, RST)
    r = rst_for(seg(5, 0, SYN))
    assert (r.seq, r.ack, r.flags) == (0, 6, RST | ACK)
    r = rst_for(seg(0xFFFFFFFF, 0, SYN | FIN, payload=b"ab"))
    assert (r.seq, r.ack, r.flags) == (0, 3, RST | ACK)


def test_peer_reset_established():
    p = passive()
    c = p.conn
    p.send(b"hi")
    assert p.send(flags=RST, ack=0) == []
    assert c.state is S.CLOSED
    ev = c.take_events()
    assert ev[-2:] == [Reset(), Closed()]
    assert bytes(c.received()) == b"hi"


def test_rst_in_time_wait_closes_without_reset_event():
    p = passive()
    p.conn.shutdown(0.0)
    p.out()
    p.send(flags=FIN | ACK)
    p.conn.take_events()
    p.send(flags=RST)
    assert p.conn.state is S.CLOSED
    assert p.conn.take_events() == [Closed()]


def test_data_after_peer_fin_is_ignored():
    p = passive()
    c = p.conn
    p.send(b"abc", flags=FIN | ACK)
    out = p.send(b"bogus")
    assert [(x.flags, x.ack) for x in out] == [(ACK, PEER_ISS + 1 + 3 + 1)]
    assert bytes(c.received()) == b"abc"


def test_can_reuse_for_new_syn_in_time_wait():
    p = passive()
    c = p.conn
    c.shutdown(0.0)
    p.out()
    p.send(flags=FIN | ACK)
    assert c.state is S.TIME_WAIT
    assert c.can_reuse_for(seg(PEER_ISS + 100000, 0, SYN))
    assert not c.can_reuse_for(seg(PEER_ISS - 5, 0, SYN))
    assert not c.can_reuse_for(seg(PEER_ISS + 100000, 0, SYN | ACK))


def test_shutdown_is_idempotent_and_send_after_shutdown_takes_nothing():
    p = active()
    c = p.conn
    c.shutdown(0.0)
    c.shutdown(0.0)
    assert len(p.out()) == 1
    assert c.send(b"x", 0.0) == 0
