"""DhcpServer: scripted client exchanges with fake time, one per message type and path."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from dhcp_helpers import MAC_A, MAC_B, MAC_C, Exchange, client_message, tiny_config

from netkit.config import Config, StaticLease
from netkit.dhcp import BOUND, LeaseTable
from netkit.dhcp import options as o
from netkit.dhcp.server import BROADCAST_IP, BROADCAST_MAC

GATEWAY = "192.168.65.1"
OTHER_SERVER = "192.168.65.250"


def selecting(ip: IPv4Address, server: str = GATEWAY) -> list:
    return [("server_id", server), ("requested_addr", str(ip))]


# ----- DISCOVER -> OFFER -----

def test_offer_fields_options_and_addressing(exchange):
    offer = exchange.send("discover", MAC_A, 0.0, xid=0xCAFEF00D)
    assert offer.message_type == o.DHCPOFFER
    message = offer.message
    assert (message.op, message.hrd, message.hln, message.hops) == (2, 1, 6, 0)
    assert message.xid == 0xCAFEF00D
    assert message.chaddr == MAC_A
    assert (message.ciaddr, message.siaddr, message.giaddr) == (0, 0, 0)
    assert offer.yiaddr in exchange.config.subnet
    assert len(offer.reply.payload) >= 300
    # Unicast to the offered address at the client's MAC (broadcast flag clear).
    assert (offer.reply.dst_ip, offer.reply.dst_mac) == (offer.yiaddr, MAC_A)
    options = offer.options
    assert options[o.OPT_SERVER_ID] == IPv4Address(GATEWAY).packed
    assert options[o.OPT_SUBNET_MASK] == bytes([255, 255, 255, 0])
    assert options[o.OPT_ROUTER] == IPv4Address(GATEWAY).packed
    assert options[o.OPT_DNS_SERVERS] == IPv4Address(GATEWAY).packed
    assert options[o.OPT_NTP_SERVERS] == IPv4Address(GATEWAY).packed
    assert options[o.OPT_BROADCAST_ADDRESS] == IPv4Address("192.168.65.255").packed
    assert options[o.OPT_DOMAIN_NAME] == b"netkit.internal"
    assert options[o.OPT_INTERFACE_MTU] == b"\x05\xdc"  # two bytes, as udhcpc reads it
    assert struct.unpack("!I", options[o.OPT_LEASE_TIME])[0] == 7200
    assert struct.unpack("!I", options[o.OPT_RENEWAL_TIME])[0] == 3600
    assert struct.unpack("!I", options[o.OPT_REBINDING_TIME])[0] == 6300
    assert o.OPT_DOMAIN_SEARCH not in options  # only when configured
    assert exchange.stats["discover"] == exchange.stats["offer"] == 1


def test_offer_with_broadcast_flag_is_broadcast():
    exchange = Exchange(Config())
    offer = exchange.send("discover", MAC_A, 0.0, flags=0x8000)
    assert (offer.reply.dst_ip, offer.reply.dst_mac) == (BROADCAST_IP, BROADCAST_MAC)
    assert offer.message.flags == 0x8000


def test_reply_clears_reserved_flag_bits(exchange):
    offer = exchange.send("discover", MAC_A, 0.0, flags=0x7FFF)
    assert offer.message.flags == 0
    assert offer.reply.dst_ip == offer.yiaddr


def test_domain_search_and_mtu_options_when_configured():
    exchange = Exchange(Config(mtu=65520, domain_search=("a.example.com", "example.com")))
    offer = exchange.send("discover", MAC_A, 0.0)
    assert offer.options[o.OPT_INTERFACE_MTU] == struct.pack("!H", 65520)
    # RFC 3397 section 2's own example shape: the second name is a pointer to offset 2.
    assert offer.options[o.OPT_DOMAIN_SEARCH] == b"\x01a\x07example\x03com\x00\xc0\x02"


def test_discover_requested_address_is_honoured_and_bad_one_ignored(exchange):
    offer = exchange.send("discover", MAC_A, 0.0, options=[("requested_addr", "192.168.65.99")])
    assert offer.yiaddr == IPv4Address("192.168.65.99")
    # A requested-address option of the wrong length in a DISCOVER is only a bad hint.
    payload = client_message("discover", MAC_B, options=[(50, b"\x01\x02")])
    assert exchange.server.handle_untrusted(payload, src_mac=MAC_B, now=0.0) is not None


def test_pool_exhausted_gets_no_reply():
    exchange = Exchange(tiny_config(1))
    assert exchange.send("discover", MAC_A, 0.0) is not None
    assert exchange.send("discover", MAC_B, 0.0) is None
    assert exchange.stats["pool_exhausted"] == 1


def test_discover_flood_offers_expire_and_free_the_pool():
    config = tiny_config(4)
    exchange = Exchange(config)
    flood = [bytes([2, 0xEE, 0, 0, 0, n]) for n in range(50)]
    for client in flood:
        exchange.send("discover", client, 0.0)
    assert exchange.stats["offer"] == 4 and exchange.stats["pool_exhausted"] == 46
    assert exchange.send("discover", MAC_A, 1.0) is None
    assert exchange.send("discover", MAC_A, config.offer_seconds + 0.5) is not None


# ----- REQUEST -----

def test_full_exchange_binds_the_lease(exchange):
    ip = exchange.lease(MAC_A, 0.0, hostname="guest-a")
    lease = exchange.leases.lookup_mac(MAC_A)
    assert (lease.ip, lease.state, lease.hostname) == (ip, BOUND, "guest-a")
    assert lease.expires == 7200.0
    assert exchange.stats["request_selecting"] == 1 and exchange.stats["ack"] == 1


def test_ack_addressing_follows_rfc_2131_section_4_1(exchange):
    offer = exchange.send("discover", MAC_A, 0.0)
    ack = exchange.send("request", MAC_A, 0.0, options=selecting(offer.yiaddr))
    assert (ack.reply.dst_ip, ack.reply.dst_mac) == (offer.yiaddr, MAC_A)
    ack = exchange.send("request", MAC_A, 1.0, flags=0x8000, options=selecting(offer.yiaddr))
    assert (ack.reply.dst_ip, ack.reply.dst_mac) == (BROADCAST_IP, BROADCAST_MAC)
    # ciaddr set wins over the broadcast flag.
    ack = exchange.send("request", MAC_A, 2.0, flags=0x8000, ciaddr=str(offer.yiaddr))
    assert (ack.reply.dst_ip, ack.reply.dst_mac) == (offer.yiaddr, MAC_A)


def test_request_for_another_server_forgets_our_offer_silently(exchange):
    offer = exchange.send("discover", MAC_A, 0.0)
    assert exchange.send("request", MAC_A, 0.0, options=selecting(offer.yiaddr, OTHER_SERVER)) is None
    assert exchange.leases.lookup_mac(MAC_A) is None
    assert exchange.stats["request_other_server"] == 1
    assert exchange.stats["ack"] == exchange.stats["nak"] == 0


def test_request_for_another_server_keeps_a_bound_lease(exchange):
    ip = exchange.lease(MAC_A, 0.0)
    assert exchange.send("request", MAC_A, 1.0, options=selecting(ip, OTHER_SERVER)) is None
    assert exchange.leases.lookup_mac(MAC_A).state == BOUND


def test_selecting_an_address_held_by_another_client_is_naked(exchange):
    ip_b = exchange.lease(MAC_B, 0.0)
    exchange.send("discover", MAC_A, 0.0)
    nak = exchange.send("request", MAC_A, 0.0, options=selecting(ip_b))
    assert nak.message_type == o.DHCPNAK
    assert nak.yiaddr == IPv4Address(0) and nak.ciaddr == IPv4Address(0)
    assert (nak.reply.dst_ip, nak.reply.dst_mac) == (BROADCAST_IP, BROADCAST_MAC)
    # udhcpc ignores a NAK whose server id is not the one it selected.
    assert nak.options[o.OPT_SERVER_ID] == IPv4Address(GATEWAY).packed
    assert o.OPT_MESSAGE in nak.options and o.OPT_LEASE_TIME not in nak.options
    assert exchange.stats["nak"] == 1


def test_selecting_without_prior_offer_acks_a_free_address(exchange):
    # After a netkit restart the client's offer is gone; the address is still free.
    ack = exchange.send("request", MAC_A, 0.0, options=selecting(IPv4Address("192.168.65.40")))
    assert ack.message_type == o.DHCPACK and ack.yiaddr == IPv4Address("192.168.65.40")


def test_selecting_with_no_address_is_malformed(exchange):
    assert exchange.send("request", MAC_A, 0.0, options=[("server_id", GATEWAY)]) is None
    assert exchange.stats["malformed"] == 1


def test_init_reboot_own_address_is_acked(exchange):
    ip = exchange.lease(MAC_A, 0.0)
    ack = exchange.send("request", MAC_A, 100.0, flags=0x8000, options=[("requested_addr", str(ip))])
    assert ack.message_type == o.DHCPACK and ack.yiaddr == ip
    assert (ack.reply.dst_ip, ack.reply.dst_mac) == (BROADCAST_IP, BROADCAST_MAC)
    assert exchange.leases.lookup_mac(MAC_A).expires == 100.0 + 7200
    assert exchange.stats["request_init_reboot"] == 1


def test_init_reboot_after_restart_without_state_keeps_the_address():
    config = Config()
    first = Exchange(config)
    ip = first.lease(MAC_A, 0.0)
    restarted = Exchange(config)
    ack = restarted.send("request", MAC_A, 5.0, options=[("requested_addr", str(ip))])
    assert ack.message_type == o.DHCPACK and ack.yiaddr == ip


@pytest.mark.parametrize("requested", ["10.0.0.5", "192.168.65.1", "192.168.65.2", "192.168.65.255"])
def test_init_reboot_wrong_network_or_reserved_address_is_naked(exchange, requested):
    nak = exchange.send("request", MAC_A, 0.0, options=[("requested_addr", requested)])
    assert nak.message_type == o.DHCPNAK
    assert exchange.stats["request_init_reboot"] == 1


def test_init_reboot_for_another_clients_address_is_naked(exchange):
    ip_b = exchange.lease(MAC_B, 0.0)
    nak = exchange.send("request", MAC_A, 1.0, options=[("requested_addr", str(ip_b))])
    assert nak.message_type == o.DHCPNAK
    assert exchange.leases.lookup_mac(MAC_B).ip == ip_b


def test_renewing_extends_the_lease_and_replies_to_ciaddr(exchange):
    ip = exchange.lease(MAC_A, 0.0)
    ack = exchange.send("request", MAC_A, 3600.0, ciaddr=str(ip))
    assert ack.message_type == o.DHCPACK
    assert ack.yiaddr == ip and ack.ciaddr == ip
    assert (ack.reply.dst_ip, ack.reply.dst_mac) == (ip, MAC_A)
    assert exchange.leases.lookup_mac(MAC_A).expires == 3600.0 + 7200
    assert exchange.stats["request_renewing"] == 1


def test_rebinding_broadcast_is_acked_to_ciaddr(exchange):
    ip = exchange.lease(MAC_A, 0.0)
    ack = exchange.send("request", MAC_A, 6300.0, ciaddr=str(ip), flags=0x8000)
    assert ack.message_type == o.DHCPACK and ack.reply.dst_ip == ip


def test_renewing_a_lost_address_is_naked():
    config = tiny_config(1)
    exchange = Exchange(config)
    ip = exchange.lease(MAC_A, 0.0)
    # A's lease runs out while A is away and B takes the only address.
    exchange.leases.expire(7200.0)
    assert exchange.lease(MAC_B, 7201.0) == ip
    nak = exchange.send("request", MAC_A, 7202.0, ciaddr=str(ip))
    assert nak.message_type == o.DHCPNAK
    assert (nak.reply.dst_ip, nak.reply.dst_mac) == (BROADCAST_IP, BROADCAST_MAC)


def test_request_without_any_address_is_malformed(exchange):
    assert exchange.send("request", MAC_A, 0.0) is None
    assert exchange.stats["malformed"] == 1


def test_request_with_bad_option_lengths_is_malformed(exchange):
    for options in ([(54, b"\x01\x02\x03")], [(50, b"\x01\x02\x03\x04\x05")]):
        payload = client_message("request", MAC_A, options=options)
        assert exchange.server.handle_untrusted(payload, src_mac=MAC_A, now=0.0) is None
    assert exchange.stats["malformed"] == 2


# ----- RELEASE, DECLINE, INFORM -----

def test_release_then_rediscover_gets_the_same_address(exchange):
    ip = exchange.lease(MAC_A, 0.0)
    assert exchange.send("release", MAC_A, 10.0, ciaddr=str(ip), options=[("server_id", GATEWAY)]) is None
    assert exchange.leases.lookup_mac(MAC_A) is None
    assert exchange.stats["release"] == 1
    exchange.lease(MAC_B, 11.0)
    assert exchange.lease(MAC_A, 20.0) == ip


def test_release_of_another_clients_address_is_ignored(exchange):
    ip_b = exchange.lease(MAC_B, 0.0)
    exchange.send("release", MAC_A, 1.0, ciaddr=str(ip_b))
    assert exchange.leases.lookup_mac(MAC_B).ip == ip_b
    assert exchange.stats["release_ignored"] == 1


def test_release_to_another_server_or_without_address(exchange):
    ip = exchange.lease(MAC_A, 0.0)
    exchange.send("release", MAC_A, 1.0, ciaddr=str(ip), options=[("server_id", OTHER_SERVER)])
    assert exchange.leases.lookup_mac(MAC_A) is not None
    assert exchange.stats["release_ignored"] == 1
    exchange.send("release", MAC_A, 1.0)
    assert exchange.stats["malformed"] == 1


def test_decline_quarantines_and_next_discover_gets_another_address(exchange):
    ip = exchange.lease(MAC_A, 0.0)
    assert exchange.send("decline", MAC_A, 1.0, options=[("requested_addr", str(ip)),
                                                          ("server_id", GATEWAY)]) is None
    assert exchange.stats["decline"] == 1
    assert exchange.leases.is_quarantined(ip, 1.0)
    assert exchange.leases.lookup_mac(MAC_A) is None
    assert exchange.lease(MAC_A, 2.0) != ip
    # Nobody gets it during the quarantine, even by asking.
    assert exchange.send("request", MAC_B, 3.0, options=[("requested_addr", str(ip))]).message_type == o.DHCPNAK


def test_decline_by_someone_else_or_without_address_is_ignored(exchange):
    ip = exchange.lease(MAC_A, 0.0)
    exchange.send("decline", MAC_B, 1.0, options=[("requested_addr", str(ip))])
    assert exchange.stats["decline_ignored"] == 1
    assert not exchange.leases.is_quarantined(ip, 1.0)
    exchange.send("decline", MAC_A, 1.0)
    assert exchange.stats["malformed"] == 1
    exchange.send("decline", MAC_A, 1.0, options=[("requested_addr", str(ip)), ("server_id", OTHER_SERVER)])
    assert exchange.stats["decline_ignored"] == 2
    assert exchange.leases.lookup_mac(MAC_A) is not None


def test_inform_acks_configuration_without_an_address(exchange):
    ack = exchange.send("inform", MAC_A, 0.0, ciaddr="192.168.65.120")
    assert ack.message_type == o.DHCPACK
    assert ack.yiaddr == IPv4Address(0) and ack.ciaddr == IPv4Address("192.168.65.120")
    assert (ack.reply.dst_ip, ack.reply.dst_mac) == (IPv4Address("192.168.65.120"), MAC_A)
    for absent in (o.OPT_LEASE_TIME, o.OPT_RENEWAL_TIME, o.OPT_REBINDING_TIME):
        assert absent not in ack.options
    assert ack.options[o.OPT_ROUTER] == IPv4Address(GATEWAY).packed
    assert ack.options[o.OPT_DNS_SERVERS] == IPv4Address(GATEWAY).packed
    assert exchange.leases.leases() == []
    assert exchange.stats["inform"] == 1


# ----- static leases through the server -----

def test_static_lease_by_mac_and_by_uuid():
    config = Config(static_leases=(StaticLease(IPv4Address("192.168.65.200"), mac=MAC_A),
                                   StaticLease(IPv4Address("192.168.65.201"), uuid="vm-b")))
    exchange = Exchange(config)
    assert exchange.lease(MAC_A, 0.0) == IPv4Address("192.168.65.200")
    exchange.leases.associate_uuid("vm-b", MAC_B)
    assert exchange.lease(MAC_B, 0.0) == IPv4Address("192.168.65.201")
    # Asking for something else is refused: the static address is the only one.
    nak = exchange.send("request", MAC_A, 1.0, options=[("requested_addr", "192.168.65.50")])
    assert nak.message_type == o.DHCPNAK


def test_uuid_association_moves_a_guest_to_its_static_address():
    config = Config(static_leases=(StaticLease(IPv4Address("192.168.65.201"), uuid="vm-a"),))
    exchange = Exchange(config)
    old = exchange.lease(MAC_A, 0.0)
    exchange.leases.associate_uuid("vm-a", MAC_A)
    # Its renewal of the pool address is refused; it rediscovers and gets the static one.
    assert exchange.send("request", MAC_A, 1.0, ciaddr=str(old)).message_type == o.DHCPNAK
    assert exchange.lease(MAC_A, 2.0) == IPv4Address("192.168.65.201")


# ----- anti-abuse and malformed input -----

def test_chaddr_must_match_the_ethernet_source(exchange):
    assert exchange.send("discover", MAC_A, 0.0, src_mac=MAC_B) is None
    ip = exchange.lease(MAC_C, 0.0)
    # A guest cannot release or decline another guest's lease by forging chaddr.
    exchange.send("release", MAC_C, 1.0, src_mac=MAC_A, ciaddr=str(ip))
    exchange.send("decline", MAC_C, 1.0, src_mac=MAC_A, options=[("requested_addr", str(ip))])
    assert exchange.leases.lookup_mac(MAC_C).ip == ip
    assert exchange.stats["chaddr_mismatch"] == 3
    assert exchange.leases.lookup_mac(MAC_A) is None


def test_multicast_or_zero_chaddr_is_refused(exchange):
    for bad in (b"\x01\x00\x5e\x00\x00\x01", b"\xff" * 6, b"\x00" * 6):
        assert exchange.send("discover", bad, 0.0) is None
    assert exchange.stats["chaddr_mismatch"] == 3
    assert exchange.leases.leases() == []


def _valid_discover() -> bytearray:
    return bytearray(client_message("discover", MAC_A))


def _with(offset: int, value: bytes) -> bytes:
    data = _valid_discover()
    data[offset:offset + len(value)] = value
    return bytes(data)


@pytest.mark.parametrize("payload", [
    pytest.param(b"", id="empty"),
    pytest.param(bytes(_valid_discover()[:100]), id="truncated-header"),
    pytest.param(bytes(_valid_discover()[:239]), id="truncated-cookie"),
    pytest.param(_with(0, b"\x02"), id="op-bootreply"),
    pytest.param(_with(1, b"\x06"), id="htype-ieee802"),
    pytest.param(_with(2, b"\x10"), id="hlen-16"),
    pytest.param(_with(236, b"\x00\x00\x00\x00"), id="no-magic-cookie"),
    pytest.param(bytes(_valid_discover()[:240]) + b"\xff", id="no-message-type"),
    pytest.param(bytes(_valid_discover()[:240]) + b"\x35\x02\x01\x01\xff", id="message-type-two-bytes"),
    pytest.param(bytes(_valid_discover()[:240]) + b"\x35", id="option-without-length"),
    pytest.param(bytes(_valid_discover()[:240]) + b"\x35\x05\x01", id="option-truncated"),
])
def test_malformed_messages_are_counted_and_dropped(exchange, payload):
    assert exchange.server.handle_untrusted(payload, src_mac=MAC_A, now=0.0) is None
    assert exchange.stats["malformed"] == 1
    assert exchange.leases.leases() == []


@pytest.mark.parametrize("message_type", ["offer", "ack", "nak", 0, 9, 200])
def test_server_only_and_unknown_message_types_are_ignored(exchange, message_type):
    assert exchange.send(message_type, MAC_A, 0.0) is None
    assert exchange.stats["unexpected_type"] == 1


def test_memoryview_payload_is_accepted(exchange):
    reply = exchange.server.handle_untrusted(memoryview(client_message("discover", MAC_A)),
                                             src_mac=MAC_A, now=0.0)
    assert reply is not None and reply.message_type == o.DHCPOFFER


def test_padding_and_repeated_options_rfc_3396(exchange):
    # Pad bytes between options, and a hostname split across two instances.
    body = bytes(_valid_discover()[:240]) + b"\x00\x00\x35\x01\x03\x00\x32\x04" + \
        IPv4Address("192.168.65.33").packed + b"\x0c\x03gue\x0c\x03st1\xff"
    ack = exchange.server.handle_untrusted(body, src_mac=MAC_A, now=0.0)
    assert ack.message_type == o.DHCPACK
    assert exchange.leases.lookup_mac(MAC_A).hostname == "guest1"


def test_timer_interface_expires_leases():
    exchange = Exchange(Config())
    exchange.lease(MAC_A, 0.0)
    assert exchange.server.get_timer() == 7200.0
    assert [lease.mac for lease in exchange.server.handle_timer(7200.0)] == [MAC_A]
    assert exchange.server.get_timer() is None


def test_shared_table_across_servers_is_consistent():
    config = Config()
    table = LeaseTable(config)
    ip = Exchange(config, table).lease(MAC_A, 0.0)
    assert table.lookup_ip(ip).mac == MAC_A
