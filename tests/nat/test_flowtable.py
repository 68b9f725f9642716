"""IdleFlowTable: per-guest shares, the total cap, and who gets evicted."""

import collections
from dataclasses import dataclass

from netkit.nat.flowtable import IdleFlowTable


@dataclass(eq=False)
class Flow:
    owner: str
    n: int
    last_active: float = 0.0
    released: bool = False


def table(max_flows=8, per_owner=4):
    counters = collections.Counter()
    released = []

    def release(flow):
        flow.released = True
        released.append(flow)

    t = IdleFlowTable(max_flows=max_flows, idle_timeout=60.0, release=release, counters=counters,
                      max_flows_per_owner=per_owner, owner=lambda flow: flow.owner)
    return t, counters, released


def add(t, owner, n):
    flow = Flow(owner, n)
    t.add((owner, n), flow, 0.0)
    return flow


def test_a_guest_over_its_share_evicts_its_own_least_recently_used():
    t, counters, released = table()
    victim = [add(t, "victim", i) for i in range(2)]
    mine = [add(t, "attacker", i) for i in range(4)]
    t.get(("attacker", 0))  # now the attacker's most recently used
    add(t, "attacker", 4)
    assert released == [mine[1]]
    assert counters["flows-evicted-guest-share"] == 1 and counters["flows-evicted"] == 1
    assert t.owner_count("attacker") == 4 and t.owner_count("victim") == 2
    for n in range(5, 1000):
        add(t, "attacker", n)
    assert not any(flow.released for flow in victim)
    assert t.get(("victim", 0)) is victim[0] and t.get(("victim", 1)) is victim[1]
    assert t.owner_count("attacker") == 4
    assert counters["flows-evicted-guest-share"] == 1000 - 4
    assert counters["flows-evicted-table-full"] == 0


def test_a_full_table_evicts_from_the_guest_holding_the_most():
    t, counters, released = table(max_flows=8, per_owner=5)
    a = [add(t, "a", i) for i in range(5)]
    b = [add(t, "b", i) for i in range(3)]
    assert len(t) == 8
    c = add(t, "c", 0)  # full: "a" holds the most and gives up its least recently used
    assert released == [a[0]]
    assert counters["flows-evicted-table-full"] == 1
    add(t, "c", 1)  # a (4) still holds the most
    assert released == [a[0], a[1]]
    add(t, "b", 3)  # a 3, b 3, c 2: a tie between a and b; c, the smallest, is never the one
    assert not c.released
    assert len(t) == 8 and t.owner_count("c") == 2
    assert t.owner_count("a") + t.owner_count("b") == 6


def test_the_biggest_owner_is_tracked_as_flows_come_and_go():
    t, counters, released = table(max_flows=6, per_owner=6)
    a = [add(t, "a", i) for i in range(4)]
    b = [add(t, "b", i) for i in range(2)]
    for flow in a[:3]:
        t.remove(flow)  # a: 1, b: 2
    add(t, "c", 0)
    add(t, "c", 1)
    add(t, "c", 2)  # a 1, b 2, c 3 = 6: full
    add(t, "a", 9)  # c holds the most
    assert t.owner_count("c") == 2 and t.owner_count("a") == 2 and t.owner_count("b") == 2
    assert not any(flow.released for flow in b)


def test_remove_owner_and_expiry_keep_the_books():
    t, counters, released = table()
    a = [add(t, "a", i) for i in range(3)]
    add(t, "b", 0)
    t.remove_owner("a")
    assert all(flow.released for flow in a)
    assert t.owner_count("a") == 0 and len(t) == 1
    t.remove(a[0])  # idempotent
    assert len(released) == 3
    t._expire(t.get(("b", 0)), 100.0)
    assert len(t) == 0 and counters["flows-expired"] == 1
    add(t, "a", 0)  # the books are empty again: nothing evicted
    assert counters["flows-evicted"] == 0


def test_without_owners_it_is_one_lru():
    counters = collections.Counter()
    t = IdleFlowTable(max_flows=3, idle_timeout=60.0, release=lambda flow: None, counters=counters)
    flows = [Flow("x", i) for i in range(3)]
    for i, flow in enumerate(flows):
        t.add(i, flow, 0.0)
    t.get(0)
    t.add(3, Flow("x", 3), 0.0)
    assert t.get(1) is None and t.get(0) is flows[0]
    assert counters["flows-evicted"] == 1
