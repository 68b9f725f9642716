"""Option encoders, checked against how busybox udhcpc reads options."""

from __future__ import annotations

import struct

import pytest
from dhcp_helpers import MAC_A, Exchange

from netkit.config import Config, ConfigError
from netkit.dhcp import options as o


def udhcpc_option_values(options: list[tuple[int, bytes]], code: int) -> bytes:
    """udhcp_get_option(): all instances of ``code`` concatenated (RFC 3396)."""
    return b"".join(value for c, value in options if c == code)


def test_domain_search_encoding_uses_rfc_1035_compression():
    encoded = o.encode_dns_names(["eng.apple.com", "marketing.apple.com"])
    # The example from RFC 3397 section 3.
    assert encoded == (b"\x03eng\x05apple\x03com\x00"
                       b"\x09marketing\xc0\x04")
    assert o.decode_dns_names(encoded) == ["eng.apple.com", "marketing.apple.com"]


def test_domain_search_compression_is_case_insensitive_and_trailing_dot_is_ignored():
    encoded = o.encode_dns_names(["Example.COM.", "a.example.com"])
    assert encoded == b"\x07Example\x03COM\x00\x01a\xc0\x00"
    assert o.decode_dns_names(encoded) == ["Example.COM", "a.Example.COM"]


def test_long_search_list_is_split_and_decodes_after_concatenation():
    names = [f"{'x' * 40}{n:03d}.test" for n in range(20)]
    encoded = o.encode_dns_names(names)
    assert len(encoded) > 255
    chunks = o.split_long_option(o.OPT_DOMAIN_SEARCH, encoded)
    assert all(len(chunk) <= 255 for _, chunk in chunks) and len(chunks) > 1
    assert o.decode_dns_names(udhcpc_option_values(chunks, o.OPT_DOMAIN_SEARCH)) == names


def test_server_sends_split_domain_search_that_reassembles():
    names = tuple(f"{'y' * 50}{n}.example" for n in range(8))
    exchange = Exchange(Config(domain_search=names))
    offer = exchange.send("discover", MAC_A, 0.0)
    assert o.decode_dns_names(offer.options[o.OPT_DOMAIN_SEARCH]) == list(names)
    assert sum(1 for code, _ in offer.message.opts if code == o.OPT_DOMAIN_SEARCH) > 1


@pytest.mark.parametrize("data", [b"\x03ab", b"\xc0", b"\xc0\x05", b"\x01a\xc0\x00", b"\x40abc"])
def test_decoder_rejects_truncation_loops_and_forward_pointers(data):
    with pytest.raises(ValueError):
        o.decode_dns_names(data)


@pytest.mark.parametrize("mtu", [576, 1500, 9000, 65520])
def test_mtu_option_is_two_bytes_big_endian(mtu):
    exchange = Exchange(Config(mtu=mtu))
    value = exchange.send("discover", MAC_A, 0.0).options[o.OPT_INTERFACE_MTU]
    assert len(value) == 2 and struct.unpack("!H", value)[0] == mtu


def test_domain_name_option_has_no_trailing_dot_or_nul():
    exchange = Exchange(Config(domain_name="corp.example."))
    assert exchange.send("discover", MAC_A, 0.0).options[o.OPT_DOMAIN_NAME] == b"corp.example"


@pytest.mark.parametrize("bad", ["a..b", "x" * 64 + ".com", "spaced name", "caf\u00e9.fr"])
def test_config_rejects_names_options_cannot_carry(bad):
    with pytest.raises(ConfigError):
        Config(domain_search=(bad,))
    with pytest.raises(ConfigError):
        Config(domain_name=bad)


def test_empty_domain_name_sends_no_option_15():
    with pytest.raises(ConfigError):
        Config(domain_search=("",))
    exchange = Exchange(Config(domain_name=""))
    assert o.OPT_DOMAIN_NAME not in exchange.send("discover", MAC_A, 0.0).options


def test_config_from_mapping_accepts_the_new_dhcp_settings():
    config = Config.from_mapping({"offer-seconds": "12", "decline-seconds": 30,
                                  "domain-search": ["a.test"]})
    assert (config.offer_seconds, config.decline_seconds, config.domain_search) == (12.0, 30.0, ("a.test",))
    with pytest.raises(ConfigError):
        Config.from_mapping({"offer-seconds": 0})
