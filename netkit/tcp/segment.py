"""The engine's view of one TCP segment, and reset generation for closed ports.

Addresses and ports live outside the engine: the runtime demultiplexes on the 4-tuple,
converts a :class:`~netkit.wire.tcp.TcpView` into a :class:`Segment` (options parsed with
``TcpOptions.parse_untrusted``) and turns outgoing segments back into frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wire.tcp import ACK, FIN, RST, SYN, TcpOptions, flags_str

__all__ = ["Segment", "NO_OPTIONS", "rst_for", "is_connection_request", "segment_length"]

#: The shared "no options" value (``TcpOptions`` is immutable).
NO_OPTIONS = TcpOptions()

_MASK = 0xFFFFFFFF


@dataclass(slots=True)
class Segment:
    """One TCP segment without addresses or ports.

    ``window`` is the raw 16-bit field as on the wire (the engine applies window
    scaling). ``payload`` may be a ``memoryview`` into a frame buffer: the engine copies
    whatever it keeps, so the caller may reuse the buffer once ``receive_segment``
    returns. Outgoing payloads are ``bytes`` or read-only ``memoryview`` slices of
    immutable ``bytes`` and stay valid forever.

    Outgoing segments reuse one ``TcpOptions`` object for as long as its contents do
    not change, so a runtime may cache ``options.emit()`` by identity.
    """

    seq: int
    ack: int
    flags: int
    window: int
    options: TcpOptions = NO_OPTIONS
    payload: bytes | memoryview = b""

    def __len__(self) -> int:
        """Sequence space the segment occupies (payload, plus one each for SYN and FIN)."""
        return segment_length(self)

    def __repr__(self) -> str:
        extra = []
        o = self.options
        if o.mss is not None:
            extra.append(f"mss={o.mss}")
        if o.wscale is not None:
            extra.append(f"ws={o.wscale}")
        if o.sack_permitted:
            extra.append("sackOK")
        if o.timestamps is not None:
            extra.append(f"ts={o.timestamps[0]}/{o.timestamps[1]}")
        if o.sack_blocks:
            extra.append("sack=" + ",".join(f"{l}-{r}" for l, r in o.sack_blocks))
        tail = (" " + " ".join(extra)) if extra else ""
        return (f"<Segment {flags_str(self.flags)} seq={self.seq} ack={self.ack} "
                f"win={self.window} len={len(self.payload)}{tail}>")


def segment_length(seg: Segment) -> int:
    f = seg.flags
    return len(seg.payload) + (1 if f & SYN else 0) + (1 if f & FIN else 0)


def is_connection_request(seg: Segment) -> bool:
    """True for a segment that may open a connection: SYN without ACK, RST or FIN."""
    return seg.flags & (SYN | ACK | RST | FIN) == SYN


def rst_for(seg: Segment) -> Segment | None:
    """The reset to send for ``seg`` arriving where no connection exists (RFC 9293 3.10.7.1).

    Never answers a RST. If ``seg`` carries an ACK the reset takes its sequence number
    from that ACK; otherwise it has sequence 0 and acknowledges everything ``seg``
    occupied.
    """
    flags = seg.flags
    if flags & RST:
        return None
    if flags & ACK:
        return Segment(seg.ack & _MASK, 0, RST, 0)
    return Segment(0, (seg.seq + segment_length(seg)) & _MASK, RST | ACK, 0)
