"""Port forwards from host listeners into a real kernel guest."""

import os
import socket
import subprocess
import sys
from ipaddress import IPv4Address

import pytest
import trio

import netkit
from netkit.config import StaticLease
from netkit.forward import ForwardError, parse_forward_spec
from netkit.testing import require_privileged, require_tool
from netkit.testing.netns_guest import open_netns_guest

pytestmark = pytest.mark.privileged

TOOLS = os.path.join(os.path.dirname(__file__), "tools")
GUEST_MAC = "02:00:00:aa:bb:cc"
GUEST_IP = "192.168.65.50"


@pytest.fixture(autouse=True)
def _privileged():
    require_privileged()
    require_tool("busybox")


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_in_guest(guest, argv, env=None):
    """Start a long-running server inside the guest; returns the process."""
    proc = await trio.lowlevel.open_process(guest.netns.exec_args(argv), stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, env=env)
    return proc


async def wait_listening(guest, port, proto="tcp"):
    flag = "-tln" if proto == "tcp" else "-uln"
    with trio.fail_after(10):
        while f":{port} " not in (await guest.run(["ss", "-H", flag])).stdout.decode():
            await trio.sleep(0.05)


async def host_run(argv, timeout=60):
    with trio.fail_after(timeout):
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


@pytest.fixture
async def guest_with_http(nursery):
    """A switch with a static lease and a static forward, and an HTTP server in the guest."""
    port = free_port()
    config = netkit.Config(static_leases=(StaticLease(ip=IPv4Address(GUEST_IP), mac=bytes.fromhex(GUEST_MAC.replace(":", ""))),),
                           forwards=(f"tcp:127.0.0.1:{port}:{GUEST_IP}:8000",))
    async with netkit.open_switch(config) as switch:
        async with open_netns_guest(switch) as guest:
            guest.netns.ip("link", "set", "dev", "eth0", "address", GUEST_MAC)
            lease = await guest.udhcpc()
            assert lease["ip"] == GUEST_IP
            server = await start_in_guest(guest, [sys.executable, "-m", "http.server", "-b", "0.0.0.0", "8000",
                                                  "-d", TOOLS])
            try:
                await wait_listening(guest, 8000)
                yield switch, guest, port
            finally:
                server.kill()
                with trio.CancelScope(shield=True):
                    await server.wait()


async def test_static_and_dynamic_tcp_forward(guest_with_http):
    require_tool("curl")
    switch, guest, static_port = guest_with_http
    out = await host_run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{static_port}/udp_echo_server.py"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == open(os.path.join(TOOLS, "udp_echo_server.py"), "rb").read()
    dynamic = free_port()
    switch.forwarder.add("tcp", f"127.0.0.1:{dynamic}", f"{GUEST_IP}:8000")
    out = await host_run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{dynamic}/tcp_test_server.py"])
    assert out.returncode == 0 and b"Host-side TCP test server" in out.stdout
    assert switch.forwarder.remove("tcp", f"127.0.0.1:{dynamic}")
    out = await host_run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{dynamic}/"])
    assert out.returncode == 7  # the listener is gone: connection refused


async def test_unix_socket_forward(guest_with_http, tmp_path):
    require_tool("curl")
    switch, guest, _ = guest_with_http
    path = str(tmp_path / "guest-http.sock")
    switch.forwarder.add("unix", path, f"{GUEST_IP}:8000")
    out = await host_run(["curl", "-sS", "--max-time", "10", "--unix-socket", path, "http://guest/udp_echo_server.py"])
    assert out.returncode == 0, out.stderr
    assert b"UDP echo server" in out.stdout
    switch.forwarder.remove("unix", path)
    assert not os.path.exists(path)


async def test_forward_to_refusing_guest_port_resets_client(guest_with_http):
    switch, guest, _ = guest_with_http
    port = free_port()
    switch.forwarder.add("tcp", f"127.0.0.1:{port}", f"{GUEST_IP}:9")
    out = await host_run([sys.executable, "-c", f"""
import socket
try:  # the reset may already arrive while create_connection checks the connect result
    s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
    print("data" if s.recv(10) else "eof")
except ConnectionResetError:
    print("reset")
"""])
    assert out.stdout.decode().strip() == "reset", out


async def test_100_concurrent_forwarded_transfers(guest_with_http):
    switch, guest, _ = guest_with_http
    server = await start_in_guest(guest, [sys.executable, os.path.join(TOOLS, "tcp_test_server.py"), "/tmp"],
                                  env=dict(os.environ, BIND="0.0.0.0", PORT="7000"))
    try:
        await wait_listening(guest, 7000)
        port = free_port()
        switch.forwarder.add("tcp", f"127.0.0.1:{port}", f"{GUEST_IP}:7000")
        out = await host_run([sys.executable, os.path.join(TOOLS, "tcp_test_client.py"), "many", "127.0.0.1",
                              str(port), "100", "200000"], timeout=120)
        assert "ok=100 " in out.stdout.decode(), out.stdout + out.stderr
    finally:
        server.kill()
        with trio.CancelScope(shield=True):
            await server.wait()


async def test_udp_forward_to_guest_echo(guest_with_http):
    switch, guest, _ = guest_with_http
    server = await start_in_guest(guest, [sys.executable, os.path.join(TOOLS, "udp_echo_server.py")],
                                  env=dict(os.environ, BIND="0.0.0.0", PORT="5353"))
    try:
        await wait_listening(guest, 5353, "udp")
        port = free_port(socket.SOCK_DGRAM)
        switch.forwarder.add("udp", f"127.0.0.1:{port}", f"{GUEST_IP}:5353")
        out = await host_run([sys.executable, "-c", f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
for i in range(3):
    s.sendto(b"ping %d" % i, ("127.0.0.1", {port}))
    print(s.recv(100).decode())
"""])
        assert out.stdout.decode().split("\n")[:3] == ["ping 0", "ping 1", "ping 2"], out
    finally:
        server.kill()
        with trio.CancelScope(shield=True):
            await server.wait()


async def test_forward_errors_are_clear(netkit_switch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(ForwardError, match="already in use"):
            netkit_switch.forwarder.add("tcp", f"127.0.0.1:{busy.getsockname()[1]}", "192.168.65.3:80")
    finally:
        busy.close()
    with pytest.raises(ForwardError, match="not in the guest subnet"):
        netkit_switch.forwarder.add("tcp", "127.0.0.1:0", "10.0.0.1:80")
    with pytest.raises(ForwardError):
        parse_forward_spec("sctp:1:2:3")
    assert parse_forward_spec("tcp:8080:192.168.65.3:80") == ("tcp", "8080", "192.168.65.3:80")
