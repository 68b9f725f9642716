"""The TLS ClientHello / SNI parser: real hellos, fragmentation, and fuzzing."""

import ssl

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netkit.http_proxy import MAX_CLIENT_HELLO, SniStatus, parse_client_hello_untrusted as parse


def client_hello(server_hostname: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl), produced in memory."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


HELLO = client_hello("www.example.test")


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message split into TLS records of ``size`` bytes."""
    body = hello[5:5 + int.from_bytes(hello[3:5], "big")]
    out = b""
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
    return out


def build_hello(name: bytes, *, extra_ext: bytes = b"", session_id: bytes = b"") -> bytes:
    sni = b"\x00" + len(name).to_bytes(2, "big") + name
    sni_list = len(sni).to_bytes(2, "big") + sni
    ext = b"\x00\x00" + len(sni_list).to_bytes(2, "big") + sni_list + extra_ext
    body = (b"\x03\x03" + b"\x11" * 32 + bytes([len(session_id)]) + session_id
            + b"\x00\x02\x13\x01" + b"\x01\x00" + len(ext).to_bytes(2, "big") + ext)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def test_real_client_hello():
    result = parse(HELLO)
    assert result.status is SniStatus.FOUND and result.server_name == "www.example.test"


def test_every_prefix_is_incomplete():
    for k in range(len(HELLO)):
        assert parse(HELLO[:k]).status is SniStatus.INCOMPLETE, k


def test_fragmented_records_and_trailing_records():
    for size in (1, 7, 100, 300):
        data = refragment(HELLO, size)
        assert parse(data).server_name == "www.example.test"
        assert parse(data[:-1]).status is SniStatus.INCOMPLETE
    # 0-RTT style: application data right after the hello is not looked at.
    assert parse(HELLO + b"\x17\x03\x03\x00\x05hello").server_name == "www.example.test"


def test_no_sni_and_garbage():
    assert parse(client_hello(None)).status is SniStatus.NO_SNI
    for junk in (b"GET / HTTP/1.1\r\n", b"\x80\x2e\x01\x03\x01", b"\x16\x02\x00",
                 b"\x16\x03\x01\x00\x00", b"\x17\x03\x03\x00\x10", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"):
        assert parse(junk).status is SniStatus.INVALID, junk
    # A server name that is not a host name is not used.
    assert parse(build_hello(b"bad name!")).status is SniStatus.NO_SNI
    assert parse(build_hello(b"192.0.2.1")).status is SniStatus.NO_SNI
    assert parse(build_hello(b"a" * 300)).status is SniStatus.NO_SNI
    assert parse(build_hello(b"ok.example")).server_name == "ok.example"
    # Duplicate extensions are malformed.
    dup = b"\x00\x00\x00\x00"
    assert parse(build_hello(b"ok.example", extra_ext=dup)).status is SniStatus.INVALID
    assert parse(build_hello(b"x.test", session_id=b"\x00" * 33)).status is SniStatus.INVALID


def test_bounded():
    huge = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + b"\x00" * 20000
    assert parse(huge).status is SniStatus.INVALID  # declared length above the cap
    # A valid-looking prefix that would need more than MAX_CLIENT_HELLO bytes.
    hs_len = MAX_CLIENT_HELLO - 10
    prefix = b"\x01" + hs_len.to_bytes(3, "big")
    recs = b""
    body = prefix + b"\x03\x03" + b"\x00" * (MAX_CLIENT_HELLO + 100)
    for i in range(0, len(body), 0x4000):
        piece = body[i:i + 0x4000]
        recs += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
    assert parse(recs[:MAX_CLIENT_HELLO - 1]).status is SniStatus.INCOMPLETE
    assert parse(recs).status is not SniStatus.INCOMPLETE


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_never_raise(data):
    result = parse(data)
    assert result.status in SniStatus
    if result.status is SniStatus.FOUND:
        assert result.server_name and result.server_name.isascii()


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_hello_never_raises(data):
    buf = bytearray(HELLO)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    for candidate in (bytes(buf), bytes(buf[:cut]), bytes(buf) + data.draw(st.binary(max_size=50))):
        result = parse(candidate)
        assert result.status in SniStatus


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.lists(_label, min_size=1, max_size=5), st.integers(1, 400), st.binary(max_size=40))
def test_fuzz_generated_hellos_parse_in_any_split(labels, record_size, session):
    name = ".".join(labels)
    if all(c.isdigit() or c == "." for c in name):
        return
    hello = refragment(build_hello(name.encode(), session_id=session[:32]), record_size)
    assert parse(hello).server_name == name
    for cut in range(0, len(hello), max(1, len(hello) // 20)):
        assert parse(hello[:cut]).status is SniStatus.INCOMPLETE


def feed_bytewise(data: bytes):
    """Parse as a caller fed one byte at a time would, honouring ``need``."""
    parses = 0
    result = parse(b"")
    for k in range(1, len(data) + 1):
        if k >= result.need:
            result = parse(data[:k])
            parses += 1
            if result.done:
                break
    if not result.done:  # the data ended (EOF): one last look, as the proxy does
        result = parse(data)
    return result, parses


def test_need_hint_avoids_quadratic_work():
    result, parses = feed_bytewise(HELLO)
    assert result.server_name == "www.example.test"
    assert parses < 10
    result, parses = feed_bytewise(refragment(HELLO, 50))
    assert result.server_name == "www.example.test"
    assert parses < 60


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 300))
def test_fuzz_need_hint_agrees_with_full_parse(junk, size):
    for data in (junk, refragment(HELLO, size), refragment(HELLO, size)[:len(junk)] + junk):
        result, _ = feed_bytewise(data)
        assert result == parse(data)
