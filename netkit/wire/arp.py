"""ARP for IPv4 over Ethernet (RFC 826): a frozen Repr with parse/emit."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import MalformedPacket

__all__ = ["ArpPacket", "ARP_REQUEST", "ARP_REPLY"]

ARP_REQUEST = 1
ARP_REPLY = 2
_arp = struct.Struct("!HHBBH6s4s6s4s")


@dataclass(frozen=True, slots=True)
class ArpPacket:
    operation: int
    sender_mac: bytes
    sender_ip: bytes  # 4 packed bytes
    target_mac: bytes
    target_ip: bytes

    @classmethod
    def parse_untrusted(cls, buf: bytes | memoryview) -> "ArpPacket":
        if len(buf) < _arp.size:
            raise MalformedPacket("ARP packet too short")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _arp.unpack_from(buf, 0)
        if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
            raise MalformedPacket("ARP is not IPv4 over Ethernet")
        if op not in (ARP_REQUEST, ARP_REPLY):
            raise MalformedPacket(f"ARP operation {op}")
        return cls(op, sha, spa, tha, tpa)

    def emit(self) -> bytes:
        return _arp.pack(1, 0x0800, 6, 4, self.operation, self.sender_mac, self.sender_ip,
                         self.target_mac, self.target_ip)
