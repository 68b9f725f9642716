"""LeaseTable: allocation policy, expiry, history, static leases, quarantine, persistence."""

from __future__ import annotations

import hashlib
import json
import math
from ipaddress import IPv4Address

import pytest
from dhcp_helpers import MAC_A, MAC_B, MAC_C, tiny_config

from netkit.config import Config, ConfigError, StaticLease
from netkit.dhcp import BOUND, OFFERED, LeaseError, LeaseTable


def mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, n >> 8, n & 0xFF])


def hashed_ip(config: Config, client_mac: bytes) -> IPv4Address:
    pool = config.pool()
    index = int.from_bytes(hashlib.sha256(client_mac).digest()[:8], "big") % len(pool)
    return IPv4Address(pool[index])


# ----- first choice, determinism -----

def test_first_address_is_a_hash_of_the_mac_and_survives_a_fresh_table():
    config = Config()
    first = LeaseTable(config).offer(MAC_A, 0.0)
    again = LeaseTable(config).offer(MAC_A, 100.0)
    assert first.ip == again.ip == hashed_ip(config, MAC_A)
    assert LeaseTable(config).offer(MAC_B, 0.0).ip == hashed_ip(config, MAC_B)


def test_hash_collision_scans_forward_to_the_next_free_address():
    config = Config()
    table = LeaseTable(config)
    target = hashed_ip(config, MAC_A)
    other = next(m for m in (mac(n) for n in range(100, 5000)) if hashed_ip(config, m) == target)
    assert table.offer(other, 0.0).ip == target
    ip = table.offer(MAC_A, 0.0).ip
    assert ip == target + 1 or (target == config.highest_ip and ip == config.lowest_ip)


def test_offer_prefers_requested_address_when_free():
    table = LeaseTable(Config())
    assert table.offer(MAC_A, 0.0, requested_ip=IPv4Address("192.168.65.77")).ip == IPv4Address("192.168.65.77")
    # Taken by A, so B's request is not honoured.
    assert table.offer(MAC_B, 0.0, requested_ip=IPv4Address("192.168.65.77")).ip != IPv4Address("192.168.65.77")
    # Outside the pool (the gateway) is never honoured.
    assert table.offer(MAC_C, 0.0, requested_ip=IPv4Address("192.168.65.1")).ip != IPv4Address("192.168.65.1")


def test_repeated_offer_returns_the_same_lease_and_refreshes_it():
    config = Config()
    table = LeaseTable(config)
    first = table.offer(MAC_A, 0.0)
    again = table.offer(MAC_A, 20.0)
    assert again is first and again.state == OFFERED
    assert again.expires == 20.0 + config.offer_seconds


def test_discover_while_bound_keeps_the_bound_lease():
    config = Config()
    table = LeaseTable(config)
    ip = table.offer(MAC_A, 0.0).ip
    table.bind(MAC_A, ip, 1.0)
    lease = table.offer(MAC_A, 50.0)
    assert lease.state == BOUND and lease.ip == ip and lease.expires == 1.0 + config.lease_seconds


# ----- never hand out reserved addresses -----

def test_never_gateway_host_network_or_broadcast():
    # A pool that covers the gateway (.1) and host (.2) addresses: only .3 and .4 are usable.
    config = Config(lowest_ip=IPv4Address("192.168.65.1"), highest_ip=IPv4Address("192.168.65.4"))
    table = LeaseTable(config)
    given = {table.offer(mac(n), 0.0).ip for n in range(2)}
    assert given == {IPv4Address("192.168.65.3"), IPv4Address("192.168.65.4")}
    assert table.offer(mac(3), 0.0) is None
    assert table.bind(mac(4), IPv4Address("192.168.65.1"), 0.0) is None
    assert table.bind(mac(4), IPv4Address("192.168.65.0"), 0.0) is None
    assert table.bind(mac(4), IPv4Address("192.168.65.255"), 0.0) is None


def test_pool_exhaustion_and_table_bounded_by_pool():
    table = LeaseTable(tiny_config(3))
    leases = [table.offer(mac(n), 0.0) for n in range(10)]
    assert sum(lease is not None for lease in leases) == 3
    assert len(table.leases()) == 3
    assert len({lease.ip for lease in leases if lease}) == 3


# ----- expiry -----

def test_offer_expires_quickly_and_frees_the_pool():
    config = tiny_config(1)
    table = LeaseTable(config)
    assert table.offer(MAC_A, 0.0) is not None
    assert table.offer(MAC_B, 1.0) is None  # the only address is held by A's offer
    assert table.next_expiry() == config.offer_seconds
    expired = table.expire(config.offer_seconds)
    assert [lease.mac for lease in expired] == [MAC_A]
    assert table.offer(MAC_B, config.offer_seconds + 1).ip == config.lowest_ip
    assert table.next_expiry() == 2 * config.offer_seconds + 1


def test_expired_leases_are_dropped_lazily_and_reported_once():
    config = tiny_config(1)
    table = LeaseTable(config)
    ip = table.offer(MAC_A, 0.0).ip
    table.bind(MAC_A, ip, 0.0)
    later = config.lease_seconds + 1.0
    # B's DISCOVER after A's lease ran out finds the address free.
    assert table.offer(MAC_B, later).ip == ip
    assert table.lookup_mac(MAC_A) is None
    reported = table.expire(later)
    assert [(lease.mac, lease.ip) for lease in reported] == [(MAC_A, ip)]
    assert table.expire(later) == []


def test_bound_lease_expires_after_lease_seconds_not_before():
    config = Config()
    table = LeaseTable(config)
    ip = table.offer(MAC_A, 0.0).ip
    table.bind(MAC_A, ip, 10.0)
    assert table.expire(10.0 + config.lease_seconds - 1) == []
    assert table.lookup_ip(ip).mac == MAC_A
    assert [lease.ip for lease in table.expire(10.0 + config.lease_seconds)] == [ip]
    assert table.lookup_ip(ip) is None


def test_renewals_do_not_grow_the_expiry_heap_without_bound():
    table = LeaseTable(Config())
    ip = table.offer(MAC_A, 0.0).ip
    for t in range(10_000):
        assert table.bind(MAC_A, ip, float(t)) is not None
    assert len(table._expiry_heap) < 200


# ----- history: the same MAC gets the same address back -----

def test_same_address_after_expiry_while_no_one_took_it():
    config = Config()
    table = LeaseTable(config)
    ip = table.offer(MAC_A, 0.0).ip
    table.bind(MAC_A, ip, 0.0)
    table.expire(1e6)
    assert table.lookup_mac(MAC_A) is None
    for n in range(20):  # other guests come and go, but the hash spreads them elsewhere
        other = table.offer(mac(100 + n), 1e6)
        assert other.ip != ip
    assert table.offer(MAC_A, 1e6 + 1).ip == ip


def test_history_yields_when_the_pool_has_nothing_else():
    table = LeaseTable(tiny_config(2))
    a_ip = table.offer(MAC_A, 0.0).ip
    assert table.release(MAC_A, a_ip)
    b_ip = table.offer(MAC_B, 1.0).ip
    assert b_ip != a_ip  # the never-used address is preferred over A's remembered one
    assert table.offer(MAC_C, 2.0).ip == a_ip  # nothing else left: C takes A's old address
    assert table.offer(MAC_A, 3.0) is None


def test_released_address_comes_back_to_its_owner():
    table = LeaseTable(Config())
    ip = table.offer(MAC_A, 0.0).ip
    table.bind(MAC_A, ip, 0.0)
    assert table.release(MAC_A, ip)
    assert not table.release(MAC_A, ip)
    assert table.offer(MAC_A, 5.0).ip == ip


def test_release_of_someone_elses_address_is_refused():
    table = LeaseTable(Config())
    ip = table.offer(MAC_A, 0.0).ip
    assert not table.release(MAC_B, ip)
    assert table.lookup_ip(ip).mac == MAC_A


# ----- bind -----

def test_bind_rules():
    config = tiny_config(4, static_leases=(StaticLease(IPv4Address("192.168.65.12"), mac=MAC_C),))
    table = LeaseTable(config)
    a = table.offer(MAC_A, 0.0).ip
    assert table.bind(MAC_B, a, 0.0) is None  # held by A
    assert table.bind(MAC_B, IPv4Address("192.168.65.12"), 0.0) is None  # C's static address
    assert table.bind(MAC_B, IPv4Address("192.168.65.50"), 0.0) is None  # outside the pool
    assert table.bind(MAC_B, IPv4Address("10.0.0.5"), 0.0) is None  # outside the subnet
    assert table.bind(MAC_C, IPv4Address("192.168.65.11"), 0.0) is None  # C may only have its own
    lease = table.bind(MAC_A, a, 1.0, hostname="alpha", client_id=b"\x01abc")
    assert (lease.state, lease.hostname, lease.client_id) == (BOUND, "alpha", b"\x01abc")


def test_bind_to_another_free_address_moves_the_lease():
    table = LeaseTable(tiny_config(4))
    first = table.offer(MAC_A, 0.0).ip
    other = next(IPv4Address(n) for n in tiny_config(4).pool() if IPv4Address(n) != first)
    lease = table.bind(MAC_A, other, 1.0)
    assert lease.ip == other
    assert table.lookup_ip(first) is None
    assert len(table.leases()) == 1


# ----- static leases -----

def test_static_lease_by_mac_even_outside_the_pool():
    static_ip = IPv4Address("192.168.65.200")
    config = tiny_config(4, static_leases=(StaticLease(static_ip, mac=MAC_A),))
    table = LeaseTable(config)
    lease = table.offer(MAC_A, 0.0, requested_ip=IPv4Address("192.168.65.10"))
    assert lease.ip == static_ip and lease.static
    assert table.bind(MAC_A, static_ip, 0.0).static


def test_static_address_inside_the_pool_is_never_given_to_others():
    static_ip = IPv4Address("192.168.65.10")
    table = LeaseTable(tiny_config(2, static_leases=(StaticLease(static_ip, mac=MAC_A),)))
    assert table.offer(MAC_B, 0.0, requested_ip=static_ip).ip == IPv4Address("192.168.65.11")
    assert table.offer(MAC_C, 0.0) is None  # A's address stays free for A
    assert table.offer(MAC_A, 0.0).ip == static_ip


def test_static_lease_by_uuid_applies_once_associated():
    static_ip = IPv4Address("192.168.65.10")
    config = tiny_config(3, static_leases=(StaticLease(static_ip, uuid="vm-1"),))
    table = LeaseTable(config)
    before = table.offer(MAC_A, 0.0)
    assert before.ip != static_ip
    table.associate_uuid("vm-1", MAC_A)
    after = table.offer(MAC_A, 1.0)
    assert after.ip == static_ip and after.uuid == "vm-1" and after.static
    assert table.lookup_ip(before.ip) is None  # the pool lease it had is dropped
    table.bind(MAC_A, static_ip, 1.0)
    # The guest restarts with a new MAC: the UUID's address follows it.
    table.associate_uuid("vm-1", MAC_B)
    assert table.lookup_mac(MAC_A) is None
    assert [lease.mac for lease in table.expire(2.0)] == [MAC_A]
    assert table.offer(MAC_B, 2.0).ip == static_ip
    assert table.offer(MAC_A, 2.0).ip != static_ip


def test_uuid_map_is_bounded():
    table = LeaseTable(tiny_config(2, max_ports=8))
    for n in range(50):
        table.associate_uuid(f"vm-{n}", mac(n))
    assert len(table._uuid_to_mac) == len(table._mac_to_uuid) == 8
    assert table._uuid_to_mac["vm-49"] == mac(49)  # the newest are kept


def test_config_rejects_conflicting_static_leases():
    ip = IPv4Address("192.168.65.50")
    with pytest.raises(ConfigError):
        Config(static_leases=(StaticLease(ip, mac=MAC_A), StaticLease(ip, mac=MAC_B)))
    with pytest.raises(ConfigError):
        Config(static_leases=(StaticLease(ip, mac=MAC_A), StaticLease(ip + 1, mac=MAC_A)))
    with pytest.raises(ConfigError):
        Config(static_leases=(StaticLease(IPv4Address("192.168.65.1"), mac=MAC_A),))


# ----- decline -----

def test_decline_quarantines_the_address():
    config = tiny_config(2, decline_seconds=600.0, decline_max_pool_fraction=0.5)
    table = LeaseTable(config)
    ip = table.offer(MAC_A, 0.0).ip
    table.bind(MAC_A, ip, 0.0)
    assert not table.decline(MAC_B, ip, 1.0)  # only the holder may decline
    assert table.decline(MAC_A, ip, 1.0)
    assert table.is_quarantined(ip, 1.0)
    other = table.offer(MAC_A, 2.0).ip
    assert other != ip  # not even for the client that declined it
    assert table.offer(MAC_B, 2.0) is None  # the pool's other address is quarantined
    assert table.bind(MAC_B, ip, 3.0) is None
    assert table.offer(MAC_B, 601.0).ip == ip  # quarantine over


def test_decline_of_static_address_does_not_quarantine():
    static_ip = IPv4Address("192.168.65.10")
    table = LeaseTable(tiny_config(2, static_leases=(StaticLease(static_ip, mac=MAC_A),)))
    table.bind(MAC_A, static_ip, 0.0)
    assert table.decline(MAC_A, static_ip, 1.0)
    assert not table.is_quarantined(static_ip, 1.0)
    assert table.offer(MAC_A, 2.0).ip == static_ip


# ----- reserve -----

def test_reserve_chooses_like_offer_and_never_expires():
    config = Config()
    table = LeaseTable(config)
    lease = table.reserve(MAC_A, 0.0)
    assert lease.ip == hashed_ip(config, MAC_A)
    assert lease.state == BOUND and lease.pinned and lease.expires == math.inf
    assert table.expire(1e12) == []
    assert table.next_expiry() is None
    # A DHCP renewal from the same guest keeps it pinned.
    assert table.bind(MAC_A, lease.ip, 5.0).expires == math.inf
    assert table.release(MAC_A, lease.ip)


def test_reserve_explicit_address_and_conflicts():
    static_ip = IPv4Address("192.168.65.200")
    config = Config(static_leases=(StaticLease(static_ip, mac=MAC_C),), decline_seconds=100.0)
    table = LeaseTable(config)
    ip = IPv4Address("192.168.65.50")
    lease = table.reserve(MAC_A, 0.0, ip=ip, uuid="vm-a")
    assert (lease.ip, lease.uuid) == (ip, "vm-a")
    assert table.reserve(MAC_A, 0.0, ip=ip) is lease  # idempotent
    with pytest.raises(LeaseError, match="leased to 02:00:00:00:00:0a"):
        table.reserve(MAC_B, 0.0, ip=ip)
    with pytest.raises(LeaseError, match="outside the subnet"):
        table.reserve(MAC_B, 0.0, ip=IPv4Address("10.0.0.1"))
    with pytest.raises(LeaseError, match="gateway"):
        table.reserve(MAC_B, 0.0, ip=config.gateway_ip)
    with pytest.raises(LeaseError, match="gateway"):
        table.reserve(MAC_B, 0.0, ip=config.host_ip)
    with pytest.raises(LeaseError, match="static address of another"):
        table.reserve(MAC_B, 0.0, ip=static_ip)
    with pytest.raises(LeaseError, match="has the static address"):
        table.reserve(MAC_C, 0.0, ip=ip + 1)
    assert table.reserve(MAC_C, 0.0, ip=static_ip).ip == static_ip
    # Quarantined after a decline.
    declined = table.offer(MAC_B, 0.0).ip
    table.decline(MAC_B, declined, 0.0)
    with pytest.raises(LeaseError, match="quarantine"):
        table.reserve(MAC_B, 1.0, ip=declined)
    # Moving a reservation frees the old address.
    moved = table.reserve(MAC_A, 2.0, ip=ip + 5)
    assert moved.ip == ip + 5 and table.lookup_ip(ip) is None


def test_reserve_outside_pool_and_exhausted_pool():
    table = LeaseTable(tiny_config(1))
    with pytest.raises(LeaseError, match="outside the DHCP pool"):
        table.reserve(MAC_A, 0.0, ip=IPv4Address("192.168.65.100"))
    table.reserve(MAC_A, 0.0)
    with pytest.raises(LeaseError, match="no free address"):
        table.reserve(MAC_B, 0.0)


# ----- persistence -----

def test_json_round_trip():
    static_ip = IPv4Address("192.168.65.10")
    config = Config(static_leases=(StaticLease(static_ip, uuid="vm-static"),))
    table = LeaseTable(config)
    bound_ip = table.offer(MAC_A, 0.0).ip
    table.bind(MAC_A, bound_ip, 0.0, hostname="alpha", client_id=b"\x01\x02")
    pinned = table.reserve(MAC_B, 0.0, ip=IPv4Address("192.168.65.60"))
    released = table.offer(mac(7), 0.0).ip
    table.release(mac(7), released)
    declined = table.offer(mac(8), 0.0).ip
    table.decline(mac(8), declined, 0.0)
    table.associate_uuid("vm-static", MAC_C)
    table.offer(mac(9), 0.0)  # an offer: not saved

    document = json.loads(json.dumps(table.to_json(100.0)))
    restored = LeaseTable.from_json(config, document, 5000.0)

    a = restored.lookup_mac(MAC_A)
    assert (a.ip, a.state, a.hostname, a.client_id) == (bound_ip, BOUND, "alpha", b"\x01\x02")
    assert a.expires == pytest.approx(5000.0 + config.lease_seconds - 100.0)
    b = restored.lookup_mac(MAC_B)
    assert b.ip == pinned.ip and b.pinned
    assert restored.lookup_mac(mac(9)) is None
    assert "quarantine" not in document  # a DECLINE is no lock-out that outlives the process
    assert not restored.is_quarantined(declined, 5000.0)
    assert restored.offer(mac(7), 5000.0).ip == released  # history kept
    assert restored.offer(MAC_C, 5000.0).ip == static_ip  # uuid association kept
    assert restored.to_json(5000.0)["version"] == 1


def test_from_json_skips_entries_that_no_longer_fit_the_config():
    table = LeaseTable(Config())
    table.reserve(MAC_A, 0.0, ip=IPv4Address("192.168.65.100"))
    ip_b = table.offer(MAC_B, 0.0).ip
    table.bind(MAC_B, ip_b, 0.0)
    document = table.to_json(0.0)
    smaller = Config(highest_ip=IPv4Address("192.168.65.50"),
                     static_leases=(StaticLease(ip_b, mac=MAC_C),))
    restored = LeaseTable.from_json(smaller, document, 0.0)
    assert restored.leases() == []


@pytest.mark.parametrize("document", [
    {"version": 99},
    {"version": 1, "leases": [{"ip": "192.168.65.5"}]},
    {"version": 1, "leases": [{"mac": "zz", "ip": "192.168.65.5", "remaining": 1}]},
    {"version": 1, "history": [["02:00:00:00:00:01"]]},
    {"version": 1, "leases": [{"mac": "02:00:00:00:00:01", "ip": "192.168.65.5", "remaining": -1}]},
    ["not", "a", "dict"],
])
def test_from_json_rejects_malformed_documents(document):
    with pytest.raises(LeaseError):
        LeaseTable.from_json(Config(), document, 0.0)


# ----- bounded DECLINE quarantine, one identity per port -----

def test_a_quarantine_from_an_older_state_file_is_ignored():
    document = {"version": 1, "quarantine": [["192.168.65.5", 500.0]]}
    restored = LeaseTable.from_json(Config(), document, 0.0)
    assert not restored.is_quarantined(IPv4Address("192.168.65.5"), 1.0)


def test_decline_quarantine_per_client_is_capped():
    config = Config(decline_max_per_port=3)
    table = LeaseTable(config)
    declined = []
    for n in range(10):  # one port rotating MACs: bind, decline, next
        ip = table.offer(mac(n), 0.0).ip
        table.bind(mac(n), ip, 0.0)
        assert table.decline(mac(n), ip, 0.0, client="port-1")
        declined.append(ip)
    quarantined = [ip for ip in declined if table.is_quarantined(ip, 1.0)]
    assert quarantined == declined[-3:]  # the port's newest three; the older went back
    assert table.quarantine_evictions == 7
    # another client has its own share
    ip = table.offer(mac(100), 0.0).ip
    table.bind(mac(100), ip, 0.0)
    table.decline(mac(100), ip, 0.0, client="port-2")
    assert table.is_quarantined(ip, 1.0) and table.is_quarantined(declined[-1], 1.0)


def test_decline_quarantine_never_takes_more_than_its_share_of_the_pool():
    config = tiny_config(8, decline_max_per_port=100, decline_max_pool_fraction=0.25)
    table = LeaseTable(config)
    for n in range(40):  # many clients, each declining once
        lease = table.offer(mac(n), float(n))
        assert lease is not None, "declines took the whole pool"
        table.bind(mac(n), lease.ip, float(n))
        table.decline(mac(n), lease.ip, float(n), client=n)
    quarantined = [IPv4Address(a) for a in config.pool() if table.is_quarantined(IPv4Address(a), 40.0)]
    assert len(quarantined) == 2  # a quarter of 8
    assert table.offer(mac(999), 40.0) is not None


def test_release_mac_drops_any_lease_and_remembers_the_address():
    table = LeaseTable(Config())
    offered = table.offer(MAC_A, 0.0)
    assert table.release_mac(MAC_A) is offered and table.lookup_mac(MAC_A) is None
    pinned = table.reserve(MAC_B, 0.0, ip=IPv4Address("192.168.65.77"))
    assert table.release_mac(MAC_B) is pinned and table.lookup_ip(IPv4Address("192.168.65.77")) is None
    assert table.offer(MAC_B, 1.0).ip == IPv4Address("192.168.65.77")  # it would get it back
    assert table.release_mac(MAC_C) is None
