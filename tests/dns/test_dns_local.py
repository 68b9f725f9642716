"""Names netkit answers itself: built-ins, vm names, PTR, the hosts file, runtime zones."""

from ipaddress import IPv4Address, IPv6Address

import pytest
from dns_helpers import CLIENT, FakeClock, ask, rdata
from dnslib import QTYPE, RCODE

from netkit.config import Config


@pytest.mark.parametrize("name", ["host.docker.internal", "host.containers.internal", "host.internal",
                                  "HOST.Docker.Internal"])
async def test_host_names(make_service, name):
    reply = await ask(make_service(), name, "A")
    assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == 1
    assert rdata(reply) == [str(Config().host_ip)]
    assert str(reply.rr[0].rname) == name + "."  # the client's spelling


@pytest.mark.parametrize("name", ["gateway.docker.internal", "gateway.containers.internal",
                                  "gateway.internal", "http.docker.internal"])
async def test_gateway_names(make_service, name):
    reply = await ask(make_service(), name, "A")
    assert rdata(reply) == [str(Config().gateway_ip)]


@pytest.mark.parametrize("qtype", ["AAAA", "MX", "TXT", "SRV", "HTTPS", "CNAME"])
async def test_local_name_other_type_is_noerror_empty(make_service, upstream, qtype):
    service = make_service(upstream)
    reply = await ask(service, "host.docker.internal", qtype)
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.rr == []
    assert upstream.queries == []  # never leaked upstream


async def test_any_for_local_name(make_service):
    reply = await ask(make_service(), "gateway.internal", "ANY")
    assert rdata(reply, "A") == [str(Config().gateway_ip)]


async def test_configurable_names_and_vm_names(make_service):
    service = make_service(host_names=("myhost.test",), gateway_names=("gw.test",),
                           vm_names=("me.vm.test", "self.test"))
    assert rdata(await ask(service, "myhost.test")) == ["192.168.65.2"]
    assert rdata(await ask(service, "gw.test")) == ["192.168.65.1"]
    # default: the asking guest's own address
    assert rdata(await ask(service, "me.vm.test")) == [str(CLIENT[0])]
    other = (IPv4Address("192.168.65.9"), 5353)
    assert rdata(await ask(service, "self.test", client=other)) == ["192.168.65.9"]
    leases = {IPv4Address("192.168.65.9"): IPv4Address("192.168.65.50")}
    service.vm_name_resolver = leases.get
    assert rdata(await ask(service, "self.test", client=other)) == ["192.168.65.50"]
    # no lease: the name exists, with no address
    reply = await ask(service, "self.test")
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []
    # PTR of the guest's own lease gives its vm name
    reply = await ask(service, "50.65.168.192.in-addr.arpa", "PTR", client=other)
    assert rdata(reply) == ["me.vm.test."]


async def test_vm_name_resolver_that_raises_is_contained(make_service):
    service = make_service(vm_names=("vm.test",))

    def broken(ip):
        raise RuntimeError("boom")

    service.vm_name_resolver = broken
    reply = await ask(service, "vm.test")
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []


async def test_ptr_for_local_addresses(make_service, upstream):
    service = make_service(upstream)
    assert rdata(await ask(service, "2.65.168.192.in-addr.arpa", "PTR")) == ["host.docker.internal."]
    assert rdata(await ask(service, "1.65.168.192.in-addr.arpa", "PTR")) == ["gateway.docker.internal."]
    # another address inside netkit's subnet: NXDOMAIN, and not asked upstream
    reply = await ask(service, "77.65.168.192.in-addr.arpa", "PTR")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert upstream.queries == []
    # outside the subnet: forwarded
    await ask(service, "1.0.0.10.in-addr.arpa", "PTR")
    assert upstream.count("1.0.0.10.in-addr.arpa") == 1


async def test_hosts_file_wins_over_upstream_and_reloads(make_service, upstream, tmp_path):
    upstream.add("db.test. 60 IN A 10.0.0.99")
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n10.1.1.1 db.test db-alias  # trailing\n"
                     "fd00::1 db.test\nbad-address name.test\n10.1.1.2 other.test\n")
    clock = FakeClock()
    service = make_service(upstream, dns_hosts_file=str(hosts), clock=clock)
    assert rdata(await ask(service, "db.test")) == ["10.1.1.1"]
    assert rdata(await ask(service, "DB-ALIAS")) == ["10.1.1.1"]
    assert rdata(await ask(service, "db.test", "AAAA")) == ["fd00::1"]
    reply = await ask(service, "other.test", "AAAA")  # in the file, no IPv6: NODATA
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []
    assert rdata(await ask(service, "1.1.1.10.in-addr.arpa", "PTR")) == ["db.test."]
    v6_reverse = IPv6Address("fd00::1").reverse_pointer
    assert rdata(await ask(service, v6_reverse, "PTR")) == ["db.test."]
    assert upstream.queries == []

    hosts.write_text("10.2.2.2 db.test\n")
    # checked at most once a second: still the old answer
    clock.advance(0.5)
    assert rdata(await ask(service, "db.test")) == ["10.1.1.1"]
    clock.advance(0.6)
    assert rdata(await ask(service, "db.test")) == ["10.2.2.2"]
    # a name removed from the file goes back to upstream
    assert rdata(await ask(service, "other.test")) == []  # upstream: NXDOMAIN
    # the file disappearing empties the table
    hosts.unlink()
    clock.advance(1.1)
    assert rdata(await ask(service, "db.test")) == ["10.0.0.99"]


async def test_hosts_file_overrides_builtin(make_service, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("10.5.5.5 host.docker.internal\n")
    service = make_service(dns_hosts_file=str(hosts))
    assert rdata(await ask(service, "host.docker.internal")) == ["10.5.5.5"]


async def test_missing_hosts_file_is_fine(make_service, tmp_path):
    service = make_service(dns_hosts_file=str(tmp_path / "nope"))
    assert rdata(await ask(service, "host.internal")) == ["192.168.65.2"]


async def test_add_zone_records_and_remove(make_service, upstream):
    service = make_service(upstream)
    service.add_zone("example.test", [
        ("www.example.test", "A", "10.1.2.3"),
        ("www.example.test", "AAAA", "fd00::3"),
        ("mail", "A", "10.1.2.4"),  # relative to the zone
        ("@", "MX", "10 mail.example.test"),
        ("txt.example.test", "TXT", "hello world"),
        ("alias.example.test", "CNAME", "www.example.test"),
        ("ext.example.test", "CNAME", "outside.test"),
        ("_http._tcp.example.test", "SRV", "0 0 80 www.example.test"),
        ("*.wild.example.test", "A", "10.7.7.7"),
        ("deep.sub.example.test", "A", "10.1.2.5"),
    ])
    assert rdata(await ask(service, "www.example.test")) == ["10.1.2.3"]
    assert rdata(await ask(service, "WWW.example.test", "AAAA")) == ["fd00::3"]
    assert rdata(await ask(service, "mail.example.test")) == ["10.1.2.4"]
    assert rdata(await ask(service, "example.test", "MX")) == ["10 mail.example.test."]
    assert rdata(await ask(service, "txt.example.test", "TXT")) == ['"hello world"']
    assert rdata(await ask(service, "_http._tcp.example.test", "SRV")) == ["0 0 80 www.example.test."]
    reply = await ask(service, "alias.example.test")
    assert [QTYPE[rr.rtype] for rr in reply.rr] == ["CNAME", "A"] and reply.header.aa == 1
    assert rdata(await ask(service, "a.b.wild.example.test")) == ["10.7.7.7"]
    # a name in the zone with no such type: NODATA with the zone's SOA
    reply = await ask(service, "www.example.test", "TXT")
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []
    assert [QTYPE[rr.rtype] for rr in reply.auth] == ["SOA"]
    # an empty non-terminal: NODATA; a missing name: NXDOMAIN; neither goes upstream
    assert (await ask(service, "sub.example.test")).header.rcode == RCODE.NOERROR
    reply = await ask(service, "missing.example.test")
    assert reply.header.rcode == RCODE.NXDOMAIN and [QTYPE[r.rtype] for r in reply.auth] == ["SOA"]
    assert upstream.queries == []
    # PTR for the zone's addresses
    assert rdata(await ask(service, "3.2.1.10.in-addr.arpa", "PTR")) == ["www.example.test."]
    # a CNAME out of the zone is followed upstream
    upstream.add("outside.test. 60 IN A 10.0.0.50")
    reply = await ask(service, "ext.example.test")
    assert rdata(reply) == ["outside.test.", "10.0.0.50"]

    # replacing the zone
    service.add_zone("example.test", "$TTL 30\nwww IN A 10.3.3.3\n@ IN TXT \"zone text\"\n")
    reply = await ask(service, "www.example.test")
    assert rdata(reply) == ["10.3.3.3"] and reply.rr[0].ttl == 30
    assert (await ask(service, "mail.example.test")).header.rcode == RCODE.NXDOMAIN

    assert service.remove_zone("example.test.") is True
    assert service.remove_zone("example.test") is False
    assert rdata(await ask(service, "example.test")) == ["10.0.0.1"]  # upstream again
    assert service.statistics()["zones"] == 0


@pytest.mark.parametrize("records", [
    [("www.example.test", "A", "not-an-ip")],
    [("www.example.test", "NOSUCHTYPE", "x")],
    [("www.other.test.", "A", "10.0.0.1")],
    [("x" * 64, "A", "10.0.0.1")],
    [("c.example.test", "CNAME", "a.test"), ("c.example.test", "A", "10.0.0.1")],
    [("www", "A")],
    "www IN A 1.2.3",
])
def test_add_zone_rejects_bad_records(make_service, records):
    service = make_service()
    with pytest.raises(ValueError):
        service.add_zone("example.test", records)
    assert service.statistics()["zones"] == 0


async def test_zone_can_override_builtin_name(make_service):
    service = make_service()
    service.add_zone("docker.internal", [("host.docker.internal", "A", "10.4.4.4")])
    assert rdata(await ask(service, "host.docker.internal")) == ["10.4.4.4"]
    # the zone owns docker.internal now: gateway.docker.internal is still the built-in
    # (a name that exists locally answers from where it exists)
    assert rdata(await ask(service, "gateway.docker.internal")) == ["192.168.65.1"]
    assert (await ask(service, "nothing.docker.internal")).header.rcode == RCODE.NXDOMAIN


async def test_cname_loop_in_zone_terminates(make_service):
    service = make_service()
    service.add_zone("loop.test", [("a.loop.test", "CNAME", "b.loop.test"),
                                   ("b.loop.test", "CNAME", "a.loop.test")])
    reply = await ask(service, "a.loop.test")
    assert reply.header.rcode == RCODE.NOERROR
    assert len(reply.rr) <= 9


async def test_zone_transfer_is_refused(make_service):
    reply = await ask(make_service(), "example.test", "AXFR", transport="tcp")
    assert reply.header.rcode == RCODE.REFUSED
