"""TCP NAT end to end: a real kernel guest in a namespace, host servers on 127.0.0.1."""

import errno
import os
import subprocess
import sys

import pytest
import trio

import netkit
from netkit.links.middleware import FaultInjector
from netkit.nat.host import HostNetwork
from netkit.testing import require_privileged, require_tool
from netkit.testing.netns_guest import open_netns_guest

pytestmark = pytest.mark.privileged

TOOLS = os.path.join(os.path.dirname(__file__), "tools")
CLIENT = [sys.executable, os.path.join(TOOLS, "tcp_test_client.py")]
HOST = "192.168.65.2"
MB = 1 << 20


@pytest.fixture(autouse=True)
def _privileged():
    require_privileged()
    require_tool("busybox")


@pytest.fixture
def host_server(tmp_path):
    """The TCP test server on host loopback: (port, results directory)."""
    proc = subprocess.Popen([sys.executable, os.path.join(TOOLS, "tcp_test_server.py"), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield port, tmp_path
    proc.kill()
    proc.wait()


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello from the host\n")
    proc = subprocess.Popen([sys.executable, "-c", "import http.server, sys, functools;"
                             "h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1]);"
                             "s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), h);"
                             "print(s.server_address[1], flush=True); s.serve_forever()", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(proc.stdout.readline())
    yield port
    proc.kill()
    proc.wait()


def _fd_count() -> int:
    import gc

    gc.collect()  # sockets an earlier test dropped must not be counted against this one
    return len(os.listdir("/proc/self/fd"))


async def _wait_flows_gone(switch, timeout=10.0):
    with trio.fail_after(timeout):
        while switch.tcp_nat.flow_count:
            await trio.sleep(0.05)


async def _client(guest, *args, timeout=300):
    proc = await guest.run([*CLIENT, *map(str, args)], timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()
    return dict(kv.split("=", 1) for kv in proc.stdout.decode().split() if "=" in kv)


async def test_curl_fetch_and_refused_port(netkit_switch, netns_guest, http_server):
    require_tool("curl")
    fds = _fd_count()
    await netns_guest.udhcpc()
    page = await netns_guest.run(["curl", "-sS", "--max-time", "10", f"http://{HOST}:{http_server}/index.html"])
    assert page.returncode == 0, page.stderr
    assert page.stdout == b"hello from the host\n"
    start = trio.current_time()
    refused = await netns_guest.run(["curl", "-sS", "--max-time", "10", f"http://{HOST}:1/"])
    assert refused.returncode == 7
    assert b"Connection refused" in refused.stderr or b"Couldn't connect" in refused.stderr
    assert trio.current_time() - start < 3
    assert netkit_switch.tcp_nat.counters["connect-refused"] == 1
    await _wait_flows_gone(netkit_switch)
    assert _fd_count() <= fds


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
async def test_256mb_each_way(netkit_switch, host_server, offload):
    port, _ = host_server
    fds = _fd_count()
    async with open_netns_guest(netkit_switch, offload=offload) as guest:
        await guest.udhcpc()
        up = await _client(guest, "upload", HOST, port, 256 * MB, 1)
        assert up["sent"] == up["got"]
        down = await _client(guest, "download", HOST, port, 256 * MB, 2)
        assert down["got"] == down["expected"] and int(down["bytes"]) == 256 * MB
    await _wait_flows_gone(netkit_switch)
    assert _fd_count() <= fds


async def test_exact_bytes_over_lossy_link(netkit_switch, host_server):
    """1% drop, 1% duplication, 5% reordering on the guest's link, both directions."""
    port, _ = host_server

    def lossy(link):
        return FaultInjector(link, seed=7, drop=0.01, duplicate=0.01, reorder=0.05)

    async with open_netns_guest(netkit_switch, wrap=lossy) as guest:
        with trio.fail_after(60):
            while True:  # DHCP itself may lose a packet; udhcpc retries
                try:
                    await guest.udhcpc()
                    break
                except Exception:
                    await trio.sleep(0.1)
        up = await _client(guest, "upload", HOST, port, 32 * MB, 3)
        assert up["sent"] == up["got"]
        down = await _client(guest, "download", HOST, port, 32 * MB, 4)
        assert down["got"] == down["expected"]
        counts = guest.link.faults
        assert counts.receive.dropped and counts.send.dropped and counts.send.reordered
    assert netkit_switch.tcp_nat.counters.get("bad-checksum", 0) == 0


async def test_half_close_each_way(netkit_switch, netns_guest, host_server):
    port, results = host_server
    await netns_guest.udhcpc()
    # The guest shuts its write side first; the host still answers.
    up = await _client(netns_guest, "upload", HOST, port, 3 * MB, 5)
    assert up["sent"] == up["got"]
    # The host shuts its write side first; the guest keeps sending.
    both = await _client(netns_guest, "hostclose", HOST, port, 2 * MB, 6, "hc1")
    assert both["got"] == both["expected"]
    with trio.fail_after(10):
        while not (results / "hc1").exists() or not (results / "hc1").read_text():
            await trio.sleep(0.05)
    assert (results / "hc1").read_text() == both["sent"]


async def test_host_reset_reaches_guest(netkit_switch, netns_guest, host_server):
    port, _ = host_server
    await netns_guest.udhcpc()
    result = await netns_guest.run([*CLIENT, "reset", HOST, str(port), str(4 * MB), "8"], timeout=60)
    assert result.stdout.decode().startswith("reset after="), result.stdout + result.stderr


async def test_1000_concurrent_connections(netkit_switch, netns_guest, host_server):
    port, _ = host_server
    fds = _fd_count()
    await netns_guest.udhcpc()
    many = await _client(netns_guest, "many", HOST, port, 1000, 20000, timeout=120)
    assert many["ok"] == "1000", many
    assert netkit_switch.tcp_nat.counters["connections-opened"] == 1000
    await _wait_flows_gone(netkit_switch)
    assert _fd_count() <= fds


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
async def test_iperf3_both_directions(netkit_switch, offload):
    iperf3 = require_tool("iperf3")
    server = subprocess.Popen([iperf3, "-s", "-B", "127.0.0.1", "-p", "15201"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        await trio.sleep(0.3)
        async with open_netns_guest(netkit_switch, offload=offload) as guest:
            await guest.udhcpc()
            for reverse in ([], ["-R"]):
                out = await guest.run([iperf3, "-c", HOST, "-p", "15201", "-t", "2", "-J", *reverse], timeout=60)
                assert out.returncode == 0, out.stdout[-2000:]
                import json
                result = json.loads(out.stdout)
                assert result["end"]["sum_received"]["bytes"] > 0
    finally:
        server.kill()
        server.wait()


# ----------------------------------------------------------------------------- host faults
class FaultyHost(HostNetwork):
    """Port 9 never answers, port 10 is unreachable; everything else is real."""

    def __init__(self):
        self.hanging = 0

    async def connect_tcp(self, address, port):
        if port == 9:
            self.hanging += 1
            await trio.sleep_forever()
        if port == 10:
            raise OSError(errno.EHOSTUNREACH, "No route to host")
        return await super().connect_tcp(address, port)


@pytest.fixture
async def faulty_switch():
    host = FaultyHost()
    config = netkit.Config(tcp_connect_timeout=30, max_connections_per_guest=100)
    async with netkit.open_switch(config, host=host) as switch:
        switch.faulty_host = host
        yield switch


async def test_slow_connects_never_stall_other_flows(faulty_switch, http_server):
    """gvisor-tap-vsock issue 676: ten slow connects froze all TCP. Not here."""
    require_tool("curl")
    async with open_netns_guest(faulty_switch) as guest:
        await guest.udhcpc()
        hang = await trio.lowlevel.open_process(
            guest.netns.exec_args(["sh", "-c", f"for i in $(seq 20); do curl -s --max-time 20 http://{HOST}:9/ & done; wait"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with trio.fail_after(10):
                while faulty_switch.faulty_host.hanging < 20:
                    await trio.sleep(0.05)
            start = trio.current_time()
            page = await guest.run(["curl", "-sS", "--max-time", "5", f"http://{HOST}:{http_server}/index.html"])
            assert page.stdout == b"hello from the host\n"
            assert trio.current_time() - start < 2
        finally:
            hang.kill()
            with trio.CancelScope(shield=True):
                await hang.wait()


async def test_unreachable_host_gives_icmp(faulty_switch):
    require_tool("curl")
    async with open_netns_guest(faulty_switch) as guest:
        await guest.udhcpc()
        # curl 7.88 prints a generic message, so look at the connect() errno itself.
        out = await guest.run([sys.executable, "-c", "import socket; s = socket.socket(); s.settimeout(5);"
                               f"s.connect(('{HOST}', 10))"])
        assert b"No route to host" in out.stderr, out.stderr
        assert faulty_switch.tcp_nat.counters["connect-unreachable"] == 1


async def test_connect_timeout_resets_guest():
    require_tool("curl")
    config = netkit.Config(tcp_connect_timeout=0.5)
    async with netkit.open_switch(config, host=FaultyHost()) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            start = trio.current_time()
            out = await guest.run(["curl", "-sS", "--max-time", "10", f"http://{HOST}:9/"])
            assert out.returncode == 7, out.stderr
            assert trio.current_time() - start < 5
            assert switch.tcp_nat.counters["connect-timeouts"] == 1


async def test_connection_limit_per_guest(host_server):
    port, _ = host_server
    config = netkit.Config(max_connections_per_guest=3)
    async with netkit.open_switch(config) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            out = await guest.run([*CLIENT, "many", HOST, str(port), "6", "1000"], timeout=60)
            assert "ok=" in out.stdout.decode()
            assert switch.tcp_nat.counters.get("guest-connection-limit", 0) >= 1


async def test_gateway_closed_port_and_disabled_host_alias(http_server):
    require_tool("curl")
    config = netkit.Config(host_loopback=False)
    async with netkit.open_switch(config) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            for url in (f"http://192.168.65.1:{http_server}/", f"http://{HOST}:{http_server}/"):
                out = await guest.run(["curl", "-sS", "--max-time", "5", url])
                assert out.returncode == 7, out.stderr
            assert switch.tcp_nat.counters["closed-port"] == 2
