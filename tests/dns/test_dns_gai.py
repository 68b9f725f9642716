"""dns_mode = "getaddrinfo", with a fake getaddrinfo (the real one could ask the host's
resolver, which tests must never do)."""

import socket

import trio
from dns_helpers import ask, rdata
from dnslib import RCODE

from netkit.dns import Forwarder, GetaddrinfoResolver

TABLE = {
    ("both.test", socket.AF_INET): ["10.0.0.1", "10.0.0.2", "10.0.0.1"],
    ("both.test", socket.AF_INET6): ["fd00::1"],
    ("v4only.test", socket.AF_INET): ["10.0.0.4"],
}


def fake_getaddrinfo(calls=None, *, errors=None, delay=0.0):
    async def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if calls is not None:
            calls.append((host, family))
        if delay:
            await trio.sleep(delay)
        if errors and host in errors:
            raise socket.gaierror(errors[host], "fake failure")
        addresses = TABLE.get((host, family))
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(family, socket.SOCK_STREAM, 6, "", (a, 0) if family == socket.AF_INET else (a, 0, 0, 0))
                for a in addresses]

    return getaddrinfo


async def test_a_and_aaaa_through_getaddrinfo(make_service):
    calls = []
    service = make_service(resolver=GetaddrinfoResolver(getaddrinfo=fake_getaddrinfo(calls)))
    reply = await ask(service, "both.test", "A")
    assert rdata(reply) == ["10.0.0.1", "10.0.0.2"] and reply.rr[0].ttl == 10
    assert rdata(await ask(service, "both.test", "AAAA")) == ["fd00::1"]
    assert calls == [("both.test", socket.AF_INET), ("both.test", socket.AF_INET6)]
    await ask(service, "both.test", "A")  # cached
    assert len(calls) == 2


async def test_no_address_of_family_is_nodata_not_nxdomain(make_service):
    service = make_service(resolver=GetaddrinfoResolver(getaddrinfo=fake_getaddrinfo()))
    reply = await ask(service, "v4only.test", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []
    reply = await ask(service, "missing.test", "A")
    assert reply.header.rcode == RCODE.NXDOMAIN


async def test_getaddrinfo_errors_are_servfail(make_service):
    errors = {"flaky.test": socket.EAI_AGAIN, "nodata.test": getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
    service = make_service(resolver=GetaddrinfoResolver(getaddrinfo=fake_getaddrinfo(errors=errors)))
    assert (await ask(service, "flaky.test")).header.rcode == RCODE.SERVFAIL
    if hasattr(socket, "EAI_NODATA"):
        reply = await ask(service, "nodata.test")
        assert reply.header.rcode == RCODE.NOERROR and reply.rr == []


async def test_slow_getaddrinfo_times_out_to_servfail(make_service):
    service = make_service(resolver=GetaddrinfoResolver(getaddrinfo=fake_getaddrinfo(delay=5)),
                           dns_timeout=0.2)
    start = trio.current_time()
    assert (await ask(service, "both.test")).header.rcode == RCODE.SERVFAIL
    assert trio.current_time() - start < 0.5


async def test_ip_literal_name_is_nxdomain(make_service):
    calls = []
    service = make_service(resolver=GetaddrinfoResolver(getaddrinfo=fake_getaddrinfo(calls)))
    assert (await ask(service, "10.0.0.1", "A")).header.rcode == RCODE.NXDOMAIN
    assert calls == []


async def test_other_types_forwarded_or_notimp(make_service, upstream):
    upstream.add("both.test. 60 IN MX 10 mx.both.test.")
    forwarder = Forwarder([("127.0.0.1", upstream.port)], timeout=1.0)
    service = make_service(resolver=GetaddrinfoResolver(getaddrinfo=fake_getaddrinfo(), fallback=forwarder))
    assert rdata(await ask(service, "both.test", "MX")) == ["10 mx.both.test."]
    assert upstream.count("both.test") == 1
    lonely = make_service(resolver=GetaddrinfoResolver(getaddrinfo=fake_getaddrinfo(), fallback=Forwarder([])))
    assert (await ask(lonely, "both.test", "MX")).header.rcode == RCODE.NOTIMP
    # local names still win in getaddrinfo mode
    assert rdata(await ask(lonely, "host.docker.internal")) == ["192.168.65.2"]
