"""Fuzzing the 9P server: random but well-framed requests (structure-aware, with
truncations and junk), and raw garbage streams. The server must never raise, never hit
an internal error, never touch anything outside its share, and keep answering."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections import Counter

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netkit.config import Share
from netkit.files import Client9P, serve_9p
from netkit.files.protocol import LAYOUTS, NOFID, NOTAG, encode

T_TYPES = sorted(n for n, (name, _) in LAYOUTS.items() if name.startswith("T"))
NAMES = ["hello.txt", "sub", "inner.txt", "new", "x", "..", ".", "", "a/b", "../outside", "link", "/etc",
         "\udcff", "n" * 300]

fids = st.one_of(st.integers(0, 6), st.just(NOFID), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.integers(0, 4096), st.integers(0, 2**64 - 1))
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=20))


def field(code: str, name: str):
    if name in ("fid", "newfid", "dfid", "olddirfid", "newdirfid", "dirfid", "afid"):
        return fids
    if name == "flags":
        return st.one_of(st.sampled_from([0, 1, 2, 0o100, 0o1000, 0o2000, 0o200000, 0x200]),
                         st.integers(0, 2**32 - 1))
    if name in ("mode",):
        return st.one_of(st.sampled_from([0o644, 0o755, 0o10644, 0o20644, 0o140755, 0o7777]),
                         st.integers(0, 2**32 - 1))
    if name == "valid":
        return st.integers(0, 0x1FF)
    if name == "msize":
        return st.integers(0, 2**32 - 1)
    if name == "version":
        return st.sampled_from(["9P2000.L", "9P2000", ""])
    if name in ("size", "offset") or name.endswith("_sec"):
        return st.one_of(st.integers(0, 1 << 20), st.integers(0, 2**64 - 1),
                         st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
    return {"b": st.integers(0, 255), "w": st.integers(0, 0xFFFF), "d": st.integers(0, 2**32 - 1),
            "o": st.integers(0, 2**32 - 1), "q": u64, "s": names, "S": st.lists(names, max_size=18),
            "D": st.binary(max_size=64), "Q": st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1),
                                                         st.integers(0, 2**64 - 1))}[code]


@st.composite
def requests(draw):
    mtype = draw(st.sampled_from(T_TYPES))
    _, layout = LAYOUTS[mtype]
    fields = {name: draw(field(code, name)) for name, code in layout}
    tag = draw(st.integers(0, 20))
    raw = encode(mtype, tag, **fields)
    mangle = draw(st.sampled_from(["none", "none", "none", "truncate", "junk"]))
    if mangle == "truncate":
        cut = draw(st.integers(7, len(raw)))
        raw = struct.pack("<I", cut) + raw[4:cut]
    elif mangle == "junk":
        junk = draw(st.binary(min_size=1, max_size=16))
        raw = struct.pack("<I", len(raw) + len(junk)) + raw[4:] + junk
    return raw


def make_share() -> tuple[str, str]:
    top = tempfile.mkdtemp(prefix="netkit-9p-fuzz-")
    share = os.path.join(top, "share")
    os.makedirs(os.path.join(share, "sub"))
    with open(os.path.join(share, "hello.txt"), "w") as f:
        f.write("hello\n")
    with open(os.path.join(share, "sub", "inner.txt"), "w") as f:
        f.write("inner\n")
    os.symlink("../outside", os.path.join(share, "link"))
    os.makedirs(os.path.join(top, "outside"))
    with open(os.path.join(top, "outside", "secret"), "w") as f:
        f.write("secret\n")
    return top, share


def outside_state(top: str) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(top, "outside")):
        for name in filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            out.append((name, st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_uid))
        out.append((dirpath, sorted(dirnames)))
    return out


async def drain(client: Client9P) -> bool:
    """Send a Tversion (which waits for every request in progress) and read replies up
    to its Rversion; False if the server closed the connection instead."""
    await client.send(encode("Tversion", NOTAG, msize=65536, version="9P2000.L"))
    with trio.fail_after(30):
        while True:
            reply = await client.receive()
            if reply is None:
                return False
            if reply[0] == "Rversion" and reply[1] == NOTAG:
                return True


EXAMPLES = int(os.environ.get("NETKIT_FUZZ_EXAMPLES", "150"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(requests(), min_size=1, max_size=25), st.booleans())
async def test_random_requests_never_break_the_server(frames, read_only):
    top, share = make_share()
    before = outside_state(top)
    stats: Counter = Counter()
    try:
        client_end, server_end = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_9p(server_end, {"s": Share("s", share, read_only)},
                                                stats=stats, msize_max=65536, max_fids=8))
            c = Client9P(client_end)
            await c.version(65536)
            await c.attach(1, "s")
            await c.walk(1, 2, "sub")
            await c.send(b"".join(frames))
            if await drain(c):
                # Still serving: a fresh session works.
                await c.attach(1, "s")
                assert (await c.call("Tgetattr", fid=1, request_mask=0x7FF))["qid"].type == 0x80
            await c.aclose()
        assert stats["internal_error"] == 0
        assert outside_state(top) == before
    finally:
        shutil.rmtree(top, ignore_errors=True)


@settings(max_examples=EXAMPLES + 50, deadline=None)
@given(st.binary(max_size=600))
async def test_raw_garbage_never_raises(data):
    top, share = make_share()
    stats: Counter = Counter()
    try:
        client_end, server_end = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_9p(server_end, {"s": Share("s", share)}, stats=stats,
                                                msize_max=8192))
            c = Client9P(client_end)
            # with and without a session in place
            if data[:1] == b"\x00":
                await c.version(8192)
                await c.attach(1, "s")
            await c.send(data)
            await c.stream.send_eof()
            with trio.fail_after(30):
                while await c.receive() is not None:
                    pass
            await c.aclose()
        assert stats["internal_error"] == 0
    finally:
        shutil.rmtree(top, ignore_errors=True)
