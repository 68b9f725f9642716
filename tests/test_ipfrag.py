"""IPv4 reassembly (sans-I/O) and fragmentation."""

import os
import struct

from scapy.layers.inet import IP, UDP, fragment

from netkit.ipfrag import Reassembler
from netkit.wire import EthernetView, Ipv4View, UdpView, udp_frame
from netkit.wire.checksum import checksum
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
    r = Reassembler(max_bytes=2500, timeout=5.0)
    a, _ = _fragments(os.urandom(3000), ident=1)
    b, _ = _fragments(os.urandom(3000), ident=2)
    r.add(Ipv4View(memoryview(a[0])), 0.0, "guest-a")
    r.add(Ipv4View(memoryview(b[0])), 1.0, "guest-b")  # evicts the older partial datagram
    assert r.stats["evicted"] == 1 and r.held_bytes <= 2500
    assert r.held_by("guest-a") == 0 and r.held_by("guest-b") == r.held_bytes
    r.expire(10.0)
    assert r.stats["timed-out"] == 1 and r.held_bytes == 0 and r.held_by("guest-b") == 0


def _first_fragments(count, ident0=0, size=1480):
    """First fragments (``size`` payload bytes, more-fragments set) of ``count`` datagrams
    that never complete; built by hand, as scapy is slow."""
    out = []
    for i in range(count):
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + size, (ident0 + i) & 0xFFFF, 0x2000, 64,
                                       17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
        struct.pack_into("!H", header, 10, checksum(header))
        out.append(bytes(header) + b"x" * size)
    return out


def _add_all(r, frags, guest, now=0.0):
    return [r.add(Ipv4View(memoryview(f)), now, guest) for f in frags]


def test_guest_share_evicts_only_that_guests_datagrams():
    r = Reassembler(max_bytes=64 * 1024, guest_bytes=16 * 1024)
    victim_frags, whole = _fragments(os.urandom(5000), ident=999)
    _add_all(r, victim_frags[:-1], "victim")  # the victim's datagram is half way
    held_by_victim = r.held_by("victim")
    _add_all(r, _first_fragments(200), "attacker")  # ~400 KB of incomplete datagrams
    assert r.held_by("attacker") <= 16 * 1024
    assert r.stats["guest-evicted"] > 150 and r.stats["evicted"] == 0
    assert r.held_by("victim") == held_by_victim
    out = r.add(Ipv4View(memoryview(victim_frags[-1])), 0.0, "victim")
    assert out is not None and bytes(Ipv4View(memoryview(out)).payload) == bytes(Ipv4View(memoryview(whole)).payload)


def test_total_limit_takes_from_the_biggest_guest():
    """Several flooding guests fill the total; a victim's datagram still completes, and
    the room comes from whoever holds the most."""
    r = Reassembler(max_bytes=32 * 1024, guest_bytes=12 * 1024)
    for i, guest in enumerate(("a1", "a2", "a3")):
        _add_all(r, _first_fragments(50, ident0=1000 * i), guest)
    assert r.held_bytes <= 32 * 1024
    victim_frags, whole = _fragments(os.urandom(8000), ident=7)
    outs = _add_all(r, victim_frags, "victim")
    assert outs[-1] is not None and not any(outs[:-1])
    assert r.stats["evicted"] >= 1 and r.held_by("victim") == 0
    assert max(r.held_by(g) for g in ("a1", "a2", "a3")) <= 12 * 1024


def test_same_ids_from_another_guest_do_not_touch_a_datagram():
    r = Reassembler()
    frags, whole = _fragments(os.urandom(2000), ident=5)
    assert len(frags) == 2
    r.add(Ipv4View(memoryview(frags[0])), 0.0, "victim")
    # The attacker replays the same fragment (same addresses and ident): not an overlap
    # with the victim's datagram, just the attacker's own.
    r.add(Ipv4View(memoryview(frags[0])), 0.0, "attacker")
    assert r.stats["overlap"] == 0
    out = r.add(Ipv4View(memoryview(frags[1])), 0.0, "victim")
    assert out is not None


def test_forget_drops_a_guests_datagrams():
    r = Reassembler()
    _add_all(r, _first_fragments(5), "gone")
    _add_all(r, _first_fragments(3, ident0=100), "stays")
    stays = r.held_by("stays")
    r.forget("gone")
    assert r.held_by("gone") == 0 and r.held_bytes == stays and len(r) == 3


def test_tiny_fragments_are_charged_their_real_cost():
    r = Reassembler(max_bytes=1 << 20, guest_bytes=64 * 1024)
    _add_all(r, _first_fragments(1000, size=8), "attacker")
    # 1000 datagrams of 8 payload bytes each would be 8000 bytes; each costs far more
    assert r.held_by("attacker") <= 64 * 1024 and len(r) < 200


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
