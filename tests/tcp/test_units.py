"""Unit tests: sequence arithmetic, buffers, settings, the state table, Segment."""

import pytest

from netkit.tcp import (TRANSITIONS, Segment, TcpSettings, TcpState, Trigger, is_connection_request,
                        segment_length)
from netkit.tcp.buffers import Reassembly, ReceiveQueue, Scoreboard, SendBuffer
from netkit.tcp.seq import seq_add, seq_diff, seq_geq, seq_gt, seq_in_window, seq_leq, seq_lt
from netkit.tcp.state import ACCEPTS_SEND, RECEIVES_DATA, SENDS_DATA, SYNCHRONIZED, next_state
from netkit.wire.tcp import ACK, FIN, SYN, TcpOptions

M = 0xFFFFFFFF


# ---------------------------------------------------------------- seq

def test_seq_arithmetic_wraps():
    assert seq_lt(M, 0) and seq_gt(0, M)
    assert seq_leq(5, 5) and seq_geq(5, 5) and not seq_lt(5, 5)
    assert seq_lt(M - 10, 10) and not seq_lt(10, M - 10)
    assert seq_diff(3, M) == 4 and seq_diff(M, 3) == -4
    assert seq_add(M, 2) == 1
    assert seq_in_window(2, M - 1, 5) and not seq_in_window(4, M - 1, 5)


# ---------------------------------------------------------------- Segment

def test_segment_length_and_repr():
    s = Segment(1, 2, SYN | FIN, 100, TcpOptions(mss=1000, timestamps=(1, 2),
                                                   sack_blocks=((1, 2),)), b"abc")
    assert len(s) == segment_length(s) == 5
    r = repr(s)
    assert "SF" in r and "mss=1000" in r and "ts=1/2" in r and "sack=1-2" in r
    assert is_connection_request(Segment(1, 0, SYN, 0))
    assert not is_connection_request(Segment(1, 0, SYN | ACK, 0))


# ---------------------------------------------------------------- settings

def test_settings_validation_and_wscale():
    assert TcpSettings().rcv_wscale == 5
    assert TcpSettings(rcv_buffer=65535).rcv_wscale == 0
    assert TcpSettings(rcv_buffer=4 << 20).rcv_wscale == 7
    assert TcpSettings(wscale=9).rcv_wscale == 9
    assert TcpSettings.for_mtu(1500).mss == 1460
    assert TcpSettings.for_mtu(65520).mss == 65480
    for bad in (dict(mss=10), dict(rcv_buffer=100), dict(wscale=2), dict(rto_min=5.0),
                dict(tso_size=100), dict(max_retries=0), dict(window_scaling=False)):
        with pytest.raises(ValueError):
            TcpSettings(**bad)


# ---------------------------------------------------------------- state table

def test_state_table_complete_and_consistent():
    reachable = {TcpState.CLOSED}
    frontier = [TcpState.CLOSED]
    while frontier:
        st = frontier.pop()
        for (src, trig), dst in TRANSITIONS.items():
            if src is st and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    assert reachable == set(TcpState)
    for st in TcpState:
        if st is not TcpState.CLOSED:
            for trig in (Trigger.RCV_RST, Trigger.ABORT, Trigger.TIMEOUT):
                assert next_state(st, trig) is TcpState.CLOSED
    with pytest.raises(RuntimeError):
        next_state(TcpState.CLOSED, Trigger.RCV_FIN)
    assert RECEIVES_DATA <= SYNCHRONIZED and SENDS_DATA <= SYNCHRONIZED
    assert TcpState.TIME_WAIT not in SENDS_DATA | ACCEPTS_SEND


def test_rfc_diagram_transitions():
    # the transitions the RFC 9293 diagram has, spelled out
    S, T = TcpState, Trigger
    expect = {
        (S.SYN_SENT, T.RCV_SYN_ACK): S.ESTABLISHED,
        (S.SYN_SENT, T.RCV_SYN): S.SYN_RECEIVED,
        (S.ESTABLISHED, T.SHUTDOWN): S.FIN_WAIT_1,
        (S.FIN_WAIT_1, T.RCV_FIN): S.CLOSING,
        (S.CLOSING, T.RCV_ACK_OF_FIN): S.TIME_WAIT,
        (S.FIN_WAIT_2, T.RCV_FIN): S.TIME_WAIT,
        (S.CLOSE_WAIT, T.SHUTDOWN): S.LAST_ACK,
        (S.LAST_ACK, T.RCV_ACK_OF_FIN): S.CLOSED,
    }
    for k, v in expect.items():
        assert TRANSITIONS[k] is v


# ---------------------------------------------------------------- SendBuffer

def test_send_buffer_reads_across_chunks_and_drops():
    b = SendBuffer()
    b.append(b"a" * 10000)
    b.append(b"b" * 10000)
    for i in range(100):
        b.append(b"c")                       # small writes merge
    assert len(b._chunks) == 3 and len(b) == 20100
    assert bytes(b.read(9990, 20)) == b"a" * 10 + b"b" * 10
    assert b.read(0, 10000) is b._chunks[0]  # zero copy
    assert isinstance(b.read(5, 5), memoryview)
    b.drop(15000)
    assert b.start == 15000 and bytes(b.read(19999, 3)) == b"bcc"
    b.drop(5100)
    assert len(b) == 0 and b._chunks == []
    b.append(b"z" * 5000)
    assert bytes(b.read(20100, 5000)) == b"z" * 5000


def test_send_buffer_compacts():
    b = SendBuffer()
    for i in range(200):
        b.append(bytes([i % 256]) * 5000)
    b.drop(5000 * 150 + 10)
    assert len(b._chunks) < 100
    assert bytes(b.read(5000 * 150 + 10, 3)) == bytes([150]) * 3


# ---------------------------------------------------------------- ReceiveQueue

def test_receive_queue_views_survive():
    q = ReceiveQueue()
    q.append(b"hello ")
    q.append(b"world")
    bufs = q.buffers()
    assert b"".join(bytes(x) for x in bufs) == b"hello world"
    v = q.peek()
    q.consume(6)
    q.append(b"!")
    assert bytes(v) == b"hello world"       # old view unaffected
    assert bytes(q.peek()) == b"world!"
    with pytest.raises(ValueError):
        q.consume(7)


# ---------------------------------------------------------------- Reassembly

def test_reassembly_first_bytes_win_and_merge():
    r = Reassembly(1000, 100)
    assert r.insert(10, b"AAAA") == 4
    assert r.insert(20, b"BBBB") == 4
    assert r.insert(8, b"xxxxxxxxxxxxxxxxxx") == 10      # fills gaps only
    assert r.nblocks == 1 and r.size == 18
    s, e, pieces = r.pop_first()
    assert (s, e) == (8, 26)
    assert b"".join(pieces) == b"xxAAAAxxxxxxBBBBxx"


def test_reassembly_caps():
    r = Reassembly(10, 100)
    assert r.insert(0, b"12345") == 5
    assert r.insert(100, b"123456") == -1                # bytes cap
    r = Reassembly(1000, 2)
    r.insert(0, b"a")
    r.insert(5, b"b")
    assert r.insert(10, b"c") == -1                       # pieces cap
    r = Reassembly(1000, 100, max_blocks=2)
    r.insert(0, b"a")
    r.insert(5, b"b")
    assert r.insert(10, b"c") == -1                       # blocks cap
    assert r.insert(1, b"a") == 1                         # extending a block is fine


def test_reassembly_sack_blocks_order():
    r = Reassembly(1000, 100)
    r.insert(10, b"a")
    r.insert(30, b"b")
    r.insert(20, b"c")
    assert r.blocks(3) == [(20, 21), (30, 31), (10, 11)]
    r.insert(11, b"d")
    assert r.blocks(2) == [(10, 12), (30, 31)]


# ---------------------------------------------------------------- Scoreboard

def test_scoreboard():
    sb = Scoreboard(max_blocks=3)
    assert sb.add(10, 20) and not sb.add(12, 18) and sb.add(15, 25)
    assert (sb.starts, sb.ends, sb.size) == ([10], [25], 15)
    sb.add(30, 40)
    sb.add(50, 60)
    sb.add(70, 80)                                        # over the cap: highest dropped
    assert sb.starts == [10, 30, 50] and sb.size == 35
    assert sb.next_hole(0, 60) == (0, 10)
    assert sb.next_hole(12, 60) == (25, 30)
    assert sb.next_hole(55, 60) is None
    assert sb.sacked_below(35) == 20
    sb.trim(35)
    assert sb.starts == [35, 50] and sb.size == 15
    sb.clear()
    assert not sb and sb.size == 0
