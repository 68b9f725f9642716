"""TCP header: a zero-copy view, the options ``Repr``, and a header builder."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .checksum import ones_sum, pseudo_header_sum
from .errors import MalformedPacket

__all__ = [
    "FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR",
    "TcpView", "TcpOptions", "build_tcp_header", "flags_str", "TCP_HEADER_LEN",
]

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
TCP_HEADER_LEN = 20

# Option kinds
_EOL, _NOP, _MSS, _WSCALE, _SACK_OK, _SACK, _TIMESTAMP = 0, 1, 2, 3, 4, 5, 8
MAX_SACK_BLOCKS = 4

_hdr = struct.Struct("!HHIIBBHHH")
_two_u32 = struct.Struct("!II")
_NOP_NOP_TS = bytes([1, 1, 8, 10])


def flags_str(flags: int) -> str:
    return "".join(c for bit, c in zip((SYN, FIN, RST, PSH, ACK, URG, ECE, CWR), "SFRPAUEC") if flags & bit) or "."


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """Parsed TCP options. ``sack_blocks`` are (left, right) sequence-number pairs."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    #: (TSval, TSecr)
    timestamps: tuple[int, int] | None = None

    @classmethod
    def parse_untrusted(cls, data: bytes | memoryview) -> "TcpOptions":
        """Parse the options area. Unknown options are skipped; bad lengths raise."""
        mss = wscale = timestamps = None
        sack_ok = False
        sacks: tuple[tuple[int, int], ...] = ()
        i, n = 0, len(data)
        while i < n:
            kind = data[i]
            if kind == _EOL:
                break
            if kind == _NOP:
                i += 1
                continue
            if i + 1 >= n:
                raise MalformedPacket("TCP option without length")
            length = data[i + 1]
            if length < 2 or i + length > n:
                raise MalformedPacket(f"TCP option {kind} has bad length {length}")
            body = data[i + 2:i + length]
            if kind == _MSS:
                if length != 4:
                    raise MalformedPacket("TCP MSS option length")
                mss = (body[0] << 8) | body[1]
            elif kind == _WSCALE:
                if length != 3:
                    raise MalformedPacket("TCP window scale option length")
                wscale = min(body[0], 14)  # RFC 7323 2.3: treat >14 as 14
            elif kind == _SACK_OK:
                if length != 2:
                    raise MalformedPacket("TCP SACK-permitted option length")
                sack_ok = True
            elif kind == _SACK:
                if (length - 2) % 8 or length == 2:
                    raise MalformedPacket("TCP SACK option length")
                count = min((length - 2) // 8, MAX_SACK_BLOCKS)
                sacks = tuple(struct.unpack_from("!II", body, 8 * k) for k in range(count))
            elif kind == _TIMESTAMP:
                if length != 10:
                    raise MalformedPacket("TCP timestamp option length")
                timestamps = struct.unpack_from("!II", body, 0)
            i += length
        return cls(mss, wscale, sack_ok, sacks, timestamps)

    def emit(self) -> bytes:
        """Encode, NOP-padded to a multiple of 4 bytes (at most 40)."""
        out = bytearray()
        if self.mss is not None:
            out += struct.pack("!BBH", _MSS, 4, self.mss)
        if self.sack_permitted and self.timestamps is not None:
            out += struct.pack("!BBBBII", _SACK_OK, 2, _TIMESTAMP, 10, *self.timestamps)
        else:
            if self.timestamps is not None:
                out += struct.pack("!BBBBII", _NOP, _NOP, _TIMESTAMP, 10, *self.timestamps)
            if self.sack_permitted:
                out += struct.pack("!BBBB", _NOP, _NOP, _SACK_OK, 2)
        if self.wscale is not None:
            out += struct.pack("!BBBB", _NOP, _WSCALE, 3, self.wscale)
        if self.sack_blocks:
            room = (40 - len(out) - 4) // 8
            blocks = self.sack_blocks[:max(room, 0)]
            if blocks:
                out += struct.pack("!BBBB", _NOP, _NOP, _SACK, 2 + 8 * len(blocks))
                for left, right in blocks:
                    out += struct.pack("!II", left & 0xFFFFFFFF, right & 0xFFFFFFFF)
        while len(out) % 4:
            out.append(_NOP)
        return bytes(out)


class TcpView:
    """Zero-copy view of a TCP segment (header + payload) inside an IPv4 packet."""

    __slots__ = ("buf", "src_port", "dst_port", "seq", "ack", "data_offset", "flags", "window",
                 "checksum_field", "urgent")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < TCP_HEADER_LEN:
            raise MalformedPacket("TCP segment shorter than its header")
        (self.src_port, self.dst_port, self.seq, self.ack, off, self.flags,
         self.window, self.checksum_field, self.urgent) = _hdr.unpack_from(buf, 0)
        self.data_offset = (off >> 4) * 4
        if self.data_offset < TCP_HEADER_LEN or self.data_offset > len(buf):
            raise MalformedPacket(f"TCP data offset {self.data_offset} out of range")
        self.buf = buf

    @property
    def options_bytes(self) -> memoryview:
        return self.buf[TCP_HEADER_LEN:self.data_offset]

    def options(self) -> TcpOptions:
        if self.data_offset == TCP_HEADER_LEN:
            return _NO_OPTIONS
        buf = self.buf
        # Fast path for what nearly every segment of a connection carries: NOP NOP TS.
        if self.data_offset == 32 and buf[20:24] == _NOP_NOP_TS:
            return TcpOptions(timestamps=_two_u32.unpack_from(buf, 24))
        return TcpOptions.parse_untrusted(self.options_bytes)

    @property
    def payload(self) -> memoryview:
        return self.buf[self.data_offset:]

    def checksum_ok(self, src: bytes, dst: bytes) -> bool:
        return ones_sum(self.buf, pseudo_header_sum(src, dst, 6, len(self.buf))) == 0xFFFF


_NO_OPTIONS = TcpOptions()


def build_tcp_header(src_port: int, dst_port: int, seq: int, ack: int, flags: int, window: int,
                     options: bytes = b"", urgent: int = 0) -> bytearray:
    """A TCP header with a zero checksum field (the IPv4 builder fills it in)."""
    if len(options) % 4 or len(options) > 40:
        raise ValueError("TCP options must be padded to 4 bytes and at most 40")
    hdr = bytearray(_hdr.pack(src_port, dst_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                              ((TCP_HEADER_LEN + len(options)) // 4) << 4, flags,
                              window, 0, urgent))
    hdr += options
    return hdr
