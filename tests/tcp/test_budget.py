"""The engine under a buffer budget (netkit.budget): scripted peer, fake time.

At the budget the advertised window stops opening (never below one MSS for a flow that
holds nothing), out-of-order data is dropped, in-order data beyond what was allowed is
trimmed, the send space shrinks; every byte charged is returned on close or release.
"""

import random

import pytest

from netkit.budget import BufferBudget
from netkit.tcp import SendSpace, TcpSettings
from netkit.tcp.buffers import BLOCK_COST, PIECE_COST

from .helpers import ACK, FIN, PEER_ISS, passive, pure_acks
from .sim import run_transfer

MSS = 1460


def _edge(segment) -> int:
    """The right edge of the window a segment advertises (no window scaling)."""
    return segment.ack + segment.window


def test_window_stops_at_the_guest_budget_and_reopens_when_consumed():
    budget = BufferBudget(guest_limit=20_000, limit=1 << 30)
    acct = budget.account("guest")
    p = passive(account=acct)
    c = p.conn
    base = PEER_ISS + 1
    edges = []
    for _ in range(20):             # the application never reads
        edges += [_edge(s) for s in p.send(b"x" * MSS)]
        p.now += 0.05
        edges += [_edge(s) for s in p.tick(p.now)]
    assert edges and max(edges) <= base + 20_000
    assert acct.used == c.received_size == c.buffered_bytes <= 20_000 + MSS
    assert budget.window_limited > 0
    # the whole budget is held: the window is closed
    p.now += 1
    last = pure_acks(p.send(b"", flags=ACK))
    assert not last or _edge(last[-1]) - p.snd_nxt <= MSS
    # the application reads: the budget comes back and a window update opens it again
    c.consume(c.received_size, p.now)
    [update] = c.take_outgoing()
    assert acct.used == 0 and update.window >= 10_000


def test_flow_holding_nothing_gets_one_mss_when_the_budget_is_gone():
    """Other flows hold the whole budget: a fresh flow still advertises one MSS, takes
    it, and gets it again once its data has been consumed (no deadlock)."""
    budget = BufferBudget(guest_limit=100_000, limit=100_000)
    other = budget.account("other")
    other.charge(150_000)          # over the total
    acct = budget.account("guest")
    p = passive(account=acct)
    c = p.conn
    out = p.send(b"a" * MSS)
    assert c.received_size == MSS and acct.used == MSS
    c.consume(MSS, p.now)
    out += c.take_outgoing()
    assert acct.used == 0
    assert max(_edge(s) for s in out) - p.snd_nxt >= MSS  # one more MSS offered
    out = p.send(b"b" * MSS)
    assert c.received_size == MSS and budget.rcv_dropped == 0


def test_out_of_order_data_is_dropped_at_the_budget():
    budget = BufferBudget(guest_limit=40_000, limit=1 << 30)
    acct = budget.account("guest")
    p = passive(account=acct, window=65535)
    c = p.conn
    start = p.snd_nxt
    # The window we advertised covers only what the budget allowed then (40 000 bytes)...
    for k in range(1, 10):         # every other segment: all out of order
        p.send(b"o" * 1000, seq=start + 2000 * k, advance=False)
    assert budget.ooo_dropped == 0 and acct.used == c.buffered_bytes
    # ... but another flow of the guest takes most of the budget meanwhile.
    hog = 40_000 - acct.used - 5_000
    acct.charge(hog)
    for k in range(10, 20):
        p.send(b"o" * 1000, seq=start + 2000 * k, advance=False)
    assert acct.used - hog == c.buffered_bytes and acct.used <= 40_000
    assert budget.ooo_dropped > 0 and budget.ooo_dropped_bytes == 1000 * budget.ooo_dropped
    assert c.stats.ooo_dropped == budget.ooo_dropped_bytes and c.stats.ooo_segments == 19
    acct.charge(-hog)
    # The hole at the start is filled by the peer: data flows in order again and the
    # budget still holds (what was out of order moved to the receive queue).
    p.send(b"i" * 1000, seq=start)
    assert c.received_size >= 1000 and acct.used == c.buffered_bytes <= 40_000


def test_tiny_out_of_order_pieces_are_charged_their_overhead():
    budget = BufferBudget(guest_limit=100_000, limit=1 << 30)
    acct = budget.account("guest")
    p = passive(account=acct)
    c = p.conn
    for k in range(1, 200):
        p.send(b"z", seq=p.snd_nxt + 2 * k, advance=False)
    blocks = c._ooo.nblocks
    assert acct.used == c.buffered_bytes == blocks * (1 + PIECE_COST + BLOCK_COST)


def test_in_order_data_beyond_the_budget_is_trimmed_to_the_floor():
    """The window was advertised while there was room; meanwhile another flow took the
    budget. In-order data inside the old window is cut to the progress floor."""
    budget = BufferBudget(guest_limit=1 << 20, limit=1 << 20)
    acct = budget.account("guest")
    p = passive(account=acct)
    c = p.conn
    budget.account("hog").charge(1 << 20)
    out = p.send(b"d" * 3000)
    assert c.received_size == MSS and acct.used == MSS
    assert budget.rcv_dropped == 1 and budget.rcv_dropped_bytes == 3000 - MSS
    assert c.stats.budget_dropped == 3000 - MSS
    assert out and out[-1].ack == PEER_ISS + 1 + MSS
    # the peer retransmits the rest after the application read: accepted
    c.consume(MSS, p.now)
    c.take_outgoing()
    p.send(b"d" * (3000 - MSS), seq=PEER_ISS + 1 + MSS)
    assert c.received_size == MSS  # the floor again (the hog still holds the rest)


def test_fin_beyond_the_budget_waits_with_the_data():
    budget = BufferBudget(guest_limit=1 << 20, limit=1 << 20)
    acct = budget.account("guest")
    p = passive(account=acct)
    budget.account("hog").charge(1 << 20)
    p.send(b"d" * 3000, flags=ACK | FIN)
    assert not p.conn.peer_finished and p.conn.received_size == MSS


def test_send_space_follows_the_budget_and_acks_give_it_back():
    budget = BufferBudget(guest_limit=10_000, limit=1 << 30)
    acct = budget.account("guest")
    p = passive(account=acct, window=65535)
    c = p.conn
    assert c.send_space() == 10_000
    assert c.send(b"s" * 20_000, p.now) == 10_000
    assert acct.used == 10_000 and c.send_space() == 0 and budget.send_limited == 1
    out = c.take_outgoing()
    acked = sum(len(s.payload) for s in out)
    assert acked
    c.take_events()
    p.send(ack=c.snd_una + 4000)
    assert any(isinstance(e, SendSpace) for e in c.take_events())
    assert acct.used == 6_000 and c.send_space() == 4_000


def test_send_floor_when_the_total_is_gone():
    budget = BufferBudget(guest_limit=1 << 20, limit=1 << 20)
    budget.account("hog").charge(2 << 20)
    acct = budget.account("guest")
    p = passive(account=acct)
    c = p.conn
    assert c.send_space() == MSS          # min(mss, 4096)
    assert c.send(b"f" * 5000, p.now) == MSS
    assert c.send_space() == 0
    out = c.take_outgoing()
    p.send(ack=c.snd_max)
    assert c.send_space() == MSS and any(s.payload for s in out)


def test_close_and_release_return_every_byte():
    budget = BufferBudget(guest_limit=1 << 20, limit=1 << 20)
    acct = budget.account("guest")
    p = passive(account=acct, window=0)   # the peer reads nothing: our data waits
    c = p.conn
    c.send(b"s" * 5000, p.now)
    p.send(b"r" * 700)                    # in order, never consumed
    p.send(b"o" * 700, seq=p.snd_nxt + 1000, advance=False)  # out of order
    assert acct.used == c.buffered_bytes > 5000 + 700 + 700
    c.abort(p.now)                        # CLOSED: send and out-of-order queues go
    assert acct.used == c.received_size == 700
    c.release_buffers()
    assert acct.used == 0 and budget.used == 0 and c.account is None


def test_time_wait_releases_the_send_buffer():
    budget = BufferBudget(guest_limit=1 << 20, limit=1 << 20)
    acct = budget.account("guest")
    p = passive(account=acct)
    c = p.conn
    c.send(b"s" * 100, p.now)
    c.shutdown(p.now)
    c.take_outgoing()
    p.send(flags=ACK | FIN, ack=c.snd_max)
    assert c.state.name == "TIME_WAIT" and acct.used == 0


@pytest.mark.parametrize("seed", range(6))
def test_lossy_transfer_under_a_tight_budget(seed):
    """Both directions over a lossy, reordering channel with budgets far smaller than the
    data: the transfer completes byte for byte and the accounts match the buffers at
    every step (checked inside run_transfer)."""
    rng = random.Random(seed)
    data_a, data_b = rng.randbytes(300_000), rng.randbytes(200_000)
    budget = BufferBudget(guest_limit=24_000, limit=1 << 30)
    acct_a, acct_b = budget.account("a"), budget.account("b")
    r = run_transfer(seed, data_a, data_b, drop=0.03, dup=0.02, reorder=0.1, slow_reader=seed % 2 == 1,
                     settings_a=TcpSettings(sack=seed % 3 != 0), account_a=acct_a, account_b=acct_b)
    assert bytes(r.b.got) == data_a and bytes(r.a.got) == data_b
    assert acct_a.used == 0 and acct_b.used == 0 and budget.used == 0


def test_transfer_progresses_on_the_floor_alone():
    """The total is used up by others: one MSS at a time still gets everything across."""
    budget = BufferBudget(guest_limit=1 << 20, limit=1 << 20)
    budget.account("hog").charge(1 << 20)
    acct_a, acct_b = budget.account("a"), budget.account("b")
    data = random.Random(1).randbytes(100_000)
    r = run_transfer(1, data, b"", account_a=acct_a, account_b=acct_b, reorder=0.05)
    assert bytes(r.b.got) == data
    assert acct_a.used == acct_b.used == 0 and budget.used == 1 << 20
