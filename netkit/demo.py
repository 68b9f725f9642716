"""``make demo``: one real guest (a network namespace) on a netkit switch.

It creates a namespace, attaches it through a tap, lets the guest's kernel and busybox
udhcpc take a DHCP lease, pings the gateway, resolves host.docker.internal through
netkit's DNS, fetches a page from an HTTP server on the host's 127.0.0.1 through NAT,
prints what happened, and cleans up. Needs root (namespaces and taps).
"""

from __future__ import annotations

import http.server
import os
import shlex
import sys
import threading

import trio

from .config import Config, format_mac
from .netns import udhcpc
from .runtime import open_switch
from .testing.netns_guest import open_netns_guest


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _show(guest, argv: list[str]) -> str:
    _say(f"  guest$ {shlex.join(argv)}")
    proc = await guest.run(argv, timeout=30)
    out = (proc.stdout + proc.stderr).decode(errors="replace").rstrip()
    for line in out.splitlines():
        _say(f"    {line}")
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed: {shlex.join(argv)} exited {proc.returncode}")
    return out


async def demo(config: Config) -> None:
    _say("netkit demo: a network namespace guest on a userspace switch")
    _say(f"  switch: subnet {config.subnet}, gateway {config.gateway_ip} ({format_mac(config.gateway_mac)}), "
         f"host alias {config.host_ip}, MTU {config.mtu}")
    async with open_switch(config) as switch:
        async with open_netns_guest(switch) as guest:
            _say(f"  guest: namespace {guest.name}, {guest.ifname} attached through a tap")
            _say()
            _say(f"  guest$ udhcpc -i {guest.ifname}")
            lease = await udhcpc(guest.netns, guest.ifname)
            _say(f"    lease {lease.get('ip')} mask {lease.get('mask')} router {lease.get('router')} "
                 f"dns {lease.get('dns')} mtu {lease.get('mtu')} for {lease.get('lease')} s")
            await _show(guest, ["ip", "-4", "addr", "show", "dev", guest.ifname])
            await _show(guest, ["ping", "-c", "3", "-i", "0.2", "-W", "2", str(config.gateway_ip)])
            await _show(guest, ["ip", "neigh", "show", "dev", guest.ifname])
            await _show(guest, ["busybox", "nslookup", "host.docker.internal", str(config.gateway_ip)])
            port = _start_host_http_server()
            _say(f"  host: an HTTP server on 127.0.0.1:{port} (the guest reaches it as host.docker.internal)")
            await _show(guest, ["timeout", "10", "busybox", "wget", "-q", "-O", "-",
                                f"http://host.docker.internal:{port}/"])
            _say()
            stats = switch.statistics()
            gw = stats["gateway"]
            _say(f"  NAT: {switch.tcp_nat.statistics()}")
            _say(f"  DNS: {switch.dns.statistics()['queries']} queries")
            _say(f"  switch: {stats['frames_in']} frames in, {stats['frames_out']} out; "
                 f"gateway answered {gw['counters'].get('arp-replies', 0)} ARP and "
                 f"{gw['counters'].get('icmp-echo-replies', 0)} echo requests; dhcp {gw['dhcp']}")
            for lease_obj in switch.leases():
                _say(f"  lease table: {format_mac(lease_obj.mac)} -> {lease_obj.ip} ({lease_obj.state})")
    _say("  cleaned up: namespace and tap removed")


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = f"hello from the host, you are {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _start_host_http_server() -> int:
    """A host-side server on loopback, in a thread (the switch keeps the trio thread)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: it creates a network namespace and a tap device", file=sys.stderr)
        return 1
    trio.run(demo, Config())
    return 0


if __name__ == "__main__":
    sys.exit(main())
