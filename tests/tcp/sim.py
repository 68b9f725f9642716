"""Two engines over a seeded lossy channel with a fake clock (for the property tests)."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from netkit.tcp import (Closed, PeerFinished, Reset, Segment, TcpConnection, TcpSettings, TcpState,
                        TimedOut)


@dataclass
class Endpoint:
    name: str
    data: bytes                  # what this side's application sends
    settings: TcpSettings
    conn: TcpConnection | None = None
    sent: int = 0
    got: bytearray = field(default_factory=bytearray)
    finished: bool = False       # PeerFinished seen
    reset: bool = False
    timed_out: bool = False
    closed: bool = False
    read_limit: int | None = None  # bytes the app reads per step (None: everything)


@dataclass
class Result:
    a: Endpoint
    b: Endpoint
    now: float
    steps: int
    delivered: int
    dropped: int


def _app_step(ep: Endpoint, now: float, rng: random.Random) -> None:
    c = ep.conn
    if c is None:
        return
    while ep.sent < len(ep.data):
        space = c.send_space()
        if space <= 0:
            break
        n = min(space, rng.choice((1, 100, 1460, 8000, 65536)))
        taken = c.send(ep.data[ep.sent:ep.sent + n], now)
        if not taken:
            break
        ep.sent += taken
    if ep.sent == len(ep.data) and c.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT,
                                               TcpState.SYN_RECEIVED, TcpState.SYN_SENT):
        c.shutdown(now)
    avail = c.received_size
    if avail:
        n = avail if ep.read_limit is None else min(avail, ep.read_limit)
        ep.got += c.received()[:n]
        c.consume(n, now)


def _events(ep: Endpoint) -> None:
    for ev in ep.conn.take_events():
        if isinstance(ev, PeerFinished):
            ep.finished = True
        elif isinstance(ev, Reset):
            ep.reset = True
        elif isinstance(ev, TimedOut):
            ep.timed_out = True
        elif isinstance(ev, Closed):
            ep.closed = True


def run_transfer(seed: int, data_a: bytes, data_b: bytes, *, settings_a: TcpSettings | None = None,
                 settings_b: TcpSettings | None = None, drop: float = 0.0, dup: float = 0.0,
                 reorder: float = 0.0, latency: float = 0.005, slow_reader: bool = False,
                 max_time: float = 3000.0, max_steps: int = 200000, account_a=None,
                 account_b=None) -> Result:
    """``account_a`` / ``account_b``: buffer budget accounts (netkit.budget) the two
    engines charge; after every step each must hold exactly what it held before plus
    its engine's ``buffered_bytes``."""
    rng = random.Random(seed)
    base_a = account_a.used if account_a is not None else 0
    base_b = account_b.used if account_b is not None else 0

    def check_accounts() -> None:
        for ep, acct, base in ((a, account_a, base_a), (b, account_b, base_b)):
            if acct is not None and ep.conn is not None:
                assert acct.used == base + ep.conn.buffered_bytes, (ep.name, acct.used, base,
                                                                    ep.conn.buffered_bytes)
    a = Endpoint("a", data_a, settings_a or TcpSettings())
    b = Endpoint("b", data_b, settings_b or TcpSettings())
    if slow_reader:
        b.read_limit = rng.choice((100, 1000, 5000))
    now = 0.0
    a.conn = TcpConnection.connect(now, a.settings, iss=rng.getrandbits(32),
                                   ts_offset=rng.getrandbits(32), account=account_a)
    heap: list[tuple[float, int, str, Segment]] = []
    counter = 0
    delivered = dropped = 0

    def put(dest: str, segs: list[Segment]) -> None:
        nonlocal counter, dropped
        for s in segs:
            if rng.random() < drop:
                dropped += 1
                continue
            copies = 2 if rng.random() < dup else 1
            for _ in range(copies):
                delay = latency
                if rng.random() < reorder:
                    delay += rng.random() * latency * 4
                counter += 1
                heapq.heappush(heap, (now + delay, counter, dest, s))

    steps = 0
    while steps < max_steps:
        steps += 1
        # deliver everything due
        while heap and heap[0][0] <= now:
            _, _, dest, s = heapq.heappop(heap)
            delivered += 1
            if dest == "b":
                if b.conn is None:
                    if s.flags & 0x02 and not s.flags & 0x10:
                        b.conn = TcpConnection.from_syn(s, now, b.settings,
                                                        iss=rng.getrandbits(32),
                                                        ts_offset=rng.getrandbits(32),
                                                        account=account_b)
                        b.conn.accept(now)
                    continue
                b.conn.receive_segment(s, now)
            else:
                a.conn.receive_segment(s, now)
        for ep in (a, b):
            if ep.conn is not None:
                _app_step(ep, now, rng)
                _events(ep)
        put("b", a.conn.take_outgoing())
        if b.conn is not None:
            put("a", b.conn.take_outgoing())
        check_accounts()
        if a.closed and (b.conn is None or b.closed) and not heap:
            break
        # advance the clock to the next thing that happens
        candidates = [heap[0][0]] if heap else []
        for ep in (a, b):
            if ep.conn is not None:
                t = ep.conn.get_timer()
                if t is not None:
                    candidates.append(t)
        if slow_reader and b.conn is not None and b.conn.received_size:
            candidates.append(now + 0.01)
        if not candidates:
            break
        nxt = min(candidates)
        if nxt > now:
            now = nxt
        if now > max_time:
            break
        for ep in (a, b):
            if ep.conn is not None:
                t = ep.conn.get_timer()
                if t is not None and t <= now:
                    ep.conn.handle_timer(now)
                    _events(ep)
    for ep in (a, b):                    # what the slow reader left behind
        if ep.conn is not None and ep.conn.received_size:
            ep.got += ep.conn.received()
            ep.conn.consume(ep.conn.received_size, now)
    check_accounts()
    return Result(a, b, now, steps, delivered, dropped)
