"""Loss recovery: RTO (RFC 6298), fast retransmit / NewReno (RFC 5681/6582), SACK (RFC 6675)."""

import pytest

from netkit.tcp import Closed, TcpSettings, TcpState, TimedOut

from .helpers import FIN, OUR_ISS, passive

S = TcpState
D = OUR_ISS + 1          # our first data sequence number


def sent(out):
    return [(x.seq - D, len(x.payload)) for x in out if x.payload]


# ---------------------------------------------------------------- RTO

def test_rto_retransmits_with_exponential_backoff():
    p = passive(TcpSettings(rto_min=1.0, max_retries=20))
    c = p.conn
    c.send(b"r" * 100, 0.0)
    assert sent(p.out()) == [(0, 100)]
    times = []
    for _ in range(8):
        out = p.tick()
        assert sent(out) == [(0, 100)]
        times.append(p.now)
    gaps = [round(b - a, 6) for a, b in zip([0.0] + times, times)]
    assert gaps == [1, 2, 4, 8, 16, 32, 60, 60]
    assert c.stats.rto_expirations == 8 and c.stats.retransmits == 8
    p.send()                                         # finally acked
    assert c.get_timer() is None and c._retries == 0


def test_max_retries_times_out():
    p = passive(TcpSettings(max_retries=3))
    c = p.conn
    c.send(b"x", 0.0)
    p.out()
    for _ in range(3):
        assert len(p.tick()) == 1
    assert p.tick() == []
    assert c.state is S.CLOSED
    assert c.take_events() == [TimedOut(), Closed()]


def test_rtt_estimation_rfc6298():
    p = passive(TcpSettings(rto_min=0.01))
    c = p.conn
    assert c.srtt == pytest.approx(0.0)              # handshake sample
    for i, delay in enumerate([0.1, 0.1, 0.3]):
        c.send(b"m", p.now)
        p.out()
        p.now += delay
        p.send()
    # SRTT/RTTVAR recurrences
    srtt, var = 0.0, 0.0
    for r in [0.1, 0.1, 0.3]:
        var = 0.75 * var + 0.25 * abs(srtt - r)
        srtt = 0.875 * srtt + 0.125 * r
    assert c.srtt == pytest.approx(srtt)
    assert c.rttvar == pytest.approx(var)
    assert c.rto == pytest.approx(srtt + 4 * var)


def test_karn_no_sample_from_retransmitted_segment():
    p = passive(TcpSettings(rto_min=0.5))
    c = p.conn
    c.send(b"k", 0.0)
    p.out()
    p.tick()                                          # retransmit at 0.5
    before = c.srtt
    p.now = 5.0
    p.send()
    assert c.srtt == before


def test_rtt_from_timestamps():
    p = passive(TcpSettings(rto_min=0.01), ts=True)
    c = p.conn
    c.send(b"t", 0.0)
    [d] = p.out()
    echo = d.options.timestamps[0]
    p.now = 0.25
    p.send(timestamps=(50, echo))
    assert c.srtt == pytest.approx(0.25 * 0.125, abs=0.002)


def test_rto_go_back_n_with_slow_start():
    p = passive(TcpSettings(rto_min=1.0))
    c = p.conn
    c.send(b"g" * 14600, 0.0)
    assert len(p.out()) == 10
    out = p.tick()
    assert sent(out) == [(0, 1460)]
    assert c.cwnd == 1460 and c.ssthresh == 7300
    out = p.send(ack=D + 1460)
    assert sent(out) == [(1460, 1460), (2920, 1460)]   # slow start from one segment
    # an ACK covering the originals too moves snd_nxt forward
    out = p.send(ack=D + 14600)
    assert c.snd_una == c.snd_max == D + 14600
    assert c.get_timer() is None


def test_retransmitted_fin():
    p = passive(TcpSettings(rto_min=1.0))
    c = p.conn
    c.send(b"end", 0.0)
    c.shutdown(0.0)
    p.out()
    out = p.tick()
    assert [(x.seq - D, bytes(x.payload), x.flags & FIN) for x in out] == [(0, b"end", FIN)]
    p.send(ack=D + 3)                                  # data acked, FIN lost again
    out = p.tick()
    assert [(x.seq - D, x.flags & FIN) for x in out] == [(3, FIN)]
    p.send(ack=D + 4)
    assert c.state is S.FIN_WAIT_2


def test_shrunk_window_with_data_in_flight_does_not_time_out():
    """The peer acks nothing and closes its window: our retransmissions act as probes and
    the connection survives as long as the peer answers."""
    p = passive(TcpSettings(max_retries=3))
    c = p.conn
    c.send(b"s" * 3000, 0.0)
    p.out()
    p.send(window=0, ack=D)
    for _ in range(30):
        out = p.tick()
        assert sent(out) == [(0, 1460)]
        p.send(window=0, ack=D)
    assert c.state is S.ESTABLISHED and p.now > 1000
    # once the peer stops answering, the retries run out
    for _ in range(6):
        p.tick()
    assert c.state is S.CLOSED


# ---------------------------------------------------------------- fast retransmit / NewReno

def dupacks(p, n, ack=D, **kw):
    out = []
    for _ in range(n):
        out += p.send(ack=ack, advance=False, **kw)
    return out


def test_fast_retransmit_on_three_dupacks_newreno():
    p = passive()
    c = p.conn
    c.send(b"f" * 14600 + b"g" * 10000, 0.0)
    assert len(p.out()) == 10
    assert dupacks(p, 2) == []
    out = dupacks(p, 1)
    assert sent(out) == [(0, 1460)]
    assert c.stats.fast_retransmits == 1
    assert c.ssthresh == 7300 and c.cwnd == 7300 + 3 * 1460
    # each further dup ACK inflates cwnd; new data goes once inflated past the flight
    new = []
    for _ in range(7):
        new += sent(dupacks(p, 1))
    assert new and all(off >= 14600 for off, _ in new)
    # partial ACK: retransmit the next hole at once
    out = p.send(ack=D + 2920, advance=False)
    assert (2920, 1460) in sent(out)
    # full ACK ends recovery with cwnd = ssthresh-ish
    p.send(ack=c.snd_max, advance=False)
    assert c._recovery == 0
    assert c.cwnd <= 7300 + 1460


def test_no_fast_retransmit_for_window_updates_or_data():
    p = passive()
    c = p.conn
    c.send(b"f" * 14600, 0.0)
    p.out()
    for w in (60000, 61000, 62000, 63000):
        assert sent(p.send(ack=D, window=w, advance=False)) == []
    for i in range(4):
        assert sent(p.send(b"d", ack=D)) == []
    assert c.stats.fast_retransmits == 0


# ---------------------------------------------------------------- SACK

def test_sack_driven_retransmission_skips_sacked_ranges():
    p = passive(sack=True, window=65535)
    c = p.conn
    c.cwnd = 20 * 1460
    c.send(b"s" * 20 * 1460, 0.0)
    assert len(p.out()) == 20
    M = 1460
    # segments 0 and 5 lost; the rest SACKed over several ACKs
    out = p.send(ack=D, advance=False, sack_blocks=((D + M, D + 3 * M),))
    assert sent(out) == []
    out = p.send(ack=D, advance=False, sack_blocks=((D + M, D + 5 * M),))
    assert sent(out) == [(0, M)]                       # > 2*MSS SACKed: recovery
    assert c._recovery == 2
    out = p.send(ack=D, advance=False,
                 sack_blocks=((D + 6 * M, D + 20 * M), (D + M, D + 5 * M)))
    # the hole at segment 5 is retransmitted, never the SACKed data
    assert (5 * M, M) in sent(out)
    assert all(not (M <= off < 5 * M or 6 * M <= off < 20 * M) for off, _ in sent(out))
    rtx_before = c.stats.retransmits
    p.send(ack=D + 5 * M, advance=False, sack_blocks=((D + 6 * M, D + 20 * M),))
    assert c.stats.retransmits == rtx_before          # hole already retransmitted
    p.send(ack=D + 20 * M, advance=False)
    assert c._recovery == 0 and c.snd_una == c.snd_max


def test_sack_hostile_blocks_are_bounded_and_ignored():
    p = passive(sack=True)
    c = p.conn
    c.send(b"h" * 14600, 0.0)
    p.out()
    bogus = ((D + 100, D + 50), (D - 1000, D - 10), (D + 20000, D + 30000), (D + 10, D + 10))
    p.send(ack=D, advance=False, sack_blocks=bogus)
    assert not c._sb
    # many distinct blocks over many ACKs: the scoreboard stays bounded
    for i in range(200):
        first = 4 * i % 200
        blocks = tuple((D + 1 + 70 * j + i % 3, D + 2 + 70 * j + i % 3)
                       for j in range(first, first + 4))
        p.send(ack=D, advance=False, sack_blocks=blocks)
    assert len(c._sb.starts) <= 32
    # and recovery still completes
    p.send(ack=c.snd_max, advance=False)
    assert c.snd_una == c.snd_max and not c._sb


def test_rto_clears_scoreboard():
    p = passive(TcpSettings(rto_min=1.0), sack=True)
    c = p.conn
    c.send(b"c" * 5 * 1460, 0.0)
    p.out()
    p.send(ack=D, advance=False, sack_blocks=((D + 1460, D + 2920),))
    assert c._sb
    out = p.tick()
    assert not c._sb and sent(out) == [(0, 1460)]
    out = p.send(ack=D + 1460, advance=False)
    # go-back-N resends even the previously SACKed segment (the receiver may renege)
    assert (1460, 1460) in sent(out)
