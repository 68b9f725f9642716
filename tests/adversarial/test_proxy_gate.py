"""Attack 4 (bypass the outbound policy through the HTTP proxy) and the proxy part of
attack 6 (one guest starving the others of the proxy).

Before: ``--deny tcp:192.168.65.2/32:PORT`` reset a direct connection but the proxy
(absolute-form GET, CONNECT, transparent mode) fetched the page; 169.254.169.254 went
through the proxy too; a name resolving to a denied address was connected to; and one
guest trickling bytes into 1024 proxy connections kept every other guest on 503.

Every switch here uses ``RecordingHost``: names resolve from a table the test controls
(never the machine's resolver), and a connect anywhere but 127.0.0.1 is recorded and
refused without touching the network.
"""

from __future__ import annotations

import errno
import functools
import socket
from ipaddress import IPv4Address

import pytest
import trio

import netkit
from netkit.http_proxy import ProxySettings
from netkit.nat.host import HostNetwork
from netkit.policy import FlowRequest
from netkit.testing.fake_guest import FakeGuest, attach_fake_guest

from .conftest import LOOPBACK_ONLY

GATEWAY = "192.168.65.1"
HOST_ALIAS = "192.168.65.2"
PROXY_PORT = 3128
METADATA = "169.254.169.254"


class RecordingHost(HostNetwork):
    """Host sockets for the test switch: loopback only, every attempt recorded."""

    def __init__(self, names: dict[str, list[str]] | None = None) -> None:
        self.names = dict(names or {})
        self.connects: list[tuple[str, int]] = []
        self.resolved: list[str] = []

    async def resolve(self, name: str) -> list[IPv4Address]:
        self.resolved.append(name)
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test resolver)")
        return [IPv4Address(a) for a in self.names[name]]

    async def connect_tcp(self, address, port):
        self.connects.append((str(address), port))
        if str(address) != "127.0.0.1":
            raise OSError(errno.ECONNREFUSED, "the test host connects to loopback only")
        return await super().connect_tcp(address, port)


class Origin:
    """An HTTP origin on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self, body: bytes = b"origin page") -> None:
        self.body = body
        self.connections = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.listener))
        await trio.serve_listeners(self._handle, [listener], task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                  % (len(self.body), self.body))
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch):
    # The proxy reads HTTP_PROXY/HTTPS_PROXY/NO_PROXY of this process: keep them out.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def origin(nursery):
    server = Origin()
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def gated(nursery, origin, netkit_config):
    """A switch whose policy denies the origin's port on the host alias, on top of the
    adversarial allow list (host alias and loopback only)."""
    host = RecordingHost({"ok.test": ["127.0.0.1"], "rebind.test": [METADATA],
                          "corp.test": ["10.1.2.3"], "mixed.test": ["127.0.0.1", METADATA]})
    config = netkit.Config(dns_upstreams=("127.0.0.1:9",), allow=netkit_config.allow + ("10.0.0.0/8",),
                           deny=(f"tcp:{HOST_ALIAS}/32:{origin.port}", "10.1.0.0/16"))
    async with netkit.open_switch(config, host=host) as switch:
        switch.recording_host = host
        yield switch


def transparent(switch) -> None:
    """Turn transparent mode on (port 80 of any destination goes to the proxy)."""
    switch.http_proxy.reconfigure(switch.http_proxy.settings.replace(allow=("*",)))


async def exchange(guest: FakeGuest, data: bytes, *, to: tuple[str, int] = (GATEWAY, PROXY_PORT),
                   timeout: float = 10) -> bytes:
    """Send ``data`` from the guest and read until the other side closes."""
    stream = await guest.open_tcp_stream(*to)
    out = b""
    with trio.fail_after(timeout):
        await stream.send_all(data)
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            out += chunk
    await stream.aclose()
    return out


def get(url: str, host: str | None = None) -> bytes:
    host = host or url.split("/")[2]
    return f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def connect(authority: str) -> bytes:
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode()


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# ----------------------------------------------------------------------------- attack 4
async def test_denied_destination_is_refused_on_every_proxy_path(gated, origin, nursery):
    guest = await attach_fake_guest(gated, nursery)
    port = origin.port
    # Direct: RST, as before.
    with pytest.raises(ConnectionRefusedError):
        await guest.open_tcp_stream(HOST_ALIAS, port)
    # Explicit proxy, every way of naming the host: the alias, its loopback, netkit's
    # host name, a name resolving to loopback, IPv6 loopback.
    for url in (f"http://{HOST_ALIAS}:{port}/", f"http://127.0.0.1:{port}/", f"http://127.9.9.9:{port}/",
                f"http://0.0.0.0:{port}/", f"http://host.docker.internal:{port}/", f"http://ok.test:{port}/",
                f"http://[::1]:{port}/", f"http://[::ffff:127.0.0.1]:{port}/"):
        response = await exchange(guest, get(url))
        assert status(response) == 403, (url, response)
        assert b"outbound policy" in response
    # CONNECT.
    for authority in (f"{HOST_ALIAS}:{port}", f"127.0.0.1:{port}", f"ok.test:{port}"):
        response = await exchange(guest, connect(authority))
        assert status(response) == 403, (authority, response)
    # Transparent: port 80 of the host alias is allowed, and the Host header names the
    # denied port.
    transparent(gated)
    response = await exchange(guest, get("/", host=f"{HOST_ALIAS}:{port}"), to=(HOST_ALIAS, 80))
    assert status(response) == 403, response

    assert origin.connections == 0
    assert all(p != port for _, p in gated.recording_host.connects)
    counters = gated.policy.counters
    assert counters["proxy-denied"] == 11 and counters["transparent-proxy-denied"] == 1, counters
    assert gated.http_proxy.statistics()["policy_denied"] == 12
    # The same guest still reaches an allowed port through the proxy.
    other = Origin(b"allowed")
    await nursery.start(other.serve)
    response = await exchange(guest, get(f"http://127.0.0.1:{other.port}/"))
    assert status(response) == 200 and response.endswith(b"allowed")


async def test_metadata_address_is_refused_without_a_connect(nursery):
    """No allow list here: the default deny of 169.254.169.254 is what must hold."""
    host = RecordingHost({"meta.test": [METADATA], "decimal.test": [METADATA]})
    config = netkit.Config(dns_upstreams=("127.0.0.1:9",))
    async with netkit.open_switch(config, host=host) as switch:
        guest = await attach_fake_guest(switch, nursery)
        requests = [get(f"http://{METADATA}/latest/meta-data/"), get("http://meta.test/"),
                    get(f"http://[::ffff:{METADATA}]/"), connect(f"{METADATA}:443"), connect("meta.test:80")]
        for request in requests:
            response = await exchange(guest, request)
            assert status(response) == 403, (request, response)
        # Transparent: to port 80 of an allowed address, Host: the metadata address.
        transparent(switch)
        response = await exchange(guest, get("/latest/meta-data/", host=METADATA), to=(HOST_ALIAS, 80))
        assert status(response) == 403, response
        assert all(address != METADATA for address, _ in host.connects), host.connects
        assert switch.policy.counters["proxy-denied"] == 5
        assert switch.policy.counters["transparent-proxy-denied"] == 1


async def test_virtual_subnet_is_never_reached_through_the_proxy(nursery):
    """Attack 7 through the proxy: an unassigned address of the virtual subnet (or a name
    resolving to one) is the guests' network, never the host's: no policy in force here,
    and still no connect."""
    unassigned = "192.168.65.71"
    host = RecordingHost({"lan.test": [unassigned]})
    config = netkit.Config(dns_upstreams=("127.0.0.1:9",))
    async with netkit.open_switch(config, host=host) as switch:
        guest = await attach_fake_guest(switch, nursery)
        for request in (get(f"http://{unassigned}/"), get("http://lan.test/"), connect(f"{unassigned}:22")):
            response = await exchange(guest, request)
            assert 400 <= status(response) < 600, (request, response)
        assert host.connects == []


async def test_name_resolving_to_a_denied_address_is_refused(gated, nursery):
    guest = await attach_fake_guest(gated, nursery)
    host = gated.recording_host
    for name in ("rebind.test", "corp.test", "mixed.test"):
        response = await exchange(guest, get(f"http://{name}:8080/"))
        assert status(response) == 403, (name, response)
    assert {"rebind.test", "corp.test", "mixed.test"} <= set(host.resolved)
    assert host.connects == []  # not even the allowed address of mixed.test
    response = await exchange(guest, get("http://nowhere.test/"))
    assert status(response) == 502 and b"cannot resolve" in response


async def test_policy_hook_sees_proxy_flows_with_the_guest(gated, nursery):
    other = Origin(b"hooked")
    await nursery.start(other.serve)
    seen: list[FlowRequest] = []
    gated.policy.hook = lambda request: seen.append(request) or None
    guest = await attach_fake_guest(gated, nursery)
    guest_ip = IPv4Address(guest.ip)
    transparent(gated)
    assert status(await exchange(guest, get(f"http://ok.test:{other.port}/"))) == 200
    assert status(await exchange(guest, get("/", host=f"ok.test:{other.port}"), to=(HOST_ALIAS, 80))) == 200
    proxy_flows = [r for r in seen if r.via != "nat"]
    assert [(r.via, r.guest, r.name, r.destination, r.port) for r in proxy_flows] == [
        ("proxy", guest_ip, "ok.test", IPv4Address(HOST_ALIAS), other.port),
        ("transparent-proxy", guest_ip, "ok.test", IPv4Address(HOST_ALIAS), other.port)]
    port_id = gated.port_for_mac(guest.mac).id
    assert {r.switch_port for r in seen} == {port_id}
    # The connection to port 80 that the transparent proxy took was asked about too.
    assert any(r.via == "nat" and r.port == 80 for r in seen)
    # A hook that says no is a 403 like a rule.
    gated.policy.hook = lambda request: netkit.policy.DENY if request.via == "proxy" else None
    assert status(await exchange(guest, get(f"http://ok.test:{other.port}/"))) == 403


async def test_upstream_proxy_is_not_contacted_for_a_denied_origin(gated, nursery):
    upstream = Origin(b"from upstream")
    await nursery.start(upstream.serve)
    url = f"http://127.0.0.1:{upstream.port}"
    gated.http_proxy.reconfigure(ProxySettings(http=url, https=url))
    guest = await attach_fake_guest(gated, nursery)
    refused = [get(f"http://{METADATA}/"), get("http://rebind.test/"), get("http://corp.test/"),
               connect(f"{METADATA}:443"),
               # Does not resolve on the host: with an allow list in force, refused.
               get("http://intranet.corp.test/")]
    for request in refused:
        response = await exchange(guest, request)
        assert status(response) == 403, (request, response)
    assert upstream.connections == 0
    assert gated.recording_host.connects == []
    # An allowed origin does go through the upstream.
    response = await exchange(guest, get("http://ok.test:8080/"))
    assert status(response) == 200 and response.endswith(b"from upstream")
    assert upstream.connections == 1


async def test_no_host_loopback_holds_for_loopback_addresses(origin, nursery):
    """--no-host-loopback: the host is unreachable however the guest names it (before,
    a SYN to 127.0.0.1 and a proxy request for http://127.0.0.1/ both reached it)."""
    host = RecordingHost({"ok.test": ["127.0.0.1"]})
    config = netkit.Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY, host_loopback=False)
    async with netkit.open_switch(config, host=host) as switch:
        guest = await attach_fake_guest(switch, nursery)
        for address in (HOST_ALIAS, "127.0.0.1", "0.0.0.0"):
            with pytest.raises(ConnectionRefusedError):
                await guest.open_tcp_stream(address, origin.port)
        for url in (f"http://127.0.0.1:{origin.port}/", f"http://ok.test:{origin.port}/",
                    f"http://host.docker.internal:{origin.port}/", f"http://{HOST_ALIAS}:{origin.port}/"):
            response = await exchange(guest, get(url))
            assert status(response) == 502 and (b"not reachable" in response or b"loopback" in response), response
        assert origin.connections == 0 and host.connects == []
        assert switch.tcp_nat.counters["closed-port"] == 3


# ----------------------------------------------------------------------------- attack 6 (proxy)
async def trickle(guest: FakeGuest, started: trio.Event, result: list) -> None:
    """A request head sent one byte at a time, never finished; keeps the reply."""
    stream = await guest.open_tcp_stream(GATEWAY, PROXY_PORT)
    started.set()
    head = b"GET http://ok.test/ HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
    received = b""
    async with trio.open_nursery() as nursery:
        async def send() -> None:
            try:
                for i in range(len(head)):
                    await stream.send_all(head[i:i + 1])
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        nursery.start_soon(send)
        while True:
            try:
                chunk = await stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            if not chunk:
                break
            received += chunk
        nursery.cancel_scope.cancel()
    result.append((trio.current_time(), received))
    await trio.aclose_forcefully(stream)


async def test_trickling_guest_cannot_starve_the_proxy(nursery):
    share, deadline = 4, 3.0
    other = Origin(b"served")
    await nursery.start(other.serve)
    host = RecordingHost({"ok.test": ["127.0.0.1"]})
    config = netkit.Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY,
                           http_proxy_max_connections=share + 2, http_proxy_max_connections_per_guest=share,
                           http_proxy_header_timeout=deadline)
    async with netkit.open_switch(config, host=host) as switch:
        attacker = await attach_fake_guest(switch, nursery)
        victim = await attach_fake_guest(switch, nursery)
        stats = switch.http_proxy.statistics
        results: list = []
        start = trio.current_time()
        for _ in range(share):
            started = trio.Event()
            nursery.start_soon(trickle, attacker, started, results)
            await started.wait()
        with trio.fail_after(5):
            while stats()["active_connections"] < share:
                await trio.sleep(0.01)
        # The attacker's next connection is over its share: 503 for it alone.
        response = await exchange(attacker, get("http://ok.test/"))
        assert status(response) == 503 and b"per client" in response
        assert stats()["rejected_client_busy"] == 1
        # The victim is served while the attacker's connections are still held.
        response = await exchange(victim, get(f"http://ok.test:{other.port}/"))
        assert status(response) == 200 and response.endswith(b"served")
        assert len(results) == 0 and stats()["active_connections"] >= share
        # The trickled heads end with 408 at the deadline, not when the bytes stop.
        with trio.fail_after(deadline + 10):
            while len(results) < share:
                await trio.sleep(0.05)
        for ended, received in results:
            assert received.startswith(b"HTTP/1.1 408 "), received
            assert ended - start < deadline + 5
        assert stats()["header_timeouts"] == share
        assert stats().get("rejected_busy", 0) == 0


# ----------------------------------------------------------------------------- a kernel guest
@pytest.mark.privileged
async def test_kernel_guest_curl_through_proxy_is_denied(origin, nursery):
    from netkit.testing import require_privileged, require_tool
    from netkit.testing.netns_guest import open_netns_guest

    require_privileged()
    require_tool("curl")
    config = netkit.Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY,
                           deny=(f"tcp:{HOST_ALIAS}/32:{origin.port}",))
    async with netkit.open_switch(config, host=RecordingHost()) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            proxy = f"http://{GATEWAY}:{PROXY_PORT}"
            curl = functools.partial(guest.run, timeout=30)
            direct = await curl(["curl", "-sS", "--max-time", "10", f"http://{HOST_ALIAS}:{origin.port}/"])
            assert direct.returncode == 7, direct  # connection refused (RST)
            for url in (f"http://{HOST_ALIAS}:{origin.port}/", f"http://127.0.0.1:{origin.port}/"):
                out = await curl(["curl", "-s", "-w", "%{http_code}", "--max-time", "10", "-x", proxy, url])
                assert out.stdout.endswith(b"403"), out
                assert b"outbound policy" in out.stdout
            tunnel = await curl(["curl", "-s", "-p", "-o", "/dev/null", "-w", "%{http_connect}", "--max-time", "10",
                                 "-x", proxy, f"http://{HOST_ALIAS}:{origin.port}/"])
            assert tunnel.stdout == b"403", tunnel
            assert origin.connections == 0
            assert switch.policy.counters["proxy-denied"] == 3
