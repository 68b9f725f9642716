"""SNTP server: answers decoded by hand (not with netkit's own NtpPacket), era handling,
malformed and non-client datagrams dropped and counted, and a loopback UDP round trip."""

from __future__ import annotations

import socket
import struct
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from netkit.ntp import (NTP_EPOCH_OFFSET, NtpPacket, SntpServer, from_ntp_timestamp, serve_udp,
                        to_ntp_timestamp)

ERA1 = 2**32 - NTP_EPOCH_OFFSET  # Unix time at which NTP era 1 begins (2036-02-07T06:28:16Z)


def request(*, version: int = 4, mode: int = 3, poll: int = 6, transmit: bytes = b"\x12\x34\x56\x78\x9a\xbc\xde\xf0",
            extra: bytes = b"") -> bytes:
    first = (0 << 6) | (version << 3) | mode
    return bytes([first, 0, poll & 0xFF, 0]) + bytes(36) + transmit + extra


def decode(reply: bytes) -> dict:
    """A hand decoder for the 48-byte header (RFC 5905 figure 8)."""
    assert len(reply) == 48
    first = reply[0]
    delay, dispersion = struct.unpack(">II", reply[4:12])

    def ts(offset: int) -> tuple[int, int]:
        return struct.unpack(">II", reply[offset:offset + 8])

    return {
        "li": first >> 6, "vn": (first >> 3) & 7, "mode": first & 7,
        "stratum": reply[1], "poll": struct.unpack(">b", reply[2:3])[0],
        "precision": struct.unpack(">b", reply[3:4])[0],
        "root_delay": delay / 65536, "root_dispersion": dispersion / 65536,
        "refid": reply[12:16],
        "ref": ts(16), "orig_raw": reply[24:32], "rx": ts(32), "tx": ts(40),
    }


def unix(ts: tuple[int, int], era: int = 0) -> float:
    return era * 2**32 + ts[0] - NTP_EPOCH_OFFSET + ts[1] / 2**32


def test_answers_client_request_with_all_fields():
    server = SntpServer(clock=lambda: 1_700_000_000.75)
    tx = struct.pack(">II", 3_908_000_000, 0xDEADBEEF)
    reply = server.handle_untrusted(request(version=4, poll=10, transmit=tx), received_at=1_700_000_000.5)
    f = decode(reply)
    assert (f["li"], f["vn"], f["mode"]) == (0, 4, 4)
    assert f["stratum"] == 1 and f["refid"] == b"LOCL"
    assert f["poll"] == 10
    assert f["precision"] == -20
    assert f["root_delay"] == 0 and 0 < f["root_dispersion"] < 0.001
    assert f["orig_raw"] == tx  # the client's transmit timestamp, bit for bit
    assert unix(f["rx"]) == pytest.approx(1_700_000_000.5, abs=1e-9)
    assert unix(f["tx"]) == pytest.approx(1_700_000_000.75, abs=1e-9)
    assert unix(f["ref"]) == 1_700_000_000  # the current second: never after transmit
    assert server.stats == {"answered": 1}


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_version_is_echoed(version):
    f = decode(SntpServer().handle_untrusted(request(version=version), received_at=time.time()))
    assert f["vn"] == version and f["mode"] == 4


@pytest.mark.parametrize("poll", [-6, 0, 4, 17, 127])
def test_poll_is_echoed_signed(poll):
    f = decode(SntpServer().handle_untrusted(request(poll=poll), received_at=time.time()))
    assert f["poll"] == poll


def test_configurable_stratum_and_refid():
    f = decode(SntpServer(stratum=2, reference_id=b"\xc0\xa8\x41\x01").handle_untrusted(
        request(), received_at=0.0))
    assert f["stratum"] == 2 and f["refid"] == b"\xc0\xa8\x41\x01"
    with pytest.raises(ValueError):
        SntpServer(stratum=16)
    with pytest.raises(ValueError):
        SntpServer(stratum=0)


def test_trailing_extension_or_mac_is_ignored_and_reply_is_48_bytes():
    server = SntpServer()
    reply = server.handle_untrusted(request(extra=bytes(20)), received_at=time.time())
    assert reply is not None and len(reply) == 48


@pytest.mark.parametrize("length", [0, 1, 47])
def test_short_packets_dropped_and_counted(length):
    server = SntpServer()
    assert server.handle_untrusted(request()[:length], received_at=0.0) is None
    assert server.stats == {"short": 1}


@pytest.mark.parametrize("version", [0, 5, 6, 7])
def test_bad_versions_dropped_and_counted(version):
    server = SntpServer()
    assert server.handle_untrusted(request(version=version), received_at=0.0) is None
    assert server.stats == {"bad_version": 1}


@pytest.mark.parametrize("mode", [0, 1, 2, 4, 5, 6, 7])
def test_non_client_modes_dropped_and_counted(mode):
    server = SntpServer()
    assert server.handle_untrusted(request(mode=mode), received_at=0.0) is None
    assert server.stats == {"not_client": 1}


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_never_raises_and_never_amplifies(data):
    server = SntpServer()
    reply = server.handle_untrusted(data, received_at=1e9)
    if reply is not None:
        assert len(reply) == 48 <= len(data)
        assert decode(reply)["mode"] == 4
    assert sum(server.stats.values()) == 1


# ---------------------------------------------------------------- timestamps and eras

def test_known_timestamps():
    assert to_ntp_timestamp(0.0) == NTP_EPOCH_OFFSET << 32
    assert to_ntp_timestamp(0.5) == (NTP_EPOCH_OFFSET << 32) | 0x80000000
    assert to_ntp_timestamp(-NTP_EPOCH_OFFSET) == 0  # 1900-01-01, the prime epoch


def test_fraction_rounding_carries_into_seconds():
    ts = to_ntp_timestamp(100.99999999999)
    assert ts >> 32 == NTP_EPOCH_OFFSET + 101 and ts & 0xFFFFFFFF == 0


def test_era_wrap_in_2036():
    # One second before the wrap the seconds field is all ones; at the wrap it is 0.
    assert to_ntp_timestamp(ERA1 - 1) >> 32 == 0xFFFFFFFF
    assert to_ntp_timestamp(ERA1) >> 32 == 0
    assert to_ntp_timestamp(ERA1 + 5.25) == (5 << 32) | 0x40000000
    # Decoding chooses the era nearest the pivot, on both sides of the wrap.
    assert from_ntp_timestamp(to_ntp_timestamp(ERA1 + 5.25), pivot=ERA1 - 3600) == ERA1 + 5.25
    assert from_ntp_timestamp(to_ntp_timestamp(ERA1 - 0.5), pivot=ERA1 + 3600) == ERA1 - 0.5


def test_server_across_the_2036_wrap():
    # The datagram arrives 0.25 s before the wrap; the reply leaves 0.25 s after it.
    server = SntpServer(clock=lambda: ERA1 + 0.25)
    f = decode(server.handle_untrusted(request(), received_at=ERA1 - 0.25))
    assert f["rx"] == (0xFFFFFFFF, 0xC0000000)
    assert f["tx"] == (0, 0x40000000)
    assert f["ref"] == (0, 0)
    # A client in era 1 (or straddling it) recovers both times.
    assert unix(f["rx"], era=0) == ERA1 - 0.25
    assert unix(f["tx"], era=1) == ERA1 + 0.25


@given(st.floats(min_value=-NTP_EPOCH_OFFSET, max_value=5_000_000_000, allow_nan=False),
       st.floats(min_value=-2e9, max_value=2e9, allow_nan=False))
def test_round_trip_within_68_years_of_pivot(t, delta):
    pivot = t + delta
    back = from_ntp_timestamp(to_ntp_timestamp(t), pivot=pivot)
    assert back == pytest.approx(t, abs=2e-6)


def test_packet_repr_round_trip():
    reply = SntpServer(clock=lambda: 1e9).handle_untrusted(request(), received_at=1e9)
    pkt = NtpPacket.parse(reply)
    assert pkt.mode == 4 and pkt.version == 4 and pkt.reference_id == b"LOCL"
    assert pkt.emit() == reply
    with pytest.raises(ValueError):
        NtpPacket.parse(reply[:47])


# ---------------------------------------------------------------- loopback UDP

async def test_loopback_udp_client_offset_is_small():
    server = SntpServer()
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_udp, sock, server)
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with client:
            offsets = []
            for _ in range(3):
                t1 = time.time()
                await client.sendto(request(transmit=struct.pack(">Q", to_ntp_timestamp(t1))),
                                    sock.getsockname())
                with trio.fail_after(5):
                    data = await client.recv(100)
                t4 = time.time()
                f = decode(data)
                t2, t3 = unix(f["rx"]), unix(f["tx"])
                assert f["orig_raw"] == struct.pack(">Q", to_ntp_timestamp(t1))
                assert t1 <= t2 + 1e-6 and t2 <= t3 and t3 <= t4 + 1e-6
                offsets.append(((t2 - t1) + (t3 - t4)) / 2)
            assert min(abs(o) for o in offsets) < 0.010
            # garbage on the same socket is dropped, not answered, and counted
            await client.sendto(b"junk", sock.getsockname())
            await client.sendto(request(mode=1), sock.getsockname())
            await client.sendto(request(), sock.getsockname())
            with trio.fail_after(5):
                assert len(await client.recv(100)) == 48
        nursery.cancel_scope.cancel()
    sock.close()
    assert server.stats == {"answered": 4, "short": 1, "not_client": 1}
