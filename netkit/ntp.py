"""SNTP server (RFC 4330, packet format of RFC 5905) serving the host's clock.

As in Docker Desktop ("Addressing Time Drift in Docker Desktop for Mac"), guests should
follow the *host's* clock, not the world's: make across a shared folder compares
timestamps written on both sides, so if the host has drifted 30 minutes from real time
the guest should drift with it. The host clock is therefore this server's primary
reference, and it says so on the wire:

- **stratum 1, reference id ``LOCL``**: RFC 4330 lists ``LOCL`` ("uncalibrated local
  clock used as a primary reference for a subnet without external means of
  synchronization") as a stratum-1 reference identifier. That is exactly our position:
  the host clock is the reference for the guest subnet whatever disciplines it. A
  stratum-2 answer would need the address of an upstream server in the reference id,
  which we do not know (and would be a lie if the host runs no NTP at all).
- **leap indicator 0**, always: the guest must follow the host even when the host itself
  is not synchronized; LI=3 ("alarm") would make clients refuse the answer.
- **precision -20** (about 1 µs): ``time.time()`` reads a nanosecond clock, but what a
  client sees is bounded by the Python code between reading the clock and the datagram
  leaving, which is on the order of a microsecond.
- **root delay 0** (we are the reference) and **root dispersion 2^-16 s** (~15 µs), the
  smallest non-zero value the 16.16 field holds: the reference's own error is nil by
  definition, so only the read-out precision remains.
- the **reference timestamp** is the current second, rounded down, so it is never later
  than the transmit timestamp (some clients treat that as bogus).

Only client-mode (mode 3) requests of versions 1-4 are answered (RFC 4330 also allows
answering symmetric-active with symmetric-passive; we do not, so a guest cannot set up a
peer association with the gateway). Everything else is counted in ``stats`` and dropped.
Replies are never longer than requests (48 bytes), so the server cannot amplify.

The core is sans-I/O: ``handle_untrusted`` takes a datagram and the wall time at which it
arrived and returns the reply. :func:`serve_udp` is a small trio runtime around it.
"""

from __future__ import annotations

import math
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "SntpServer", "NtpPacket", "NTP_PORT", "NTP_EPOCH_OFFSET",
    "to_ntp_timestamp", "from_ntp_timestamp", "serve_udp",
]

NTP_PORT = 123
#: Seconds from the NTP prime epoch (1900-01-01) to the Unix epoch (1970-01-01).
NTP_EPOCH_OFFSET = 2_208_988_800
_ERA = 1 << 32  # seconds in one NTP era (136 years); era 1 begins 2036-02-07T06:28:16Z

_HEADER = struct.Struct(">BBbbII4sQQQQ")  # 48 bytes
assert _HEADER.size == 48

MODE_SYMMETRIC_ACTIVE = 1
MODE_CLIENT = 3
MODE_SERVER = 4


def to_ntp_timestamp(unix_time: float) -> int:
    """A Unix time as a 64-bit NTP timestamp (32.32 fixed point since 1900, modulo the era).

    From 2036-02-07T06:28:16Z the seconds field wraps to 0 (NTP era 1), as RFC 5905
    prescribes; receivers disambiguate with their own clock (:func:`from_ntp_timestamp`).
    """
    seconds = math.floor(unix_time)
    fraction = round((unix_time - seconds) * _ERA)
    if fraction >= _ERA:  # rounding carried into the seconds
        seconds += 1
        fraction -= _ERA
    return (((seconds + NTP_EPOCH_OFFSET) % _ERA) << 32) | fraction


def from_ntp_timestamp(timestamp: int, *, pivot: float) -> float:
    """The Unix time of a 64-bit NTP timestamp, choosing the era that puts it nearest to
    ``pivot`` (a Unix time known to be within 68 years of the answer, such as now)."""
    seconds, fraction = timestamp >> 32, timestamp & 0xFFFFFFFF
    base = math.floor(pivot) + NTP_EPOCH_OFFSET  # pivot in seconds since 1900, all eras
    era = base // _ERA
    candidate = era * _ERA + seconds
    # Pick among the pivot's era and its neighbours the one closest to the pivot.
    candidate = min((candidate - _ERA, candidate, candidate + _ERA), key=lambda c: abs(c - base))
    return candidate - NTP_EPOCH_OFFSET + fraction / _ERA


def _short(seconds: float) -> int:
    """Seconds as the NTP 'short format' (unsigned 16.16), saturating."""
    return max(0, min(0xFFFFFFFF, round(seconds * 65536)))


@dataclass(frozen=True, slots=True)
class NtpPacket:
    """The 48-byte NTP header (extension fields and MACs are not represented)."""

    leap: int
    version: int
    mode: int
    stratum: int
    poll: int
    precision: int
    root_delay: int        # 16.16 fixed point seconds
    root_dispersion: int   # 16.16 fixed point seconds
    reference_id: bytes
    reference_ts: int      # 64-bit NTP timestamps
    originate_ts: int
    receive_ts: int
    transmit_ts: int

    @classmethod
    def parse(cls, data: bytes) -> "NtpPacket":
        """Parse the header; raises ``ValueError`` if ``data`` is shorter than 48 bytes."""
        if len(data) < _HEADER.size:
            raise ValueError(f"NTP packet too short: {len(data)} bytes")
        (first, stratum, poll, precision, delay, dispersion, refid,
         ref, orig, rx, tx) = _HEADER.unpack_from(data)
        return cls(first >> 6, (first >> 3) & 7, first & 7, stratum, poll, precision,
                   delay, dispersion, refid, ref, orig, rx, tx)

    def emit(self) -> bytes:
        return _HEADER.pack((self.leap << 6) | (self.version << 3) | self.mode, self.stratum,
                            self.poll, self.precision, self.root_delay, self.root_dispersion,
                            self.reference_id, self.reference_ts, self.originate_ts,
                            self.receive_ts, self.transmit_ts)


class SntpServer:
    """Answers SNTP client requests with the time of ``clock`` (a Unix-time function).

    ``stats`` counts ``answered`` replies and dropped requests by reason: ``short``
    (under 48 bytes), ``bad_version`` (not 1-4) and ``not_client`` (any mode but 3).
    """

    def __init__(self, *, stratum: int = 1, reference_id: bytes = b"LOCL",
                 precision: int = -20, root_delay: float = 0.0,
                 root_dispersion: float = 2 ** -16,
                 clock: Callable[[], float] = time.time) -> None:
        if not 1 <= stratum <= 15:
            raise ValueError("stratum must be 1..15 (0 is kiss-o'-death, 16 unsynchronized)")
        if len(reference_id) > 4:
            raise ValueError("reference_id is at most 4 bytes")
        if not -128 <= precision <= 127:
            raise ValueError("precision is a signed 8-bit log2 of seconds")
        self.stratum = stratum
        self.reference_id = reference_id.ljust(4, b"\0")
        self.precision = precision
        self.root_delay = _short(root_delay)
        self.root_dispersion = _short(root_dispersion)
        self._clock = clock
        self.stats: Counter[str] = Counter()

    def handle_untrusted(self, payload: bytes, *, received_at: float) -> bytes | None:
        """The reply to one datagram from a guest, or ``None`` to drop it.

        ``received_at`` is the wall-clock (Unix) time at which the datagram arrived; the
        transmit timestamp is read from ``clock`` now, just before the reply is built.
        Never raises on any input.
        """
        if len(payload) < _HEADER.size:
            self.stats["short"] += 1
            return None
        first = payload[0]
        version, mode = (first >> 3) & 7, first & 7
        if not 1 <= version <= 4:
            self.stats["bad_version"] += 1
            return None
        if mode != MODE_CLIENT:
            self.stats["not_client"] += 1
            return None
        poll = payload[2] - 256 if payload[2] >= 128 else payload[2]
        # originate = the client's transmit timestamp, copied bit for bit (RFC 4330 §5).
        client_transmit = int.from_bytes(payload[40:48], "big")
        now = self._clock()
        reply = _HEADER.pack(
            (0 << 6) | (version << 3) | MODE_SERVER, self.stratum, poll, self.precision,
            self.root_delay, self.root_dispersion, self.reference_id,
            to_ntp_timestamp(math.floor(now)), client_transmit,
            to_ntp_timestamp(received_at), to_ntp_timestamp(now))
        self.stats["answered"] += 1
        return reply

    def statistics(self) -> dict[str, int]:
        return dict(self.stats)


async def serve_udp(sock, server: SntpServer, *, wall_clock: Callable[[], float] = time.time,
                    task_status=None) -> None:
    """Answer datagrams on a bound ``trio.socket`` UDP socket with ``server`` until
    cancelled (a runtime for loopback tests and standalone use; the gateway has its own)."""
    import trio

    if task_status is None:
        task_status = trio.TASK_STATUS_IGNORED
    task_status.started()
    while True:
        try:
            data, addr = await sock.recvfrom(2048)
        except ConnectionError:  # ICMP errors from an earlier reply surface here
            continue
        reply = server.handle_untrusted(data, received_at=wall_clock())
        if reply is not None:
            try:
                await sock.sendto(reply, addr)
            except OSError:
                server.stats["send_error"] += 1
