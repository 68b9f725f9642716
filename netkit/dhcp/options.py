"""DHCP option codes and the encoders for option values (RFC 2132, RFC 3397, RFC 3396).

Pure functions over bytes; the server in ``server.py`` decides which options to send.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

__all__ = [
    "MAGIC_COOKIE",
    "OPT_PAD", "OPT_SUBNET_MASK", "OPT_ROUTER", "OPT_DNS_SERVERS", "OPT_HOSTNAME",
    "OPT_DOMAIN_NAME", "OPT_INTERFACE_MTU", "OPT_BROADCAST_ADDRESS", "OPT_NTP_SERVERS",
    "OPT_REQUESTED_IP", "OPT_LEASE_TIME", "OPT_OVERLOAD", "OPT_MESSAGE_TYPE", "OPT_SERVER_ID",
    "OPT_PARAMETER_LIST", "OPT_MESSAGE", "OPT_MAX_MESSAGE_SIZE", "OPT_RENEWAL_TIME",
    "OPT_REBINDING_TIME", "OPT_CLIENT_ID", "OPT_DOMAIN_SEARCH", "OPT_END",
    "DHCPDISCOVER", "DHCPOFFER", "DHCPREQUEST", "DHCPDECLINE", "DHCPACK", "DHCPNAK",
    "DHCPRELEASE", "DHCPINFORM", "MESSAGE_TYPE_NAMES",
    "encode_dns_names", "decode_dns_names", "split_long_option", "encode_u16", "encode_u32",
]

MAGIC_COOKIE = 0x63825363

OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS_SERVERS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_INTERFACE_MTU = 26
OPT_BROADCAST_ADDRESS = 28
OPT_NTP_SERVERS = 42
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMETER_LIST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_CLIENT_ID = 61
OPT_DOMAIN_SEARCH = 119
OPT_END = 255

DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPDECLINE = 4
DHCPACK = 5
DHCPNAK = 6
DHCPRELEASE = 7
DHCPINFORM = 8

MESSAGE_TYPE_NAMES = {
    DHCPDISCOVER: "discover", DHCPOFFER: "offer", DHCPREQUEST: "request", DHCPDECLINE: "decline",
    DHCPACK: "ack", DHCPNAK: "nak", DHCPRELEASE: "release", DHCPINFORM: "inform",
}

#: RFC 1035 compression pointers carry a 14-bit offset.
_MAX_POINTER_OFFSET = 0x3FFF


def encode_u16(value: int) -> bytes:
    return struct.pack("!H", value)


def encode_u32(value: int) -> bytes:
    return struct.pack("!I", value)


def encode_dns_names(names: Iterable[str]) -> bytes:
    """Encode domain names as RFC 3397 wants for option 119: RFC 1035 wire format,
    with compression pointers relative to the start of the (concatenated) option data.

    Compression keeps a long search list inside one 255-byte option more often; busybox
    udhcpc, systemd-networkd and dhclient all follow pointers. Suffixes match
    case-insensitively, as DNS names compare.
    """
    out = bytearray()
    suffix_offsets: dict[tuple[str, ...], int] = {}
    for name in names:
        labels = [label for label in name.rstrip(".").split(".") if label]
        for i, label in enumerate(labels):
            suffix = tuple(part.lower() for part in labels[i:])
            offset = suffix_offsets.get(suffix)
            if offset is not None:
                out += struct.pack("!H", 0xC000 | offset)
                break
            if len(out) <= _MAX_POINTER_OFFSET:
                suffix_offsets[suffix] = len(out)
            encoded = label.encode("ascii")
            out.append(len(encoded))
            out += encoded
        else:
            out.append(0)
    return bytes(out)


def decode_dns_names(data: bytes) -> list[str]:
    """Decode option 119 data (the inverse of :func:`encode_dns_names`).

    Follows compression pointers the way busybox's ``dname_dec`` does, but refuses
    forward pointers and loops. Raises ``ValueError`` on anything malformed.
    """
    names: list[str] = []
    pos = 0
    while pos < len(data):
        labels: list[str] = []
        cursor = pos
        jumped = False
        hops = 0
        while True:
            if cursor >= len(data):
                raise ValueError("domain name runs past the end of the option")
            length = data[cursor]
            if length == 0:
                if not jumped:
                    pos = cursor + 1
                break
            if length & 0xC0 == 0xC0:
                if cursor + 1 >= len(data):
                    raise ValueError("truncated compression pointer")
                target = ((length & 0x3F) << 8) | data[cursor + 1]
                if not jumped:
                    pos = cursor + 2
                jumped = True
                hops += 1
                # A pointer may only refer backwards; this also rules out loops.
                if target >= cursor or hops > 128:
                    raise ValueError("bad compression pointer")
                cursor = target
                continue
            if length & 0xC0:
                raise ValueError("reserved label type")
            label = data[cursor + 1:cursor + 1 + length]
            if len(label) != length:
                raise ValueError("truncated label")
            labels.append(label.decode("ascii", "replace"))
            cursor += 1 + length
        names.append(".".join(labels))
    return names


def split_long_option(code: int, value: bytes) -> list[tuple[int, bytes]]:
    """One option as (code, chunk) pairs of at most 255 bytes each (RFC 3396).

    A value longer than 255 bytes is sent as consecutive instances of the same code,
    which the client concatenates.
    """
    if len(value) <= 255:
        return [(code, value)]
    return [(code, value[i:i + 255]) for i in range(0, len(value), 255)]
