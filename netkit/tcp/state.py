"""TCP connection states and the one table of transitions between them (h11 ``_state.py`` style).

The connection code decides *that* something happened (a Trigger); this table alone
decides which state follows. A (state, trigger) pair missing from the table is a bug in
the engine, never a reaction to input: ``TcpConnection`` only fires triggers that are
valid for its state, and the fuzz tests hold it to that.
"""

from __future__ import annotations

import enum

__all__ = ["TcpState", "Trigger", "TRANSITIONS", "next_state", "SYNCHRONIZED", "RECEIVES_DATA",
           "SENDS_DATA", "ACCEPTS_SEND"]


class TcpState(enum.Enum):
    CLOSED = "CLOSED"
    #: Passive open: the peer's SYN is remembered, nothing sent yet; the runtime is
    #: connecting to the real destination and will call accept() or refuse().
    SYN_PENDING = "SYN-PENDING"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"

    # Members are singletons compared by identity; hash them by identity too (C speed,
    # unlike Enum's Python-level __hash__), since the engine tests set membership per
    # segment.
    __hash__ = object.__hash__


class Trigger(enum.Enum):
    CONNECT = "connect"                 # application: active open, SYN sent
    SYN_ARRIVED = "syn arrived"         # passive open: SYN remembered, nothing sent
    ACCEPT = "accept"                   # application: destination reachable, SYN-ACK sent
    REFUSE = "refuse"                   # application: destination refused, RST sent
    RCV_SYN = "rcv SYN"                 # simultaneous open
    RCV_SYN_ACK = "rcv SYN-ACK"
    RCV_ACK_OF_SYN = "rcv ACK of SYN"
    SHUTDOWN = "shutdown"               # application: no more data, FIN queued
    RCV_FIN = "rcv FIN"
    RCV_ACK_OF_FIN = "rcv ACK of FIN"
    TIME_WAIT_EXPIRED = "time-wait expired"
    RCV_RST = "rcv RST"
    ABORT = "abort"                     # application
    TIMEOUT = "timeout"                 # retransmissions exhausted


S, T = TcpState, Trigger

TRANSITIONS: dict[tuple[TcpState, Trigger], TcpState] = {
    # opening
    (S.CLOSED, T.CONNECT): S.SYN_SENT,
    (S.CLOSED, T.SYN_ARRIVED): S.SYN_PENDING,
    (S.SYN_PENDING, T.ACCEPT): S.SYN_RECEIVED,
    (S.SYN_PENDING, T.REFUSE): S.CLOSED,
    (S.SYN_SENT, T.RCV_SYN_ACK): S.ESTABLISHED,
    (S.SYN_SENT, T.RCV_SYN): S.SYN_RECEIVED,            # simultaneous open
    (S.SYN_RECEIVED, T.RCV_ACK_OF_SYN): S.ESTABLISHED,
    # we close first
    (S.ESTABLISHED, T.SHUTDOWN): S.FIN_WAIT_1,
    (S.FIN_WAIT_1, T.RCV_ACK_OF_FIN): S.FIN_WAIT_2,
    (S.FIN_WAIT_1, T.RCV_FIN): S.CLOSING,               # simultaneous close
    (S.FIN_WAIT_2, T.RCV_FIN): S.TIME_WAIT,
    (S.CLOSING, T.RCV_ACK_OF_FIN): S.TIME_WAIT,
    (S.TIME_WAIT, T.TIME_WAIT_EXPIRED): S.CLOSED,
    # the peer closes first
    (S.ESTABLISHED, T.RCV_FIN): S.CLOSE_WAIT,
    (S.CLOSE_WAIT, T.SHUTDOWN): S.LAST_ACK,
    (S.LAST_ACK, T.RCV_ACK_OF_FIN): S.CLOSED,
}
# Resets, aborts and timeouts end a connection from any live state.
for _state in TcpState:
    if _state is not S.CLOSED:
        for _trigger in (T.RCV_RST, T.ABORT, T.TIMEOUT):
            TRANSITIONS[(_state, _trigger)] = S.CLOSED
del _state, _trigger


def next_state(state: TcpState, trigger: Trigger) -> TcpState:
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise RuntimeError(f"TCP engine bug: no transition from {state.value} "
                           f"on {trigger.value}") from None


#: States in which both sequence spaces are known (RFC 9293 "synchronized").
SYNCHRONIZED = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT, S.CLOSING,
                          S.LAST_ACK, S.TIME_WAIT})
#: States in which the peer may still send us data.
RECEIVES_DATA = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})
#: States in which we may transmit data (or our FIN).
SENDS_DATA = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK})
#: States in which ``send()`` buffers data (before ``shutdown()``).
ACCEPTS_SEND = frozenset({S.SYN_PENDING, S.SYN_SENT, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT})
del S, T
