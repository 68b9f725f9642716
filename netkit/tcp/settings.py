"""Per-connection TCP tuning: one immutable object, shared by many connections."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TcpSettings"]


def _derive_wscale(rcv_buffer: int) -> int:
    shift = 0
    while shift < 14 and (rcv_buffer >> shift) > 0xFFFF:
        shift += 1
    return shift


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """Knobs of the TCP engine. Times are seconds, sizes bytes.

    Build one per link (``TcpSettings.for_mtu(mtu)``) and pass it to every connection.
    """

    #: The MSS we advertise: the most payload we accept per segment (link MTU - 40).
    #: Also caps what we send, whatever the peer advertises.
    mss: int = 1460
    #: Receive buffer: the most in-order data held for the application; the advertised
    #: window is this minus what the application has not consumed yet.
    rcv_buffer: int = 1 << 20
    #: Send buffer: the most data ``send`` accepts that the peer has not acknowledged.
    snd_buffer: int = 1 << 20
    #: Our window-scale shift; ``None`` derives the smallest shift that covers rcv_buffer.
    wscale: int | None = None
    window_scaling: bool = True
    sack: bool = True
    timestamps: bool = True
    rto_min: float = 0.2
    rto_max: float = 60.0
    rto_initial: float = 1.0
    #: Longest an ACK for in-order data may be delayed.
    delayed_ack: float = 0.04
    #: How long a connection that closed first lingers in TIME-WAIT (much less than 2 MSL).
    time_wait: float = 2.0
    #: Consecutive unanswered retransmissions (or window probes) before TimedOut.
    max_retries: int = 15
    #: SYN / SYN-ACK retransmissions before TimedOut.
    syn_retries: int = 6
    #: Cap on bytes held in the out-of-order queue (None: rcv_buffer); beyond, dropped.
    max_ooo_bytes: int | None = None
    #: Cap on separate pieces held in the out-of-order queue.
    max_ooo_segments: int = 4096
    #: Challenge ACKs (RFC 5961) sent per second at most, per connection.
    challenge_ack_limit: int = 10
    #: When the link segments for us (GSO/TSO): the most payload per emitted data
    #: segment. The link must cut it at ``TcpConnection.send_mss``. None: cut at the MSS.
    tso_size: int | None = None
    #: Initial congestion window in segments (RFC 6928).
    initial_window: int = 10
    #: Smallest peer MSS we honour (a tiny MSS would make us send tiny segments).
    min_peer_mss: int = 64

    _wscale: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        if not 64 <= self.mss <= 65495:
            raise ValueError(f"mss {self.mss} outside 64..65495")
        if self.rcv_buffer < self.mss or self.rcv_buffer > (0xFFFF << 14):
            raise ValueError(f"rcv_buffer {self.rcv_buffer} must be in mss..{0xFFFF << 14}")
        if self.snd_buffer < 1:
            raise ValueError("snd_buffer must be positive")
        if self.wscale is not None and not 0 <= self.wscale <= 14:
            raise ValueError("wscale must be in 0..14")
        if not 0 < self.rto_min <= self.rto_initial <= self.rto_max:
            raise ValueError("need 0 < rto_min <= rto_initial <= rto_max")
        if self.delayed_ack < 0 or self.time_wait < 0:
            raise ValueError("delayed_ack and time_wait must not be negative")
        if self.max_retries < 1 or self.syn_retries < 0:
            raise ValueError("max_retries must be >= 1 and syn_retries >= 0")
        if self.tso_size is not None and not self.mss <= self.tso_size <= 65535 * 4:
            raise ValueError("tso_size must be at least mss")
        if self.challenge_ack_limit < 0 or self.initial_window < 1 or self.max_ooo_segments < 1:
            raise ValueError("bad challenge_ack_limit, initial_window or max_ooo_segments")
        if not 48 <= self.min_peer_mss <= self.mss:
            raise ValueError("min_peer_mss must be in 48..mss")
        ws = self.wscale
        if ws is None:
            ws = _derive_wscale(self.rcv_buffer)
        elif (self.rcv_buffer >> ws) > 0xFFFF:
            raise ValueError(f"wscale {ws} too small for rcv_buffer {self.rcv_buffer}")
        if not self.window_scaling and self.rcv_buffer > 0xFFFF:
            raise ValueError("rcv_buffer above 65535 needs window_scaling")
        object.__setattr__(self, "_wscale", ws)

    @property
    def rcv_wscale(self) -> int:
        """The window-scale shift we advertise (derived when ``wscale`` is None)."""
        return self._wscale

    @property
    def ooo_cap(self) -> int:
        return self.rcv_buffer if self.max_ooo_bytes is None else self.max_ooo_bytes

    @classmethod
    def for_mtu(cls, mtu: int, **kw) -> "TcpSettings":
        """Settings whose MSS fits an IPv4 link MTU (MTU - 20 IP - 20 TCP)."""
        return cls(mss=min(mtu - 40, 65495), **kw)
