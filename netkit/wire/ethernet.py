"""Ethernet II frames: a zero-copy view and a header builder."""

from __future__ import annotations

from .errors import MalformedPacket

__all__ = ["EthernetView", "ETHERTYPE_IPV4", "ETHERTYPE_ARP", "ETHERTYPE_IPV6", "ETHERTYPE_VLAN",
           "BROADCAST_MAC", "ETH_HEADER_LEN", "ethernet_header", "is_multicast"]

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_IPV6 = 0x86DD
ETH_HEADER_LEN = 14
BROADCAST_MAC = b"\xff" * 6


def is_multicast(mac: bytes | memoryview) -> bool:
    """True for broadcast and multicast destinations (the I/G bit)."""
    return bool(mac[0] & 1)


class EthernetView:
    """View of an Ethernet II frame; ``payload`` is the bytes after the 14-byte header."""

    __slots__ = ("buf", "ethertype")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < ETH_HEADER_LEN:
            raise MalformedPacket("frame shorter than an Ethernet header")
        self.buf = buf
        self.ethertype = (buf[12] << 8) | buf[13]

    @property
    def dst(self) -> bytes:
        return bytes(self.buf[0:6])

    @property
    def src(self) -> bytes:
        return bytes(self.buf[6:12])

    @property
    def payload(self) -> memoryview:
        return self.buf[ETH_HEADER_LEN:]


def ethernet_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big")
