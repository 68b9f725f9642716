"""``make soak``: netkit under sustained load, faults and floods, with figures to report.

Each part runs a real kernel guest (a network namespace) on an in-process switch and
servers on host loopback, and prints one result line; ``--json FILE`` also writes them.
Needs root. Parts: ``connections`` (N concurrent TCP connections, each moving data, then
held idle: RSS per connection), ``scan`` (all 65535 ports of the host alias), ``lossy``
(exact bytes each way over the fault-injection link, several seeds), ``dnsflood`` (DNS
queries to a slow upstream while another guest's TCP transfer runs), ``memory`` (issue 12
attack 5 with fake guests on memory links: N zero-window downloads, then 2N connections
filled with out-of-order data; RSS before, at the peak and after the attacker left, the
bytes buffered against ``guest_buffer_bytes``, and a victim's download meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import trio

import netkit
from netkit.links.middleware import FaultInjector
from netkit.testing.netns_guest import open_netns_guest

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(os.path.dirname(HERE), "tools")
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the attack helpers of tests/adversarial
HOST = "192.168.65.2"
MB = 1 << 20


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def start_server(*argv: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    return proc, int(proc.stdout.readline())


async def guest_python(guest, code: str, timeout: float = 600) -> str:
    out = await guest.run([sys.executable, "-c", code], timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode())
    return out.stdout.decode().strip()


def config(**kw) -> netkit.Config:
    return netkit.Config(dns_upstreams=("127.0.0.1:9",), **kw)


async def part_connections(n: int) -> dict:
    """N connections, each sends and receives 1 KiB, then all stay open while we measure."""
    holder, port = start_server("-c", """
import socket, threading, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(65535)
print(srv.getsockname()[1], flush=True)
held = []
while True:
    c, _ = srv.accept()
    data = b""
    while len(data) < 1024:
        chunk = c.recv(1024 - len(data))
        if not chunk:
            break
        data += chunk
    c.sendall(data)
    held.append(c)
""")
    try:
        async with netkit.open_switch(config(max_connections_per_guest=n + 100)) as switch:
            async with open_netns_guest(switch) as guest:
                await guest.udhcpc()
                base_rss, base_fds = rss_kib(), fd_count()
                ready = trio.Event()
                result: dict = {}

                async def client() -> None:
                    code = f"""
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({n} + 1000, {n} + 1000))
async def one(i, sem):
    async with sem:
        r, w = await asyncio.open_connection("{HOST}", {port})
        w.write(bytes([i % 256]) * 1024); await w.drain()
        got = await r.readexactly(1024)
    return (r, w, got == bytes([i % 256]) * 1024)
async def main():
    sem = asyncio.Semaphore(2000)
    conns = await asyncio.gather(*(one(i, sem) for i in range({n})))
    print("ok=%d" % sum(1 for c in conns if c[2]), flush=True)
    sys.stdin.readline()  # hold them open until told
asyncio.run(main())
"""
                    proc = await trio.lowlevel.open_process(guest.netns.exec_args([sys.executable, "-c", code]),
                                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                    line = b""
                    while not line.endswith(b"\n"):
                        line += await proc.stdout.receive_some(100)
                    result["ok"] = int(line.split(b"=")[1])
                    ready.set()
                    await result["release"].wait()
                    await proc.stdin.send_all(b"\n")
                    await proc.wait()

                result["release"] = trio.Event()
                start = time.monotonic()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client)
                    await ready.wait()
                    elapsed = time.monotonic() - start
                    # every connection the client completed is held as a flow before we measure
                    with trio.move_on_after(30):
                        while switch.tcp_nat.flow_count < result["ok"]:
                            await trio.sleep(0.05)
                    flows = switch.tcp_nat.flow_count
                    held_rss = rss_kib()
                    result["release"].set()
                per_conn = (held_rss - base_rss) * 1024 / max(flows, 1)
                return {"part": "connections", "requested": n, "completed": result["ok"], "flows_held": flows,
                        "setup_seconds": round(elapsed, 1), "rss_base_mib": round(base_rss / 1024, 1),
                        "rss_held_mib": round(held_rss / 1024, 1), "bytes_per_connection": int(per_conn),
                        "fds_during": fd_count() - base_fds}
    finally:
        holder.kill()


async def part_scan() -> dict:
    async with netkit.open_switch(config(tcp_half_close_timeout=3.0)) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            fds = fd_count()
            start = time.monotonic()
            out = await guest.run([sys.executable, os.path.join(TOOLS, "port_scan.py"), HOST, "10000"], timeout=900)
            elapsed = time.monotonic() - start
            counts = dict(kv.split("=") for kv in out.stdout.decode().split())
            ping = await guest.run(["ping", "-c", "1", "-W", "2", HOST])
            with trio.move_on_after(30):
                while switch.tcp_nat.flow_count:
                    await trio.sleep(0.1)
            return {"part": "scan", "ports": 65535, "seconds": round(elapsed, 1), **counts,
                    "ping_after": ping.returncode == 0, "flows_after": switch.tcp_nat.flow_count,
                    "fd_delta_after": fd_count() - fds}


async def part_lossy(size_mb: int, seeds: list[int]) -> list[dict]:
    server, port = start_server(os.path.join(TOOLS, "tcp_test_server.py"))
    results = []
    try:
        for seed in seeds:
            async with netkit.open_switch(config()) as switch:
                def lossy(link, seed=seed):
                    return FaultInjector(link, seed=seed, drop=0.01, duplicate=0.01, reorder=0.05, corrupt=0.001)

                async with open_netns_guest(switch, wrap=lossy) as guest:
                    for _ in range(20):
                        try:
                            await guest.udhcpc()
                            break
                        except Exception:
                            await trio.sleep(0.2)
                    client = [sys.executable, os.path.join(TOOLS, "tcp_test_client.py")]
                    start = time.monotonic()
                    up = (await guest.run([*client, "upload", HOST, str(port), str(size_mb * MB), str(seed)],
                                          timeout=1800)).stdout.decode()
                    mid = time.monotonic()
                    down = (await guest.run([*client, "download", HOST, str(port), str(size_mb * MB),
                                             str(seed + 100)], timeout=1800)).stdout.decode()
                    end = time.monotonic()
                    upd = dict(kv.split("=") for kv in up.split())
                    downd = dict(kv.split("=") for kv in down.split())
                    faults = guest.link.faults
                    results.append({"part": "lossy", "seed": seed, "mib_each_way": size_mb,
                                    "up_exact": upd.get("sent") == upd.get("got"),
                                    "down_exact": downd.get("got") == downd.get("expected"),
                                    "up_mbit_s": round(size_mb * 8 * 1.048576 / (mid - start), 1),
                                    "down_mbit_s": round(size_mb * 8 * 1.048576 / (end - mid), 1),
                                    "dropped": faults.receive.dropped + faults.send.dropped,
                                    "corrupted": faults.receive.corrupted + faults.send.corrupted,
                                    "bad_checksums_caught": switch.tcp_nat.counters.get("bad-checksum", 0)})
    finally:
        server.kill()
    return results


async def part_dnsflood(queries: int) -> dict:
    slow, slow_port = start_server("-c", """
import socket, time, threading
from dnslib import DNSRecord
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
def answer(data, addr):
    time.sleep(1.5)  # a slow upstream
    s.sendto(DNSRecord.parse(data).reply().pack(), addr)
while True:
    data, addr = s.recvfrom(4096)
    threading.Thread(target=answer, args=(data, addr), daemon=True).start()
""")
    server, port = start_server(os.path.join(TOOLS, "tcp_test_server.py"))
    try:
        cfg = netkit.Config(dns_upstreams=(f"127.0.0.1:{slow_port}",), dns_timeout=2.0)
        async with netkit.open_switch(cfg) as switch:
            async with open_netns_guest(switch) as flooder, open_netns_guest(switch) as worker:
                await flooder.udhcpc()
                await worker.udhcpc()
                client = [sys.executable, os.path.join(TOOLS, "tcp_test_client.py")]

                async def transfer() -> float:
                    start = time.monotonic()
                    out = await worker.run([*client, "download", HOST, str(port), str(200 * MB), "5"], timeout=600)
                    assert "got=" in out.stdout.decode()
                    return time.monotonic() - start

                quiet = await transfer()
                flood_code = f"""
import os, socket, time
from dnslib import DNSRecord
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
start = time.monotonic(); sent = 0
while sent < {queries}:
    s.sendto(DNSRecord.question("q%d.flood.test" % sent).pack(), ("192.168.65.1", 53)); sent += 1
    if sent % 500 == 0:
        time.sleep(0.01)
print("sent=%d rate=%d" % (sent, sent / (time.monotonic() - start)))
"""
                results: dict = {}

                async def flood() -> None:
                    results["flood"] = await guest_python(flooder, flood_code)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood)
                    with trio.fail_after(30):  # the flood is reaching the DNS service
                        while switch.dns.statistics()["queries"] == 0:
                            await trio.sleep(0.01)
                    results["loaded"] = await transfer()
                stats = switch.dns.statistics()
                return {"part": "dnsflood", "queries": queries, "flood": results["flood"],
                        "tcp_200mib_quiet_s": round(quiet, 2), "tcp_200mib_during_flood_s": round(results["loaded"], 2),
                        "servfail": stats["servfail"], "over_in_flight_limit": stats["over_in_flight_limit"]}
    finally:
        slow.kill()
        server.kill()


async def part_memory(n: int, guest_mb: int | None, attacks: list[str], segments: int) -> list[dict]:
    """Attack 5 of issue 12 at full size, default budgets (or ``guest_mb``)."""
    from adversarial.memory_attack import RawTcpAttacker, rss_bytes, start_server, wait_until
    from netkit.testing.fake_guest import FakeGuest, attach_fake_guest

    budget = {}
    if guest_mb is not None:
        budget = {"guest_buffer_bytes": guest_mb * MB, "total_buffer_bytes": max(guest_mb * 4, 256) * MB}
    server, ports = start_server(64 * MB)
    results = []
    try:
        async with netkit.open_switch(config(allow=("192.168.65.2/32", "127.0.0.1/8"), **budget)) as switch:
            async with trio.open_nursery() as nursery:
                async def guest() -> FakeGuest:
                    return await attach_fake_guest(switch, nursery)

                victim = await guest()
                nat = switch.tcp_nat
                for kind, count in (("zero-window", n), ("out-of-order", 2 * n)):
                    if kind not in attacks:
                        continue
                    attacker = await guest()
                    raw = RawTcpAttacker(attacker, switch.config.gateway_mac, switch.config.host_ip.packed)
                    base = rss_bytes()
                    t0 = time.monotonic()
                    if kind == "zero-window":
                        await raw.open(count, ports.flood, window=0, timeout=300)
                        flows = [f for f in nat.flows() if f.guest_ip == attacker.ip]
                        await wait_until(lambda: all(f.conn.send_space() == 0 or f.conn.send_buffered >= (1 << 20)
                                                     for f in flows), 300, "host reads to stop")
                    else:
                        conns = await raw.open(count, ports.idle, window=65535, wscale=7, timeout=300)
                        flows = [f for f in nat.flows() if f.guest_ip == attacker.ip]
                        await raw.send_with_gaps(conns, segments)
                        await wait_until(lambda: sum(f.conn.stats.ooo_segments + f.conn.stats.out_of_window
                                                     for f in flows) >= len(flows) * segments, 300,
                                         "segments processed")
                    peak = rss_bytes()
                    buffered = nat.statistics().get("buffers", {}).get("buffered-bytes")
                    t1 = time.monotonic()
                    stream = await victim.open_tcp_stream(HOST, ports.file)
                    got = 0
                    while data := await stream.receive_some(1 << 20):
                        got += len(data)
                    await stream.aclose()
                    victim_s = time.monotonic() - t1
                    del flows
                    await attacker.link.aclose()
                    await wait_until(lambda: nat.flow_count == 0, 60, "flows closed")
                    after = rss_bytes()
                    stats = nat.statistics()
                    results.append({
                        "part": "memory", "attack": kind, "connections_tried": count,
                        "connections_opened": raw.established, "refused": raw.resets,
                        "ooo_offered_mb": round(2 * n * segments * 1460 / MB, 1) if kind == "out-of-order" else None,
                        "attack_s": round(t1 - t0, 2), "rss_base_mb": round(base / MB, 1),
                        "rss_peak_mb": round(peak / MB, 1), "rss_after_leave_mb": round(after / MB, 1),
                        "buffered_mb": None if buffered is None else round(buffered / MB, 2),
                        "guest_budget_mb": switch.config.guest_buffer_bytes / MB
                        if hasattr(switch.config, "guest_buffer_bytes") else None,
                        "victim_download_mb": round(got / MB, 1), "victim_download_s": round(victim_s, 2),
                        "counters": {k: v for k, v in stats.items() if k.startswith("budget-") and v},
                    })
                nursery.cancel_scope.cancel()
    finally:
        server.kill()
    return results


async def main(args) -> list[dict]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    results: list[dict] = []
    for part in args.parts:
        if part == "connections":
            new = [await part_connections(args.connections)]
        elif part == "scan":
            new = [await part_scan()]
        elif part == "lossy":
            new = await part_lossy(args.lossy_mb, args.seeds)
        elif part == "dnsflood":
            new = [await part_dnsflood(args.dns_queries)]
        elif part == "memory":
            new = await part_memory(args.memory_connections, args.guest_buffer_mb, args.memory_attacks,
                                    args.memory_segments)
        else:
            raise SystemExit(f"unknown part {part!r}")
        for result in new:
            print(json.dumps(result), flush=True)
        results += new
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", default=["connections", "scan", "lossy", "dnsflood", "memory"])
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--lossy-mb", type=int, default=1024)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--dns-queries", type=int, default=20000)
    p.add_argument("--memory-connections", type=int, default=300,
                   help="memory part: zero-window downloads (twice as many out-of-order connections)")
    p.add_argument("--memory-attacks", nargs="+", default=["zero-window", "out-of-order"])
    p.add_argument("--memory-segments", type=int, default=256,
                   help="memory part: out-of-order segments of 1460 bytes sent on each connection")
    p.add_argument("--guest-buffer-mb", type=int, default=None,
                   help="memory part: guest_buffer_bytes in MiB (default: netkit's default)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("make soak needs root (network namespaces and taps)")
    results = trio.run(main, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
