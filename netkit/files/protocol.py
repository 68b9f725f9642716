"""9P2000.L wire format: message numbers, field layouts, one table-driven codec.

Shared by the server (which decodes T-messages and encodes R-messages) and the test
client (the reverse). Every message is ``size[4] type[1] tag[2]`` followed by the fields
in :data:`LAYOUTS`, all little-endian. Field codes:

==== =========================================================================
b    u8            w    u16           d    u32           q    u64
s    string: u16 length + bytes (names are decoded with surrogateescape, so any
     byte string a host filesystem holds round-trips)
Q    qid: type[1] version[4] path[8]
S    u16 count + that many strings (Twalk names)
R    u16 count + that many qids (Rwalk)
D    u32 count + that many bytes (Rread, Twrite, Rreaddir)
o    optional trailing u32: 0 when the message ends before it (Tfsync's datasync,
     which older kernels do not send)
==== =========================================================================

Decoding checks every length against the bytes present and raises only
:class:`MalformedMessage`; trailing bytes after the last field are ignored (room for
extensions, as Linux does).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

__all__ = [
    "MalformedMessage", "Qid", "LAYOUTS", "NAMES", "NUMBERS", "HEADER", "NOTAG", "NOFID",
    "QTDIR", "QTSYMLINK", "QTFILE", "encode", "decode", "encode_dirent", "decode_dirents",
    "error_body", "MAXWELEM", "IOHDRSZ",
]


class MalformedMessage(ValueError):
    """A message whose fields do not fit its bytes (or an unknown message type)."""


class Qid(NamedTuple):
    type: int
    version: int
    path: int

    def pack(self) -> bytes:
        return _QID.pack(self.type, self.version, self.path)


NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
MAXWELEM = 16
#: Bytes of an Rread/Twrite that are not data: size, type, tag, count (+ fid, offset).
IOHDRSZ = 24
QTDIR, QTSYMLINK, QTFILE = 0x80, 0x02, 0x00

HEADER = struct.Struct("<IBH")
_QID = struct.Struct("<BIQ")
_DIRENT_HEAD = struct.Struct("<BIQQB")  # qid, offset, type (the name follows)

#: message number -> (name, fields). Requests (T) are even, replies (R) odd.
LAYOUTS: dict[int, tuple[str, tuple[tuple[str, str], ...]]] = {}


def _m(number: int, name: str, spec: str) -> None:
    fields = tuple((f.split(":")[0], f.split(":")[1]) for f in spec.split()) if spec else ()
    LAYOUTS[number] = (name, fields)


_m(7, "Rlerror", "ecode:d")
_m(8, "Tstatfs", "fid:d")
_m(9, "Rstatfs", "type:d bsize:d blocks:q bfree:q bavail:q files:q ffree:q fsid:q namelen:d")
_m(12, "Tlopen", "fid:d flags:d")
_m(13, "Rlopen", "qid:Q iounit:d")
_m(14, "Tlcreate", "fid:d name:s flags:d mode:d gid:d")
_m(15, "Rlcreate", "qid:Q iounit:d")
_m(16, "Tsymlink", "fid:d name:s symtgt:s gid:d")
_m(17, "Rsymlink", "qid:Q")
_m(18, "Tmknod", "dfid:d name:s mode:d major:d minor:d gid:d")
_m(19, "Rmknod", "qid:Q")
_m(20, "Trename", "fid:d dfid:d name:s")
_m(21, "Rrename", "")
_m(22, "Treadlink", "fid:d")
_m(23, "Rreadlink", "target:s")
_m(24, "Tgetattr", "fid:d request_mask:q")
_m(25, "Rgetattr", "valid:q qid:Q mode:d uid:d gid:d nlink:q rdev:q size:q blksize:q blocks:q "
                   "atime_sec:q atime_nsec:q mtime_sec:q mtime_nsec:q ctime_sec:q ctime_nsec:q "
                   "btime_sec:q btime_nsec:q gen:q data_version:q")
_m(26, "Tsetattr", "fid:d valid:d mode:d uid:d gid:d size:q atime_sec:q atime_nsec:q "
                   "mtime_sec:q mtime_nsec:q")
_m(27, "Rsetattr", "")
_m(30, "Txattrwalk", "fid:d newfid:d name:s")
_m(31, "Rxattrwalk", "size:q")
_m(32, "Txattrcreate", "fid:d name:s attr_size:q flags:d")
_m(33, "Rxattrcreate", "")
_m(40, "Treaddir", "fid:d offset:q count:d")
_m(41, "Rreaddir", "data:D")
_m(50, "Tfsync", "fid:d datasync:o")
_m(51, "Rfsync", "")
_m(52, "Tlock", "fid:d type:b flags:d start:q length:q proc_id:d client_id:s")
_m(53, "Rlock", "status:b")
_m(54, "Tgetlock", "fid:d type:b start:q length:q proc_id:d client_id:s")
_m(55, "Rgetlock", "type:b start:q length:q proc_id:d client_id:s")
_m(70, "Tlink", "dfid:d fid:d name:s")
_m(71, "Rlink", "")
_m(72, "Tmkdir", "dfid:d name:s mode:d gid:d")
_m(73, "Rmkdir", "qid:Q")
_m(74, "Trenameat", "olddirfid:d oldname:s newdirfid:d newname:s")
_m(75, "Rrenameat", "")
_m(76, "Tunlinkat", "dirfid:d name:s flags:d")
_m(77, "Runlinkat", "")
_m(100, "Tversion", "msize:d version:s")
_m(101, "Rversion", "msize:d version:s")
_m(102, "Tauth", "afid:d uname:s aname:s n_uname:o")
_m(103, "Rauth", "aqid:Q")
_m(104, "Tattach", "fid:d afid:d uname:s aname:s n_uname:o")
_m(105, "Rattach", "qid:Q")
_m(108, "Tflush", "oldtag:w")
_m(109, "Rflush", "")
_m(110, "Twalk", "fid:d newfid:d wnames:S")
_m(111, "Rwalk", "qids:R")
_m(116, "Tread", "fid:d offset:q count:d")
_m(117, "Rread", "data:D")
_m(118, "Twrite", "fid:d offset:q data:D")
_m(119, "Rwrite", "count:d")
_m(120, "Tclunk", "fid:d")
_m(121, "Rclunk", "")
_m(122, "Tremove", "fid:d")
_m(123, "Rremove", "")

NAMES = {number: name for number, (name, _) in LAYOUTS.items()}
NUMBERS = {name: number for number, name in NAMES.items()}

_INTS = {"b": struct.Struct("<B"), "w": struct.Struct("<H"), "d": struct.Struct("<I"),
         "q": struct.Struct("<Q")}


def _enc_str(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if len(raw) > 0xFFFF:
        raise ValueError("9P string longer than 65535 bytes")
    return len(raw).to_bytes(2, "little") + raw


def _enc_field(code: str, value: Any) -> bytes:
    if code in _INTS:
        return _INTS[code].pack(value)
    if code == "o":
        return _INTS["d"].pack(value)
    if code == "s":
        return _enc_str(value)
    if code == "Q":
        return _QID.pack(*value)
    if code == "S":
        return len(value).to_bytes(2, "little") + b"".join(_enc_str(v) for v in value)
    if code == "R":
        return len(value).to_bytes(2, "little") + b"".join(_QID.pack(*q) for q in value)
    if code == "D":
        return len(value).to_bytes(4, "little") + bytes(value)
    raise AssertionError(code)


def encode(msg: int | str, tag: int, /, **fields: Any) -> bytes:
    """A whole message (header included): ``encode("Twalk", 1, fid=0, newfid=1, wnames=["a"])``."""
    number = NUMBERS[msg] if isinstance(msg, str) else msg
    _, layout = LAYOUTS[number]
    body = b"".join(_enc_field(code, fields[name]) for name, code in layout)
    return HEADER.pack(HEADER.size + len(body), number, tag) + body


def error_body(ecode: int) -> bytes:
    return struct.pack("<I", ecode)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise MalformedMessage("message ends inside a field")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def int(self, code: str) -> int:
        fmt = _INTS[code]
        return fmt.unpack(self.take(fmt.size))[0]

    def str(self) -> str:
        n = self.int("w")
        return bytes(self.take(n)).decode("utf-8", "surrogateescape")

    def qid(self) -> Qid:
        return Qid(*_QID.unpack(self.take(_QID.size)))


def decode(number: int, body: bytes | memoryview) -> dict[str, Any]:
    """The fields of a message body (the bytes after the 7-byte header)."""
    try:
        _, layout = LAYOUTS[number]
    except KeyError:
        raise MalformedMessage(f"unknown message type {number}") from None
    r = _Reader(body)
    out: dict[str, Any] = {}
    for name, code in layout:
        if code in _INTS:
            out[name] = r.int(code)
        elif code == "s":
            out[name] = r.str()
        elif code == "Q":
            out[name] = r.qid()
        elif code == "S":
            out[name] = [r.str() for _ in range(r.int("w"))]
        elif code == "R":
            out[name] = [r.qid() for _ in range(r.int("w"))]
        elif code == "D":
            out[name] = bytes(r.take(r.int("d")))
        elif code == "o":
            out[name] = r.int("d") if len(r.buf) - r.pos >= 4 else 0
    return out


def encode_dirent(qid: Qid, offset: int, dtype: int, name: bytes) -> bytes:
    """One Rreaddir entry: qid[13] offset[8] type[1] name[s]."""
    return _DIRENT_HEAD.pack(qid[0], qid[1], qid[2], offset, dtype) + len(name).to_bytes(2, "little") + name


def decode_dirents(data: bytes) -> list[tuple[Qid, int, int, str]]:
    """The entries of an Rreaddir payload: (qid, offset, type, name)."""
    r = _Reader(data)
    out = []
    while r.pos < len(r.buf):
        qid = r.qid()
        offset = r.int("q")
        dtype = r.int("b")
        out.append((qid, offset, dtype, r.str()))
    return out
