"""Scripted-peer helpers for the TCP engine tests (fake time, hand-made segments)."""

from __future__ import annotations

from netkit.tcp import Segment, TcpConnection, TcpSettings, TcpState
from netkit.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions

__all__ = ["ACK", "FIN", "PSH", "RST", "SYN", "PEER_ISS", "OUR_ISS", "seg", "opts", "passive",
           "active", "Peer", "data_segs", "pure_acks"]

PEER_ISS = 1000
OUR_ISS = 5000
M = 0xFFFFFFFF


def opts(**kw) -> TcpOptions:
    return TcpOptions(**kw)


def seg(seq: int, ack: int = 0, flags: int = ACK, window: int = 65535, payload: bytes = b"",
        options: TcpOptions | None = None, **kw) -> Segment:
    if options is None:
        options = TcpOptions(**kw) if kw else TcpOptions()
    return Segment(seq & M, ack & M, flags, window, options, payload)


def data_segs(out: list[Segment]) -> list[Segment]:
    return [s for s in out if s.payload or s.flags & (SYN | FIN)]


def pure_acks(out: list[Segment]) -> list[Segment]:
    return [s for s in out if s.flags == ACK and not s.payload]


class Peer:
    """A scripted peer's sequence state plus the connection under test."""

    def __init__(self, conn: TcpConnection, snd_nxt: int, now: float = 0.0,
                 window: int = 65535, ts: bool = False, tsval: int = 1) -> None:
        self.conn = conn
        self.snd_nxt = snd_nxt & M     # the peer's next sequence number
        self.now = now
        self.window = window
        self.ts = ts
        self.tsval = tsval

    @property
    def ack(self) -> int:
        """What the peer acknowledges by default: everything the connection sent."""
        return self.conn.snd_max

    def options(self, **kw) -> TcpOptions:
        if "options" in kw:
            return kw["options"]
        if self.ts and "timestamps" not in kw:
            kw["timestamps"] = (self.tsval & M, self.conn._tsval(self.now))
        return TcpOptions(**kw)

    def send(self, payload: bytes = b"", flags: int = ACK, *, seq: int | None = None,
             ack: int | None = None, window: int | None = None, advance: bool = True,
             **kw) -> list[Segment]:
        """Deliver one segment to the connection; returns what it sent back."""
        s = Segment(self.snd_nxt if seq is None else seq & M,
                    (self.ack if ack is None else ack) & M,
                    flags, self.window if window is None else window,
                    self.options(**kw), payload)
        if advance and seq is None:
            self.snd_nxt = (self.snd_nxt + len(payload) + (1 if flags & FIN else 0)
                            + (1 if flags & SYN else 0)) & M
        self.conn.receive_segment(s, self.now)
        return self.conn.take_outgoing()

    def tick(self, until: float | None = None) -> list[Segment]:
        """Advance fake time to the connection's next timer (or ``until``) and fire it."""
        t = self.conn.get_timer() if until is None else until
        assert t is not None, "no timer armed"
        self.now = max(self.now, t)
        self.conn.handle_timer(self.now)
        return self.conn.take_outgoing()

    def out(self) -> list[Segment]:
        return self.conn.take_outgoing()

    def events(self) -> list:
        return self.conn.take_events()


def passive(settings: TcpSettings | None = None, *, mss: int | None = 1460,
            wscale: int | None = None, sack: bool = False, ts: bool = False,
            window: int = 65535, now: float = 0.0, account=None) -> Peer:
    """An ESTABLISHED connection opened by a scripted peer (the common server case).

    Defaults: the peer sends no window scaling, SACK or timestamps, so raw windows are
    bytes and segments carry no options. ``account``: a buffer budget account.
    """
    settings = settings or TcpSettings()
    syn = seg(PEER_ISS, 0, SYN, window, options=TcpOptions(
        mss=mss, wscale=wscale, sack_permitted=sack, timestamps=(1, 0) if ts else None))
    conn = TcpConnection.from_syn(syn, now, settings, iss=OUR_ISS, ts_offset=0, account=account)
    assert conn.state is TcpState.SYN_PENDING and not conn.take_outgoing()
    conn.accept(now)
    [synack] = conn.take_outgoing()
    assert synack.flags == SYN | ACK and synack.seq == OUR_ISS and synack.ack == PEER_ISS + 1
    peer = Peer(conn, PEER_ISS + 1, now, window, ts=ts, tsval=2)
    assert peer.send() == []
    assert conn.state is TcpState.ESTABLISHED
    assert [type(e).__name__ for e in conn.take_events()] == ["Connected"]
    return peer


def active(settings: TcpSettings | None = None, *, mss: int | None = 1460,
           wscale: int | None = None, sack: bool = False, ts: bool = False,
           window: int = 65535, now: float = 0.0) -> Peer:
    """An ESTABLISHED connection we opened towards a scripted peer."""
    settings = settings or TcpSettings()
    conn = TcpConnection.connect(now, settings, iss=OUR_ISS, ts_offset=0)
    [syn] = conn.take_outgoing()
    assert syn.flags == SYN and syn.seq == OUR_ISS
    peer = Peer(conn, PEER_ISS, now, window, ts=ts, tsval=2)
    o = TcpOptions(mss=mss, wscale=wscale, sack_permitted=sack,
                   timestamps=(1, syn.options.timestamps[0]) if ts else None)
    out = peer.send(flags=SYN | ACK, ack=OUR_ISS + 1, options=o)
    assert conn.state is TcpState.ESTABLISHED
    assert [(s.flags, s.seq, s.ack) for s in out] == [(ACK, OUR_ISS + 1, PEER_ISS + 1)]
    conn.take_events()
    return peer
