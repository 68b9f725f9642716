"""Opening: passive (SYN_PENDING/accept/refuse), active, simultaneous open, option negotiation."""

import pytest

from netkit.tcp import (Closed, Connected, Reset, TcpConnection, TcpSettings, TcpState,
                        TimedOut, rst_for)

from .helpers import ACK, FIN, OUR_ISS, PEER_ISS, RST, SYN, Peer, opts, passive, seg

S = TcpState


def syn(**kw):
    return seg(PEER_ISS, 0, SYN, 65535, **kw)


def test_from_syn_sends_nothing_until_accept():
    c = TcpConnection.from_syn(syn(mss=1400), 0.0, iss=OUR_ISS)
    assert c.state is S.SYN_PENDING
    assert c.take_outgoing() == [] and c.get_timer() is None
    # the guest repeats its SYN while we connect to the host: still silent
    c.receive_segment(syn(mss=1400), 0.5)
    assert c.take_outgoing() == []
    c.accept(1.0)
    [sa] = c.take_outgoing()
    assert (sa.flags, sa.seq, sa.ack) == (SYN | ACK, OUR_ISS, PEER_ISS + 1)
    assert sa.options.mss == 1460
    assert c.state is S.SYN_RECEIVED
    assert c.get_timer() == pytest.approx(2.0)      # rto_initial


def test_refuse_sends_rst_ack_and_closes():
    c = TcpConnection.from_syn(syn(), 0.0, iss=OUR_ISS)
    c.refuse(0.1)
    [r] = c.take_outgoing()
    assert (r.flags, r.seq, r.ack) == (RST | ACK, 0, PEER_ISS + 1)
    assert r == rst_for(syn())
    assert c.state is S.CLOSED
    assert c.take_events() == [Closed()]
    c.accept(0.2)                                     # late: harmless no-op
    assert c.take_outgoing() == [] and c.state is S.CLOSED


def test_from_syn_rejects_non_syn():
    for flags in (ACK, SYN | ACK, SYN | RST, SYN | FIN):
        with pytest.raises(ValueError):
            TcpConnection.from_syn(seg(1, 0, flags), 0.0)


def test_rst_while_pending_closes_quietly():
    c = TcpConnection.from_syn(syn(), 0.0, iss=OUR_ISS)
    c.receive_segment(seg(PEER_ISS + 1, 0, RST), 0.1)
    assert c.state is S.CLOSED
    assert c.take_events() == [Reset(), Closed()]
    assert c.take_outgoing() == []
    c.accept(0.2)
    assert c.take_outgoing() == []


def test_passive_handshake_and_synack_retransmission():
    c = TcpConnection.from_syn(syn(), 0.0, iss=OUR_ISS)
    c.accept(0.0)
    c.take_outgoing()
    p = Peer(c, PEER_ISS + 1)
    out = p.tick()                                     # RTO 1 s
    assert [(s.flags, s.seq) for s in out] == [(SYN | ACK, OUR_ISS)]
    assert p.now == 1.0 and c.get_timer() == 3.0       # backed off to 2 s
    # the peer repeats its SYN: we repeat the SYN-ACK
    out = p.send(flags=SYN, seq=PEER_ISS, ack=0, advance=False)
    assert [(s.flags, s.seq) for s in out] == [(SYN | ACK, OUR_ISS)]
    assert p.send() == []
    assert c.state is S.ESTABLISHED and c.take_events() == [Connected()]
    assert c.get_timer() is None


def test_synack_retries_exhausted_times_out():
    c = TcpConnection.from_syn(syn(), 0.0, TcpSettings(syn_retries=2), iss=OUR_ISS)
    c.accept(0.0)
    c.take_outgoing()
    p = Peer(c, PEER_ISS + 1)
    assert len(p.tick()) == 1 and len(p.tick()) == 1
    assert p.tick() == []
    assert c.state is S.CLOSED
    assert c.take_events() == [TimedOut(), Closed()]
    assert p.now == 1 + 2 + 4


def test_bad_ack_in_syn_received_gets_rst():
    c = TcpConnection.from_syn(syn(), 0.0, iss=OUR_ISS)
    c.accept(0.0)
    c.take_outgoing()
    p = Peer(c, PEER_ISS + 1)
    out = p.send(ack=OUR_ISS + 77, advance=False)
    assert [(s.flags, s.seq) for s in out] == [(RST, OUR_ISS + 77)]
    assert c.state is S.SYN_RECEIVED
    out = p.send(ack=OUR_ISS, advance=False)          # acks nothing new: not acceptable either
    assert [(s.flags, s.seq) for s in out] == [(RST, OUR_ISS)]


def test_active_open():
    c = TcpConnection.connect(0.0, iss=OUR_ISS)
    [s] = c.take_outgoing()
    assert (s.flags, s.seq, s.window) == (SYN, OUR_ISS, 65535)
    assert s.options.mss == 1460 and s.options.sack_permitted and s.options.wscale == 5
    assert s.options.timestamps is not None and s.options.timestamps[1] == 0
    assert c.state is S.SYN_SENT and c.get_timer() == 1.0
    p = Peer(c, PEER_ISS)
    out = p.send(flags=SYN | ACK, ack=OUR_ISS + 1, mss=1000)
    assert [(x.flags, x.seq, x.ack) for x in out] == [(ACK, OUR_ISS + 1, PEER_ISS + 1)]
    assert c.state is S.ESTABLISHED and c.take_events() == [Connected()]
    assert c.peer_mss == 1000 and c.send_mss == 1000
    assert not c.sack_permitted and not c.timestamps_enabled
    assert c.get_timer() is None


def test_syn_retransmission_backoff_and_timeout():
    c = TcpConnection.connect(0.0, TcpSettings(syn_retries=3), iss=OUR_ISS)
    c.take_outgoing()
    p = Peer(c, PEER_ISS)
    times = []
    while c.state is S.SYN_SENT:
        out = p.tick()
        times.append(p.now)
        assert all(x.flags == SYN and x.seq == OUR_ISS for x in out)
    assert times == [1, 3, 7, 15]
    assert c.take_events() == [TimedOut(), Closed()]


def test_connection_refused():
    c = TcpConnection.connect(0.0, iss=OUR_ISS)
    c.take_outgoing()
    # RST without an acceptable ACK is ignored (RFC 9293 3.10.7.3)
    c.receive_segment(seg(0, OUR_ISS + 5, RST | ACK), 0.1)
    assert c.state is S.SYN_SENT
    c.receive_segment(seg(0, 0, RST), 0.1)
    assert c.state is S.SYN_SENT
    c.receive_segment(seg(0, OUR_ISS + 1, RST | ACK), 0.1)
    assert c.state is S.CLOSED
    assert c.take_events() == [Reset(refused=True), Closed()]
    assert c.take_outgoing() == []


def test_syn_sent_bad_ack_gets_rst():
    c = TcpConnection.connect(0.0, iss=OUR_ISS)
    c.take_outgoing()
    c.receive_segment(seg(PEER_ISS, OUR_ISS + 9, SYN | ACK), 0.1)
    [r] = c.take_outgoing()
    assert (r.flags, r.seq) == (RST, OUR_ISS + 9)
    assert c.state is S.SYN_SENT
    c.receive_segment(seg(PEER_ISS, OUR_ISS, ACK), 0.1)   # acks nothing: ack <= ISS
    [r] = c.take_outgoing()
    assert (r.flags, r.seq) == (RST, OUR_ISS)
    c.receive_segment(seg(PEER_ISS, 0, 0), 0.1)            # neither SYN nor RST: dropped
    assert c.take_outgoing() == [] and c.state is S.SYN_SENT


def test_simultaneous_open():
    s = TcpSettings()
    a = TcpConnection.connect(0.0, s, iss=100)
    b = TcpConnection.connect(0.0, s, iss=900)
    [sa] = a.take_outgoing()
    [sb] = b.take_outgoing()
    a.receive_segment(sb, 0.01)
    b.receive_segment(sa, 0.01)
    assert a.state is S.SYN_RECEIVED and b.state is S.SYN_RECEIVED
    [a2] = a.take_outgoing()
    [b2] = b.take_outgoing()
    assert (a2.flags, a2.seq, a2.ack) == (SYN | ACK, 100, 901)
    assert (b2.flags, b2.seq, b2.ack) == (SYN | ACK, 900, 101)
    a.receive_segment(b2, 0.02)
    b.receive_segment(a2, 0.02)
    assert a.state is S.ESTABLISHED and b.state is S.ESTABLISHED
    assert a.take_events() == [Connected()] and b.take_events() == [Connected()]
    assert a.timestamps_enabled and a.sack_permitted and a._snd_wscale == 5
    # data flows
    a.send(b"hello", 0.03)
    for x in a.take_outgoing():
        b.receive_segment(x, 0.03)
    assert bytes(b.received()) == b"hello"


def test_simultaneous_open_with_lost_synack():
    s = TcpSettings()
    a = TcpConnection.connect(0.0, s, iss=100)
    b = TcpConnection.connect(0.0, s, iss=900)
    [sa] = a.take_outgoing()
    [sb] = b.take_outgoing()
    a.receive_segment(sb, 0.01)
    b.receive_segment(sa, 0.01)
    [a2] = a.take_outgoing()
    b.take_outgoing()                 # b's SYN-ACK is lost
    b.receive_segment(a2, 0.02)
    assert b.state is S.ESTABLISHED
    # a retransmits its SYN-ACK on timeout; b, established, answers with a challenge ACK
    a.handle_timer(a.get_timer())
    for x in a.take_outgoing():
        b.receive_segment(x, 1.1)
    for x in b.take_outgoing():
        a.receive_segment(x, 1.1)
    assert a.state is S.ESTABLISHED


def test_window_scaling_needs_both_and_syn_window_unscaled():
    # peer does not scale: we neither
    p = passive(wscale=None)
    c = p.conn
    assert c._snd_wscale == 0 and c._rcv_wscale == 0
    # peer scales: we scale too; the SYN-ACK window itself is unscaled
    c = TcpConnection.from_syn(syn(wscale=7), 0.0, iss=OUR_ISS)
    c.accept(0.0)
    [sa] = c.take_outgoing()
    assert sa.options.wscale == 5 and sa.window == 65535
    c.receive_segment(seg(PEER_ISS + 1, OUR_ISS + 1, ACK, 100), 0.0)
    assert c.snd_wnd == 100 << 7
    c.send(b"x", 0.0)
    [d] = c.take_outgoing()
    assert d.window == (1 << 20) >> 5


def test_wscale_disabled_in_settings():
    c = TcpConnection.from_syn(syn(wscale=7), 0.0,
                               TcpSettings(window_scaling=False, rcv_buffer=65535), iss=OUR_ISS)
    c.accept(0.0)
    [sa] = c.take_outgoing()
    assert sa.options.wscale is None
    assert c._snd_wscale == 0


def test_options_only_when_peer_offered():
    c = TcpConnection.from_syn(syn(), 0.0, iss=OUR_ISS)
    c.accept(0.0)
    [sa] = c.take_outgoing()
    assert sa.options == opts(mss=1460)
    c = TcpConnection.from_syn(syn(sack_permitted=True, timestamps=(77, 0)), 0.0, iss=OUR_ISS,
                               ts_offset=1000)
    c.accept(2.0)
    [sa] = c.take_outgoing()
    assert sa.options.sack_permitted and sa.options.timestamps == (3000, 77)


def test_default_peer_mss_and_tiny_mss_clamp():
    p = passive(mss=None)
    assert p.conn.peer_mss == 536
    p = passive(mss=1)
    assert p.conn.peer_mss == 64


def test_data_and_shutdown_before_established():
    c = TcpConnection.from_syn(syn(), 0.0, iss=OUR_ISS)
    assert c.send(b"banner", 0.0) == 6          # server speaks first, host answered early
    c.shutdown(0.0)
    assert c.state is S.SYN_PENDING
    c.accept(0.0)
    [sa] = c.take_outgoing()
    assert sa.flags == SYN | ACK and not sa.payload
    p = Peer(c, PEER_ISS + 1)
    out = p.send()
    assert c.state is S.FIN_WAIT_1
    assert [(x.flags & (FIN | ACK), bytes(x.payload)) for x in out] == [(FIN | ACK, b"banner")]
    assert c.take_events() == [Connected()]


def test_synack_data_is_not_acknowledged():
    c = TcpConnection.connect(0.0, iss=OUR_ISS)
    c.take_outgoing()
    c.receive_segment(seg(PEER_ISS, OUR_ISS + 1, SYN | ACK, payload=b"early"), 0.1)
    assert c.state is S.ESTABLISHED
    # data on a SYN is not acknowledged (the peer will resend it)
    [a] = c.take_outgoing()
    assert a.ack == PEER_ISS + 1 and c.received_size == 0


def test_random_iss():
    a = TcpConnection.connect(0.0)
    b = TcpConnection.connect(0.0)
    assert a.iss != b.iss
    assert 0 <= a.iss <= 0xFFFFFFFF
