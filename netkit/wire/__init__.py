"""Wire formats: zero-copy views over memoryviews for the hot path, small frozen
``Repr`` types where clarity wins, and builders. No I/O, no clocks, no state.

Every ``*View`` constructor checks lengths once and raises only ``MalformedPacket``.
"""

from .arp import ARP_REPLY, ARP_REQUEST, ArpPacket
from .checksum import checksum, ones_sum, pseudo_header_sum
from .errors import MalformedPacket
from .ethernet import (BROADCAST_MAC, ETH_HEADER_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
                       EthernetView, ethernet_header, is_multicast)
from .frames import icmp_frame, ipv4_frame, tcp_frame, udp_frame
from .icmpv4 import IcmpView, build_icmp
from .ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4View, build_ipv4_header
from .tcp import TcpOptions, TcpView, build_tcp_header
from .udp import UdpView, build_udp

__all__ = [
    "ARP_REPLY", "ARP_REQUEST", "ArpPacket", "checksum", "ones_sum", "pseudo_header_sum",
    "MalformedPacket", "BROADCAST_MAC", "ETH_HEADER_LEN", "ETHERTYPE_ARP", "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6", "EthernetView", "ethernet_header", "is_multicast", "icmp_frame", "ipv4_frame",
    "tcp_frame", "udp_frame", "IcmpView", "build_icmp", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP",
    "Ipv4View", "build_ipv4_header", "TcpOptions", "TcpView", "build_tcp_header", "UdpView", "build_udp",
]
