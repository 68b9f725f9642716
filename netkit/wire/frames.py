"""Whole-frame builders: Ethernet + IPv4 + transport, checksums filled in.

These are what protocol machines' output turns into on the way to a link. The TCP
builder can leave the TCP checksum to an offloading link (virtio-net NEEDS_CSUM):
it then stores only the pseudo-header sum and says where the field is.
"""

from __future__ import annotations

import struct

from .checksum import ones_sum, pseudo_header_sum
from .ethernet import ETH_HEADER_LEN, ETHERTYPE_IPV4, ethernet_header
from .ipv4 import FLAG_DF, IPV4_HEADER_LEN, PROTO_ICMP, PROTO_TCP, PROTO_UDP, build_ipv4_header
from .icmpv4 import build_icmp
from .udp import build_udp

__all__ = ["ipv4_frame", "udp_frame", "icmp_frame", "tcp_frame", "fragment_frames", "TCP_CSUM_START",
           "TCP_CSUM_OFFSET"]

#: Where an offloading link must put the TCP checksum: from the TCP header start,
#: field at offset 16.
TCP_CSUM_START = ETH_HEADER_LEN + IPV4_HEADER_LEN
TCP_CSUM_OFFSET = 16


def ipv4_frame(dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, protocol: int,
               payload: bytes | memoryview, *, ident: int = 0, ttl: int = 64,
               flags_frag: int = FLAG_DF) -> bytes:
    return b"".join((ethernet_header(dst_mac, src_mac, ETHERTYPE_IPV4),
                     build_ipv4_header(src_ip, dst_ip, protocol, len(payload), ident=ident, ttl=ttl,
                                       flags_frag=flags_frag),
                     payload))


def udp_frame(dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, src_port: int, dst_port: int,
              payload: bytes | memoryview, *, ident: int = 0) -> bytes:
    return ipv4_frame(dst_mac, src_mac, src_ip, dst_ip, PROTO_UDP,
                      build_udp(src_ip, dst_ip, src_port, dst_port, payload), ident=ident)


def icmp_frame(dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, type_: int, code: int,
               rest: bytes, body: bytes | memoryview, *, ident: int = 0) -> bytes:
    return ipv4_frame(dst_mac, src_mac, src_ip, dst_ip, PROTO_ICMP, build_icmp(type_, code, rest, body),
                      ident=ident)


def tcp_frame(dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, tcp_header: bytearray,
              payload: bytes | memoryview, *, ident: int = 0, partial_checksum: bool = False) -> bytes:
    """A TCP frame. ``tcp_header`` comes from ``build_tcp_header`` (checksum field zero).

    With ``partial_checksum`` the checksum field holds only the pseudo-header sum, for a
    link that completes it (pass ``TxOffload(TCP_CSUM_START, TCP_CSUM_OFFSET, ...)``).
    """
    seg_len = len(tcp_header) + len(payload)
    pseudo = pseudo_header_sum(src_ip, dst_ip, PROTO_TCP, seg_len)
    if partial_checksum:
        struct.pack_into("!H", tcp_header, 16, pseudo)
    else:
        total = ones_sum(payload, ones_sum(tcp_header, pseudo)) if payload else ones_sum(tcp_header, pseudo)
        struct.pack_into("!H", tcp_header, 16, ~total & 0xFFFF)
    return b"".join((ethernet_header(dst_mac, src_mac, ETHERTYPE_IPV4),
                     build_ipv4_header(src_ip, dst_ip, PROTO_TCP, seg_len, ident=ident),
                     tcp_header, payload))


def fragment_frames(frame: bytes, mtu: int) -> list[bytes]:
    """Split an Ethernet+IPv4 frame (20-byte header, DF ignored) into frames of at most
    ``mtu`` IP bytes each. Returns ``[frame]`` when it already fits."""
    ip_len = len(frame) - ETH_HEADER_LEN
    if ip_len <= mtu:
        return [frame]
    eth = frame[:ETH_HEADER_LEN]
    src, dst = frame[26:30], frame[30:34]
    protocol = frame[23]
    ident = (frame[18] << 8) | frame[19]
    ttl = frame[22]
    payload = memoryview(frame)[ETH_HEADER_LEN + IPV4_HEADER_LEN:]
    step = (mtu - IPV4_HEADER_LEN) & ~7
    frames = []
    for offset in range(0, len(payload), step):
        piece = payload[offset:offset + step]
        more = 0x2000 if offset + step < len(payload) else 0
        frames.append(b"".join((eth, build_ipv4_header(src, dst, protocol, len(piece), ident=ident, ttl=ttl,
                                                       flags_frag=more | (offset >> 3)), piece)))
    return frames
