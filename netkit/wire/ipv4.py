"""IPv4: a zero-copy header view (fragments flagged, not reassembled) and a builder."""

from __future__ import annotations

import struct

from .checksum import checksum, ones_sum
from .errors import MalformedPacket

__all__ = ["Ipv4View", "build_ipv4_header", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP",
           "IPV4_HEADER_LEN", "FLAG_DF", "FLAG_MF"]

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
IPV4_HEADER_LEN = 20
FLAG_DF = 0x4000
FLAG_MF = 0x2000
_hdr = struct.Struct("!BBHHHBBH4s4s")


class Ipv4View:
    """View of an IPv4 packet. Lengths are checked once, here.

    ``payload`` is cut to the header's total length (link padding removed).
    A fragment (MF set or offset non-zero) has ``is_fragment`` true; its payload
    is the fragment's bytes, not a transport header.
    """

    __slots__ = ("buf", "header_len", "total_len", "ident", "flags_frag", "ttl", "protocol",
                 "src", "dst", "tos")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < IPV4_HEADER_LEN:
            raise MalformedPacket("IPv4 packet shorter than its header")
        (vihl, self.tos, self.total_len, self.ident, self.flags_frag, self.ttl, self.protocol,
         _csum, self.src, self.dst) = _hdr.unpack_from(buf, 0)
        if vihl >> 4 != 4:
            raise MalformedPacket(f"IP version {vihl >> 4}")
        self.header_len = (vihl & 0xF) * 4
        if self.header_len < IPV4_HEADER_LEN:
            raise MalformedPacket(f"IPv4 IHL {self.header_len} too small")
        if self.total_len < self.header_len or self.total_len > len(buf):
            raise MalformedPacket(f"IPv4 total length {self.total_len} out of range")
        self.buf = buf

    def header_checksum_ok(self) -> bool:
        return ones_sum(self.buf[:self.header_len]) == 0xFFFF

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & 0x3FFF)  # MF or a non-zero offset

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags_frag & FLAG_MF)

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags_frag & FLAG_DF)

    @property
    def fragment_offset(self) -> int:
        """Offset of this fragment's data in bytes."""
        return (self.flags_frag & 0x1FFF) * 8

    @property
    def options(self) -> memoryview:
        return self.buf[IPV4_HEADER_LEN:self.header_len]

    @property
    def payload(self) -> memoryview:
        return self.buf[self.header_len:self.total_len]

    @property
    def header(self) -> memoryview:
        return self.buf[:self.header_len]


def build_ipv4_header(src: bytes, dst: bytes, protocol: int, payload_len: int, *, ident: int = 0,
                      ttl: int = 64, flags_frag: int = FLAG_DF, tos: int = 0) -> bytearray:
    """A 20-byte IPv4 header with its checksum filled in."""
    hdr = bytearray(_hdr.pack(0x45, tos, IPV4_HEADER_LEN + payload_len, ident & 0xFFFF, flags_frag,
                              ttl, protocol, 0, src, dst))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return hdr
