"""End to end, as root: ``netkit-switch --tap --netns --api`` with a real kernel guest,
driven by the ``netkit`` CLI (expose, unexpose, connections, leases) and curl."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
import trio

from netkit.netns import Netns, udhcpc, unique_name
from netkit.testing import require_privileged, require_tool

pytestmark = pytest.mark.privileged

NETKIT = [sys.executable, "-m", "netkit.cli"]
NETKIT_SWITCH = os.path.join(os.path.dirname(sys.executable), "netkit-switch")
#: No proxy variables: every request here goes to this machine.
ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _netkit(*args: str) -> str:
    proc = await trio.run_process([*NETKIT, *args], capture_stdout=True, capture_stderr=True, check=False, env=ENV)
    assert proc.returncode == 0, (args, proc.stderr.decode())
    return proc.stdout.decode()


async def _wait_until(predicate, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)
        return
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _kill(proc) -> None:
    if proc.returncode is None:
        proc.kill()


async def test_api_daemon_expose_connections_leases(tmp_path):
    require_privileged()
    require_tool("busybox")
    require_tool("curl")
    api_dir = tempfile.mkdtemp(prefix="nkapi")
    api = f"{api_dir}/api.sock"
    ns = Netns.create(unique_name("nkapi"))
    tap = unique_name("nkat")
    guest_root = tmp_path / "guest"
    guest_root.mkdir()
    (guest_root / "hello.txt").write_text("hello from the guest\n")
    host_root = tmp_path / "host"
    host_root.mkdir()
    with open(host_root / "big.bin", "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros
    host_port = _free_port()
    procs: list[trio.Process] = []
    try:
        daemon = await trio.lowlevel.open_process(
            [NETKIT_SWITCH, "--tap", tap, "--netns", ns.name, "--api", api, "--dns-upstream", "127.0.0.1:9"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        procs.append(daemon)

        async def daemon_ready() -> bool:
            assert daemon.returncode is None, "netkit-switch exited"
            return os.path.exists(api) and tap in ns.ip("link", "show")
        await _wait_until(daemon_ready, 10, "netkit-switch up")
        lease = await udhcpc(ns, tap)
        guest_ip = lease["ip"]

        # A web server in the guest, reached from the host through `netkit expose`.
        web = await trio.lowlevel.open_process(
            ns.exec_args([sys.executable, "-m", "http.server", "8000", "-b", "0.0.0.0", "--directory",
                          str(guest_root)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        procs.append(web)
        local_port = _free_port()
        out = await _netkit("expose", "--api", api, f"127.0.0.1:{local_port}", f"{guest_ip}:8000")
        assert out.strip() == f"forwarding tcp 127.0.0.1:{local_port} -> {guest_ip}:8000"

        async def curl_forward() -> bool:
            proc = await trio.run_process(["curl", "-sS", "--noproxy", "*", "--max-time", "2",
                                           f"http://127.0.0.1:{local_port}/hello.txt"],
                                          capture_stdout=True, capture_stderr=True, check=False, env=ENV)
            return proc.returncode == 0 and proc.stdout == b"hello from the guest\n"
        await _wait_until(curl_forward, 15, "the guest web server through the forward")
        forwards = json.loads(await _netkit("forwards", "--api", api, "--json"))
        assert forwards[0]["connections"] >= 1

        await _netkit("unexpose", "--api", api, f"127.0.0.1:{local_port}")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", local_port), timeout=2).close()

        # A slow download from the guest to a host server on 127.0.0.1 (192.168.65.2 in the guest).
        host_web = await trio.lowlevel.open_process(
            [sys.executable, "-m", "http.server", str(host_port), "-b", "127.0.0.1", "--directory", str(host_root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        procs.append(host_web)

        async def host_web_up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", host_port), timeout=1).close()
                return True
            except OSError:
                return False
        await _wait_until(host_web_up, 10, "host web server")
        download = await trio.lowlevel.open_process(
            ns.exec_args(["curl", "-sS", "--noproxy", "*", "--limit-rate", "2M", "-o", "/dev/null",
                          f"http://192.168.65.2:{host_port}/big.bin"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        procs.append(download)
        destination = f"192.168.65.2:{host_port}"

        async def flow():
            table = json.loads(await _netkit("connections", "--api", api, "--json"))
            for row in table["connections"]:
                if row["destination"] == destination and row["bytes_to_guest"] > 0:
                    return row
            return None

        first = None
        with trio.fail_after(10):
            while first is None:
                first = await flow()

        async def progressed():
            row = await flow()
            assert row is not None, "the download's flow disappeared"
            return row if row["bytes_to_guest"] > first["bytes_to_guest"] and row["age"] > first["age"] else None

        with trio.fail_after(10):
            while (second := await progressed()) is None:
                pass
        assert second["guest"] == first["guest"] and second["guest"].startswith(f"{guest_ip}:")
        assert second["state"] == "ESTABLISHED"
        assert second["bytes_to_guest"] > first["bytes_to_guest"], (first, second)
        assert second["bytes_to_host"] > 0  # the request
        assert second["age"] > first["age"]
        text = await _netkit("connections", "--api", api)
        assert destination in text and "ESTABLISHED" in text
        download.kill()

        leases = await _netkit("leases", "--api", api)
        mac = ns.mac_of(tap)
        assert guest_ip in leases and ":".join(f"{b:02x}" for b in mac) in leases and "bound" in leases

        daemon.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await daemon.wait() == 0
        assert not os.path.exists(api), "API socket left behind"
    finally:
        for proc in procs:
            _kill(proc)
        with trio.CancelScope(shield=True):
            for proc in procs:
                await proc.wait()
        ns.delete()
        subprocess.run(["rm", "-rf", api_dir])
