"""The ``netkit`` control subcommands (a real subprocess) against an in-process switch,
and ``netkit-switch --api`` as a daemon (no root needed: a QEMU listener is the link)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from ipaddress import IPv4Address

import trio

from netkit.cli import main as cli_main

NETKIT = [sys.executable, "-m", "netkit.cli"]
NETKIT_SWITCH = os.path.join(os.path.dirname(sys.executable), "netkit-switch")


async def netkit(*args: str, env: dict | None = None, subprocess_: bool = False) -> tuple[int, str, str]:
    """Run ``netkit ARGS``: in a worker thread (``netkit.cli.main``, fast), or as a real
    process when ``env`` is given or ``subprocess_`` is set."""
    if env is not None or subprocess_:
        proc = await trio.run_process([*NETKIT, *args], capture_stdout=True, capture_stderr=True, check=False,
                                      env=env)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli_main(list(args))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
        return rc, out.getvalue(), err.getvalue()

    return await trio.to_thread.run_sync(run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_api_cli_expose_forwards_unexpose(api):
    port = _free_port()
    # Once as a real process: the `netkit` entry point dispatches to the control commands.
    rc, out, err = await netkit("expose", "--api", api.path, f"127.0.0.1:{port}", "192.168.65.3:80",
                                subprocess_=True)
    assert rc == 0, err
    assert out.strip() == f"forwarding tcp 127.0.0.1:{port} -> 192.168.65.3:80"
    rc, out, err = await netkit("expose", "--udp", "--api", api.path, "--json", str(port), "192.168.65.3:53")
    assert rc == 0, err
    assert json.loads(out)["proto"] == "udp"
    rc, out, err = await netkit("forwards", "--api", api.path)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["PROTO", "LOCAL", "REMOTE", "CONNECTIONS"]
    assert any(line.split()[:3] == ["tcp", f"127.0.0.1:{port}", "192.168.65.3:80"] for line in lines)
    rc, out, err = await netkit("forwards", "--api", api.path, "--json")
    assert {f["proto"] for f in json.loads(out)} == {"tcp", "udp"}
    # The server's reason, with the status, on stderr; exit status 1.
    rc, out, err = await netkit("expose", "--api", api.path, f"127.0.0.1:{port}", "192.168.65.3:80")
    assert rc == 1 and "already forwarded" in err and "HTTP 409" in err
    rc, out, err = await netkit("unexpose", "--api", api.path, f"127.0.0.1:{port}")
    assert rc == 0 and out.startswith(f"removed tcp 127.0.0.1:{port}"), err
    rc, out, err = await netkit("unexpose", "--udp", "--api", api.path, str(port))
    assert rc == 0, err
    rc, out, err = await netkit("forwards", "--api", api.path)
    assert out.strip() == "no port forwards"
    rc, out, err = await netkit("unexpose", "--api", api.path, str(port))
    assert rc == 1 and "no tcp forward" in err


async def test_api_cli_unix_forward_paths_are_absolute(api, api_dir):
    rel = os.path.relpath(f"{api_dir}/cli-fwd.sock")
    rc, out, err = await netkit("expose", "--unix", "--api", api.path, rel, "192.168.65.3:22")
    assert rc == 0, err
    assert f"{api_dir}/cli-fwd.sock" in out
    rc, out, err = await netkit("unexpose", "--unix", "--api", api.path, rel)
    assert rc == 0, err


async def test_api_cli_leases_stats_connections_capture(api, fake_guest, nursery, api_dir):
    async def echo(stream):
        async for data in stream:
            await stream.send_all(data)

    import functools
    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    stream = await fake_guest.open_tcp_stream(api.switch.config.host_ip, port)
    await stream.send_all(b"hello")
    assert await stream.receive_some(100) == b"hello"

    ip = str(IPv4Address(fake_guest.ip))
    rc, out, err = await netkit("leases", "--api", api.path)
    assert rc == 0, err
    assert out.splitlines()[0].split()[:3] == ["IP", "MAC", "STATE"]
    assert ip in out and ":".join(f"{b:02x}" for b in fake_guest.mac) in out and "bound" in out
    rc, out, err = await netkit("leases", "--api", api.path, "--json")
    assert json.loads(out)[0]["ip"] == ip

    rc, out, err = await netkit("stats", "--api", api.path)
    assert rc == 0, err
    for label in ("frames", "bytes", "flows", "dns", "http proxy", "drops"):
        assert any(line.startswith(label) for line in out.splitlines()), (label, out)
    assert "tcp 1" in out
    rc, out, err = await netkit("stats", "--api", api.path, "--json")
    assert json.loads(out)["flows"]["tcp"] == 1

    rc, out, err = await netkit("connections", "--api", api.path)
    assert rc == 0, err
    header, row = out.splitlines()
    assert header.split() == ["PROTO", "GUEST", "DESTINATION", "STATE", "TO", "HOST", "TO", "GUEST", "AGE"]
    assert row.split()[:4] == ["tcp", row.split()[1], f"{api.switch.config.host_ip}:{port}", "ESTABLISHED"]
    assert row.split()[1].startswith(ip + ":")
    rc, out, err = await netkit("connections", "--api", api.path, "--json", "--protocol", "tcp")
    (flow,) = json.loads(out)["connections"]
    assert flow["bytes_to_host"] == 5 and flow["bytes_to_guest"] == 5

    pcap = os.path.relpath(f"{api_dir}/cli.pcap")  # made absolute by the client
    rc, out, err = await netkit("capture", "start", "--api", api.path, pcap)
    assert rc == 0 and out.strip() == f"capturing to {api_dir}/cli.pcap", err
    assert await fake_guest.ping(api.switch.config.gateway_ip)
    rc, out, err = await netkit("capture", "status", "--api", api.path)
    assert out.strip() == f"capturing to {api_dir}/cli.pcap"
    rc, out, err = await netkit("capture", "stop", "--api", api.path)
    assert rc == 0 and out.strip() == f"capture stopped: {api_dir}/cli.pcap", err
    assert os.path.getsize(f"{api_dir}/cli.pcap") > 24
    rc, out, err = await netkit("capture", "stop", "--api", api.path)
    assert rc == 0 and out.strip() == "no capture was running"
    await stream.aclose()


async def test_api_cli_errors_and_defaults(api_dir):
    rc, out, err = await netkit("forwards", "--api", f"{api_dir}/missing.sock")
    assert rc == 1 and f"no netkit API socket at {api_dir}/missing.sock" in err
    env = dict(os.environ, NETKIT_API=f"{api_dir}/from-env.sock")
    rc, out, err = await netkit("leases", env=env)
    assert rc == 1 and f"{api_dir}/from-env.sock" in err
    rc, out, err = await netkit("expose", "--help")
    assert rc == 0 and "/run/netkit/api.sock" in out and "NETKIT_API" in out


async def test_api_cli_token(netkit_switch, nursery, api_dir):
    from netkit.api.server import serve_api

    path = f"{api_dir}/tok.sock"
    await nursery.start(lambda task_status: serve_api(netkit_switch, path, token="t0k", task_status=task_status))
    rc, out, err = await netkit("forwards", "--api", path)
    assert rc == 1 and "bearer token" in err and "HTTP 401" in err
    rc, out, err = await netkit("forwards", "--api", path, "--api-token", "t0k")
    assert rc == 0, err
    rc, out, err = await netkit("forwards", "--api", path, env=dict(os.environ, NETKIT_API_TOKEN="t0k"))
    assert rc == 0, err


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_api_netkit_switch_daemon_serves_the_api(api_dir):
    """``netkit-switch --listen-qemu ... --api PATH``: the CLI drives it; SIGTERM removes the socket."""
    qemu = f"{api_dir}/qemu.sock"
    path = f"{api_dir}/d/api.sock"
    proc = subprocess.Popen([NETKIT_SWITCH, "--listen-qemu", qemu, "--api", path, "--dns-upstream", "127.0.0.1:9"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(lambda: os.path.exists(path) or proc.poll() is not None), "daemon did not start"
        assert proc.poll() is None, proc.stdout.read()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        port = _free_port()
        out = subprocess.run([*NETKIT, "expose", "--api", path, str(port), "192.168.65.9:80"], capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        out = subprocess.run(["curl", "-sS", "--unix-socket", path, "http://localhost/services/forwarder/all"],
                             capture_output=True, text=True)
        assert json.loads(out.stdout) == [{"local": f"127.0.0.1:{port}", "remote": "192.168.65.9:80",
                                           "protocol": "tcp"}]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not os.path.exists(path), "API socket left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_api_netkit_switch_refuses_a_non_socket_api_path(api_dir):
    path = f"{api_dir}/not-a-socket"
    with open(path, "w") as f:
        f.write("data")
    out = subprocess.run([NETKIT_SWITCH, "--listen-qemu", f"{api_dir}/q.sock", "--api", path], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert "--api:" in out.stderr and "not a socket" in out.stderr
    with open(path) as f:
        assert f.read() == "data"


def test_api_default_socket_path():
    from netkit.api.paths import default_api_path

    assert default_api_path({}, 0) == "/run/netkit/api.sock"
    assert default_api_path({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000) == "/run/user/1000/netkit/api.sock"
    assert default_api_path({}, 1000) == "/tmp/netkit-1000/api.sock"
    assert default_api_path({"NETKIT_API": "/x/y.sock", "XDG_RUNTIME_DIR": "/r"}, 0) == "/x/y.sock"
    from netkit.cli import switch_parser

    args = switch_parser().parse_args(["--stdio", "--api"])
    assert args.api == default_api_path()
    assert switch_parser().parse_args(["--stdio"]).api is None
