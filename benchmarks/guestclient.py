"""Guest-side load generators for the benchmark harness (run inside the guest netns).

    python -m benchmarks.guestclient connrate --host H --port P --seconds S --concurrency C
    python -m benchmarks.guestclient latency  --host H --port P --seconds S
    python -m benchmarks.guestclient hold     --host H --port P --levels 1,1000,10000
    python -m benchmarks.guestclient udpprobe --host H --port P
    python -m benchmarks.guestclient dns      --server S --seconds T --window W

Each prints one JSON object on stdout (``hold`` prints one per level and waits for a line
on stdin before going on to the next level, so the harness can sample the stack's memory
while the connections are open). Talks only to the host/server address it is given, which
the stack maps to host loopback (or the veth host address).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import resource
import select
import socket
import struct
import sys
import time


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ----------------------------------------------------------------------------- connection rate
def connrate_sequential(addr: tuple[str, int], seconds: float) -> dict:
    done = errors = 0
    first_error = ""
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(addr)
            s.sendall(b"r")
            while s.recv(16):
                pass
            done += 1
        except OSError as e:
            errors += 1
            first_error = first_error or repr(e)
            if errors > 50 and done == 0:
                break
            time.sleep(0.01)
        finally:
            s.close()
    elapsed = time.perf_counter() - start
    return {"completed": done, "errors": errors, "first_error": first_error, "seconds": elapsed,
            "rate": done / elapsed}


async def connrate_concurrent(addr: tuple[str, int], seconds: float, concurrency: int) -> dict:
    loop = asyncio.get_running_loop()
    stats = {"completed": 0, "errors": 0, "first_error": ""}
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                await asyncio.wait_for(_request(loop, s, addr), 5)
                stats["completed"] += 1
            except (OSError, asyncio.TimeoutError) as e:
                stats["errors"] += 1
                stats["first_error"] = stats["first_error"] or repr(e)
                if stats["errors"] > 50 and stats["completed"] == 0:
                    return
                await asyncio.sleep(0.01)
            finally:
                s.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    stats.update(seconds=elapsed, rate=stats["completed"] / elapsed)
    return stats


async def _request(loop, s: socket.socket, addr) -> None:
    await loop.sock_connect(s, addr)
    await loop.sock_sendall(s, b"r")
    while await loop.sock_recv(s, 16):
        pass


# ----------------------------------------------------------------------------- latency
def latency(addr: tuple[str, int], seconds: float) -> dict:
    s = socket.create_connection(addr, timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"p")
    samples: list[int] = []
    clock = time.perf_counter_ns
    send, recv = s.send, s.recv
    warm_until = time.perf_counter() + min(0.2, seconds / 5)
    while time.perf_counter() < warm_until:
        send(b"x")
        if not recv(1):
            raise ConnectionError("server closed")
    deadline = time.perf_counter() + seconds
    while len(samples) < 500_000:
        t0 = clock()
        send(b"x")
        if not recv(1):
            raise ConnectionError("server closed")
        samples.append(clock() - t0)
        if len(samples) % 64 == 0 and time.perf_counter() > deadline:
            break
    s.close()
    samples.sort()
    n = len(samples)
    return {"count": n, "median_us": samples[n // 2] / 1000, "p99_us": samples[min(n - 1, int(n * 0.99))] / 1000,
            "min_us": samples[0] / 1000}


# ----------------------------------------------------------------------------- hold (memory test)
async def hold(addr: tuple[str, int], levels: list[int], concurrency: int, level_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    conns: list[socket.socket] = []
    sem = asyncio.Semaphore(concurrency)
    stats = {"errors": 0, "retries": 0, "first_error": ""}

    async def open_one() -> None:
        async with sem:
            for attempt in range(3):  # a lost SYN is not what this test measures
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    await asyncio.wait_for(_hold_handshake(loop, s, addr), 10)
                except (OSError, asyncio.TimeoutError) as e:
                    s.close()
                    stats["first_error"] = stats["first_error"] or repr(e)
                    if attempt == 2:
                        stats["errors"] += 1
                        return
                    stats["retries"] += 1
                    continue
                conns.append(s)
                return

    for level in levels:
        t0 = time.perf_counter()
        need = max(0, level - len(conns))
        tasks = [asyncio.ensure_future(open_one()) for _ in range(need)]
        pending: set = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=level_timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        emit({"level": level, "open": len(conns), "errors": stats["errors"], "retries": stats["retries"],
              "first_error": stats["first_error"], "timed_out": bool(tasks) and bool(pending),
              "seconds": time.perf_counter() - t0})
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "close":
            break
    for s in conns:
        s.close()


async def _hold_handshake(loop, s: socket.socket, addr) -> None:
    await loop.sock_connect(s, addr)
    await loop.sock_sendall(s, b"h")
    if await loop.sock_recv(s, 1) != b"H":
        raise ConnectionError("no hold acknowledgement")


# ----------------------------------------------------------------------------- UDP probe
def udpprobe(addr: tuple[str, int], tries: int, timeout: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(addr)
    s.settimeout(timeout)
    last = ""
    for i in range(tries):
        token = f"probe{i}".encode()
        try:
            s.send(token)
            while True:
                if s.recv(2048) == token:
                    return {"ok": True}
        except OSError as e:
            last = repr(e)
    return {"ok": False, "error": last or "no reply"}


# ----------------------------------------------------------------------------- DNS
def dns_query(qid: int, n: int) -> bytes:
    name = b"".join(bytes([len(label)]) + label for label in (f"q{n}".encode(), b"bench", b"test")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)


ANSWER_IP = bytes([10, 0, 0, 1])


def dns_valid(reply: bytes, qid: int | None = None) -> int | None:
    """The ID of a reply that carries our upstream's answer (A 10.0.0.1), else None: only
    answers from the benchmark's own upstream count."""
    if len(reply) < 16 or not reply.endswith(ANSWER_IP):
        return None
    rid, flags, _, ancount = struct.unpack_from("!HHHH", reply)
    if not flags & 0x8000 or ancount < 1 or (qid is not None and rid != qid):
        return None
    return rid


def dns(server: tuple[str, int], seconds: float, window: int, probe_tries: int, probe_timeout: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(server)
    # probe: one query must get an answer before we load it
    s.settimeout(probe_timeout)
    ok = False
    last = ""
    for i in range(probe_tries):
        try:
            s.send(dns_query(i + 1, i))
            while True:
                reply = s.recv(4096)
                if dns_valid(reply, i + 1) is not None:
                    ok = True
                    break
        except OSError as e:
            last = repr(e)
        if ok:
            break
    if not ok:
        return {"ok": False, "error": last or "no answer"}
    s.setblocking(False)
    outstanding: dict[int, float] = {}
    answered = lost = 0
    counter = 1000
    qid = 0
    now = time.perf_counter()
    start = now
    deadline = start + seconds

    def send_one() -> None:
        nonlocal counter, qid
        for _ in range(65536):
            qid = (qid + 1) & 0xFFFF
            if qid and qid not in outstanding:
                break
        counter += 1
        try:
            s.send(dns_query(qid, counter))
            outstanding[qid] = time.perf_counter()
        except BlockingIOError:
            pass

    while now < deadline:
        while len(outstanding) < window:
            send_one()
        r, _, _ = select.select([s], [], [], 0.2)
        if r:
            while True:
                try:
                    reply = s.recv(4096)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.ECONNREFUSED:
                        continue
                    raise
                rid = dns_valid(reply)
                if rid is not None and outstanding.pop(rid, None) is not None:
                    answered += 1
        now = time.perf_counter()
        for k in [k for k, t in outstanding.items() if now - t > 1.0]:
            del outstanding[k]
            lost += 1
    elapsed = time.perf_counter() - start
    return {"ok": True, "answered": answered, "lost": lost, "seconds": elapsed, "qps": answered / elapsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.guestclient")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("connrate", "latency", "hold", "udpprobe"):
        sp = sub.add_parser(name)
        sp.add_argument("--host", required=True)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--seconds", type=float, default=2.0)
        sp.add_argument("--concurrency", type=int, default=1)
        sp.add_argument("--levels", default="1,1000,10000")
        sp.add_argument("--level-timeout", type=float, default=60)
        sp.add_argument("--tries", type=int, default=3)
        sp.add_argument("--timeout", type=float, default=1.0)
    sp = sub.add_parser("dns")
    sp.add_argument("--server", required=True)
    sp.add_argument("--port", type=int, default=53)
    sp.add_argument("--seconds", type=float, default=2.0)
    sp.add_argument("--window", type=int, default=16)
    sp.add_argument("--tries", type=int, default=3)
    sp.add_argument("--timeout", type=float, default=1.0)
    args = p.parse_args(argv)
    raise_nofile()
    if args.cmd == "dns":
        emit(dns((args.server, args.port), args.seconds, args.window, args.tries, args.timeout))
        return 0
    addr = (args.host, args.port)
    if args.cmd == "connrate":
        if args.concurrency <= 1:
            emit(connrate_sequential(addr, args.seconds))
        else:
            emit(asyncio.run(connrate_concurrent(addr, args.seconds, args.concurrency)))
    elif args.cmd == "latency":
        emit(latency(addr, args.seconds))
    elif args.cmd == "hold":
        levels = [int(x) for x in args.levels.split(",") if x]
        asyncio.run(hold(addr, levels, args.concurrency, args.level_timeout))
    elif args.cmd == "udpprobe":
        emit(udpprobe(addr, args.tries, args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
