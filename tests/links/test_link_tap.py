"""Tap links: a real tap in a network namespace, with and without virtio-net offloads.

The kernel in the namespace is the peer: it ARPs and pings us, and (with offloads)
hands us GSO frames and accepts one from us. The unprivileged tests check the
virtio-net header handling over a socketpair standing in for the tap fd.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys

import pytest
import trio
import trio.testing

from netkit.links import LinkClosed, TapLink, TxOffload
from netkit.links.tap import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR_LEN,
    VnetHeader,
    _in_netns,
    decode_vnet_header,
    encode_vnet_header,
)

PEER_MAC = "02:00:00:00:00:99"
PEER_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
TAP = "nkt0"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def mac_of(netns: str, dev: str) -> str:
    return json.loads(ip("-j", "-n", netns, "link", "show", dev))[0]["address"]


def configure_guest(netns: str, *, static_neighbor: bool = False) -> str:
    ip("-n", netns, "addr", "add", f"{GUEST_IP}/24", "dev", TAP)
    if static_neighbor:
        ip("-n", netns, "neigh", "add", PEER_IP, "lladdr", PEER_MAC, "dev", TAP)
    return mac_of(netns, TAP)


# ----- the virtio-net header, no privileges needed -----
def test_vnet_header_encode_decode():
    assert encode_vnet_header(None) == bytes(10)
    raw = encode_vnet_header(TxOffload(csum_start=34, csum_offset=16, gso_type=1, gso_size=1448, hdr_len=66))
    assert raw == struct.pack("<BBHHHH", 1, 1, 66, 1448, 34, 16)
    assert decode_vnet_header(raw) == VnetHeader(1, 1, 66, 1448, 34, 16)
    assert decode_vnet_header(raw).needs_csum
    # checksum offload without GSO
    assert encode_vnet_header(TxOffload(csum_start=34, csum_offset=6))[:2] == b"\x01\x00"
    with pytest.raises(ValueError):
        decode_vnet_header(b"short")


async def test_offload_link_strips_and_builds_the_header_over_a_stand_in_fd():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = TapLink.adopt(ours.detach(), offload=True, name="tap:standin")
    assert link.offload
    theirs.send(encode_vnet_header(TxOffload(34, 16, 1, 1448, 66)) + b"G" * 30000)
    theirs.send(bytes(10) + b"p" * 60)
    theirs.send(b"short")  # shorter than the header: counted, dropped
    assert await link.receive_batch() == [b"G" * 30000, b"p" * 60]
    assert link.stats.receive_errors == 1
    link.send(b"q" * 60)
    link.send(b"T" * 20000, TxOffload(34, 16, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 66))
    plain, gso = theirs.recv(70000), theirs.recv(70000)
    assert plain == bytes(10) + b"q" * 60
    assert decode_vnet_header(gso) == VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 1, 66, 1448, 34, 16)
    assert gso[VNET_HDR_LEN:] == b"T" * 20000
    theirs.close()
    with pytest.raises(LinkClosed):
        await link.receive_batch()
    await link.aclose()


async def test_plain_link_passes_frames_untouched_over_a_stand_in_fd():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = TapLink.adopt(ours.detach())
    for i in range(100):
        theirs.send(bytes([i]) * 100)
    batch = await link.receive_batch()
    assert len(batch) == 64 and batch[0] == bytes(100)  # capped batches
    assert len(await link.receive_batch()) == 36
    link.send(b"z" * 1514)
    assert theirs.recv(2000) == b"z" * 1514
    theirs.close()
    await link.aclose()


# ----- a real tap -----
def arp_reply_for(frame: bytes):
    from scapy.layers.l2 import ARP, Ether

    pkt = Ether(frame)
    if ARP in pkt and pkt[ARP].op == 1 and pkt[ARP].pdst == PEER_IP:
        return bytes(Ether(dst=pkt.src, src=PEER_MAC) / ARP(
            op=2, hwsrc=PEER_MAC, psrc=PEER_IP, hwdst=pkt[ARP].hwsrc, pdst=pkt[ARP].psrc))
    return None


def echo_reply_for(frame: bytes):
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    if ICMP in pkt and pkt[ICMP].type == 8 and pkt[IP].dst == PEER_IP:
        # The payload is copied as is; scapy recomputes the checksums.
        return bytes(Ether(dst=pkt.src, src=PEER_MAC) / IP(src=PEER_IP, dst=pkt[IP].src) /
                     ICMP(type=0, id=pkt[ICMP].id, seq=pkt[ICMP].seq) / bytes(pkt[ICMP].payload))
    return None


@pytest.mark.privileged
@pytest.mark.parametrize("offload", [False, True], ids=["plain", "vnet-hdr"])
async def test_kernel_arps_and_pings_through_the_tap(netns, offload):
    link = TapLink.create(TAP, netns=netns, offload=offload, mtu=1500)
    assert link.offload is offload and link.mtu == 1500
    assert "UP" in ip("-n", netns, "link", "show", TAP)
    assert "mtu 1500" in ip("-n", netns, "link", "show", TAP)
    configure_guest(netns)
    seen = {"arp": 0, "echo": 0}

    async def responder():
        while True:
            for frame in await link.receive_batch():
                if (reply := arp_reply_for(frame)) is not None:
                    seen["arp"] += 1
                    assert link.send(reply)
                elif (reply := echo_reply_for(frame)) is not None:
                    seen["echo"] += 1
                    assert link.send(reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        with trio.fail_after(10):
            result = await trio.run_process(
                ["ip", "netns", "exec", netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", PEER_IP],
                check=False, capture_stdout=True, capture_stderr=True)
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stdout + result.stderr
    assert seen["arp"] >= 1 and seen["echo"] == 2
    await link.aclose()
    # The tap is not persistent: closing its fd removed it.
    assert subprocess.run(["ip", "-n", netns, "link", "show", TAP], capture_output=True).returncode != 0


@pytest.mark.privileged
async def test_large_ping_is_fragmented_to_the_mtu(netns):
    link = TapLink.create(TAP, netns=netns, mtu=1280)
    configure_guest(netns, static_neighbor=True)
    sizes = []

    async def collect():
        while True:
            sizes.extend(len(f) for f in await link.receive_batch())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        await trio.run_process(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "0.2", "-s", "4000",
                                PEER_IP], check=False, capture_stdout=True)
        with trio.fail_after(2):
            while len(sizes) < 4:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert max(sizes) <= 1280 + 14
    await link.aclose()


GSO_SERVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 5001))
srv.listen()
srv.settimeout(8)
conn, _ = srv.accept()
conn.settimeout(8)
total = 0
while total < int(sys.argv[2]):
    data = conn.recv(1 << 16)
    if not data:
        break
    total += len(data)
print(total, flush=True)
conn.sendall(b"s" * 60000)
conn.close()
"""


def ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.mark.privileged
async def test_gso_frames_both_ways_with_offloads(netns):
    """Our one 20 kB TCP segment (GSO, partial checksum) reaches a socket in the
    namespace, and the kernel answers with GSO frames larger than the MTU."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    link = TapLink.create(TAP, netns=netns, offload=True, mtu=1500)
    guest_mac = configure_guest(netns, static_neighbor=True)
    payload_len = 20000
    server = await trio.lowlevel.open_process(
        ["ip", "netns", "exec", netns, sys.executable, "-c", GSO_SERVER, GUEST_IP, str(payload_len)],
        stdout=subprocess.PIPE)
    state = {"rcv_nxt": None, "max_frame": 0, "data_bytes": 0, "fin": False}
    our_isn, port = 1000, 40000

    def segment(flags: str, seq: int, ack: int, payload: bytes = b"", **tcp) -> bytes:
        return bytes(Ether(src=PEER_MAC, dst=guest_mac) / IP(src=PEER_IP, dst=GUEST_IP, flags="DF") /
                     TCP(sport=port, dport=5001, flags=flags, seq=seq, ack=ack, window=65535, **tcp) / payload)

    try:
        async with trio.open_nursery() as nursery:
            synack = trio.Event()

            async def tcp_peer():
                while True:
                    for frame in await link.receive_batch():
                        pkt = Ether(frame)
                        if TCP not in pkt or pkt[TCP].dport != port:
                            continue
                        state["max_frame"] = max(state["max_frame"], len(frame))
                        tcp = pkt[TCP]
                        if tcp.flags.S and tcp.flags.A:
                            state["rcv_nxt"] = tcp.seq + 1
                            synack.set()
                            continue
                        data = len(bytes(tcp.payload))
                        if data or tcp.flags.F:
                            state["data_bytes"] += data
                            state["rcv_nxt"] = tcp.seq + data + (1 if tcp.flags.F else 0)
                            state["fin"] = state["fin"] or bool(tcp.flags.F)
                            link.send(segment("A", our_isn + 1 + payload_len, state["rcv_nxt"]))

            nursery.start_soon(tcp_peer)
            with trio.fail_after(10):
                while not synack.is_set():  # retry until the server is listening
                    link.send(segment("S", our_isn, 0, options=[("MSS", 1460)]))
                    with trio.move_on_after(0.1):
                        await synack.wait()
                link.send(segment("A", our_isn + 1, state["rcv_nxt"]))
                # One big segment for the kernel to treat as GSO: the TCP checksum field
                # holds only the pseudo-header sum (not complemented), as virtio expects.
                big = bytearray(segment("PA", our_isn + 1, state["rcv_nxt"], b"D" * payload_len, chksum=0))
                tcp_len = len(big) - 34
                pseudo = socket.inet_aton(PEER_IP) + socket.inet_aton(GUEST_IP) + struct.pack(">BBH", 0, 6, tcp_len)
                struct.pack_into(">H", big, 34 + 16, ones_complement_sum(pseudo))
                assert link.send(bytes(big), TxOffload(csum_start=34, csum_offset=16,
                                                       gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
                                                       gso_size=1460, hdr_len=54))
                got = await server.stdout.receive_some(100)
                assert int(got.split()[0]) == payload_len
                while not state["fin"]:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            if server.returncode is None:
                server.kill()
            await server.wait()
            await server.stdout.aclose()
    assert state["data_bytes"] == 60000
    assert state["max_frame"] > 1514, "the kernel sent no GSO frame"
    await link.aclose()


@pytest.mark.privileged
async def test_adopt_checks_the_vnet_header_flag(netns):
    with _in_netns(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"nkadopt", 0x0002 | 0x1000 | 0x4000))
    try:
        with pytest.raises(ValueError):
            TapLink.adopt(fd, offload=False)
    except BaseException:
        os.close(fd)
        raise
    link = TapLink.adopt(fd, offload=True, name="tap:adopted")
    assert link.fileno() == fd
    await link.aclose()


@pytest.mark.privileged
async def test_deleting_the_namespace_ends_the_link(netns):
    link = TapLink.create(TAP, netns=netns)
    async with trio.open_nursery() as nursery:

        async def reader():
            with pytest.raises(LinkClosed):
                while True:
                    await link.receive_batch()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # the reader waits in receive_batch
        # Deleting the device (as deleting its namespace would) makes reads fail.
        ip("-n", netns, "link", "del", TAP)
        with trio.fail_after(3):
            while True:
                await trio.sleep(0.01)
                if not nursery.child_tasks:
                    break
    await link.aclose()


@pytest.mark.privileged
def test_create_in_a_missing_namespace_fails_cleanly():
    from netkit.testing.privileged import require_privileged

    require_privileged()
    with pytest.raises(OSError):
        TapLink.create(TAP, netns="nklt-does-not-exist")
