"""Two netkit TCP engines wired back to back in-process, moving bulk data one way.

Measures the per-segment cost of the sans-I/O engine alone (no parsing, no checksums,
no sockets): the sender's application writes 64 KiB chunks whenever there is send
space, the receiver's application consumes everything after each batch, and segments
cross the "wire" in batches (as the runtime processes a batch of frames and then takes
the output once).

    python benchmarks/tcp_engine_loopback.py [--mb 256] [--batch N] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import time

from netkit.tcp import TcpConnection, TcpSettings

CHUNK = 65536


def run(settings: TcpSettings, total: int, batch: int = 0) -> tuple[float, int, int]:
    """``batch``: segments the receiver processes before taking its output (0: all that
    arrived together, as a runtime reading frames in batches does)."""
    now = 0.0
    a = TcpConnection.connect(now, settings, iss=1, ts_offset=0)
    b = TcpConnection.from_syn(a.take_outgoing()[0], now, settings, iss=2, ts_offset=0)
    b.accept(now)
    for seg in b.take_outgoing():
        a.receive_segment(seg, now)
    for seg in a.take_outgoing():
        b.receive_segment(seg, now)
    a.take_events()
    b.take_events()
    chunk = bytes(CHUNK)
    sent = received = 0
    segs_ab = segs_ba = 0
    t0 = time.perf_counter()
    while received < total:
        now += 0.0001
        while sent < total:
            space = a.send_space()
            if space < CHUNK:
                break
            sent += a.send(chunk, now)
        out = a.take_outgoing()
        segs_ab += len(out)
        back = []
        for i, seg in enumerate(out, 1):
            # As from a frame buffer: the receiver must copy what it keeps.
            seg.payload = memoryview(seg.payload)
            b.receive_segment(seg, now)
            if batch and i % batch == 0:
                n = b.received_size
                b.consume(n, now)
                received += n
                back += b.take_outgoing()
        n = b.received_size
        if n:
            b.consume(n, now)
            received += n
        back += b.take_outgoing()
        segs_ba += len(back)
        for seg in back:
            a.receive_segment(seg, now)
        if not out and not back:
            t = min(x for x in (a.get_timer(), b.get_timer()) if x is not None)
            now = max(now, t)
            a.handle_timer(now)
            b.handle_timer(now)
    elapsed = time.perf_counter() - t0
    assert a.stats.retransmits == 0, a.stats
    return elapsed, segs_ab, segs_ba


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--batch", type=int, default=0,
                   help="receiver takes its output every N segments (default: per burst)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    total = args.mb * 1024 * 1024
    cases = [
        ("MTU 65520 (mss 65480)", TcpSettings.for_mtu(65520)),
        ("MTU 1500 + TSO 64 KiB", TcpSettings(mss=1460, tso_size=65160)),
        ("MTU 1500, no offload", TcpSettings(mss=1460)),
    ]
    if args.profile:
        import cProfile
        import pstats
        cProfile.runctx("run(cases[0][1], total)", globals(), locals(), "/tmp/tcp_bench.prof")
        pstats.Stats("/tmp/tcp_bench.prof").sort_stats("tottime").print_stats(15)
        return
    for name, settings in cases:
        # best of a few runs: the machine may be shared
        elapsed, ab, ba = min(run(settings, total, args.batch) for _ in range(args.repeat))
        mb = total / (1024 * 1024)
        print(f"{name:24s} {mb:6.0f} MB in {elapsed:6.3f} s = {mb / elapsed:8.1f} MB/s "
              f"({ab} data segments, {ba} ACK segments, "
              f"{elapsed / ab * 1e6:5.2f} us per data segment incl. its ACK share)")


if __name__ == "__main__":
    main()
