"""ICMPv4: a view for echo and error messages, and builders."""

from __future__ import annotations

import struct

from .checksum import checksum, ones_sum
from .errors import MalformedPacket

__all__ = ["IcmpView", "build_icmp", "ECHO_REPLY", "ECHO_REQUEST", "DEST_UNREACHABLE",
           "TIME_EXCEEDED", "UNREACH_NET", "UNREACH_HOST", "UNREACH_PORT", "UNREACH_NEEDFRAG",
           "UNREACH_ADMIN"]

ECHO_REPLY, DEST_UNREACHABLE, ECHO_REQUEST, TIME_EXCEEDED = 0, 3, 8, 11
UNREACH_NET, UNREACH_HOST, UNREACH_PROTO, UNREACH_PORT, UNREACH_NEEDFRAG, UNREACH_ADMIN = 0, 1, 2, 3, 4, 13
_hdr = struct.Struct("!BBHHH")


class IcmpView:
    """View of an ICMP message. For echo, ``ident``/``sequence`` are meaningful;
    for errors, ``rest`` is the 4-byte rest-of-header and ``body`` the quoted packet."""

    __slots__ = ("buf", "type", "code", "ident", "sequence")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < 8:
            raise MalformedPacket("ICMP message shorter than 8 bytes")
        self.type, self.code, _c, self.ident, self.sequence = _hdr.unpack_from(buf, 0)
        self.buf = buf

    def checksum_ok(self) -> bool:
        return ones_sum(self.buf) == 0xFFFF

    @property
    def rest(self) -> bytes:
        return bytes(self.buf[4:8])

    @property
    def body(self) -> memoryview:
        return self.buf[8:]


def build_icmp(type_: int, code: int, rest: bytes, body: bytes | memoryview) -> bytes:
    """An ICMP message with its checksum; ``rest`` is the 4 bytes after the checksum."""
    msg = bytearray(struct.pack("!BBH", type_, code, 0)) + rest + body
    struct.pack_into("!H", msg, 2, checksum(msg))
    return bytes(msg)
