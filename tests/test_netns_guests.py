"""Real Linux guests (network namespaces) on a netkit switch through tap devices."""

import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from netkit.config import format_mac
from netkit.netns import UDHCPC_SCRIPT, Netns, udhcpc, unique_name
from netkit.testing import require_privileged, require_tool
from netkit.testing.netns_guest import open_netns_guest

pytestmark = pytest.mark.privileged


@pytest.fixture(autouse=True)
def _privileged():
    require_privileged()
    require_tool("busybox")


async def test_udhcpc_lease_renew_neigh_and_ping(netkit_switch, netns_guest, tmp_path):
    config = netkit_switch.config
    log = tmp_path / "udhcpc.log"
    env = dict(os.environ, NETKIT_UDHCPC_LOG=str(log))
    proc = await trio.lowlevel.open_process(
        netns_guest.netns.exec_args(["busybox", "udhcpc", "-i", "eth0", "-s", UDHCPC_SCRIPT, "-f", "-t", "5",
                                     "-T", "1"]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(15):
            while not log.exists() or "bound ip=" not in log.read_text():
                await trio.sleep(0.05)
        bound = dict(line.split(" ", 1)[1].split("=", 1) for line in log.read_text().splitlines())
        lease = netkit_switch.leases()[0]
        assert bound["ip"] == str(lease.ip)
        assert bound["mask"] == "24"
        assert bound["router"] == str(config.gateway_ip)
        assert bound["dns"] == str(config.gateway_ip)
        assert bound["mtu"] == str(config.mtu)
        assert bound["lease"] == str(config.lease_seconds)
        proc.send_signal(signal.SIGUSR1)  # udhcpc: renew now
        with trio.fail_after(15):
            while "renew ip=" not in log.read_text():
                await trio.sleep(0.05)
        assert f"renew ip={lease.ip}" in log.read_text()
    finally:
        proc.terminate()
        with trio.CancelScope(shield=True):
            await proc.wait()
    addr = await netns_guest.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert f"{lease.ip}/24" in addr.stdout.decode()
    ping = await netns_guest.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", str(config.gateway_ip)])
    assert ping.returncode == 0, ping.stdout
    assert b"3 received" in ping.stdout
    neigh = await netns_guest.run(["ip", "neigh", "show", str(config.gateway_ip), "dev", "eth0"])
    assert format_mac(config.gateway_mac) in neigh.stdout.decode()


async def test_two_netns_guests_ping_each_other(netkit_switch):
    async with open_netns_guest(netkit_switch) as a, open_netns_guest(netkit_switch) as b:
        lease_a = await a.udhcpc()
        lease_b = await b.udhcpc()
        assert lease_a["ip"] != lease_b["ip"]
        for guest, peer in ((a, lease_b["ip"]), (b, lease_a["ip"])):
            ping = await guest.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", peer])
            assert ping.returncode == 0, ping.stdout + ping.stderr


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_netkit_switch_daemon_tap_and_clean_shutdown(tmp_path):
    netkit_switch = os.path.join(os.path.dirname(sys.executable), "netkit-switch")
    ns = Netns.create(unique_name("nkd"))
    tap = unique_name("nkt")
    qemu_sock = tmp_path / "qemu.sock"
    pcap = tmp_path / "daemon.pcap"
    proc = subprocess.Popen([netkit_switch, "--tap", tap, "--netns", ns.name, "--listen-qemu", str(qemu_sock),
                             "--pcap", str(pcap), "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(lambda: qemu_sock.exists() and tap in ns.ip("link", "show")), "daemon did not start"
        lease = trio.run(lambda: udhcpc(ns, tap))
        assert lease["router"] == "192.168.65.1"
        ping = ns.run(["ping", "-c", "1", "-W", "2", "192.168.65.1"])
        assert ping.returncode == 0, ping.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not qemu_sock.exists(), "listener socket left behind"
        assert tap not in ns.ip("link", "show"), "tap left behind"
        assert pcap.stat().st_size > 24
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.delete()


def test_netkit_switch_errors_name_the_flag():
    netkit_switch = os.path.join(os.path.dirname(sys.executable), "netkit-switch")
    out = subprocess.run([netkit_switch, "--mtu", "99", "--stdio"], capture_output=True, text=True)
    assert out.returncode == 2 and "--mtu" in out.stderr
    out = subprocess.run([netkit_switch, "--gateway-ip", "10.9.9.1", "--stdio"], capture_output=True, text=True)
    assert out.returncode == 2 and "--gateway-ip" in out.stderr
    out = subprocess.run([netkit_switch], capture_output=True, text=True)
    assert out.returncode == 2 and "no guest link" in out.stderr


def test_netkit_run_configures_guest_and_propagates_status():
    netkit = os.path.join(os.path.dirname(sys.executable), "netkit")
    before = _netns_names()
    out = subprocess.run([netkit, "run", "--", "sh", "-c",
                          "ip -4 -o addr show dev eth0; ip route; cat /etc/resolv.conf; "
                          "ping -c 1 -W 2 192.168.65.1 >/dev/null && echo PING-OK; exit 7"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 7, out.stderr
    assert "192.168.65." in out.stdout and "/24" in out.stdout
    assert "default via 192.168.65.1" in out.stdout
    assert "nameserver 192.168.65.1" in out.stdout
    assert "PING-OK" in out.stdout
    assert _netns_names() <= before, "netkit run left a namespace behind"


def _netns_names() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def test_daemon_drops_privileges_after_setup(tmp_path):
    import pwd

    user = "nobody"
    uid = pwd.getpwnam(user).pw_uid
    netkit_switch = os.path.join(os.path.dirname(sys.executable), "netkit-switch")
    ns = Netns.create(unique_name("nku"))
    tap = unique_name("nkt")
    proc = subprocess.Popen([netkit_switch, "--tap", tap, "--netns", ns.name, "--user", user,
                             "--dns-upstream", "127.0.0.1:9"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        def uid_now():
            with open(f"/proc/{proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        assert _wait_for(lambda: uid_now() == uid), "did not become nobody"
        lease = trio.run(lambda: udhcpc(ns, tap))
        assert lease["router"] == "192.168.65.1"
        assert ns.run(["ping", "-c", "1", "-W", "2", "192.168.65.2"]).returncode == 0  # raw ICMP opened before
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.delete()
