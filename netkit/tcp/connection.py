"""The sans-I/O TCP connection: RFC 9293 plus the parts of RFC 5681, 5961, 6298, 6582,
6675, 6928 and 7323 that a robust, fast userspace stack needs.

A :class:`TcpConnection` never touches a socket or reads a clock. The runtime feeds it
parsed segments and application calls, each with the current time ``now`` (float
seconds, any monotonic origin), and collects what it produced.

Driving it (one connection; the runtime demultiplexes on the 4-tuple)::

    seg = Segment(view.seq, view.ack, view.flags, view.window, view.options(), view.payload)
    conn.receive_segment(seg, now)        # for each frame of a batch
    conn.send(data, now)                  # whenever the host side produced bytes
    conn.consume(n, now)                  # after writing n bytes of conn.received() out
    ...                                   # end of the batch:
    for seg in conn.take_outgoing():      # -> frames (build_tcp_header(..., seg.options.emit()))
        ...
    for ev in conn.take_events():         # Connected, DataReceived, SendSpace, PeerFinished,
        ...                               # Reset, TimedOut, Closed
    deadline = conn.get_timer()           # call conn.handle_timer(now) at/after it

Call ``take_outgoing()`` once per batch, not per segment: plain pure ACKs and the partial
last data segment are built only then, so a batch produces one ACK and full-sized
segments (and a FIN rides on the last data segment). ``get_timer()`` must be read after
the batch too (it also finalises pending output).

Passive open (netkit answers a guest): :meth:`TcpConnection.from_syn` remembers the SYN
and sends nothing (state SYN_PENDING) while the runtime connects to the real
destination; then :meth:`~TcpConnection.accept` (SYN-ACK) or
:meth:`~TcpConnection.refuse` (RST). The application may ``send`` and ``shutdown``
before the handshake completes; data and FIN wait for it. Active open:
:meth:`TcpConnection.connect`. For segments that match no connection, answer with
:func:`~netkit.tcp.segment.rst_for`.

What is implemented: both handshakes (and simultaneous open), half-close in both
directions, simultaneous close, short bounded TIME-WAIT; RFC 5961 RST/SYN/ACK checks with
rate-limited challenge ACKs; MSS, window scaling, timestamps (RTT, PAWS) and SACK
options; RTO per RFC 6298 with Karn's rule; fast retransmit with NewReno (RFC 6582) or,
when SACK is permitted, SACK-scoreboard recovery (RFC 6675, simplified pipe); slow
start/congestion avoidance with byte counting, initial window per RFC 6928; delayed
ACKs; SACK blocks for our reassembly queue; capped out-of-order reassembly where the
first bytes received for an offset win; zero-window persist probes; keepalive answers;
receiver and sender SWS avoidance; windows that shrink with a slow application but never
move their right edge left.

Sequence numbers are mod 2**32 throughout; buffers are positioned by absolute stream
offsets (:mod:`netkit.tcp.buffers`). State changes go through the table in
:mod:`netkit.tcp.state` only.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..wire.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions
from .buffers import Reassembly, ReceiveQueue, Scoreboard, SendBuffer
from .events import Closed, Connected, DataReceived, Event, PeerFinished, Reset, SendSpace, TimedOut
from .segment import NO_OPTIONS, Segment, is_connection_request, rst_for
from .settings import TcpSettings
from .state import ACCEPTS_SEND, RECEIVES_DATA, SENDS_DATA, TRANSITIONS, TcpState, Trigger

if TYPE_CHECKING:
    from ..budget import BufferAccount

__all__ = ["TcpConnection", "TcpStats"]

MASK = 0xFFFFFFFF
HALF = 0x80000000
_TS_OVERHEAD = 12            # NOP NOP TS(10) on every segment once timestamps are on
_PAWS_IDLE = 24 * 86400.0    # RFC 7323 5.5: ts_recent older than this is invalid
_DEFAULT_MSS = 536           # RFC 9293 3.7.1: peer MSS when it sent none
_MAX_DUP_RUN = 4             # at most this many distinct dup ACKs queued back to back
#: Host data a flow over its budget may still take when its send buffer is empty (its
#: progress floor; one MSS at most).
_SEND_FLOOR_MAX = 4096

# timer kinds
_T_NONE, _T_RTX, _T_PERSIST, _T_TIME_WAIT = 0, 1, 2, 3
# recovery modes
_REC_NONE, _REC_NEWRENO, _REC_SACK = 0, 1, 2

_CLOSED = TcpState.CLOSED
_SYN_PENDING = TcpState.SYN_PENDING
_SYN_SENT = TcpState.SYN_SENT
_SYN_RECEIVED = TcpState.SYN_RECEIVED
_ESTABLISHED = TcpState.ESTABLISHED
_FIN_WAIT_1 = TcpState.FIN_WAIT_1
_FIN_WAIT_2 = TcpState.FIN_WAIT_2
_CLOSING = TcpState.CLOSING
_TIME_WAIT = TcpState.TIME_WAIT
_CLOSE_WAIT = TcpState.CLOSE_WAIT
_LAST_ACK = TcpState.LAST_ACK

_DATA_RECEIVED = DataReceived()
_SEND_SPACE = SendSpace()


def _random32() -> int:
    return secrets.randbits(32)


@dataclass(slots=True)
class TcpStats:
    """Counters of one connection (``TcpConnection.statistics()``)."""

    segments_in: int = 0
    segments_out: int = 0
    bytes_in: int = 0             # in-order payload bytes delivered to received()
    bytes_out: int = 0            # payload bytes transmitted, retransmissions included
    retransmits: int = 0          # segments retransmitted, any cause
    fast_retransmits: int = 0     # loss recoveries entered on duplicate ACKs / SACK
    rto_expirations: int = 0
    dup_acks_in: int = 0
    ooo_segments: int = 0         # segments queued out of order
    ooo_dropped: int = 0          # out-of-order bytes dropped at the reassembly cap or budget
    budget_dropped: int = 0       # in-order bytes dropped because the buffer budget is used up
    out_of_window: int = 0        # segments failing the acceptability test (answered by ACK)
    paws_dropped: int = 0
    bad_ack: int = 0              # ACKs for data never sent, or far too old
    challenge_acks: int = 0
    challenge_acks_suppressed: int = 0
    persist_probes: int = 0
    resets_in: int = 0
    resets_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TcpConnection:
    """One TCP connection's protocol machine. Create with :meth:`connect` or :meth:`from_syn`.

    Public read-only attributes: ``state`` (:class:`TcpState`), ``settings``, ``iss``,
    ``irs``, ``snd_una``, ``snd_nxt``, ``snd_max``, ``snd_wnd`` (scaled, bytes),
    ``rcv_nxt``, ``cwnd``, ``ssthresh``, ``srtt``, ``rttvar``, ``rto``, ``peer_mss``,
    ``sack_permitted``, ``timestamps_enabled``, ``stats``.
    """

    __slots__ = (
        "settings", "state", "stats", "iss", "irs", "snd_una", "snd_nxt", "snd_max", "snd_wnd",
        "max_snd_wnd", "_snd_wl1", "_snd_wl2", "rcv_nxt", "_rcv_adv", "_snd_wscale",
        "_rcv_wscale", "peer_mss", "_eff_mss", "_seg_max", "sack_permitted",
        "timestamps_enabled", "_ts_recent", "_ts_recent_time", "_ts_offset", "_last_ack_sent",
        "_sndbuf", "_snd_base_seq", "_rcvq", "_ooo", "_rcv_abs", "_rcv_fin_seq", "_rcv_mss",
        "_unacked_bytes", "_ack_pending", "_ack_dup", "_delack_deadline", "cwnd", "ssthresh",
        "_ca_acc", "_cwnd_cap", "_dupacks", "_recovery", "_recover", "_high_rxt", "_sb", "srtt",
        "rttvar", "rto", "_retries", "_probes", "_persist_backoff", "_rto_episode", "_rtt_seq",
        "_rtt_start", "_rtt_time", "_rtx_high", "_rto_base", "_timer", "_timer_kind",
        "_tw_start", "_fin_seq", "_shutdown", "_peer_fin", "_out", "_pend_ack", "_pend_ack_now",
        "_cork", "_cork_now", "_out_dups", "_events", "_start", "_last_rcv", "_syn_opts",
        "_chal_start", "_chal_count", "_opts", "_opts_ts", "_opts_tsecr", "_rcv_buffer",
        "_snd_buffer", "_sws", "_space_low", "_ws_ok", "_rtx_ts", "_acct", "_floor_rcv",
        "_floor_snd", "_budget_blocked",
    )

    # ------------------------------------------------------------------ construction

    def __init__(self, settings: TcpSettings, now: float, iss: int, ts_offset: int) -> None:
        """Internal: use :meth:`connect` or :meth:`from_syn`."""
        s = settings
        self.settings = s
        self.state = _CLOSED
        self.stats = TcpStats()
        iss &= MASK
        self.iss = iss
        self.irs = 0
        self.snd_una = self.snd_nxt = self.snd_max = iss
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self.rcv_nxt = 0
        self._rcv_adv = 0
        self._snd_wscale = 0
        self._rcv_wscale = 0
        self._ws_ok = False
        self.peer_mss = _DEFAULT_MSS
        self.sack_permitted = False
        self.timestamps_enabled = False
        self._ts_recent = 0
        self._ts_recent_time = now
        self._ts_offset = ts_offset & MASK
        self._last_ack_sent = 0
        self._sndbuf = SendBuffer()
        self._snd_base_seq = (iss + 1) & MASK   # sequence number of _sndbuf.start
        self._rcvq = ReceiveQueue()
        self._ooo = Reassembly(s.ooo_cap, s.max_ooo_segments)
        self._rcv_abs = 0                       # absolute offset of rcv_nxt
        self._rcv_fin_seq: int | None = None    # a FIN seen out of order
        self._rcv_mss = min(_DEFAULT_MSS, s.mss)
        self._unacked_bytes = 0
        self._ack_pending = False
        self._ack_dup = False
        self._delack_deadline: float | None = None
        self._set_mss()
        self.cwnd = self._initial_cwnd()
        self.ssthresh = 1 << 62
        self._ca_acc = 0
        self._cwnd_cap = max(s.snd_buffer, 4 * self._seg_max)
        self._dupacks = 0
        self._recovery = _REC_NONE
        self._recover = iss
        self._high_rxt = 0
        self._sb = Scoreboard()
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = s.rto_initial
        self._rto_base = s.rto_initial          # RTO without backoff
        self._retries = 0
        self._probes = 0
        self._persist_backoff = 0
        self._rto_episode = False
        self._rtt_seq: int | None = None        # end of the segment being timed (no TS)
        self._rtt_start = 0
        self._rtt_time = 0.0
        self._rtx_high = iss                    # end of the highest retransmitted range
        self._rtx_ts: int | None = None         # our TSval at the latest retransmission
        self._timer: float | None = None
        self._timer_kind = _T_NONE
        self._tw_start = 0.0
        self._fin_seq: int | None = None        # sequence number of our FIN once shut down
        self._shutdown = False
        self._peer_fin = False
        self._out: list[Segment] = []
        self._pend_ack = False                  # a plain pure ACK to append on take_outgoing
        self._pend_ack_now = 0.0
        self._cork = False                      # a partial tail segment waits for take_outgoing
        self._cork_now = 0.0
        self._out_dups = 0
        self._events: list[Event] = []
        self._start = now
        self._last_rcv = now
        self._syn_opts = NO_OPTIONS
        self._chal_start = float("-inf")
        self._chal_count = 0
        self._opts = NO_OPTIONS
        self._opts_ts = -1
        self._opts_tsecr = -1
        self._rcv_buffer = s.rcv_buffer
        self._snd_buffer = s.snd_buffer
        self._sws = min(s.rcv_buffer // 2, s.mss)
        self._space_low = s.snd_buffer // 2
        #: The guest's buffer budget (netkit.budget), or None: not budgeted.
        self._acct: BufferAccount | None = None
        # What a flow holding (next to) nothing may always buffer, whatever the budget
        # says, so that no flow deadlocks: one MSS of guest data, a little host data.
        self._floor_rcv = s.mss
        self._floor_snd = min(s.mss, _SEND_FLOOR_MAX)
        #: The budget cut our send space: tell the application when ACKs free some.
        self._budget_blocked = False

    @classmethod
    def connect(cls, now: float, settings: TcpSettings | None = None, *, iss: int | None = None,
                ts_offset: int | None = None, account: "BufferAccount | None" = None) -> "TcpConnection":
        """Active open: the returned connection has a SYN in ``take_outgoing()``.
        ``account``: the buffer budget this connection charges (see :attr:`buffered_bytes`)."""
        self = cls(settings or TcpSettings(), now, _random32() if iss is None else iss,
                   _random32() if ts_offset is None else ts_offset)
        self._acct = account
        self._transition(Trigger.CONNECT, now)
        s = self.settings
        self._syn_opts = TcpOptions(
            mss=s.mss,
            wscale=s.rcv_wscale if s.window_scaling else None,
            sack_permitted=s.sack,
            timestamps=(self._tsval(now), 0) if s.timestamps else None)
        self._send_syn(now, retransmit=False)
        return self

    @classmethod
    def from_syn(cls, syn: Segment, now: float, settings: TcpSettings | None = None, *,
                 iss: int | None = None, ts_offset: int | None = None,
                 account: "BufferAccount | None" = None) -> "TcpConnection":
        """Passive open from a peer's SYN. Nothing is sent until :meth:`accept` or
        :meth:`refuse` (state SYN_PENDING). ``syn`` must satisfy
        :func:`~netkit.tcp.segment.is_connection_request` (else ``ValueError``).
        ``account``: the buffer budget this connection charges."""
        if not is_connection_request(syn):
            raise ValueError(f"not a connection request: {syn!r}")
        self = cls(settings or TcpSettings(), now, _random32() if iss is None else iss,
                   _random32() if ts_offset is None else ts_offset)
        self._acct = account
        self._transition(Trigger.SYN_ARRIVED, now)
        self.irs = syn.seq & MASK
        self.rcv_nxt = (self.irs + 1) & MASK
        self._last_ack_sent = self.rcv_nxt
        self._negotiate(syn.options, now, peer_syn=True)
        self.snd_wnd = syn.window
        self.max_snd_wnd = syn.window
        self._snd_wl1 = self.irs
        self._snd_wl2 = self.iss
        return self

    def accept(self, now: float) -> None:
        """Passive open: the destination answered; send the SYN-ACK. No-op unless SYN_PENDING
        (the peer may have reset meanwhile)."""
        if self.state is not _SYN_PENDING:
            return
        self._transition(Trigger.ACCEPT, now)
        s = self.settings
        self._syn_opts = TcpOptions(
            mss=s.mss,
            wscale=self._rcv_wscale if self._ws_ok else None,
            sack_permitted=self.sack_permitted,
            timestamps=(self._tsval(now), self._ts_recent) if self.timestamps_enabled else None)
        self._send_syn(now, retransmit=False)

    def refuse(self, now: float) -> None:
        """Passive open: the destination refused or timed out; RST the SYN. No-op unless
        SYN_PENDING."""
        if self.state is not _SYN_PENDING:
            return
        self._emit(Segment(0, self.rcv_nxt, RST | ACK, 0))
        self.stats.resets_out += 1
        self._transition(Trigger.REFUSE, now)

    # ------------------------------------------------------------------ application side

    def send(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue ``data`` for transmission; returns how many bytes were taken (bounded by
        :meth:`send_space`). Takes nothing (returns 0) after :meth:`shutdown` or once the
        connection can no longer send (reset, aborted, timed out, closed). ``bytes`` are
        kept without copying; other buffers are copied."""
        if self._shutdown or self.state not in ACCEPTS_SEND:
            return 0
        space = self._snd_buffer - len(self._sndbuf)
        acct = self._acct
        if acct is not None:
            total = acct.total
            if acct.used + space > acct.limit or total.used + space > total.limit:
                space = self._budget_send_space(space)
        n = len(data)
        if n > space:
            if space <= 0:
                return 0
            data = memoryview(data)[:space]
            n = space
        if not n:
            return 0
        if type(data) is not bytes:
            data = bytes(data)
        self._sndbuf.append(data)
        if acct is not None:
            acct.used += n
            total.used += n
        if self.state in SENDS_DATA:
            self._output(now)
        return n

    def send_space(self) -> int:
        """Bytes :meth:`send` would accept now: the send buffer's room, cut to what the
        buffer budget allows (a :class:`SendSpace` event follows when it grows again)."""
        if self._shutdown or self.state not in ACCEPTS_SEND:
            return 0
        space = self._snd_buffer - len(self._sndbuf)
        acct = self._acct
        if acct is not None and space > 0:
            total = acct.total
            if acct.used + space > acct.limit or total.used + space > total.limit:
                space = self._budget_send_space(space)
                if space <= 0:
                    total.send_limited += 1
        return space if space > 0 else 0

    def _budget_send_space(self, space: int) -> int:
        """``space`` cut to the budget's room, but never below the progress floor."""
        acct = self._acct
        allow = acct.room()
        floor = self._floor_snd - len(self._sndbuf)
        if floor > allow:
            allow = floor
        if allow < space:
            self._budget_blocked = True
            return allow
        return space

    @property
    def send_buffered(self) -> int:
        """Bytes queued and not yet acknowledged by the peer."""
        return len(self._sndbuf)

    @property
    def buffered_bytes(self) -> int:
        """Memory held in this connection's buffers, as charged to its budget account:
        the send buffer, the receive queue, and the out-of-order queue (with a fixed cost
        per piece, see :data:`~netkit.tcp.buffers.PIECE_COST`)."""
        return len(self._sndbuf) + self._rcvq.size + self._ooo.cost

    @property
    def account(self) -> "BufferAccount | None":
        return self._acct

    def release_buffers(self) -> None:
        """The runtime is done with this connection: drop everything buffered and return
        it to the budget. Call it once the connection is closed or abandoned; the
        connection must not be driven afterwards."""
        acct = self._acct
        if acct is not None:
            n = self.buffered_bytes
            if n:
                acct.charge(-n)
            self._acct = None
        if self._sndbuf.end != self._sndbuf.start:
            self._sndbuf = SendBuffer()
        if self._rcvq.size:
            self._rcvq.clear()
        if self._ooo:
            self._ooo.clear()
        self._sb.clear()

    def received(self) -> memoryview:
        """In-order data not yet consumed, as one read-only view (joins internally when
        the data arrived in several segments). The view stays valid after further calls."""
        return self._rcvq.peek()

    def received_buffers(self) -> list[memoryview]:
        """The same data as :meth:`received`, as a list of views (for ``sendmsg``)."""
        return self._rcvq.buffers()

    @property
    def received_size(self) -> int:
        return self._rcvq.size

    def consume(self, n: int, now: float) -> None:
        """The application took the first ``n`` bytes of :meth:`received`. Opens the
        receive window; a window update goes out when it opens significantly
        (RFC 1122 4.2.3.3 SWS avoidance)."""
        self._rcvq.consume(n)
        acct = self._acct
        if acct is not None:
            acct.used -= n
            acct.total.used -= n
        if n and self.state in RECEIVES_DATA and not self._peer_fin:
            cur = (self._rcv_adv - self.rcv_nxt) & MASK
            if cur >= HALF:
                cur = 0
            free = self._rcv_free()
            if cur * 2 <= self._rcv_buffer and free - cur >= self._sws and free >> self._rcv_wscale:
                self._ack_pending = True
                self._output(now)

    def read(self, now: float, max_bytes: int | None = None) -> bytes:
        """Convenience: copy out and consume up to ``max_bytes`` of received data."""
        view = self._rcvq.peek()
        if max_bytes is not None:
            view = view[:max_bytes]
        data = bytes(view)
        self.consume(len(data), now)
        return data

    def shutdown(self, now: float) -> None:
        """No more data from us: FIN after everything already queued (half-close). Idempotent.
        Before the handshake completes, the FIN waits for it."""
        if self._shutdown or self.state not in ACCEPTS_SEND:
            return
        self._shutdown = True
        self._fin_seq = (self._snd_base_seq + len(self._sndbuf)) & MASK
        if self.state is _ESTABLISHED or self.state is _CLOSE_WAIT:
            self._transition(Trigger.SHUTDOWN, now)
            self._output(now)

    def abort(self, now: float) -> None:
        """Drop the connection now, sending RST where the peer has state for it."""
        st = self.state
        if st is _CLOSED:
            return
        if st is _SYN_PENDING:
            self.refuse(now)
            return
        if st is not _SYN_SENT and st is not _TIME_WAIT:
            self._emit(Segment(self.snd_max, self.rcv_nxt, RST | ACK, 0))
            self.stats.resets_out += 1
        self._transition(Trigger.ABORT, now)

    def take_outgoing(self) -> list[Segment]:
        """Segments to transmit, oldest first; the list is handed over (not copied)."""
        if self._cork:
            self._flush_cork()
        if self._pend_ack:
            self._pend_ack = False
            self._out.append(self._make_ack(self._pend_ack_now))
            self.stats.segments_out += 1
            self._acked()
        out = self._out
        if not out:
            return []
        self._out = []
        self._out_dups = 0
        return out

    def take_events(self) -> list[Event]:
        ev = self._events
        if not ev:
            return []
        self._events = []
        return ev

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` must be called, or None."""
        if self._cork:
            self._flush_cork()
        t = self._timer
        d = self._delack_deadline
        if d is None:
            return t
        if t is None or d < t:
            return d
        return t

    def handle_timer(self, now: float) -> None:
        """Run whatever timers are due at ``now`` (early calls are harmless)."""
        d = self._delack_deadline
        if d is not None and now >= d:
            self._delack_deadline = None
            self._ack_pending = True
        t = self._timer
        if t is not None and now >= t:
            kind = self._timer_kind
            self._timer = None
            self._timer_kind = _T_NONE
            if kind == _T_RTX:
                self._on_rto(now)
            elif kind == _T_PERSIST:
                self._on_persist(now)
            elif kind == _T_TIME_WAIT:
                self._transition(Trigger.TIME_WAIT_EXPIRED, now)
        if self.state is not _CLOSED:
            self._output(now)

    def statistics(self) -> TcpStats:
        return self.stats

    @property
    def send_mss(self) -> int:
        """Payload bytes per wire segment towards the peer (the GSO size when ``tso_size``
        is set)."""
        return self._eff_mss

    @property
    def peer_finished(self) -> bool:
        return self._peer_fin

    @property
    def is_closed(self) -> bool:
        return self.state is _CLOSED

    def can_reuse_for(self, syn: Segment) -> bool:
        """True when ``syn`` may replace this connection (RFC 6191 style): we are in
        TIME_WAIT and the new SYN is beyond our old receive sequence. The runtime then
        discards this connection and creates a new one with :meth:`from_syn`."""
        return (self.state is _TIME_WAIT and is_connection_request(syn)
                and ((syn.seq - self.rcv_nxt) & MASK) < HALF and syn.seq != self.rcv_nxt)

    def __repr__(self) -> str:
        return (f"<TcpConnection {self.state.value} una={self.snd_una} nxt={self.snd_nxt} "
                f"rcv_nxt={self.rcv_nxt} cwnd={self.cwnd} wnd={self.snd_wnd}>")

    # ------------------------------------------------------------------ segment arrival

    def receive_segment(self, seg: Segment, now: float) -> None:
        """Process one segment from the peer (already matched to this connection by the
        caller's 4-tuple). Never raises for any segment contents."""
        stats = self.stats
        stats.segments_in += 1
        st = self.state
        if st is _ESTABLISHED:
            if self._fast_path(seg, now):
                return
            self._rcv_synchronized(seg, now)
        elif st is _SYN_SENT:
            self._rcv_syn_sent(seg, now)
        elif st is _SYN_PENDING:
            if seg.flags & RST and seg.seq == self.rcv_nxt:
                self._reset(now)
            return
        elif st is _CLOSED:
            rst = rst_for(seg)
            if rst is not None:
                self._emit(rst)
                stats.resets_out += 1
            return
        else:
            self._rcv_synchronized(seg, now)
        if self.state is not _CLOSED:
            self._output(now)

    def _fast_path(self, seg: Segment, now: float) -> bool:
        """Header prediction for ESTABLISHED: in-order data, or a pure ACK of new data,
        with nothing unusual going on. Returns False to take the full path."""
        if (seg.flags & ~PSH) != ACK or seg.seq != self.rcv_nxt or self._recovery \
                or self._ooo._starts:
            return False
        opts = seg.options
        if opts.sack_blocks:
            return False
        ts = opts.timestamps
        if self.timestamps_enabled:
            if ts is None:
                return False
            tsval = ts[0]
            d = (tsval - self._ts_recent) & MASK
            if d >= HALF:
                return False  # PAWS candidate: slow path
        ack = seg.ack
        una = self.snd_una
        d_ack = (ack - una) & MASK
        if d_ack > ((self.snd_max - una) & MASK):
            return False
        payload = seg.payload
        plen = len(payload)
        acct = self._acct
        if plen:
            if d_ack or plen > ((self._rcv_adv - self.rcv_nxt) & MASK) \
                    or self._rcv_fin_seq is not None:
                return False
            if acct is not None:
                total = acct.total
                if acct.used + plen > acct.limit or total.used + plen > total.limit:
                    return False            # over the budget: the full path decides
        elif not d_ack:
            return False
        # ---- accepted
        self._last_rcv = now
        self._probes = 0
        if ts is not None and self.timestamps_enabled and \
                ((self._last_ack_sent - seg.seq) & MASK) < HALF:
            self._ts_recent = ts[0] & MASK
            self._ts_recent_time = now
        wnd = seg.window << self._snd_wscale
        if d_ack:
            self._ack_new_data(ack, d_ack, ts, now)
        # window update (RFC 9293 3.10.7.4)
        wl1 = self._snd_wl1
        if seg.seq != wl1 and ((seg.seq - wl1) & MASK) < HALF or \
                (seg.seq == wl1 and ((ack - self._snd_wl2) & MASK) < HALF):
            self.snd_wnd = wnd
            self._snd_wl1 = seg.seq
            self._snd_wl2 = ack
            if wnd > self.max_snd_wnd:
                self.max_snd_wnd = wnd
        if plen:
            self._rcvq.append(bytes(payload))
            if acct is not None:
                acct.used += plen
                total.used += plen
            self.rcv_nxt = (self.rcv_nxt + plen) & MASK
            self._rcv_abs += plen
            self.stats.bytes_in += plen
            ev = self._events
            if not ev or ev[-1] is not _DATA_RECEIVED:
                ev.append(_DATA_RECEIVED)
            if plen > self._rcv_mss:
                self._rcv_mss = plen if plen < self.settings.mss else self.settings.mss
            un = self._unacked_bytes + plen
            self._unacked_bytes = un
            if un >= 2 * self._rcv_mss:
                self._ack_pending = True
            elif self._delack_deadline is None:
                self._delack_deadline = now + self.settings.delayed_ack
        if self.state is not _CLOSED:
            self._output(now)
        return True

    def _rcv_syn_sent(self, seg: Segment, now: float) -> None:
        """RFC 9293 3.10.7.3."""
        flags = seg.flags
        ack_ok = False
        if flags & ACK:
            ack = seg.ack
            if ((ack - self.iss - 1) & MASK) > ((self.snd_max - self.iss - 1) & MASK):
                # acknowledges something we never sent
                if not flags & RST:
                    self._emit(Segment(ack, 0, RST, 0))
                    self.stats.resets_out += 1
                return
            ack_ok = True
        if flags & RST:
            if ack_ok:
                self._reset(now)
            return
        if not flags & SYN:
            return
        # SYN or SYN-ACK (data and FIN on it are not acknowledged: the peer resends them)
        self.irs = seg.seq & MASK
        self.rcv_nxt = (self.irs + 1) & MASK
        self._negotiate(seg.options, now, peer_syn=False)
        self._rcv_adv = (self.rcv_nxt + min(self._rcv_buffer, 0xFFFF)) & MASK
        self.snd_wnd = seg.window          # never scaled on a SYN
        self.max_snd_wnd = seg.window
        self._snd_wl1 = seg.seq
        self._snd_wl2 = seg.ack
        self._last_rcv = now
        if ack_ok:
            self._retries = 0
            ts = seg.options.timestamps
            self._ack_new_data(seg.ack, (seg.ack - self.snd_una) & MASK, ts, now)
            self._transition(Trigger.RCV_SYN_ACK, now)
            self._ack_pending = True
        else:
            # simultaneous open: SYN-ACK with our original sequence number
            self._transition(Trigger.RCV_SYN, now)
            s = self.settings
            self._syn_opts = TcpOptions(
                mss=s.mss,
                wscale=self._rcv_wscale if self._ws_ok else None,
                sack_permitted=self.sack_permitted,
                timestamps=(self._tsval(now), self._ts_recent) if self.timestamps_enabled else None)
            self._send_syn(now, retransmit=False)

    def _rcv_synchronized(self, seg: Segment, now: float) -> None:
        """RFC 9293 3.10.7.4 for SYN-RECEIVED and the synchronized states."""
        flags = seg.flags
        st = self.state
        stats = self.stats
        seq = seg.seq
        opts = seg.options
        ts = opts.timestamps

        if st is _SYN_RECEIVED and flags & SYN and not flags & RST and seq == self.irs:
            if not flags & ACK:
                # the peer repeats its SYN: our SYN-ACK was lost
                if self._challenge_allowed(now):
                    self._send_syn(now, retransmit=True)
                return
            if seg.ack == self.snd_max:
                # simultaneous open: the peer's SYN-ACK completes our handshake
                self.snd_wnd = seg.window
                self._snd_wl1 = seq
                self._snd_wl2 = seg.ack
                self._last_rcv = now
                self._ack_new_data(seg.ack, (seg.ack - self.snd_una) & MASK, ts, now)
                self._transition(Trigger.RCV_ACK_OF_SYN, now)
                return

        # PAWS (RFC 7323 5.3)
        if ts is not None and self.timestamps_enabled and not flags & RST:
            d = (self._ts_recent - ts[0]) & MASK
            if d and d < HALF and not (
                    # a reordered duplicate ACK is harmless (Linux tcp_disordered_ack)
                    flags & (SYN | FIN | RST | ACK) == ACK and not seg.payload
                    and seq == self.rcv_nxt and seg.ack == self.snd_una
                    and (seg.window << self._snd_wscale) == self.snd_wnd
                    and d <= self.rto * 1000.0):
                if now - self._ts_recent_time <= _PAWS_IDLE:
                    stats.paws_dropped += 1
                    self._ack_pending = True
                    return
                self._ts_recent = ts[0] & MASK   # ts_recent went stale: resynchronize
                self._ts_recent_time = now

        # Acceptability: the segment must overlap [rcv_nxt, rcv_nxt + max(wnd, 1)).
        rcv_nxt = self.rcv_nxt
        payload = seg.payload
        plen = len(payload)
        wnd = (self._rcv_adv - rcv_nxt) & MASK
        if wnd >= HALF:
            wnd = 0
        ds = ((seq - rcv_nxt + HALF) & MASK) - HALF
        if flags & RST:
            seglen = 0
        else:
            seglen = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        ok = ds < (wnd or 1) and (ds >= 0 if seglen == 0 else ds + seglen > 0)
        if not ok:
            if not flags & RST:
                stats.out_of_window += 1
                self._ack_pending = True
                if st is _TIME_WAIT and flags & FIN:
                    self._restart_time_wait(now)
            return

        if flags & RST:
            if ds == 0:
                self._reset(now)
            else:
                self._challenge_ack(now)        # RFC 5961 3.2
            return

        # RFC 7323 4.3: TS.Recent from segments at or left of the last ACK we sent
        if ts is not None and self.timestamps_enabled and \
                ((self._last_ack_sent - seq) & MASK) < HALF and \
                ((ts[0] - self._ts_recent) & MASK) < HALF:
            self._ts_recent = ts[0] & MASK
            self._ts_recent_time = now

        if flags & SYN:
            self._challenge_ack(now)            # RFC 5961 4.2
            return
        if not flags & ACK:
            return

        if st is _SYN_RECEIVED:
            ack = seg.ack
            d = (ack - self.snd_una) & MASK
            if 0 < d <= ((self.snd_max - self.snd_una) & MASK):
                self.snd_wnd = seg.window << self._snd_wscale
                self._snd_wl1 = seq
                self._snd_wl2 = ack
                if self.snd_wnd > self.max_snd_wnd:
                    self.max_snd_wnd = self.snd_wnd
                self._transition(Trigger.RCV_ACK_OF_SYN, now)
                st = self.state
            else:
                self._emit(Segment(ack, 0, RST, 0))
                stats.resets_out += 1
                return

        if not self._process_ack(seg, now):
            return
        st = self.state
        if st is _CLOSED:
            return
        fin = flags & FIN
        if plen or fin:
            if st in RECEIVES_DATA:
                self._process_text(seq, payload, fin, now)
            else:
                # the peer finished already: anything new is bogus; repeat our ACK
                self._ack_pending = True
                if st is _TIME_WAIT and fin:
                    self._restart_time_wait(now)

    def _process_ack(self, seg: Segment, now: float) -> bool:
        """The ACK field of an acceptable segment. False: drop the rest of the segment."""
        ack = seg.ack
        una = self.snd_una
        d_ack = (ack - una) & MASK
        flight = (self.snd_max - una) & MASK
        if d_ack > flight:
            if d_ack < HALF:
                # acknowledges data never sent (RFC 9293: ACK and drop)
                self.stats.bad_ack += 1
                self._challenge_ack(now)
                return False
            if ((una - ack) & MASK) > self.max_snd_wnd:
                # older than anything the peer could have seen (RFC 5961 5.2)
                self.stats.bad_ack += 1
                self._challenge_ack(now)
                return False
            return True                         # an old duplicate: ignore the ACK field
        self._last_rcv = now
        self._probes = 0
        seq = seg.seq
        wnd = seg.window << self._snd_wscale
        sack_new = False
        if self.sack_permitted and flight:
            blocks = seg.options.sack_blocks
            if blocks:
                sack_new = self._update_scoreboard(blocks)
        if d_ack:
            self._ack_new_data(ack, d_ack, seg.options.timestamps, now)
        elif flight and (sack_new or (not seg.payload and not seg.flags & (SYN | FIN)
                                      and wnd == self.snd_wnd)):
            self._on_dupack(now)
        wl1 = self._snd_wl1
        if seq != wl1 and ((seq - wl1) & MASK) < HALF or \
                (seq == wl1 and ((ack - self._snd_wl2) & MASK) < HALF):
            if wnd > self.snd_wnd:
                self._persist_backoff = 0
            self.snd_wnd = wnd
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            if wnd > self.max_snd_wnd:
                self.max_snd_wnd = wnd
        return True

    def _ack_new_data(self, ack: int, acked: int, ts: tuple[int, int] | None, now: float) -> None:
        """SND.UNA advances by ``acked`` (> 0) to ``ack``."""
        self.snd_una = ack
        d = (ack - self.snd_nxt) & MASK
        if d and d < HALF:
            self.snd_nxt = ack                  # beyond a go-back-N rewind
        buf = self._sndbuf
        blen = buf.end - buf.start
        n = (ack - self._snd_base_seq) & MASK
        if n > blen:
            n = blen
        if n:
            space_before = self._snd_buffer - blen
            buf.drop(n)
            self._snd_base_seq = (self._snd_base_seq + n) & MASK
            acct = self._acct
            if acct is not None:
                acct.used -= n
                acct.total.used -= n
            if (space_before < self._space_low or self._budget_blocked) and self.state in ACCEPTS_SEND \
                    and not self._shutdown:
                self._budget_blocked = False
                ev = self._events
                if not ev or ev[-1] is not _SEND_SPACE:
                    ev.append(_SEND_SPACE)
        self._retries = 0
        self._rto_episode = False
        # Progress ends the backoff even without a valid RTT sample (as lwIP and
        # smoltcp do): with constant loss and no timestamps, Karn's rule could
        # otherwise keep the RTO at its maximum indefinitely.
        self.rto = self._rto_base
        # RTT (RFC 6298, RFC 7323 4.1)
        if ts is not None and self.timestamps_enabled:
            tsecr = ts[1]
            rtx = self._rtx_ts
            if rtx is not None and ((tsecr - rtx) & MASK) >= HALF:
                # Karn's rule with timestamps: the echo predates our latest
                # retransmission (the peer's left edge did not move), so the sample
                # would include the retransmission delay.
                pass
            else:
                self._rtx_ts = None
                r = (self._tsval(now) - tsecr) & MASK
                if r <= (now - self._start) * 1000.0 + 1000.0:
                    self._rtt_sample(r / 1000.0)
        elif self._rtt_seq is not None and ((ack - self._rtt_seq) & MASK) < HALF:
            # Karn: no sample when this ACK also covers retransmitted data (it may have
            # waited for a retransmission to fill a hole before the timed segment).
            if ((ack - acked - self._rtx_high) & MASK) < HALF:
                self._rtt_sample(now - self._rtt_time)
            self._rtt_seq = None
        # congestion control
        mss = self._eff_mss
        rec = self._recovery
        if rec:
            if ((ack - self._recover) & MASK) < HALF:
                # full acknowledgement: recovery over (RFC 6582 3.2 step 3)
                self._recovery = _REC_NONE
                self._dupacks = 0
                if rec == _REC_SACK:
                    self.cwnd = self.ssthresh
                else:
                    flight = (self.snd_max - ack) & MASK
                    self.cwnd = min(self.ssthresh, max(flight, mss) + mss)
            else:
                # partial acknowledgement: the next hole is lost too
                self._sb.trim(buf.start)
                if rec == _REC_NEWRENO:
                    self.cwnd = max(self.cwnd - acked + (mss if acked >= mss else 0), mss)
                    self._retransmit_first(now)
                elif self._high_rxt <= buf.start:
                    self._retransmit_first(now)
        else:
            self._dupacks = 0
            cwnd = self.cwnd
            if cwnd < self.ssthresh:
                cwnd += acked                    # slow start
            else:
                self._ca_acc += acked            # congestion avoidance, byte counting
                if self._ca_acc >= cwnd:
                    self._ca_acc -= cwnd
                    cwnd += mss
            self.cwnd = cwnd if cwnd < self._cwnd_cap else self._cwnd_cap
        if self._sb.starts:
            self._sb.trim(buf.start)
        # retransmission timer (RFC 6298 5.2, 5.3)
        if ack == self.snd_max:
            if self._timer_kind == _T_RTX:
                self._timer = None
                self._timer_kind = _T_NONE
        else:
            self._timer = now + self.rto
            self._timer_kind = _T_RTX
        fin = self._fin_seq
        if fin is not None and ack == ((fin + 1) & MASK):
            st = self.state
            if st is _FIN_WAIT_1 or st is _CLOSING or st is _LAST_ACK:
                self._transition(Trigger.RCV_ACK_OF_FIN, now)

    def _on_dupack(self, now: float) -> None:
        self.stats.dup_acks_in += 1
        self._dupacks += 1
        rec = self._recovery
        if rec == _REC_NONE:
            if (self._dupacks >= 3 or (self.sack_permitted and self._sb.size > 2 * self._eff_mss)) \
                    and ((self.snd_una - self._recover) & MASK) < HALF:
                self._enter_recovery(now)
        elif rec == _REC_NEWRENO and self.cwnd < self._cwnd_cap:
            self.cwnd += self._eff_mss          # inflate (RFC 6582)

    def _enter_recovery(self, now: float) -> None:
        """Fast retransmit, then NewReno (RFC 6582) or SACK-based (RFC 6675) recovery."""
        mss = self._eff_mss
        flight = (self.snd_max - self.snd_una) & MASK
        self.ssthresh = max(flight // 2, 2 * mss)
        self._recover = self.snd_max
        self.stats.fast_retransmits += 1
        if self.sack_permitted:
            self._recovery = _REC_SACK
            self.cwnd = self.ssthresh
            self._high_rxt = self._sndbuf.start
        else:
            self._recovery = _REC_NEWRENO
            self.cwnd = self.ssthresh + 3 * mss
        self._retransmit_first(now)

    def _update_scoreboard(self, blocks: tuple[tuple[int, int], ...]) -> bool:
        base = self._snd_base_seq
        buf = self._sndbuf
        start, end = buf.start, buf.end
        span = (self.snd_max - base) & MASK
        new = False
        for left, right in blocks[:4]:
            dl = (left - base) & MASK
            dr = (right - base) & MASK
            if dl >= dr or dr > span:
                continue                        # malformed, D-SACK or beyond what we sent
            s = start + dl
            e = start + dr
            if e > end:
                e = end
            if s < e and self._sb.add(s, e):
                new = True
        return new

    def _process_text(self, seq: int, payload, fin: int, now: float) -> None:
        """Segment text and FIN (RFC 9293 3.10.7.4, seventh and eighth)."""
        rcv_nxt = self.rcv_nxt
        plen = len(payload)
        d = (seq - rcv_nxt) & MASK
        if d >= HALF:
            # starts before rcv_nxt: keep only what is new (what we hold wins)
            skip = (MASK + 1) - d
            if skip > plen or (skip == plen and not fin):
                self._ack_pending = True
                return
            payload = memoryview(payload)[skip:]
            plen -= skip
            d = 0
            self._ack_pending = True
        wnd = (self._rcv_adv - rcv_nxt) & MASK
        if wnd >= HALF:
            wnd = 0
        if d + plen > wnd:
            keep = wnd - d
            if keep < 0:
                keep = 0
            payload = memoryview(payload)[:keep]
            plen = keep
            fin = 0
            self._ack_pending = True
        acct = self._acct
        if d:
            # out of order
            if plen:
                self.stats.ooo_segments += 1
                ooo = self._ooo
                if acct is None:
                    stored = ooo.insert(self._rcv_abs + d, payload)
                else:
                    cost = ooo.cost
                    stored = ooo.insert(self._rcv_abs + d, payload, acct.room())
                    if stored == -2:
                        acct.total.ooo_dropped += 1
                        acct.total.ooo_dropped_bytes += plen
                    else:
                        acct.charge(ooo.cost - cost)
                if stored < 0:
                    self.stats.ooo_dropped += plen
            if fin:
                f = (seq + plen) & MASK
                cur = self._rcv_fin_seq
                if cur is None or ((f - cur) & MASK) >= HALF:
                    self._rcv_fin_seq = f
            self._ack_dup = True
            return
        if plen and acct is not None:
            # In order, inside the window we advertised, but the budget may have been
            # used up since by other flows: keep what it allows (or the progress floor)
            # and drop the rest; the peer retransmits it.
            allow = acct.room()
            floor = self._floor_rcv - self._rcvq.size
            if floor > allow:
                allow = floor
            if plen > allow:
                keep = allow if allow > 0 else 0
                acct.total.rcv_dropped += 1
                acct.total.rcv_dropped_bytes += plen - keep
                self.stats.budget_dropped += plen - keep
                payload = memoryview(payload)[:keep]
                plen = keep
                fin = 0
                self._ack_pending = True
        if plen:
            if acct is None:
                self._deliver(payload, now)
            else:
                before = self._rcvq.size + self._ooo.cost
                self._deliver(payload, now)
                acct.charge(self._rcvq.size + self._ooo.cost - before)
        if fin:
            if self.rcv_nxt != ((seq + plen) & MASK):
                fin = 0                         # data past the FIN: ignore the FIN
        elif self._rcv_fin_seq is not None:
            if self.rcv_nxt == self._rcv_fin_seq:
                fin = 1
            elif ((self.rcv_nxt - self._rcv_fin_seq) & MASK) < HALF:
                self._rcv_fin_seq = None        # inconsistent peer; wait for a real FIN
        if fin:
            self._on_peer_fin(now)

    def _deliver(self, payload, now: float) -> None:
        """In-order data at rcv_nxt; drains the reassembly queue behind it."""
        ooo = self._ooo
        rcvq = self._rcvq
        plen = len(payload)
        had_ooo = bool(ooo)
        if not had_ooo:
            rcvq.append(bytes(payload))
            delivered = plen
        else:
            start = self._rcv_abs
            pos, end = start, start + plen
            while True:
                fs = ooo.first_start
                if fs is not None and fs <= pos:
                    _, bend, pieces = ooo.pop_first()
                    for p in pieces:
                        rcvq.append(p)
                    if bend > pos:
                        pos = bend
                    continue
                if pos >= end:
                    break
                take = end if fs is None or fs > end else fs
                rcvq.append(bytes(payload[pos - start:take - start]))
                pos = take
            delivered = pos - start
        self.rcv_nxt = (self.rcv_nxt + delivered) & MASK
        self._rcv_abs += delivered
        self.stats.bytes_in += delivered
        ev = self._events
        if not ev or ev[-1] is not _DATA_RECEIVED:
            ev.append(_DATA_RECEIVED)
        if plen > self._rcv_mss:
            self._rcv_mss = plen if plen < self.settings.mss else self.settings.mss
        un = self._unacked_bytes + delivered
        self._unacked_bytes = un
        if had_ooo or un >= 2 * self._rcv_mss:
            self._ack_pending = True
        elif self._delack_deadline is None:
            self._delack_deadline = now + self.settings.delayed_ack

    def _on_peer_fin(self, now: float) -> None:
        self.rcv_nxt = (self.rcv_nxt + 1) & MASK
        self._peer_fin = True
        self._rcv_fin_seq = None
        self._clear_ooo()
        self._ack_pending = True
        self._events.append(PeerFinished())
        self._transition(Trigger.RCV_FIN, now)

    def _reset(self, now: float) -> None:
        self.stats.resets_in += 1
        st = self.state
        if st is not _TIME_WAIT:
            self._events.append(Reset(refused=st is _SYN_SENT))
        self._transition(Trigger.RCV_RST, now)

    def _challenge_allowed(self, now: float) -> bool:
        if now - self._chal_start >= 1.0:
            self._chal_start = now
            self._chal_count = 0
        if self._chal_count >= self.settings.challenge_ack_limit:
            self.stats.challenge_acks_suppressed += 1
            return False
        self._chal_count += 1
        return True

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 challenge ACK, rate limited (section 7)."""
        if self._challenge_allowed(now):
            self.stats.challenge_acks += 1
            self._ack_pending = True

    # ------------------------------------------------------------------ timers

    def _on_rto(self, now: float) -> None:
        st = self.state
        s = self.settings
        if st is _SYN_SENT or st is _SYN_RECEIVED:
            self._retries += 1
            if self._retries > s.syn_retries:
                self._timeout(now)
                return
            self.rto = min(self.rto * 2, s.rto_max)
            self.stats.rto_expirations += 1
            self._send_syn(now, retransmit=True)
            return
        una = self.snd_una
        if una == self.snd_max or st not in SENDS_DATA:
            return
        if self.snd_wnd == 0 and now - self._last_rcv <= 2 * s.rto_max:
            pass        # the peer shrank its window but is alive: retransmissions probe it
        else:
            self._retries += 1
            if self._retries > s.max_retries:
                self._timeout(now)
                return
        self.stats.rto_expirations += 1
        mss = self._eff_mss
        if not self._rto_episode:
            self.ssthresh = max(((self.snd_max - una) & MASK) // 2, 2 * mss)
            self._rto_episode = True
        self.cwnd = mss
        self._ca_acc = 0
        self._recovery = _REC_NONE
        self._dupacks = 0
        self._recover = self.snd_max
        self._sb.clear()                        # the receiver may renege (RFC 2018 8)
        self.snd_nxt = una
        self.rto = min(self.rto * 2, s.rto_max)
        self._retransmit_first(now)
        self._timer = now + self.rto
        self._timer_kind = _T_RTX

    def _on_persist(self, now: float) -> None:
        if self.state not in SENDS_DATA or self.snd_una != self.snd_max or not self._has_unsent():
            return
        room = ((self.snd_una + self.snd_wnd - self.snd_nxt + HALF) & MASK) - HALF
        if room > 0:
            return                              # the window is open: _output sends
        self._probes += 1
        if self._probes > self.settings.max_retries:
            self._timeout(now)
            return
        self.stats.persist_probes += 1
        # Linux-style probe: an old sequence number, no data; any live peer ACKs it.
        self._emit(Segment((self.snd_una - 1) & MASK, self.rcv_nxt, ACK, self._rcv_window(),
                           self._seg_options(now)))
        self._persist_backoff += 1
        self._timer = now + self._persist_interval()
        self._timer_kind = _T_PERSIST

    def _persist_interval(self) -> float:
        s = self.settings
        return min(max(self.rto, s.rto_min) * (1 << min(self._persist_backoff, 20)), s.rto_max)

    def _restart_time_wait(self, now: float) -> None:
        """A repeated FIN in TIME-WAIT restarts the wait, bounded at 2x from entry."""
        if self._timer_kind == _T_TIME_WAIT:
            tw = self.settings.time_wait
            self._timer = min(now + tw, self._tw_start + 2 * tw)

    def _timeout(self, now: float) -> None:
        self._events.append(TimedOut())
        self._transition(Trigger.TIMEOUT, now)

    # ------------------------------------------------------------------ output

    def _output(self, now: float) -> None:
        st = self.state
        if self._ack_dup:
            self._ack_dup = False
            if st is not _CLOSED:
                self._send_ack(now, dup=True)
        if st in SENDS_DATA:
            buf = self._sndbuf
            if self._recovery or self._fin_seq is not None or \
                    ((self.snd_nxt - self._snd_base_seq) & MASK) < buf.end - buf.start:
                self._send_data(now)
            self._update_timer(now)
        if self._ack_pending and st is not _CLOSED and st is not _SYN_SENT \
                and st is not _SYN_PENDING:
            self._send_ack(now, dup=False)

    def _send_data(self, now: float, flush: bool = False) -> None:
        buf = self._sndbuf
        una = self.snd_una
        seg_max = self._seg_max
        cwnd = self.cwnd
        win = -1                                # the window field, computed once per burst
        if self._recovery == _REC_SACK:
            pipe = self._sack_pipe()
            sb = self._sb
            if sb:
                hs = sb.highest
                while pipe < cwnd:
                    frm = self._high_rxt if self._high_rxt > buf.start else buf.start
                    hole = sb.next_hole(frm, hs)
                    if hole is None:
                        break
                    s, e = hole
                    n = e - s
                    if n > seg_max:
                        n = seg_max
                    seq = (self._snd_base_seq + (s - buf.start)) & MASK
                    if win < 0:
                        win = self._rcv_window()
                    self._note_retransmit(now, seq, self._xmit(seq, s, n, now, win))
                    self._high_rxt = s + n
                    pipe += n
        else:
            pipe = (self.snd_nxt - una) & MASK
        edge = (una + self.snd_wnd) & MASK
        fin_seq = self._fin_seq
        while True:
            nxt = self.snd_nxt
            nxt_abs = buf.start + ((nxt - self._snd_base_seq) & MASK)
            unsent = buf.end - nxt_abs
            if unsent <= 0 and (fin_seq is None or nxt != fin_seq):
                break
            wnd_room = ((edge - nxt + HALF) & MASK) - HALF
            room = cwnd - pipe
            if wnd_room < room:
                room = wnd_room
            if unsent > 0:
                n = unsent
                if n > seg_max:
                    n = seg_max
                if n > room:
                    n = room
                    if n <= 0:
                        break
                if n < seg_max:
                    if n < unsent:
                        if pipe > 0 and n < (self.max_snd_wnd >> 1):
                            break               # sender SWS avoidance (RFC 9293 3.8.6.2.1)
                    elif not flush and nxt == self.snd_max:
                        # The tail of what the application gave us: hold it until the
                        # batch ends (take_outgoing), so that consecutive send() calls
                        # fill whole segments and a FIN can ride on the last one.
                        self._cork = True
                        self._cork_now = now
                        break
            else:
                if wnd_room < 1:
                    break                       # FIN alone needs one byte of window
                n = 0
            retransmit = nxt != self.snd_max
            if win < 0:
                win = self._rcv_window()
            end = self._xmit(nxt, nxt_abs, n, now, win)
            if retransmit:
                self._note_retransmit(now, nxt, end)
            elif self._rtt_seq is None and not self.timestamps_enabled:
                self._rtt_start = nxt
                self._rtt_seq = end
                self._rtt_time = now
            self.snd_nxt = end
            pipe += (end - nxt) & MASK

    def _flush_cork(self) -> None:
        self._cork = False
        if self.state in SENDS_DATA:
            now = self._cork_now
            self._send_data(now, flush=True)
            self._update_timer(now)

    def _sack_pipe(self) -> int:
        """RFC 6675 pipe, simplified: holes below the highest SACK count as lost, and
        holes we retransmitted count as in flight again."""
        una_abs = self._sndbuf.start
        flight = (self.snd_max - self.snd_una) & MASK
        sb = self._sb
        if not sb:
            return flight
        hs = sb.highest
        sacked = sb.size
        lost = (hs - una_abs) - sacked
        hr = self._high_rxt if self._high_rxt < hs else hs
        rtx = (hr - una_abs) - sb.sacked_below(hr) if hr > una_abs else 0
        return flight - sacked - lost + rtx

    def _retransmit_first(self, now: float) -> None:
        """Retransmit the segment at SND.UNA regardless of windows (fast retransmit,
        RTO, NewReno partial ACK)."""
        buf = self._sndbuf
        una = self.snd_una
        start = buf.start
        n = buf.end - start
        if n > self._eff_mss:
            n = self._eff_mss
        sb = self._sb
        if sb and sb.starts[0] > start and sb.starts[0] - start < n:
            n = sb.starts[0] - start
        if n <= 0 and (self._fin_seq is None or una != self._fin_seq):
            return
        end = self._xmit(una, start, n, now)
        self._note_retransmit(now, una, end)
        d = (end - self.snd_nxt) & MASK
        if d and d < HALF:
            self.snd_nxt = end
        if start + n > self._high_rxt:
            self._high_rxt = start + n

    def _note_retransmit(self, now: float, seq: int, end: int) -> None:
        self.stats.retransmits += 1
        d = (end - self._rtx_high) & MASK
        if d and d < HALF:
            self._rtx_high = end
        rs = self._rtt_seq
        if rs is not None and ((seq - rs) & MASK) >= HALF \
                and ((self._rtt_start - end) & MASK) >= HALF:
            self._rtt_seq = None                # Karn: the timed segment was resent
        if self.timestamps_enabled:
            self._rtx_ts = self._tsval(now)

    def _xmit(self, seq: int, off: int, n: int, now: float, win: int = -1) -> int:
        """Emit ``n`` data bytes from absolute offset ``off`` at ``seq`` (plus our FIN when
        it comes next); returns the sequence number after the segment. ``win``: the
        window field, when the caller computed it for a burst (nothing arrives between
        the segments of one burst, so it is the same for all of them)."""
        flags = ACK
        end = (seq + n) & MASK
        if n:
            payload = self._sndbuf.read(off, n)
            if off + n == self._sndbuf.end:
                flags = ACK | PSH
            self.stats.bytes_out += n
        else:
            payload = b""
        if end == self._fin_seq and self._fin_seq is not None:
            flags |= FIN
            end = (end + 1) & MASK
        self._emit(Segment(seq, self.rcv_nxt, flags, win if win >= 0 else self._rcv_window(),
                           self._seg_options(now), payload))
        d = (end - self.snd_max) & MASK
        if d and d < HALF:
            self.snd_max = end
        if self._timer_kind != _T_RTX:
            self._timer = now + self.rto
            self._timer_kind = _T_RTX
        return end

    def _send_ack(self, now: float, dup: bool) -> None:
        """Queue a pure ACK. Plain ones are deferred to ``take_outgoing`` (built once, with
        the freshest state, and dropped if a later segment carries the ACK anyway);
        duplicate ACKs for out-of-order data and ACKs with SACK blocks go out as they are,
        kept distinct (the peer counts them for fast retransmit) up to a short run."""
        if dup or (self.sack_permitted and self._ooo._starts):
            self._pend_ack = False
            seg = self._make_ack(now)
            out = self._out
            if dup and self._out_dups >= _MAX_DUP_RUN:
                out[-1] = seg
            else:
                out.append(seg)
                self.stats.segments_out += 1
                self._out_dups = self._out_dups + 1 if dup else 0
        else:
            self._pend_ack = True
            self._pend_ack_now = now
            self._rcv_window()                  # the edge is decided now (sent at take)
        self._acked()

    def _make_ack(self, now: float) -> Segment:
        if self.sack_permitted and self._ooo._starts:
            opts = self._sack_options(now)
        else:
            opts = self._seg_options(now)
        # Sequence number: SND.MAX rather than a go-back-N-rewound SND.NXT, so the peer
        # finds the ACK acceptable; clamped to its window (Linux tcp_acceptable_seq).
        seq = self.snd_max
        if self.state is not _SYN_RECEIVED:
            edge = (self.snd_una + self.snd_wnd) & MASK
            d = (seq - edge) & MASK
            if d and d < HALF:
                seq = edge
        return Segment(seq, self.rcv_nxt, ACK, self._rcv_window(), opts)

    def _emit(self, seg: Segment) -> None:
        self._out.append(seg)
        self._out_dups = 0
        self.stats.segments_out += 1
        if seg.flags & ACK:
            self._pend_ack = False
            self._acked()

    def _acked(self) -> None:
        self._ack_pending = False
        self._unacked_bytes = 0
        self._delack_deadline = None
        self._last_ack_sent = self.rcv_nxt

    def _send_syn(self, now: float, retransmit: bool) -> None:
        if retransmit:
            self._note_retransmit(now, self.iss, (self.iss + 1) & MASK)
            self._rtt_seq = None
            o = self._syn_opts
            if o.timestamps is not None:
                o = TcpOptions(o.mss, o.wscale, o.sack_permitted, (),
                               (self._tsval(now), o.timestamps[1]))
                self._syn_opts = o
        elif self._syn_opts.timestamps is None:
            self._rtt_start = self.iss
            self._rtt_seq = (self.iss + 1) & MASK
            self._rtt_time = now
        win = min(self._rcv_free(), 0xFFFF)
        if self.state is _SYN_SENT:
            seg = Segment(self.iss, 0, SYN, win, self._syn_opts)
        else:
            seg = Segment(self.iss, self.rcv_nxt, SYN | ACK, win, self._syn_opts)
            self._rcv_adv = (self.rcv_nxt + win) & MASK
        self._emit(seg)
        self.snd_nxt = self.snd_max = (self.iss + 1) & MASK
        self._timer = now + self.rto
        self._timer_kind = _T_RTX

    def _update_timer(self, now: float) -> None:
        kind = self._timer_kind
        if kind == _T_TIME_WAIT:
            return
        if self.snd_max != self.snd_una:
            if kind != _T_RTX:
                self._timer = now + self.rto
                self._timer_kind = _T_RTX
        elif self._has_unsent() and not self._cork:
            if kind != _T_PERSIST:
                self._timer = now + self._persist_interval()
                self._timer_kind = _T_PERSIST
        elif kind != _T_NONE:
            self._timer = None
            self._timer_kind = _T_NONE

    def _has_unsent(self) -> bool:
        buf = self._sndbuf
        nxt = self.snd_nxt
        if buf.start + ((nxt - self._snd_base_seq) & MASK) < buf.end:
            return True
        return self._fin_seq is not None and nxt == self._fin_seq

    def _rcv_window(self) -> int:
        """The raw window field for an outgoing segment; advances the advertised right
        edge (never moves it left, RFC 9293 3.8.6.2.2) with receiver SWS avoidance."""
        ws = self._rcv_wscale
        rcv_nxt = self.rcv_nxt
        free = self._rcv_buffer - self._rcvq.size
        acct = self._acct
        if acct is not None:
            # The budget: what is left of it (out-of-order data inside the window is
            # charged already), but never less than the progress floor.
            total = acct.total
            allow = acct.limit - acct.used
            t = total.limit - total.used
            if t < allow:
                allow = t
            if allow < free:
                allow += self._ooo.size
                floor = self._floor_rcv - self._rcvq.size
                if floor > allow:
                    allow = floor
                if allow < free:
                    free = allow
                    total.window_limited += 1
        cur = (self._rcv_adv - rcv_nxt) & MASK
        if cur >= HALF:
            cur = 0
        if free < cur + self._sws:
            free = cur
        raw = free >> ws
        if (raw << ws) < cur:
            raw = (cur + (1 << ws) - 1) >> ws
        if raw > 0xFFFF:
            raw = 0xFFFF
        adv = raw << ws
        if adv > cur:
            self._rcv_adv = (rcv_nxt + adv) & MASK
        return raw

    def _rcv_free(self) -> int:
        """Receive buffer room, cut by the budget as in :meth:`_rcv_window` (no counting)."""
        free = self._rcv_buffer - self._rcvq.size
        acct = self._acct
        if acct is not None:
            allow = acct.room() + self._ooo.size
            floor = self._floor_rcv - self._rcvq.size
            if floor > allow:
                allow = floor
            if allow < free:
                free = allow
        return free

    def _drop_sndbuf(self) -> None:
        acct = self._acct
        if acct is not None:
            acct.charge(-len(self._sndbuf))
        self._sndbuf = SendBuffer()

    def _clear_ooo(self) -> None:
        acct = self._acct
        if acct is not None:
            acct.charge(-self._ooo.cost)
        self._ooo.clear()

    def _tsval(self, now: float) -> int:
        return (int(now * 1000.0) + self._ts_offset) & MASK

    def _seg_options(self, now: float) -> TcpOptions:
        if not self.timestamps_enabled:
            return NO_OPTIONS
        tsval = (int(now * 1000.0) + self._ts_offset) & MASK
        if tsval != self._opts_ts or self._ts_recent != self._opts_tsecr:
            self._opts = TcpOptions(timestamps=(tsval, self._ts_recent))
            self._opts_ts = tsval
            self._opts_tsecr = self._ts_recent
        return self._opts

    def _sack_options(self, now: float) -> TcpOptions:
        rcv_abs = self._rcv_abs
        rcv_nxt = self.rcv_nxt
        ts = None
        limit = 4
        if self.timestamps_enabled:
            ts = (self._tsval(now), self._ts_recent)
            limit = 3
        blocks = tuple(((rcv_nxt + s - rcv_abs) & MASK, (rcv_nxt + e - rcv_abs) & MASK)
                       for s, e in self._ooo.blocks(limit))
        return TcpOptions(timestamps=ts, sack_blocks=blocks)

    # ------------------------------------------------------------------ helpers

    def _negotiate(self, opts: TcpOptions, now: float, peer_syn: bool) -> None:
        """Options from the peer's SYN or SYN-ACK (RFC 7323: only what both sent)."""
        s = self.settings
        mss = opts.mss if opts.mss is not None else _DEFAULT_MSS
        self.peer_mss = max(s.min_peer_mss, min(mss, 65495))
        self._ws_ok = s.window_scaling and opts.wscale is not None
        if self._ws_ok:
            self._snd_wscale = min(opts.wscale, 14)
            self._rcv_wscale = s.rcv_wscale
        else:
            self._snd_wscale = self._rcv_wscale = 0
            self._rcv_buffer = min(self._rcv_buffer, 0xFFFF)
            self._sws = min(self._rcv_buffer // 2, s.mss)
        self.sack_permitted = s.sack and opts.sack_permitted
        self.timestamps_enabled = s.timestamps and opts.timestamps is not None and \
            (peer_syn or self._syn_opts.timestamps is not None)
        if self.timestamps_enabled:
            self._ts_recent = opts.timestamps[0] & MASK
            self._ts_recent_time = now
        self._set_mss()
        self.cwnd = self._initial_cwnd()
        self._cwnd_cap = max(s.snd_buffer, 4 * self._seg_max)

    def _set_mss(self) -> None:
        s = self.settings
        eff = min(self.peer_mss, s.mss) - (_TS_OVERHEAD if self.timestamps_enabled else 0)
        self._eff_mss = max(eff, 16)
        self._seg_max = max(s.tso_size, self._eff_mss) if s.tso_size else self._eff_mss

    def _initial_cwnd(self) -> int:
        mss = self._eff_mss
        iw = self.settings.initial_window
        if iw == 10:
            return min(10 * mss, max(2 * mss, 14600))   # RFC 6928
        return iw * mss

    def _rtt_sample(self, r: float) -> None:
        s = self.settings
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        rto = self.srtt + max(0.001, 4 * self.rttvar)
        self.rto = self._rto_base = \
            s.rto_min if rto < s.rto_min else (s.rto_max if rto > s.rto_max else rto)

    def _transition(self, trigger: Trigger, now: float) -> None:
        new = TRANSITIONS.get((self.state, trigger))
        if new is None:
            raise RuntimeError(f"TCP engine bug: no transition from {self.state.value} "
                               f"on {trigger.value}")
        self.state = new
        if new is _CLOSED:
            self._timer = None
            self._timer_kind = _T_NONE
            self._delack_deadline = None
            self._ack_pending = False
            self._ack_dup = False
            self._pend_ack = False
            self._cork = False
            self._drop_sndbuf()
            self._clear_ooo()
            self._sb.clear()
            self._events.append(Closed())
        elif new is _ESTABLISHED:
            self._events.append(Connected())
            if self._shutdown:
                self._transition(Trigger.SHUTDOWN, now)
        elif new is _TIME_WAIT:
            self._timer = now + self.settings.time_wait
            self._timer_kind = _T_TIME_WAIT
            self._tw_start = now
            self._drop_sndbuf()
            self._sb.clear()
