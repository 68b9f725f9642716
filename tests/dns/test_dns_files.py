"""resolv.conf (default upstreams) and hosts-file parsing and reload; DNS config fields.

Every resolv.conf here is written by the test; the real /etc/resolv.conf is never read.
"""

import dataclasses
from ipaddress import IPv4Address, IPv6Address

import pytest
from dns_helpers import FakeClock, ask, free_udp_port, rdata
from dnslib import RCODE

from netkit.config import Config, ConfigError
from netkit.dns import DnsService, Forwarder, default_resolver
from netkit.dns.files import WatchedFile, parse_hosts, parse_resolv_conf
from netkit.dns.message import name_key


def test_parse_resolv_conf():
    text = """# generated
search example.com lan
options edns0 trust-ad ndots:2
nameserver 127.0.0.53
nameserver   ::1   # inline comment
nameserver fe80::1%eth0
nameserver not-an-address
nameserver 127.0.0.53
;nameserver 10.9.9.9
domain lan
nameserver
"""
    assert parse_resolv_conf(text) == (("127.0.0.53", 53), ("::1", 53), ("fe80::1%eth0", 53))
    assert parse_resolv_conf("") == ()


def test_default_upstreams_follow_resolv_conf(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions ndots:1\n")
    clock = FakeClock()
    config = dataclasses.replace(Config(), dns_resolv_conf=str(resolv), dns_timeout=1.0)
    resolver = default_resolver(config, clock)
    assert isinstance(resolver, Forwarder)
    assert resolver.servers() == [("127.0.0.1", 53)]
    resolv.write_text("nameserver 127.0.0.2\nnameserver ::1\n")
    assert resolver.servers() == [("127.0.0.1", 53)]  # not re-checked within a second
    clock.advance(1.0)
    assert resolver.servers() == [("127.0.0.2", 53), ("::1", 53)]
    resolv.unlink()
    clock.advance(1.0)
    assert resolver.servers() == []


async def test_service_uses_resolv_conf_servers_and_reloads(upstream, upstream2, tmp_path):
    """End to end: the service forwards to what resolv.conf names, and follows a change.

    resolv.conf cannot carry a port, so the test maps port 53 to the fakes' ports in the
    socket factory (still only ever 127.0.0.1)."""
    import trio

    ports = {"127.0.0.1": upstream.port, "127.0.0.2": upstream2.port}

    def factory(family, type_):
        sock = trio.socket.socket(family, type_)
        connect = sock.connect

        async def redirect(address):
            host, port = address
            assert host in ports  # nothing but the fakes
            await connect(("127.0.0.1", ports[host]))

        sock.connect = redirect
        return sock

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    clock = FakeClock()
    config = dataclasses.replace(Config(), dns_resolv_conf=str(resolv), dns_timeout=1.0)
    forwarder = default_resolver(config, clock)
    forwarder._socket_factory = factory
    service = DnsService(config, resolver=forwarder, clock=clock)
    assert rdata(await ask(service, "example.test")) == ["10.0.0.1"]
    resolv.write_text("nameserver 127.0.0.2\n")
    clock.advance(1.0)  # the reload interval
    service.cache.clear()  # the first answer is cached for its TTL (300 s)
    assert rdata(await ask(service, "example.test")) == ["10.0.0.2"]


async def test_empty_resolv_conf_means_servfail(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search lan\n")
    config = dataclasses.replace(Config(), dns_resolv_conf=str(resolv))
    reply = await ask(DnsService(config), "example.test")
    assert reply.header.rcode == RCODE.SERVFAIL


def test_watched_file_counts_loads_and_survives_bad_parse(tmp_path):
    path = tmp_path / "f"
    path.write_text("one")
    clock = FakeClock()

    def parse(text):
        if text == "bad":
            raise RuntimeError("parser bug")
        return text

    watched = WatchedFile(str(path), parse, "", clock=clock)
    assert watched.get() == "one" and watched.loads == 1
    clock.advance(5)
    assert watched.get() == "one" and watched.loads == 1  # unchanged: not re-read
    path.write_text("bad")
    clock.advance(1)
    assert watched.get() == ""
    path.write_text("three")
    clock.advance(1)
    assert watched.get() == "three"


def test_parse_hosts():
    table = parse_hosts("""
127.0.0.1 localhost
::1 localhost ip6-localhost
10.0.0.5  Web.Test web   # comment
10.0.0.6  web.test
fe80::5%eth0 web.test
bogus   x.test
10.0.0.7  bad..name good.test
10.0.0.8
""")
    assert table.addresses[name_key("web.test")] == [IPv4Address("10.0.0.5"), IPv4Address("10.0.0.6"),
                                                     IPv6Address("fe80::5")]
    assert table.addresses[name_key("localhost")] == [IPv4Address("127.0.0.1"), IPv6Address("::1")]
    assert table.addresses[name_key("good.test")] == [IPv4Address("10.0.0.7")]
    assert name_key("x.test") not in table.addresses
    assert str(table.canonical[IPv4Address("10.0.0.5")]) == "Web.Test."


def test_dns_config_fields():
    config = Config.from_mapping({
        "dns-upstreams": "127.0.0.1:5353, [::1]:53",
        "dns_hosts_file": "/tmp/hosts",
        "dns_timeout": "1.5",
        "dns_max_in_flight": 10,
        "host_names": ["h.test"],
        "vm_names": "vm.test,me.test",
        "dns_mode": "getaddrinfo",
    })
    assert config.dns_upstreams == ("127.0.0.1:5353", "[::1]:53")
    assert config.dns_hosts_file == "/tmp/hosts"
    assert config.dns_timeout == 1.5 and config.dns_max_in_flight == 10
    assert config.host_names == ("h.test",) and config.vm_names == ("vm.test", "me.test")
    assert Config.from_mapping({"dns_hosts_file": ""}).dns_hosts_file is None
    defaults = Config()
    assert defaults.dns_cache_entries == 10000 and defaults.dns_max_in_flight == 256
    assert defaults.dns_timeout == 2.0 and defaults.dns_hosts_file is None
    assert defaults.dns_resolv_conf == "/etc/resolv.conf" and defaults.dns_upstreams == ()


@pytest.mark.parametrize("changes", [
    {"dns_upstreams": ["dns.example.com"]},
    {"dns_upstreams": ["1.2.3.4:99999"]},
    {"dns_mode": "magic"},
    {"dns_timeout": 0},
    {"dns_max_in_flight": 0},
    {"dns_cache_entries": -1},
    {"host_names": ["bad..name"]},
    {"vm_names": ["x" * 64 + ".test"]},
])
def test_dns_config_validation(changes):
    with pytest.raises(ConfigError):
        Config.from_mapping(changes)


async def test_getaddrinfo_mode_default_resolver(tmp_path):
    from netkit.dns import GetaddrinfoResolver

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    config = dataclasses.replace(Config(), dns_mode="getaddrinfo", dns_resolv_conf=str(resolv),
                                 dns_upstreams=(f"127.0.0.1:{free_udp_port()}",))
    resolver = default_resolver(config)
    assert isinstance(resolver, GetaddrinfoResolver)
    assert resolver.fallback.servers()[0][0] == "127.0.0.1"
