"""ntpdate (ntpsec's shim over ntpdig) queries netkit's SNTP server and sees a tiny offset.

ntpdig has no option to pick the server port, so the server listens on 127.0.0.1:123
inside a private network namespace: a helper thread enters the namespace (setns is
per-thread for network namespaces), creates and binds the socket there, and returns;
the socket stays in the namespace and trio serves it from the main thread. ntpdate runs
in the same namespace through ``ip netns exec``. Nothing touches the host's port 123.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import threading

import trio

from netkit.netns import Netns, unique_name
from netkit.ntp import SntpServer, serve_udp
from netkit.testing.privileged import require_privileged, require_tool

CLONE_NEWNET = 0x40000000


def _socket_in_netns(name: str, addr: tuple[str, int]) -> socket.socket:
    """A UDP socket bound to ``addr`` inside network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list = []

    def work() -> None:
        try:
            own = os.open(f"/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(target, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into the test namespace failed")
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.bind(addr)
                    result.append(sock)
                finally:
                    if libc.setns(own, CLONE_NEWNET) != 0:  # this thread then ends anyway
                        result.append(OSError(ctypes.get_errno(), "setns back failed"))
            finally:
                os.close(own)
                os.close(target)
        except BaseException as e:  # reported to the caller
            result.append(e)

    thread = threading.Thread(target=work, name="netkit-test-setns")
    thread.start()
    thread.join()
    for item in result:
        if isinstance(item, BaseException):
            for other in result:
                if isinstance(other, socket.socket):
                    other.close()
            raise item
    return result[0]


async def test_ntpdate_query_offset_below_10ms():
    require_privileged()
    require_tool("ip")
    require_tool("ntpdate")
    server = SntpServer()
    with Netns.create(unique_name("nkntp")) as ns:
        sock = trio.socket.from_stdlib_socket(_socket_in_netns(ns.name, ("127.0.0.1", 123)))
        with sock:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_udp, sock, server)
                with trio.fail_after(30):
                    proc = await trio.run_process(ns.exec_args(["ntpdate", "-q", "127.0.0.1"]),
                                                  capture_stdout=True, capture_stderr=True, check=False)
                nursery.cancel_scope.cancel()
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    # e.g. "2025-01-01 12:00:00.123456 (+0000) +0.000094 +/- 0.000040 127.0.0.1 s1 no-leap"
    m = re.search(r"\(\S+\)\s+([+-]\d+\.\d+)\s+\+/-\s+(\d+\.\d+)\s+127\.0\.0\.1\s+s(\d+)\s+(\S+)", out)
    assert m, out
    offset, stratum, leap = float(m.group(1)), int(m.group(3)), m.group(4)
    assert abs(offset) < 0.010, out
    assert stratum == 1 and leap == "no-leap", out
    assert server.stats["answered"] >= 1
