"""Fuzz: handle_untrusted never raises, and the lease table stays within its bounds."""

from __future__ import annotations

from ipaddress import IPv4Address

from dhcp_helpers import MAC_A, MAC_B, client_message, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netkit.config import StaticLease
from netkit.dhcp import DhcpServer, LeaseTable

CONFIG = tiny_config(4, static_leases=(StaticLease(IPv4Address("192.168.65.100"), mac=MAC_B),))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_MESSAGES = [
    client_message("discover", MAC_A, options=[("requested_addr", "192.168.65.11"), ("hostname", "a")]),
    client_message("request", MAC_A, options=[("server_id", "192.168.65.1"),
                                              ("requested_addr", "192.168.65.10")]),
    client_message("request", MAC_A, options=[("requested_addr", "192.168.65.12")]),
    client_message("request", MAC_A, ciaddr="192.168.65.10", flags=0x8000),
    client_message("release", MAC_A, ciaddr="192.168.65.10"),
    client_message("decline", MAC_A, options=[("requested_addr", "192.168.65.10")]),
    client_message("inform", MAC_A, ciaddr="192.168.65.10"),
    client_message("discover", MAC_B),
]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 400), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 400), st.just(0)),
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        position = position % (len(out) + 1)
        if kind == "flip" and position < len(out):
            out[position] ^= value
        elif kind == "truncate":
            del out[position:]
        elif kind == "insert":
            out.insert(position, value)
        elif kind == "delete" and position < len(out):
            del out[position]
    return bytes(out)


def check_invariants(table: LeaseTable) -> None:
    leases = table.leases()
    pool = CONFIG.pool()
    assert len(leases) <= len(pool) + len(CONFIG.static_leases)
    assert len({lease.ip for lease in leases}) == len(leases)
    for lease in leases:
        assert int(lease.ip) in pool or lease.ip == IPv4Address("192.168.65.100")
        assert lease.ip not in (CONFIG.gateway_ip, CONFIG.host_ip)
        assert table.lookup_ip(lease.ip) is lease


@FUZZ
@given(payload=st.binary(max_size=700))
def test_random_bytes_never_raise(payload):
    server = DhcpServer(CONFIG, LeaseTable(CONFIG))
    assert server.handle_untrusted(payload, src_mac=MAC_A, now=0.0) is None
    assert server.stats["malformed"] + server.stats["chaddr_mismatch"] + server.stats["unexpected_type"] == 1


@FUZZ
@given(messages=st.lists(st.tuples(st.sampled_from(VALID_MESSAGES), st.lists(mutation, max_size=4),
                                   st.sampled_from([MAC_A, MAC_B]), st.floats(0, 100)),
                         min_size=1, max_size=12))
def test_mutated_valid_messages_never_raise(messages):
    table = LeaseTable(CONFIG)
    server = DhcpServer(CONFIG, table)
    now = 0.0
    for base, mutations, src_mac, step in messages:
        now += step
        reply = server.handle_untrusted(mutate(base, mutations), src_mac=src_mac, now=now)
        if reply is not None:
            assert len(reply.payload) >= 300
            assert reply.dst_mac in (src_mac, b"\xff" * 6)
        check_invariants(table)
    table.expire(now + 1e6)
    assert [lease for lease in table.leases() if not lease.pinned] == []
    assert server.stats["received"] == len(messages)


option = st.tuples(st.integers(1, 254), st.binary(max_size=20))


@FUZZ
@given(message_type=st.integers(0, 12), options=st.lists(option, max_size=8),
       ciaddr=st.sampled_from(["0.0.0.0", "192.168.65.10", "10.1.2.3", "255.255.255.255"]),
       flags=st.integers(0, 0xFFFF), tail=st.binary(max_size=8))
def test_well_framed_messages_with_arbitrary_options_never_raise(message_type, options, ciaddr, flags, tail):
    table = LeaseTable(CONFIG)
    server = DhcpServer(CONFIG, table)
    body = bytes(client_message("discover", MAC_A, ciaddr=ciaddr, flags=flags))[:240]
    body += bytes([53, 1, message_type])
    for code, value in options:
        body += bytes([code, len(value)]) + value
    body += b"\xff" + tail
    server.handle_untrusted(body, src_mac=MAC_A, now=1.0)
    check_invariants(table)
