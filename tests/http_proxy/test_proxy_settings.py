"""ProxySettings parsing (vpnkit JSON, environment), host patterns, file reloads."""

import json

import pytest
import trio

from netkit.http_proxy import ConfigError, HostPatterns, HttpProxy, ProxySettings, split_authority


def test_vpnkit_json():
    s = ProxySettings.from_vpnkit_json({
        "http": "http://user:p%40ss@proxy.corp:3128",
        "https": "proxy.corp:3129",
        "exclude": "*.local, 10.0.0.0/8  internal.corp,127.0.0.1",
        "transparent_http_ports": [80, 8080],
        "transparent_https_ports": [443],
        "some_future_key": True,
    })
    assert s.http_upstream.host == "proxy.corp" and s.http_upstream.port == 3128
    assert s.http_upstream.authorization == b"Basic dXNlcjpwQHNz"  # user:p@ss
    assert s.https_upstream.port == 3129 and s.https_upstream.authorization is None
    assert s.exclude == ("*.local", "10.0.0.0/8", "internal.corp", "127.0.0.1")
    assert s.transparent_http_ports == (80, 8080)
    assert s.upstream_for("a.local", 80, tls=False) is None
    assert s.upstream_for("10.1.2.3", 80, tls=False) is None
    assert s.upstream_for("git.internal.corp", 443, tls=True) is None
    assert s.upstream_for("example.com", 80, tls=False) is s.http_upstream
    assert s.upstream_for("example.com", 443, tls=True) is s.https_upstream
    assert "p%40ss" not in repr(s) and "***" in repr(s)
    # Round trip.
    assert ProxySettings.from_vpnkit_json(json.dumps(s.to_vpnkit_json())) == s


def test_vpnkit_json_reload_resets_vpnkit_keys_but_keeps_netkit_ones():
    base = ProxySettings(http="http://a:1", exclude=("x",), connect_timeout=3, direct=("host.test",))
    s = ProxySettings.from_vpnkit_json('{"https": "b:2"}', base=base)
    assert s.http is None and s.exclude == () and s.https == "b:2"
    assert s.connect_timeout == 3 and s.direct == ("host.test",)
    assert s.upstream_for("host.test", 443, tls=True) is None
    s = ProxySettings.from_vpnkit_json({"allow": ["*.docker.com"], "deny_message": "no"})
    assert s.allowed("hub.docker.com") and not s.allowed("example.com")


@pytest.mark.parametrize("data", [
    "not json", "[]", {"http": 5}, {"http": "socks5://p:1080"}, {"http": "http://:80"},
    {"exclude": "a*b.com"}, {"transparent_http_ports": [0]}, {"transparent_https_ports": "x"},
    {"allow": [1]}, {"http": "http://p:99999"},
])
def test_bad_vpnkit_json(data):
    with pytest.raises(ConfigError):
        ProxySettings.from_vpnkit_json(data)


def test_bad_fields():
    for kwargs in ({"connect_timeout": 0}, {"max_connections": 0}, {"max_header_bytes": 10},
                   {"idle_timeout": "x"}, {"deny_message": 3}):
        with pytest.raises(ConfigError):
            ProxySettings(**kwargs)


def test_environment():
    s = ProxySettings.from_environment({
        "HTTP_PROXY": "http://upper:1", "http_proxy": "http://lower:2",
        "HTTPS_PROXY": "http://secure:3", "NO_PROXY": "localhost,.corp",
    })
    assert s.http_upstream.host == "lower"
    assert s.https_upstream.host == "secure"
    assert s.exclude == ("localhost", ".corp")
    s = ProxySettings.from_environment({"ALL_PROXY": "http://all:4"})
    assert s.http_upstream.host == "all" and s.https_upstream.host == "all"
    assert ProxySettings.from_environment({}) == ProxySettings()


@pytest.mark.parametrize("pattern,host,port,expected", [
    ("example.com", "example.com", None, True),
    ("example.com", "www.example.com", None, True),
    ("example.com", "badexample.com", None, False),
    ("*.example.com", "example.com", None, False),
    ("*.example.com", "a.b.example.com", None, True),
    (".example.com", "www.example.com", None, True),
    ("www.*.com", "www.foo.com", None, True),
    ("www.*.com", "api.foo.com", None, False),
    ("*", "anything.at.all", None, True),
    ("*", "10.0.0.1", None, True),
    ("10.0.0.0/8", "10.200.0.1", None, True),
    ("10.0.0.0/8", "11.0.0.1", None, False),
    ("10.0.0.0/8", "ten.example", None, False),
    ("192.168.1.5", "192.168.1.5", None, True),
    ("::1", "::1", None, True),
    ("fd00::/8", "fd12::1", None, True),
    ("[::1]:8080", "::1", 8080, True),
    ("[::1]:8080", "::1", 80, False),
    ("example.com:8443", "example.com", 8443, True),
    ("example.com:8443", "example.com", 443, False),
    ("EXAMPLE.com.", "Example.COM", None, True),
])
def test_host_patterns(pattern, host, port, expected):
    assert HostPatterns([pattern]).matches(host, port) is expected


def test_split_authority():
    assert split_authority("Example.com", 80) == ("example.com", 80)
    assert split_authority("example.com:8080", 80) == ("example.com", 8080)
    assert split_authority("[::1]:443", None) == ("::1", 443)
    for bad in ("", "a b", "host:", "host:0", "host:99999", "[::1", "::1:80", "h\x00st"):
        with pytest.raises(ValueError):
            split_authority(bad, None)


async def test_watch_file_reloads_and_survives_bad_files(tmp_path, caplog):
    path = tmp_path / "http_proxy.json"
    path.write_text(json.dumps({"http": "http://127.0.0.1:1111", "exclude": "a.test"}))
    proxy = HttpProxy(ProxySettings(connect_timeout=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: proxy.watch_file(path, interval=0.02,
                                                                 task_status=task_status))
        assert proxy.settings.http_upstream.port == 1111
        assert proxy.settings.connect_timeout == 2  # kept: not a vpnkit key
        path.write_text(json.dumps({"http": "http://127.0.0.1:2222"}))
        await wait_for(lambda: proxy.settings.http_upstream.port == 2222)
        assert proxy.settings.exclude == ()
        path.write_text("{ broken")
        await wait_for(lambda: proxy.statistics().get("file_errors") == 1)
        assert proxy.settings.http_upstream.port == 2222  # old settings kept
        assert "keeping the current proxy settings" in caplog.text
        path.unlink()
        await trio.sleep(0.1)
        path.write_text(json.dumps({"https": "http://127.0.0.1:3333"}))
        await wait_for(lambda: proxy.settings.https_upstream is not None)
        assert proxy.settings.http is None
        nursery.cancel_scope.cancel()


async def wait_for(predicate, timeout=5):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
