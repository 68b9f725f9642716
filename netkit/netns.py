"""Network namespaces for guests: create, configure, run commands in, delete.

Thin wrappers over iproute2 (``ip netns ...``). Every namespace is created and deleted
by its exact name; nothing here touches a namespace it did not make.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

__all__ = ["NetnsError", "Netns", "unique_name", "guest_resolv_dir", "udhcpc", "UDHCPC_SCRIPT"]

#: The udhcpc event script netkit ships (configures the interface, records the lease).
UDHCPC_SCRIPT = os.path.join(os.path.dirname(__file__), "data", "udhcpc.script")

_counter = itertools.count()


class NetnsError(RuntimeError):
    """An iproute2 command failed; the message includes its stderr."""


def unique_name(prefix: str) -> str:
    """A name unique to this process, short enough for an interface (15 chars)."""
    name = f"{prefix}{os.getpid() % 100000}x{next(_counter)}"
    if len(name) > 15:
        raise ValueError(f"name {name!r} is longer than 15 characters")
    return name


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def guest_resolv_dir(name: str) -> str:
    """``ip netns exec`` bind-mounts files from here over /etc (resolv.conf, hosts)."""
    return os.path.join("/etc/netns", name)


@dataclass
class Netns:
    """A network namespace this process created (and will delete)."""

    name: str

    @classmethod
    def create(cls, name: str) -> "Netns":
        _ip("netns", "add", name)
        ns = cls(name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def ip(self, *args: str) -> str:
        return _ip("-n", self.name, *args)

    def exec_args(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], *, timeout: float | None = 60, check: bool = False,
            **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_args(argv), capture_output=True, text=True, timeout=timeout,
                              check=check, **kwargs)

    def mac_of(self, ifname: str) -> bytes:
        info = json.loads(self.ip("-j", "link", "show", "dev", ifname))
        return bytes.fromhex(info[0]["address"].replace(":", ""))

    def rename(self, ifname: str, new: str) -> None:
        self.ip("link", "set", "dev", ifname, "down")
        self.ip("link", "set", "dev", ifname, "name", new)
        self.ip("link", "set", "dev", new, "up")

    def configure(self, ifname: str, address: IPv4Address, subnet: IPv4Network, gateway: IPv4Address,
                  mtu: int) -> None:
        """Static address, default route and MTU, as DHCP would have set them."""
        self.ip("link", "set", "dev", ifname, "mtu", str(mtu), "up")
        self.ip("addr", "add", f"{address}/{subnet.prefixlen}", "dev", ifname)
        self.ip("route", "add", "default", "via", str(gateway), "dev", ifname)

    def write_resolv_conf(self, nameserver: IPv4Address, search: tuple[str, ...] = ()) -> None:
        directory = guest_resolv_dir(self.name)
        os.makedirs(directory, exist_ok=True)
        lines = [f"nameserver {nameserver}\n"]
        if search:
            lines.append("search " + " ".join(search) + "\n")
        with open(os.path.join(directory, "resolv.conf"), "w") as f:
            f.writelines(lines)

    def delete(self) -> None:
        directory = guest_resolv_dir(self.name)
        if os.path.isdir(directory):
            shutil.rmtree(directory, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


async def udhcpc(netns: Netns, ifname: str, *, timeout: float = 20, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Run busybox udhcpc in ``netns`` until it holds a lease; return the lease environment.

    ``extra`` adds udhcpc flags. Raises ``NetnsError`` with udhcpc's output on failure.
    """
    import tempfile

    import trio

    with tempfile.NamedTemporaryFile(prefix="netkit-udhcpc-", suffix=".env") as log_file:
        env = dict(os.environ, NETKIT_UDHCPC_LOG=log_file.name)
        argv = netns.exec_args(["busybox", "udhcpc", "-i", ifname, "-s", UDHCPC_SCRIPT, "-f", "-q", "-n",
                                "-t", "5", "-T", "1", *extra])
        with trio.fail_after(timeout):
            proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, env=env)
        if proc.returncode != 0:
            raise NetnsError(f"udhcpc failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
        lease: dict[str, str] = {}
        with open(log_file.name) as f:
            for line in f:
                event, _, kv = line.rstrip("\n").partition(" ")
                key, _, value = kv.partition("=")
                lease[key] = value
                lease["event"] = event
        return lease
