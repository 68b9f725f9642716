"""IPv4 reassembly (sans-I/O) and fragmentation."""

import os

from scapy.layers.inet import IP, UDP, fragment

from netkit.ipfrag import Reassembler
from netkit.wire import EthernetView, Ipv4View, UdpView, udp_frame
from netkit.wire.frames import fragment_frames


def _fragments(payload: bytes, size=1480, ident=7):
    pkt = IP(src="10.0.0.1", dst="10.0.0.2", id=ident) / UDP(sport=1, dport=2) / payload
    return [bytes(f) for f in fragment(pkt, fragsize=size)], bytes(pkt)


def test_reassembles_in_any_order():
    frags, whole = _fragments(os.urandom(5000))
    r = Reassembler()
    out = None
    for f in reversed(frags):
        out = r.add(Ipv4View(memoryview(f)), now=0.0) or out
    assert out is not None
    ip = Ipv4View(memoryview(out))
    assert ip.header_checksum_ok() and not ip.is_fragment
    assert bytes(ip.payload) == bytes(Ipv4View(memoryview(whole)).payload)
    assert r.held_bytes == 0 and len(r) == 0


def test_overlap_drops_datagram():
    frags, _ = _fragments(os.urandom(3000))
    r = Reassembler()
    assert r.add(Ipv4View(memoryview(frags[0])), 0.0) is None
    assert r.add(Ipv4View(memoryview(frags[0])), 0.0) is None  # same piece again: overlap
    assert r.stats["overlap"] == 1 and r.held_bytes == 0


def test_timeout_and_memory_cap():
    r = Reassembler(max_bytes=2000, timeout=5.0)
    a, _ = _fragments(os.urandom(3000), ident=1)
    b, _ = _fragments(os.urandom(3000), ident=2)
    r.add(Ipv4View(memoryview(a[0])), 0.0)
    r.add(Ipv4View(memoryview(b[0])), 1.0)  # evicts the older partial datagram
    assert r.stats["evicted"] == 1 and r.held_bytes <= 2000
    r.expire(10.0)
    assert r.stats["timed-out"] == 1 and r.held_bytes == 0


def test_fragment_frames_roundtrip():
    payload = os.urandom(20000)
    frame = udp_frame(b"\x02" * 6, b"\x04" * 6, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 5, 6, payload, ident=9)
    pieces = fragment_frames(frame, 1500)
    assert len(pieces) == 14 and all(len(p) - 14 <= 1500 for p in pieces)
    r = Reassembler()
    out = None
    for p in pieces:
        out = r.add(Ipv4View(EthernetView(memoryview(p)).payload), 0.0) or out
    ip = Ipv4View(memoryview(out))
    udp = UdpView(ip.payload)
    assert bytes(udp.payload) == payload and udp.checksum_ok(ip.src, ip.dst)
