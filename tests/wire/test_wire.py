"""Wire views and builders, cross-checked against scapy's independent encoders."""

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from netkit.wire import (ARP_REPLY, ArpPacket, EthernetView, IcmpView, Ipv4View, MalformedPacket,
                         TcpOptions, TcpView, UdpView, build_tcp_header, icmp_frame, tcp_frame, udp_frame)
from netkit.wire.checksum import checksum, ones_sum, pseudo_header_sum
from netkit.wire.frames import TCP_CSUM_OFFSET, TCP_CSUM_START

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
IP_A = bytes([10, 0, 0, 1])
IP_B = bytes([10, 0, 0, 2])


def reference_sum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum((b[i] << 8) | b[i + 1] for i in range(0, len(b), 2))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@given(st.binary(max_size=2000))
def test_ones_sum_matches_reference(data):
    assert ones_sum(data) == reference_sum(data)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1500, 65535])
def test_ones_sum_sizes(n):
    data = os.urandom(n)
    assert ones_sum(data) == reference_sum(data)
    assert ones_sum(b"\xff" * n) == reference_sum(b"\xff" * n)


def test_checksum_verifies():
    data = bytearray(os.urandom(102)) + b"\0\0"  # even length: the field sits at an even offset
    data[-2:] = checksum(data).to_bytes(2, "big")
    assert ones_sum(data) == 0xFFFF


def test_udp_frame_matches_scapy():
    frame = udp_frame(MAC_B, MAC_A, IP_A, IP_B, 1234, 53, b"hello", ident=7)
    pkt = Ether(frame)
    assert pkt[UDP].sport == 1234 and pkt[UDP].dport == 53 and bytes(pkt[UDP].payload) == b"hello"
    ref = Ether(bytes(Ether(dst=MAC_B, src=MAC_A) / IP(src="10.0.0.1", dst="10.0.0.2", id=7, flags="DF")
                      / UDP(sport=1234, dport=53) / b"hello"))
    assert pkt[IP].chksum == ref[IP].chksum
    assert pkt[UDP].chksum == ref[UDP].chksum
    eth = EthernetView(memoryview(frame))
    ip = Ipv4View(eth.payload)
    assert ip.header_checksum_ok() and not ip.is_fragment and ip.dont_fragment
    udp = UdpView(ip.payload)
    assert udp.checksum_ok(ip.src, ip.dst) and bytes(udp.payload) == b"hello"


def test_tcp_frame_with_options_matches_scapy():
    opts = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamps=(123, 456))
    hdr = build_tcp_header(40000, 80, 1000, 2000, 0x12, 65535, opts.emit())
    frame = tcp_frame(MAC_B, MAC_A, IP_A, IP_B, hdr, b"payload!")
    pkt = Ether(frame)
    ref = Ether(bytes(pkt.__class__(bytes(pkt))))  # re-parse
    del ref[TCP].chksum
    assert Ether(bytes(ref))[TCP].chksum == pkt[TCP].chksum
    sopts = dict((k, v) for k, v in pkt[TCP].options)
    assert sopts["MSS"] == 1460 and sopts["WScale"] == 7 and sopts["Timestamp"] == (123, 456)
    assert "SAckOK" in sopts
    ip = Ipv4View(EthernetView(memoryview(frame)).payload)
    tcp = TcpView(ip.payload)
    assert tcp.checksum_ok(ip.src, ip.dst)
    assert tcp.options() == opts
    assert (tcp.seq, tcp.ack, tcp.flags, tcp.window) == (1000, 2000, 0x12, 65535)
    assert bytes(tcp.payload) == b"payload!"


def test_tcp_partial_checksum_completes():
    hdr = build_tcp_header(1, 2, 3, 4, 0x10, 100)
    payload = os.urandom(3000)
    frame = bytearray(tcp_frame(MAC_B, MAC_A, IP_A, IP_B, hdr, payload, partial_checksum=True))
    # Complete it the way a NIC does: checksum from csum_start to the end, into the field.
    seg = frame[TCP_CSUM_START:]
    c = checksum(seg)
    struct.pack_into("!H", frame, TCP_CSUM_START + TCP_CSUM_OFFSET, c)
    ip = Ipv4View(EthernetView(memoryview(bytes(frame))).payload)
    assert TcpView(ip.payload).checksum_ok(ip.src, ip.dst)


def test_scapy_tcp_sack_parsed():
    pkt = bytes(TCP(sport=1, dport=2, flags="A", options=[("NOP", None), ("NOP", None),
                                                          ("SAck", (10, 20, 30, 40))]))
    assert TcpView(memoryview(pkt)).options().sack_blocks == ((10, 20), (30, 40))


def test_tcp_options_roundtrip_with_sack():
    opts = TcpOptions(timestamps=(1, 2), sack_blocks=((5, 6), (7, 8), (9, 10)))
    assert TcpOptions.parse_untrusted(opts.emit()) == opts


@pytest.mark.parametrize("raw", [b"\x02", b"\x02\x05\x00\x00\x00", b"\x03\x02", b"\x05\x03xxx", b"\x08\x04ab",
                                 b"\x04\x03x", b"\x02\x00"])
def test_tcp_options_malformed(raw):
    with pytest.raises(MalformedPacket):
        TcpOptions.parse_untrusted(raw)


def test_icmp_echo_matches_scapy():
    frame = icmp_frame(MAC_B, MAC_A, IP_A, IP_B, 8, 0, struct.pack("!HH", 0x1234, 7), b"abc")
    pkt = Ether(frame)
    assert pkt[ICMP].type == 8 and pkt[ICMP].id == 0x1234 and pkt[ICMP].seq == 7
    icmp = IcmpView(Ipv4View(EthernetView(memoryview(frame)).payload).payload)
    assert icmp.checksum_ok() and (icmp.ident, icmp.sequence) == (0x1234, 7)


def test_arp_roundtrip_with_scapy():
    raw = bytes(ARP(op=2, hwsrc="02:00:00:00:00:01", psrc="10.0.0.1", hwdst="02:00:00:00:00:02", pdst="10.0.0.2"))
    arp = ArpPacket.parse_untrusted(raw)
    assert arp.operation == ARP_REPLY and arp.sender_mac == MAC_A and arp.target_ip == IP_B
    assert arp.emit() == raw[:28]


def test_fragment_flags():
    pkt = bytes(IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", frag=0, proto=17) / (b"x" * 16))
    ip = Ipv4View(memoryview(pkt))
    assert ip.is_fragment and ip.more_fragments and ip.fragment_offset == 0
    pkt = bytes(IP(src="10.0.0.1", dst="10.0.0.2", frag=3, proto=17) / (b"x" * 16))
    ip = Ipv4View(memoryview(pkt))
    assert ip.is_fragment and not ip.more_fragments and ip.fragment_offset == 24


def test_ipv4_padding_is_cut():
    pkt = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"x") + b"\0" * 10
    ip = Ipv4View(memoryview(pkt))
    assert len(ip.payload) == 9


@pytest.mark.parametrize("mutate", [
    lambda b: b[:10],                                    # truncated
    lambda b: bytes([0x65]) + b[1:],                     # version 6
    lambda b: bytes([0x44]) + b[1:],                     # IHL 16 bytes
    lambda b: b[:2] + (9999).to_bytes(2, "big") + b[4:],  # total length beyond buffer
    lambda b: b[:2] + (10).to_bytes(2, "big") + b[4:],    # total length below header
])
def test_ipv4_malformed(mutate):
    pkt = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / b"data")
    with pytest.raises(MalformedPacket):
        Ipv4View(memoryview(mutate(pkt)))


def test_udp_and_tcp_malformed():
    with pytest.raises(MalformedPacket):
        UdpView(memoryview(b"\0" * 7))
    with pytest.raises(MalformedPacket):
        UdpView(memoryview(struct.pack("!HHHH", 1, 2, 100, 0)))
    with pytest.raises(MalformedPacket):
        TcpView(memoryview(b"\0" * 19))
    bad_offset = bytearray(20)
    bad_offset[12] = 0x40  # data offset 16
    with pytest.raises(MalformedPacket):
        TcpView(memoryview(bytes(bad_offset)))
    with pytest.raises(MalformedPacket):
        EthernetView(memoryview(b"\0" * 13))
    with pytest.raises(MalformedPacket):
        ArpPacket.parse_untrusted(b"\0" * 28)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_views_raise_only_malformed(data):
    mv = memoryview(data)
    for parse in (EthernetView, Ipv4View, UdpView, IcmpView):
        try:
            parse(mv)
        except MalformedPacket:
            pass
    try:
        TcpView(mv).options()
    except MalformedPacket:
        pass
    try:
        ArpPacket.parse_untrusted(data)
    except MalformedPacket:
        pass


def test_pseudo_header_sum():
    assert pseudo_header_sum(IP_A, IP_B, 6, 20) == reference_sum(IP_A + IP_B + b"\0\x06\x00\x14")
