"""The control API in-process: every route, gvproxy-shaped calls, errors and limits."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import stat
from ipaddress import IPv4Address

import pytest
import trio

from netkit.api.client import ApiRequestError, ApiUnavailable
from netkit.api.server import ApiServerError, bind_unix_socket, open_api, serve_api
from netkit.http_proxy.proxy import HttpProxy
from netkit.testing.wait import wait_until

from api_helpers import ApiHarness, parse_http_response


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- socket
async def test_api_socket_is_0600_and_removed_on_exit(netkit_switch, api_dir):
    path = f"{api_dir}/sub/api.sock"  # the directory is created, 0700
    async with open_api(netkit_switch, path) as server:
        assert server is not None
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert not os.path.exists(path)


async def test_api_socket_mode_ignores_a_permissive_umask(netkit_switch, api_dir):
    old = os.umask(0)
    try:
        sock = bind_unix_socket(f"{api_dir}/u.sock")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(f"{api_dir}/u.sock").st_mode) == 0o600
        assert os.umask(old) == old  # the process umask was restored
    finally:
        sock.close()


async def test_api_stale_socket_is_replaced_but_not_files_or_live_sockets(netkit_switch, api_dir):
    stale = f"{api_dir}/stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # the file stays, nobody listens: stale
    async with open_api(netkit_switch, stale):
        assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600
        # A second server on a live socket is refused, and leaves the first one alone.
        with pytest.raises(ApiServerError, match="another server is listening"):
            async with open_api(netkit_switch, stale):
                pass  # pragma: no cover
        assert os.path.exists(stale)
    regular = f"{api_dir}/plain-file"
    with open(regular, "w") as f:
        f.write("keep me")
    with pytest.raises(ApiServerError, match="not a socket"):
        async with open_api(netkit_switch, regular):
            pass  # pragma: no cover
    with open(regular) as f:
        assert f.read() == "keep me"


async def test_api_open_api_without_path_does_nothing(netkit_switch):
    async with open_api(netkit_switch, None) as server:
        assert server is None


# ----------------------------------------------------------------------------- routes
async def test_api_health(api):
    health = await api.call("health")
    assert health["status"] == "ok"
    assert health["forwards"] == 0 and health["capturing"] is False


async def test_api_forwards_add_list_remove(api):
    port = _free_port()
    created = await api.call("expose", "tcp", str(port), "192.168.65.3:80")
    assert created == {"proto": "tcp", "local": f"127.0.0.1:{port}", "remote": "192.168.65.3:80", "connections": 0}
    assert await api.call("forwards") == [created]
    # A host client can connect to the new listener (the guest is absent, so it is reset).
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    # The same forward twice: 409 with the forwarder's reason.
    with pytest.raises(ApiRequestError) as e:
        await api.call("expose", "tcp", f"127.0.0.1:{port}", "192.168.65.3:80")
    assert e.value.status == 409 and "already forwarded" in e.value.message
    # Outside the subnet, bad protocol: 400.
    with pytest.raises(ApiRequestError) as e:
        await api.call("expose", "tcp", str(_free_port()), "10.1.2.3:80")
    assert e.value.status == 400 and "not in the guest subnet" in e.value.message
    with pytest.raises(ApiRequestError) as e:
        await api.call("expose", "sctp", "1234", "192.168.65.3:80")
    assert e.value.status == 400 and "protocol" in e.value.message
    # DELETE with a body (the client) and with a query (curl).
    removed = await api.call("unexpose", "tcp", f"127.0.0.1:{port}")
    assert removed["removed"]["local"] == f"127.0.0.1:{port}"
    assert await api.call("forwards") == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(ApiRequestError) as e:
        await api.call("unexpose", "tcp", f"127.0.0.1:{port}")
    assert e.value.status == 404
    udp_port = _free_port()
    await api.call("expose", "udp", f"127.0.0.1:{udp_port}", "192.168.65.3:53")
    status, body, _ = await api.curl(method="DELETE", path=f"/forwards?proto=udp&local=127.0.0.1:{udp_port}")
    assert status == 200 and json.loads(body)["removed"]["proto"] == "udp"
    status, body, _ = await api.curl(method="DELETE", path="/forwards?proto=udp&local=127.0.0.1:1&extra=1")
    assert status == 400 and "extra" in json.loads(body)["error"]


async def test_api_unix_forward(api, api_dir):
    local = f"{api_dir}/fwd.sock"
    created = await api.call("expose", "unix", local, "192.168.65.3:22")
    assert created["local"] == local
    assert stat.S_ISSOCK(os.stat(local).st_mode)
    await api.call("unexpose", "unix", local)
    assert not os.path.exists(local)


async def test_api_gvproxy_forwarder_routes(api, api_dir):
    port = _free_port()
    local = f"127.0.0.1:{port}"
    status, body, headers = await api.curl(path="/services/forwarder/expose", method="POST",
                                           data=json.dumps({"local": local, "remote": "192.168.65.3:22",
                                                            "protocol": "tcp"}))
    assert (status, body) == (200, "")
    # protocol defaults to tcp, as in gvproxy; unix remotes are tcp:// URIs.
    sock_path = f"{api_dir}/gv.sock"
    status, body, _ = await api.curl(path="/services/forwarder/expose", method="POST",
                                     data=json.dumps({"local": sock_path, "remote": "tcp://192.168.65.4:22",
                                                      "protocol": "unix"}))
    assert (status, body) == (200, "")
    status, body, headers = await api.curl(path="/services/forwarder/all")
    assert status == 200 and headers["content-type"].startswith("application/json")
    listed = json.loads(body)
    assert listed == sorted(listed, key=lambda d: (d["local"], d["protocol"]))
    assert {"local": local, "remote": "192.168.65.3:22", "protocol": "tcp"} in listed
    assert {"local": sock_path, "remote": "tcp://192.168.65.4:22", "protocol": "unix"} in listed
    # Errors are plain text, as gvproxy's client reads them: 500 for a forward that
    # cannot be made or found, 400 for a bad request.
    status, body, headers = await api.curl(path="/services/forwarder/expose", method="POST",
                                           data=json.dumps({"local": local, "remote": "192.168.65.3:22"}))
    assert status == 500 and headers["content-type"].startswith("text/plain")
    assert "already forwarded" in body
    status, body, _ = await api.curl(path="/services/forwarder/expose", method="POST", data="{not json")
    assert status == 400 and body.strip()
    status, body, _ = await api.curl(path="/services/forwarder/expose", method="POST",
                                     data=json.dumps({"local": "127.0.0.1:1", "remote": ":22"}))
    assert status == 400 and "IP" in body
    status, body, _ = await api.curl(path="/services/forwarder/unexpose", method="POST",
                                     data=json.dumps({"local": local}))
    assert (status, body) == (200, "")
    status, body, _ = await api.curl(path="/services/forwarder/unexpose", method="POST",
                                     data=json.dumps({"local": local, "protocol": "tcp"}))
    assert status == 500 and body.strip() == "proxy not found"
    status, body, _ = await api.curl(path="/services/forwarder/unexpose", method="POST",
                                     data=json.dumps({"local": sock_path, "protocol": "unix"}))
    assert status == 200
    status, body, _ = await api.curl(path="/services/forwarder/all")
    assert json.loads(body) == []


async def test_api_leases(api, fake_guest):
    leases = await api.call("leases")
    assert len(leases) == 1
    lease = leases[0]
    assert lease["ip"] == str(IPv4Address(fake_guest.ip))
    assert lease["mac"] == ":".join(f"{b:02x}" for b in fake_guest.mac)
    assert lease["state"] == "bound"
    assert 0 < lease["expires_in"] <= api.switch.config.lease_seconds
    status, body, _ = await api.curl(path="/services/dhcp/leases")
    assert json.loads(body) == {lease["ip"]: lease["mac"]}


async def _echo_server(nursery) -> int:
    async def echo(stream):
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_api_stats_and_connections(api, fake_guest, nursery):
    port = await _echo_server(nursery)
    stream = await fake_guest.open_tcp_stream(api.switch.config.host_ip, port)
    payload = b"x" * 5000
    await stream.send_all(payload)
    got = b""
    with trio.fail_after(5):
        while len(got) < len(payload):
            got += await stream.receive_some(65536)
    await trio.sleep(0.2)
    table = await api.call("connections")
    assert table["total"] == 1 and not table["truncated"]
    (flow,) = table["connections"]
    assert flow["protocol"] == "tcp"
    assert flow["destination"] == f"{api.switch.config.host_ip}:{port}"
    assert flow["guest"].startswith(f"{IPv4Address(fake_guest.ip)}:")
    assert flow["state"] == "ESTABLISHED"
    assert flow["bytes_to_host"] == len(payload) and flow["bytes_to_guest"] == len(payload)
    assert flow["age"] >= 0.2
    stats = await api.call("stats")
    assert stats["flows"]["tcp"] == 1
    assert stats["frames"]["in"] > 0 and stats["frames"]["out"] > 0
    assert stats["bytes"]["in"] > len(payload) and stats["bytes"]["out"] > len(payload)
    assert "queries" in stats["dns"]
    assert stats["http_proxy"]["active_connections"] == 0  # the gateway's proxy, idle
    assert stats["leases"] == 1 and len(stats["ports"]) == 1
    assert set(stats["drops"]) == {"switch", "gateway"}
    status, body, _ = await api.curl(path="/connections?protocol=udp")
    assert json.loads(body)["connections"] == []
    status, body, _ = await api.curl(path="/connections?limit=0")
    assert json.loads(body)["truncated"] is True
    status, body, _ = await api.curl(path="/connections?protocol=sctp")
    assert status == 400
    await stream.aclose()


# ----------------------------------------------------------------------------- metrics
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')


def parse_prometheus(text: str) -> dict[str, dict]:
    """A strict parser for the text exposition format 0.0.4; raises AssertionError."""
    assert text.endswith("\n"), "exposition must end with a newline"
    families: dict[str, dict] = {}
    current = None
    finished: set[str] = set()
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        assert line, f"{where}: empty line"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[0] == "#" and parts[1] in ("HELP", "TYPE"), where
            name = parts[2]
            assert _METRIC_NAME.fullmatch(name), where
            family = families.setdefault(name, {"help": None, "type": None, "samples": {}})
            assert not family["samples"], f"{where}: metadata after samples"
            if parts[1] == "HELP":
                assert family["help"] is None, f"{where}: second HELP"
                family["help"] = parts[3] if len(parts) > 3 else ""
            else:
                assert family["type"] is None, f"{where}: second TYPE"
                assert len(parts) == 4 and parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), where
                family["type"] = parts[3]
            if current is not None and current != name:
                finished.add(current)
            assert name not in finished, f"{where}: family {name} is not contiguous"
            current = name
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        assert m, f"{where}: not a sample"
        name, labels_text, value_text = m.group(1), m.group(3), m.group(4)
        assert name in families and families[name]["type"], f"{where}: sample without TYPE"
        if current != name:
            finished.add(current)
        assert name not in finished, f"{where}: family {name} is not contiguous"
        current = name
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                assert lm, f"{where}: bad label at {labels_text[pos:]!r}"
                assert lm.group(1) not in labels, f"{where}: duplicate label"
                labels[lm.group(1)] = lm.group(2)
                pos = lm.end()
                if pos < len(labels_text):
                    assert labels_text[pos] == ",", f"{where}: expected ','"
                    pos += 1
        value = float(value_text)  # accepts NaN, +Inf, -Inf
        key = tuple(sorted(labels.items()))
        assert key not in families[name]["samples"], f"{where}: duplicate sample"
        if families[name]["type"] == "counter":
            assert value >= 0 and not math.isnan(value), f"{where}: bad counter"
        families[name]["samples"][key] = value
    for name, family in families.items():
        assert family["help"] is not None and family["type"] is not None, f"{name}: HELP and TYPE required"
    return families


async def test_api_metrics_parse_as_prometheus_text(api, fake_guest):
    assert await fake_guest.ping(api.switch.config.gateway_ip)
    await api.call("expose", "tcp", str(_free_port()), "192.168.65.3:80")
    api.switch.drops["a \"quoted\"\\reason\n"] += 2  # label escaping
    status, body, headers = await api.curl(path="/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = parse_prometheus(body)
    frames = families["netkit_frames_total"]
    assert frames["type"] == "counter"
    assert frames["samples"][(("direction", "in"),)] > 0
    assert families["netkit_flows"]["type"] == "gauge"
    assert set(dict(k)["protocol"] for k in families["netkit_flows"]["samples"]) == {"tcp", "udp", "icmp"}
    assert families["netkit_dns_queries_total"]["type"] == "counter"
    drops = families["netkit_drops_total"]["samples"]
    assert drops[(("layer", "switch"), ("reason", 'a \\"quoted\\"\\\\reason\\n'))] == 2
    assert families["netkit_leases"]["samples"][(("state", "bound"),)] == 1
    assert families["netkit_forwards"]["samples"][(("protocol", "tcp"),)] == 1
    assert "netkit_link_bytes_total" in families
    # The parser is strict: it rejects what Prometheus would.
    for bad in ("# TYPE x counter\nx 1\n# TYPE x counter\n", "x 1\n", "# HELP x h\n# TYPE x gauge\nx{a=\"1} 1\n",
                "# HELP x h\n# TYPE x gauge\nx 1"):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


# ----------------------------------------------------------------------------- http proxy, dns, pcap
async def test_api_http_proxy_503_without_proxy_then_get_put(api):
    api.switch.http_proxy = None  # as with --http-proxy-port 0
    status, body, _ = await api.curl(path="/http-proxy")
    assert status == 503 and "not enabled" in json.loads(body)["error"]
    api.switch.http_proxy = HttpProxy()
    try:
        settings = await api.call("http_proxy")
        assert settings["transparent_http_ports"] == [80]
        new = {"http": "http://127.0.0.1:3128", "https": "127.0.0.1:3129", "exclude": "*.local,10.0.0.0/8",
               "transparent_http_ports": [80, 8080], "transparent_https_ports": [443]}
        updated = await api.call("set_http_proxy", new)
        assert updated["http"] == "http://127.0.0.1:3128"
        assert updated["exclude"] == "*.local,10.0.0.0/8"
        assert api.switch.http_proxy.settings.transparent_http_ports == (80, 8080)
        with pytest.raises(ApiRequestError) as e:
            await api.call("set_http_proxy", {"http": "socks5://127.0.0.1:1"})
        assert e.value.status == 400 and "scheme" in e.value.message
        with pytest.raises(ApiRequestError) as e:
            await api.call("set_http_proxy", {"htp": "http://127.0.0.1:1"})
        assert e.value.status == 400 and "htp" in e.value.message
        assert api.switch.http_proxy.settings.http == "http://127.0.0.1:3128"  # unchanged by bad requests
        stats = await api.call("stats")
        assert stats["http_proxy"]["reconfigurations"] >= 1
        status, body, _ = await api.curl(path="/metrics")
        assert "netkit_http_proxy_requests_total" in parse_prometheus(body)
    finally:
        api.switch.http_proxy = None


async def test_api_large_body_with_expect_100_continue(api):
    records = [[f"h{i}.big.test", "A", f"10.0.{i // 250}.{i % 250 + 1}"] for i in range(2000)]
    data = json.dumps({"name": "big.test", "records": records})
    with trio.fail_after(0.9):  # curl would wait a whole second for a 100 that never came
        status, body, _ = await api.curl("-v", path="/dns/zones", method="POST", data=data,
                                         headers=("Expect: 100-continue",))
    assert status == 201 and json.loads(body)["records"] == 2000
    stream = await trio.open_unix_socket(api.path)
    async with stream:
        await stream.send_all(b"POST /dns/zones HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                              b"Content-Length: 2\r\n\r\n")
        with trio.fail_after(2):
            assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 100 ")


async def test_api_dns_zones(api):
    created = await api.call("add_zone", "corp.test", [["db.corp.test", "A", "10.9.8.7"], ["@", "TXT", "hi"]])
    assert created == {"name": "corp.test", "records": 2}
    assert api.switch.dns.statistics()["zones"] == 1
    await api.call("add_zone", "zone.test", "$TTL 60\nwww IN A 10.1.1.1\n")
    with pytest.raises(ApiRequestError) as e:
        await api.call("add_zone", "bad.test", [["x.bad.test", "A", "not-an-ip"]])
    assert e.value.status == 400
    with pytest.raises(ApiRequestError) as e:
        await api.call("add_zone", "bad.test", [["x.bad.test", "A"]])
    assert e.value.status == 400 and "records[0]" in e.value.message
    await api.call("remove_zone", "corp.test")
    with pytest.raises(ApiRequestError) as e:
        await api.call("remove_zone", "corp.test")
    assert e.value.status == 404
    assert api.switch.dns.statistics()["zones"] == 1


async def test_api_pcap_start_stop(api, fake_guest, api_dir):
    target = f"{api_dir}/live.pcap"
    status, body, _ = await api.curl(path="/pcap", method="POST",
                                     data=json.dumps({"action": "start", "path": "relative.pcap"}))
    assert status == 400 and "absolute" in json.loads(body)["error"]
    started = await api.call("capture_start", target)
    assert started == {"capturing": True, "path": target}
    assert (await api.call("capture_status"))["capturing"] is True
    with pytest.raises(ApiRequestError) as e:
        await api.call("capture_start", target + "2")
    assert e.value.status == 409
    assert await fake_guest.ping(api.switch.config.gateway_ip)
    stopped = await api.call("capture_stop")
    assert stopped["path"] == target and stopped["capturing"] is False
    assert os.path.getsize(target) > 24 + 2 * 16  # header + the echo request and reply
    again = await api.call("capture_stop")
    assert again["path"] is None and again["stopped"] is False
    status, body, _ = await api.curl(path="/pcap", method="POST", data=json.dumps({"action": "rewind"}))
    assert status == 400
    status, body, _ = await api.curl(path="/pcap", method="POST",
                                     data=json.dumps({"action": "start", "path": "/nonexistent-dir/x.pcap"}))
    assert status == 400 and "cannot write" in json.loads(body)["error"]


# ----------------------------------------------------------------------------- errors
async def test_api_errors_404_405_400(api):
    status, body, _ = await api.curl(path="/nope")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]
    status, body, headers = await api.curl(path="/leases", method="POST", data="{}")
    assert status == 405 and headers["allow"] == "GET"
    status, body, headers = await api.curl(path="/forwards", method="PATCH")
    assert status == 405 and headers["allow"] == "DELETE, GET, POST"
    for bad, fragment in (("{", "malformed JSON"), ("[1, 2]", "JSON object"), ('{"local": NaN, "remote": "x"}',
                                                                                    "malformed JSON"),
                          ('{"local": "1", "remote": "192.168.65.3:1", "colour": "red"}', "unknown field"),
                          ('{"remote": "192.168.65.3:1"}', "missing field"),
                          ('{"local": 5, "remote": "192.168.65.3:1"}', "'local' must be")):
        status, body, _ = await api.curl(path="/forwards", method="POST", data=bad)
        assert status == 400, bad
        assert fragment in json.loads(body)["error"], (bad, body)
    status, body, _ = await api.curl(path="/leases?verbose=1")
    assert status == 400


async def test_api_client_reports_server_errors_and_missing_sockets(api, api_dir):
    with pytest.raises(ApiRequestError) as e:
        await api.call("remove_zone", "nothing.test")
    assert e.value.status == 404 and "(HTTP 404)" in str(e.value)
    from netkit.api.client import ApiClient

    def missing():
        with ApiClient(f"{api_dir}/absent.sock") as client:
            client.health()
    with pytest.raises(ApiUnavailable, match="no netkit API socket at"):
        await trio.to_thread.run_sync(missing)
    dead = f"{api_dir}/dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)
    s.close()

    def refused():
        with ApiClient(dead) as client:
            client.health()
    with pytest.raises(ApiUnavailable, match="nothing is listening"):
        await trio.to_thread.run_sync(refused)


async def test_api_body_cap_and_bad_http(api):
    big = api.server.max_body + 1
    reply = await api.raw(b"POST /forwards HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % big)
    status, body, headers = parse_http_response(reply)
    assert status == 413 and headers["connection"] == "close"
    # Chunked bodies are counted too.
    chunk = b"x" * 65536
    data = b"POST /forwards HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (api.server.max_body // len(chunk) + 2)
    reply = await api.raw(data)
    assert parse_http_response(reply)[0] == 413
    reply = await api.raw(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert parse_http_response(reply)[0] == 400
    reply = await api.raw(b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n")
    assert parse_http_response(reply)[0] in (400, 431)
    reply = await api.raw(b"GET /health HTTP/1.1\r\n\r\n")  # HTTP/1.1 without Host
    assert parse_http_response(reply)[0] == 400


async def test_api_keep_alive_serves_several_requests(api):
    stream = await trio.open_unix_socket(api.path)
    async with stream:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        await stream.send_all(request + request)  # pipelined: both are answered in order
        data = b""
        with trio.fail_after(5):
            while data.count(b"HTTP/1.1 200") < 2:
                data += await stream.receive_some(65536)
        await stream.send_all(b"GET /leases HTTP/1.1\r\nHost: x\r\n\r\n")
        more = b""
        with trio.fail_after(5):
            while b"\r\n\r\n[]" not in more:
                more += await stream.receive_some(65536)


async def test_api_idle_timeout_and_connection_cap(netkit_switch, nursery, api_dir):
    path = f"{api_dir}/limited.sock"
    server = await nursery.start(lambda task_status: serve_api(netkit_switch, path, idle_timeout=0.3,
                                                               max_connections=2, task_status=task_status))
    first = await trio.open_unix_socket(path)
    second = await trio.open_unix_socket(path)
    await first.send_all(b"GET /heal")  # half a request, then silence
    await wait_until(lambda: server.statistics()["active_connections"] == 2, timeout=5)
    third = await trio.open_unix_socket(path)
    await third.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(2):
        reply = b""
        while True:
            chunk = await third.receive_some(4096)
            if not chunk:
                break
            reply += chunk
    assert parse_http_response(reply)[0] == 503
    assert server.statistics()["rejected_connections"] == 1
    with trio.fail_after(2):  # the idle ones are closed after 0.3 s (408 for the half request)
        reply = b""
        while chunk := await first.receive_some(4096):
            reply += chunk
        assert parse_http_response(reply)[0] == 408
        assert await second.receive_some(4096) == b""
    for s in (first, second, third):
        await s.aclose()
    assert server.statistics()["active_connections"] == 0


async def test_api_bearer_token(netkit_switch, nursery, api_dir):
    path = f"{api_dir}/token.sock"
    server = await nursery.start(lambda task_status: serve_api(netkit_switch, path, token="s3cret-token",
                                                               task_status=task_status))
    api = ApiHarness(path, server, netkit_switch, "s3cret-token")
    status, body, headers = await api.curl(path="/health")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, _, _ = await api.curl(path="/health", headers=("Authorization: Bearer wrong",))
    assert status == 401
    status, _, _ = await api.curl(path="/nope")  # no route probing without the token
    assert status == 401
    status, body, _ = await api.curl(path="/health", headers=("Authorization: Bearer s3cret-token",))
    assert status == 200
    assert (await api.call("health"))["status"] == "ok"  # the client sends its token


# ----------------------------------------------------------------------------- the data path
async def test_api_switch_keeps_forwarding_while_bad_requests_arrive(api, fake_guest):
    gateway = api.switch.config.gateway_ip
    results = []

    async def pinger():
        for _ in range(40):
            results.append(await fake_guest.ping(gateway, timeout=1))
            await trio.sleep(0.01)

    async def abuser():
        garbage = [b"\x00\xff" * 3000, b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 5000,
                   b"POST /forwards HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
                   b"POST /forwards HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{\"a\":[[[",
                   b"PUT /http-proxy HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
                   b"POST /dns/zones HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"name\": 1}  ",
                   b"DELETE /forwards?local=%zz HTTP/1.1\r\nHost: x\r\n\r\n"]
        for _ in range(5):
            for data in garbage:
                stream = await trio.open_unix_socket(api.path)
                async with stream:
                    try:
                        await stream.send_all(data)
                        with trio.move_on_after(0.5):
                            await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        pass
            deep = b"[" * 200000
            reply = await api.raw(b"POST /forwards HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  b"Content-Length: %d\r\n\r\n" % len(deep) + deep)
            assert parse_http_response(reply)[0] == 400

    async with trio.open_nursery() as n:
        n.start_soon(pinger)
        n.start_soon(abuser)
    assert results and all(results), results
    assert (await api.call("health"))["status"] == "ok"
    assert api.server.statistics()["responses"].get(500, 0) == 0


async def test_api_component_failure_is_a_500_not_an_empty_view(api, monkeypatch, caplog):
    """A component whose statistics() fails has a bug: /stats and /metrics say so (500,
    logged with the traceback) instead of quietly leaving that component out."""

    def broken():
        raise RuntimeError("udp statistics bug")

    monkeypatch.setattr(api.switch.udp_nat, "statistics", broken)
    for path in ("/stats", "/metrics"):
        status, _body, _headers = await api.curl(path=path)
        assert status == 500
    assert "udp statistics bug" in caplog.text
    status, _body, _headers = await api.curl(path="/health")  # the API itself carries on
    assert status == 200
