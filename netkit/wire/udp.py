"""UDP: a zero-copy view and a datagram builder."""

from __future__ import annotations

import struct

from .checksum import checksum, ones_sum, pseudo_header_sum
from .errors import MalformedPacket

__all__ = ["UdpView", "build_udp", "UDP_HEADER_LEN"]

UDP_HEADER_LEN = 8
_hdr = struct.Struct("!HHHH")


class UdpView:
    """View of a UDP datagram; ``payload`` is cut to the UDP length field."""

    __slots__ = ("buf", "src_port", "dst_port", "length", "checksum_field")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < UDP_HEADER_LEN:
            raise MalformedPacket("UDP datagram shorter than its header")
        self.src_port, self.dst_port, self.length, self.checksum_field = _hdr.unpack_from(buf, 0)
        if self.length < UDP_HEADER_LEN or self.length > len(buf):
            raise MalformedPacket(f"UDP length {self.length} out of range")
        self.buf = buf

    @property
    def payload(self) -> memoryview:
        return self.buf[UDP_HEADER_LEN:self.length]

    def checksum_ok(self, src: bytes, dst: bytes) -> bool:
        if self.checksum_field == 0:  # "no checksum" is legal for UDP over IPv4
            return True
        return ones_sum(self.buf[:self.length], pseudo_header_sum(src, dst, 17, self.length)) == 0xFFFF


def build_udp(src: bytes, dst: bytes, src_port: int, dst_port: int, payload: bytes | memoryview) -> bytes:
    """A UDP datagram (header + payload) with its checksum for the given IPs."""
    length = UDP_HEADER_LEN + len(payload)
    dgram = bytearray(_hdr.pack(src_port, dst_port, length, 0)) + payload
    csum = checksum(dgram, pseudo_header_sum(src, dst, 17, length)) or 0xFFFF
    struct.pack_into("!H", dgram, 6, csum)
    return bytes(dgram)
