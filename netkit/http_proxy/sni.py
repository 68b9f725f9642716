"""A bounded, sans-I/O parser for the server name (SNI) in a TLS ClientHello.

``parse_client_hello_untrusted(data)`` takes the bytes a guest has sent so far on a TLS
connection and answers one of:

- ``INCOMPLETE``: a valid prefix; read more (up to ``MAX_CLIENT_HELLO`` bytes);
- ``FOUND`` with ``server_name``: the host_name from the server_name extension;
- ``NO_SNI``: a well-formed ClientHello without a (usable) server name;
- ``INVALID``: not a TLS ClientHello.

It never raises on any input and never looks past ``MAX_CLIENT_HELLO`` bytes. The
handshake message may be fragmented over several TLS records (RFC 8446 5.1).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["SniStatus", "SniResult", "parse_client_hello_untrusted", "MAX_CLIENT_HELLO"]

#: Most bytes of records we look at: a ClientHello is a few hundred bytes (about 1.8 KB
#: with post-quantum key shares); 64 KiB leaves room for any real one.
MAX_CLIENT_HELLO = 64 * 1024

_RECORD_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST = 0
_MAX_RECORD = 16384 + 2048  # TLSPlaintext limit is 2^14; allow a little slack
_NAME_RE = re.compile(rb"^[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*$")


class SniStatus(enum.Enum):
    INCOMPLETE = "incomplete"
    FOUND = "found"
    NO_SNI = "no_sni"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class SniResult:
    status: SniStatus
    server_name: str | None = None
    #: For INCOMPLETE: parsing again before this many bytes are there is pointless
    #: (lets a caller fed one byte at a time avoid quadratic work).
    need: int = 0

    @property
    def done(self) -> bool:
        return self.status is not SniStatus.INCOMPLETE


_INVALID = SniResult(SniStatus.INVALID)
_NO_SNI = SniResult(SniStatus.NO_SNI)


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds-checked big-endian reads over a bytes slice; overrun raises _Malformed."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _Malformed
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def sub(self, n: int) -> "_Reader":
        """A reader over the next ``n`` bytes (which this one skips)."""
        if n < 0 or self.pos + n > self.end:
            raise _Malformed
        r = _Reader(self.buf, self.pos, self.pos + n)
        self.pos += n
        return r


def _handshake_message(data: bytes) -> tuple[bytes, int]:
    """Reassemble the first handshake message from TLS records.

    Returns (the whole message with its 4-byte header, 0) once it is all there, or
    (``b""``, bytes needed to make progress) while ``data`` is a valid prefix; raises
    ``_Malformed`` for anything else. Records after the one that completes the message
    (0-RTT data...) are ignored."""
    out = bytearray()
    pos = 0
    n = len(data)
    while True:
        if out and out[0] != _HANDSHAKE_CLIENT_HELLO:
            raise _Malformed
        if len(out) >= 4:
            length = int.from_bytes(out[1:4], "big")
            if length < 38 or length > MAX_CLIENT_HELLO:
                raise _Malformed
            if len(out) >= 4 + length:
                return bytes(out[:4 + length]), 0
        if pos >= n:
            return b"", n + 1
        header = data[pos:pos + 5]
        # Check each header byte as soon as it is there, so garbage fails fast.
        if header[0] != _RECORD_HANDSHAKE or (len(header) >= 2 and header[1] != 3):
            raise _Malformed
        if len(header) < 5:
            return b"", pos + 5
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > _MAX_RECORD:
            raise _Malformed
        fragment = data[pos + 5:pos + 5 + length]
        out += fragment
        pos += 5 + length
        if len(fragment) < length:
            # A partial record: the message may be complete already; if not, check
            # what is there and wait for the rest of this record.
            if out and out[0] != _HANDSHAKE_CLIENT_HELLO:
                raise _Malformed
            if len(out) >= 4:
                message_length = int.from_bytes(out[1:4], "big")
                if not 38 <= message_length <= MAX_CLIENT_HELLO:
                    raise _Malformed
                if len(out) >= 4 + message_length:
                    return bytes(out[:4 + message_length]), 0
                return b"", min(pos, n + 4 + message_length - len(out))
            return b"", min(pos, n + 4 - len(out))


def _valid_name(raw: bytes) -> str | None:
    name = raw[:-1] if raw.endswith(b".") else raw
    if not 0 < len(name) <= 253 or not _NAME_RE.match(name):
        return None
    # An IP literal is not allowed in SNI (RFC 6066 3); don't route by one.
    if re.fullmatch(rb"[0-9.]+", name):
        return None
    return name.decode("ascii").lower()


def _parse_hello_body(body: bytes) -> SniResult:
    r = _Reader(body)
    version = r.take(2)
    if version[0] != 3:
        raise _Malformed
    r.take(32)  # random
    session_id_len = r.u8()
    if session_id_len > 32:
        raise _Malformed
    r.take(session_id_len)
    suites_len = r.u16()
    if suites_len < 2 or suites_len % 2:
        raise _Malformed
    r.take(suites_len)
    compression_len = r.u8()
    if compression_len < 1:
        raise _Malformed
    r.take(compression_len)
    if r.remaining() == 0:
        return _NO_SNI  # no extensions at all (SSL 3.0 / old clients)
    extensions = r.sub(r.u16())
    if r.remaining() != 0:
        raise _Malformed
    seen: set[int] = set()
    found: str | None = None
    while extensions.remaining():
        ext_type = extensions.u16()
        ext = extensions.sub(extensions.u16())
        if ext_type in seen:
            raise _Malformed  # RFC 8446 4.2: no extension type appears twice
        seen.add(ext_type)
        if ext_type != _EXT_SERVER_NAME:
            continue
        names = ext.sub(ext.u16())
        if ext.remaining():
            raise _Malformed
        while names.remaining():
            name_type = names.u8()
            name = names.take(names.u16())
            if name_type == _NAME_TYPE_HOST and found is None:
                found = _valid_name(name)
                if found is None:
                    return _NO_SNI
    if found is None:
        return _NO_SNI
    return SniResult(SniStatus.FOUND, found)


def parse_client_hello_untrusted(data: bytes | bytearray | memoryview) -> SniResult:
    """Classify the first bytes of a TLS connection; see the module docstring.

    Only the first ``MAX_CLIENT_HELLO`` bytes are looked at; a ClientHello that is
    still incomplete there is ``INVALID`` (so a caller never needs to read more)."""
    try:
        view = bytes(data[:MAX_CLIENT_HELLO])
        message, need = _handshake_message(view)
        if not message:
            if len(view) >= MAX_CLIENT_HELLO:
                return _INVALID
            return SniResult(SniStatus.INCOMPLETE, need=min(need, MAX_CLIENT_HELLO))
        return _parse_hello_body(message[4:])
    except _Malformed:
        return _INVALID
    except Exception:  # pragma: no cover - defence in depth: untrusted input never raises
        return _INVALID
    except Exception:  # pragma: no cover - defence in depth: untrusted input never raises
        return _INVALID
