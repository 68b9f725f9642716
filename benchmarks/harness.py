"""netkit benchmark harness: the same guest on netkit, pasta, slirp4netns and a kernel veth.

    python -m benchmarks [--smoke] [--runs N] [--only X[,Y...]] [--json PATH]

Every run sets up one fresh guest namespace per stack and MTU, then takes each
measurement on every stack in turn (the stack order rotates from run to run) so that
drift on a shared machine hits all stacks alike; figures are the median over runs.
Prints Markdown tables with netkit/pasta and netkit/slirp4netns ratios, writes JSON and a
PNG chart. Exits 1 only when a stack failed (did not start, died, or a measurement that
should work errored); low numbers and not-yet-supported features ("unsupported") are not
failures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from .stacks import (KINDS, LABELS, ROOT, Guest, StackError, StackFactory, StackSpec, default_specs,
                     make_workdir, stop_process, tool)

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
#: pasta's guest reaches a host-loopback resolver through its gateway address, which
#: pasta maps to 127.0.0.1 (see stacks.py), so the upstream answers there too when free.
PASTA_DNS_TARGET = "127.0.0.1:53"


# ----------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    name: str
    runs: int
    tcp_seconds: int          # iperf3 -t
    udp_seconds: int
    udp_bitrate: str          # iperf3 -b
    udp_length: int           # iperf3 -l
    py_seconds: float         # connection rate and latency
    dns_seconds: float
    conc: int                 # concurrent connection-rate workers
    dns_window: int           # DNS queries in flight
    mem_levels: tuple[int, ...]
    mem_runs: int             # RSS does not drift with CPU load: fewer runs than the timing figures
    level_timeout: float
    probe_tries: int
    probe_timeout: float


FULL = Profile("full", runs=3, tcp_seconds=3, udp_seconds=2, udp_bitrate="1G", udp_length=1400, py_seconds=1.5,
               dns_seconds=1.5, conc=32, dns_window=16, mem_levels=(1, 1000, 10000), mem_runs=1, level_timeout=40,
               probe_tries=3, probe_timeout=1.0)
SMOKE = Profile("smoke", runs=1, tcp_seconds=1, udp_seconds=1, udp_bitrate="200M", udp_length=1400,
                py_seconds=0.4, dns_seconds=0.4, conc=8, dns_window=8, mem_levels=(1, 10, 100), mem_runs=1,
                level_timeout=20, probe_tries=2, probe_timeout=0.5)


# ----------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    better: str  # "higher" | "lower"


def figures_for(profile: Profile) -> list[Figure]:
    figs = [
        Figure("tcp_up_gbps", "TCP bulk guest→host (iperf3)", "Gbit/s", "higher"),
        Figure("tcp_down_gbps", "TCP bulk host→guest (iperf3 -R)", "Gbit/s", "higher"),
        Figure("conn_seq_per_s", "TCP connect/request/close, sequential", "conn/s", "higher"),
        Figure("conn_conc_per_s", f"TCP connect/request/close, {profile.conc} concurrent", "conn/s", "higher"),
        Figure("rr_median_us", "1-byte request/response, median", "µs", "lower"),
        Figure("rr_p99_us", "1-byte request/response, p99", "µs", "lower"),
        Figure("udp_gbps", f"UDP guest→host received ({profile.udp_length} B at {profile.udp_bitrate}bit/s)",
               "Gbit/s", "higher"),
        Figure("udp_loss_pct", "UDP loss at that rate", "%", "lower"),
        Figure("dns_qps", f"DNS queries/s ({profile.dns_window} in flight)", "q/s", "higher"),
    ]
    for n in profile.mem_levels:
        figs.append(Figure(f"rss_mb_{n}", f"stack RSS with {n} idle TCP connection{'s' if n != 1 else ''}",
                           "MiB", "lower"))
    return figs


def figure_keys(smoke: bool) -> list[str]:
    """The figure keys a run in this mode reports (the smoke test checks them)."""
    return [f.key for f in figures_for(SMOKE if smoke else FULL)]


# ----------------------------------------------------------------------------- outcomes
@dataclass
class Unsupported:
    """The stack does not offer this yet (not a failure)."""
    reason: str
    status: str = "unsupported"


@dataclass
class Limit:
    """The stack did not get there within the harness's time limit (a finding, not a failure)."""
    reason: str
    status: str = "limit"


@dataclass
class NotApplicable:
    """The figure does not exist for this stack (e.g. RSS of the kernel)."""
    reason: str
    status: str = "n/a"


@dataclass
class Failed:
    """The stack failed: did not start, died, or errored where it should work."""
    reason: str
    status: str = "error"


class MeasureError(Exception):
    pass


# ----------------------------------------------------------------------------- helpers
def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def free_port(bind: str) -> int:
    with socket.socket() as s:
        s.bind((bind, 0))
        return s.getsockname()[1]


def is_listening(bind: str, port: int) -> bool:
    want = f"{socket.inet_aton(bind)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 3 and parts[1] == want and parts[3] == "0A":
                return True
    return False


def wait_until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise MeasureError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise MeasureError(f"timed out waiting for {what}")
        time.sleep(0.02)


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise MeasureError(f"no JSON in output: {text.strip()[-300:]!r}")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise MeasureError(f"no VmRSS for pid {pid}")


# ----------------------------------------------------------------------------- host side
class HostServers:
    """The host-side servers (benchmarks.hostserver), one per bind address."""

    def __init__(self, dns_upstream: str) -> None:
        self.dns_upstream = dns_upstream
        self.procs: dict[str, tuple[subprocess.Popen, int]] = {}
        #: optional DNS sockets: "ADDR:PORT" -> "ok" | "busy(ERRNO)"
        self.optional: dict[str, str] = {}

    def start(self, bind: str, dns_bind: str, dns_optional: str | None = None) -> int:
        port = free_port(bind)
        argv = [sys.executable, "-m", "benchmarks.hostserver", "--tcp", f"{bind}:{port}",
                "--udp-echo", f"{bind}:{port}", "--dns", f"{dns_bind}:53"]
        if dns_optional:
            argv += ["--dns-optional", dns_optional]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=child_env(), stdin=subprocess.DEVNULL)
        r, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if r else ""
        words = line.split()
        if not words or words[0] != "ready":
            stop_process(proc)
            raise StackError(f"host server on {bind}:{port} did not start: {proc.stderr.read()[-500:]}")
        for w in words[1:]:
            addr, _, state = w.partition("=")
            self.optional[addr] = state
        self.procs[bind] = (proc, port)
        return port

    def port(self, bind: str) -> int:
        return self.procs[bind][1]

    def stop(self, bind: str) -> None:
        proc, _ = self.procs.pop(bind, (None, 0))
        stop_process(proc)

    def stop_all(self) -> None:
        for bind in list(self.procs):
            self.stop(bind)


@dataclass
class Context:
    profile: Profile
    servers: HostServers
    iperf3: str
    verbose: bool = False

    def guest_run(self, guest: Guest, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(guest.exec_args(argv), capture_output=True, text=True, timeout=timeout,
                                  cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"{argv[0]} in the guest timed out after {timeout:.0f} s") from None

    def guest_py(self, guest: Guest, args: list[str], timeout: float) -> dict:
        proc = self.guest_run(guest, [sys.executable, "-m", "benchmarks.guestclient", *args], timeout)
        if proc.returncode != 0:
            raise MeasureError(f"guest client {args[0]} failed: {proc.stderr.strip()[-400:]}")
        return last_json(proc.stdout)


# ----------------------------------------------------------------------------- measurements
Values = dict  # figure key -> float | Unsupported | NotApplicable | Failed


def iperf3(ctx: Context, guest: Guest, extra: list[str], seconds: int) -> dict:
    bind = guest.server_bind
    port = free_port(bind)
    server = subprocess.Popen([ctx.iperf3, "-s", "-1", "-B", bind, "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        wait_until(lambda: is_listening(bind, port), 10, "iperf3 server", server)
        proc = ctx.guest_run(guest, [ctx.iperf3, "-c", guest.host_addr, "-p", str(port), "-t", str(seconds), "-J",
                                     "--connect-timeout", "3000", *extra], timeout=seconds + 20)
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise MeasureError(f"iperf3 gave no JSON (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        if "error" in result:
            raise MeasureError(f"iperf3: {result['error']}")
        return result
    finally:
        stop_process(server, timeout=2)


def m_tcp(reverse: bool):
    def measure(ctx: Context, guest: Guest) -> Values:
        r = iperf3(ctx, guest, ["-R"] if reverse else [], ctx.profile.tcp_seconds)
        bps = r["end"]["sum_received"]["bits_per_second"]
        return {"tcp_down_gbps" if reverse else "tcp_up_gbps": bps / 1e9}
    return measure


def m_conn(concurrency: int):
    def measure(ctx: Context, guest: Guest) -> Values:
        p = ctx.profile
        port = ctx.servers.port(guest.server_bind)
        r = ctx.guest_py(guest, ["connrate", "--host", guest.host_addr, "--port", str(port), "--seconds",
                                 str(p.py_seconds), "--concurrency", str(concurrency)], timeout=p.py_seconds + 30)
        key = "conn_seq_per_s" if concurrency <= 1 else "conn_conc_per_s"
        if r["completed"] == 0:
            return {key: Failed(f"no connection completed: {r['first_error']}")}
        return {key: r["rate"]}
    return measure


def m_latency(ctx: Context, guest: Guest) -> Values:
    p = ctx.profile
    port = ctx.servers.port(guest.server_bind)
    r = ctx.guest_py(guest, ["latency", "--host", guest.host_addr, "--port", str(port), "--seconds",
                             str(p.py_seconds)], timeout=p.py_seconds + 30)
    return {"rr_median_us": r["median_us"], "rr_p99_us": r["p99_us"]}


def m_udp(ctx: Context, guest: Guest) -> Values:
    p = ctx.profile
    port = ctx.servers.port(guest.server_bind)
    probe = ctx.guest_py(guest, ["udpprobe", "--host", guest.host_addr, "--port", str(port), "--tries",
                                 str(p.probe_tries), "--timeout", str(p.probe_timeout)], timeout=30)
    if not probe["ok"]:
        u = Unsupported(f"no UDP echo through the stack to host loopback ({probe.get('error')}): "
                        "UDP NAT not supported yet")
        return {"udp_gbps": u, "udp_loss_pct": u}
    r = iperf3(ctx, guest, ["-u", "-b", p.udp_bitrate, "-l", str(p.udp_length)], p.udp_seconds)
    end = r["end"]
    s = end.get("sum_received") or end["sum"]
    loss = end["sum"].get("lost_percent", s.get("lost_percent", 0.0))
    return {"udp_gbps": s["bits_per_second"] / 1e9, "udp_loss_pct": float(loss)}


def m_dns(ctx: Context, guest: Guest) -> Values:
    p = ctx.profile
    if guest.dns_addr is None:
        return {"dns_qps": NotApplicable(guest.dns_note or "no DNS forwarder")}
    if guest.spec.kind == "pasta" and ctx.servers.optional.get(PASTA_DNS_TARGET) != "ok":
        # this pasta sends forwarded queries for a loopback resolver to 127.0.0.1:53 whatever -D says
        return {"dns_qps": NotApplicable(f"pasta's guest reaches a loopback resolver only at {PASTA_DNS_TARGET}, "
                                         f"which another process holds ({ctx.servers.optional.get(PASTA_DNS_TARGET)})")}
    r = ctx.guest_py(guest, ["dns", "--server", guest.dns_addr, "--seconds", str(p.dns_seconds), "--window",
                             str(p.dns_window), "--tries", str(p.probe_tries), "--timeout", str(p.probe_timeout)],
                     timeout=p.dns_seconds + 30)
    if not r["ok"]:
        return {"dns_qps": Unsupported(f"no DNS answer from {guest.dns_addr}:53 ({r.get('error')}): "
                                       "DNS forwarding not supported yet")}
    return {"dns_qps": r["qps"]}


def m_memory(ctx: Context, guest: Guest) -> Values:
    p = ctx.profile
    keys = [f"rss_mb_{n}" for n in p.mem_levels]
    if guest.pid is None:
        na = NotApplicable("kernel veth: no stack process")
        return {k: na for k in keys}
    port = ctx.servers.port(guest.server_bind)
    argv = guest.exec_args([sys.executable, "-m", "benchmarks.guestclient", "hold", "--host", guest.host_addr,
                            "--port", str(port), "--levels", ",".join(map(str, p.mem_levels)), "--concurrency",
                            "128", "--level-timeout", str(p.level_timeout)])
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=child_env())
    out: Values = {}
    try:
        for n, key in zip(p.mem_levels, keys):
            r, _, _ = select.select([client.stdout], [], [], p.level_timeout + 20)
            line = client.stdout.readline() if r else ""
            if not line:
                raise MeasureError(f"hold client gave no report for {n} connections: "
                                   f"{client.stderr.read()[-300:] if client.poll() is not None else 'timeout'}")
            rep = json.loads(line)
            if rep["open"] < n:
                if rep["open"] == 0 or not guest.alive():
                    out[key] = Failed(guest.death_reason() or f"no connection opened ({rep['first_error']})")
                else:  # the stack works but did not get there: a finding, not a failure
                    why = [f"{rep['errors']} failed 3 times ({rep['first_error']})"] if rep["errors"] else []
                    if rep.get("timed_out"):
                        why.append(f"the rest not open after {p.level_timeout:.0f} s")
                    out[key] = Limit(f"only {rep['open']} of {n} connections open: {'; '.join(why)}")
            else:
                time.sleep(0.3)
                out[key] = rss_mib(guest.pid)
            client.stdin.write("next\n")
            client.stdin.flush()
        client.stdin.write("close\n")
        client.stdin.flush()
        client.wait(60)
    except (BrokenPipeError, subprocess.TimeoutExpired) as e:
        raise MeasureError(f"hold client: {e!r}") from None
    finally:
        stop_process(client)
    return out


@dataclass(frozen=True)
class Measurement:
    name: str
    figures: tuple[str, ...]
    fn: object
    aliases: tuple[str, ...] = ()


def measurements_for(profile: Profile) -> list[Measurement]:
    mem = tuple(f"rss_mb_{n}" for n in profile.mem_levels)
    # memory runs after the timing runs, on fresh stacks of its own (Runner.run)
    return [
        Measurement("memory", mem, m_memory, ("rss", "mem")),
        Measurement("tcp_up", ("tcp_up_gbps",), m_tcp(False), ("tcp",)),
        Measurement("tcp_down", ("tcp_down_gbps",), m_tcp(True), ("tcp",)),
        Measurement("conn_seq", ("conn_seq_per_s",), m_conn(1), ("conn",)),
        Measurement("conn_conc", ("conn_conc_per_s",), m_conn(profile.conc), ("conn",)),
        Measurement("latency", ("rr_median_us", "rr_p99_us"), m_latency, ("rr",)),
        Measurement("udp", ("udp_gbps", "udp_loss_pct"), m_udp, ()),
        Measurement("dns", ("dns_qps",), m_dns, ()),
    ]


# ----------------------------------------------------------------------------- selection
def select_work(only: str | None, specs: list[StackSpec], meas: list[Measurement]
                ) -> tuple[list[StackSpec], list[Measurement]]:
    if not only:
        return specs, meas
    tokens = [t.strip() for t in only.split(",") if t.strip()]
    m_tokens = [t for t in tokens if any(t == m.name or t in m.aliases or t in m.figures for m in meas)]
    s_tokens = [t for t in tokens if any(t in (s.kind, s.key, str(s.mtu)) for s in specs)]
    unknown = set(tokens) - set(m_tokens) - set(s_tokens)
    if unknown:
        raise ValueError(f"unknown {', '.join(sorted(unknown))}; use measurements "
                         f"({', '.join(m.name for m in meas)}), stacks ({', '.join(KINDS)}), "
                         f"stack/MTU keys or MTUs")
    if m_tokens:
        meas = [m for m in meas if any(t == m.name or t in m.aliases or t in m.figures for t in m_tokens)]
    if s_tokens:
        kinds = [t for t in s_tokens if t in KINDS]
        mtus = [t for t in s_tokens if t.isdigit()]
        keys = [t for t in s_tokens if "/" in t]
        specs = [s for s in specs if (s.key in keys) or
                 ((not kinds or s.kind in kinds) and (not mtus or str(s.mtu) in mtus) and (kinds or mtus))]
    return specs, meas


# ----------------------------------------------------------------------------- running
MARKS = {"unsupported": "n/s", "n/a": "n/a", "limit": "lim", "error": "ERR"}


def fmt_value(v) -> str:
    if isinstance(v, (int, float)):
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return MARKS.get(getattr(v, "status", ""), "?")


def entry(v):
    if isinstance(v, (int, float)):
        return float(v)
    return {"status": v.status, "reason": v.reason}


class Runner:
    def __init__(self, profile: Profile, specs: list[StackSpec], meas: list[Measurement], runs: int,
                 verbose: bool) -> None:
        self.profile = profile
        self.specs = specs
        self.meas = meas
        self.runs = runs
        self.verbose = verbose
        self.raw: dict[str, dict[str, list]] = {s.key: {} for s in specs}
        self.failures: list[str] = []
        self.guest_info: dict[str, dict] = {}

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def record(self, key: str, values: Values, run: int) -> None:
        failed: dict[str, list[str]] = {}
        for fig, v in values.items():
            self.raw[key].setdefault(fig, []).append(entry(v))
            if isinstance(v, Failed):
                failed.setdefault(v.reason, []).append(fig)
        for reason, figs in failed.items():
            what = "every figure" if len(figs) > 3 else ", ".join(figs)
            self.failures.append(f"{key} run {run + 1}, {what}: {reason}")

    def run(self) -> None:
        dns_upstream = f"127.77.{(os.getpid() >> 8) & 255}.{(os.getpid() & 255) or 1}"
        workdir = make_workdir()
        factory = StackFactory(workdir, dns_upstream)
        servers = HostServers(dns_upstream)
        ctx = Context(self.profile, servers, tool("iperf3"), self.verbose)
        try:
            needs_loopback53 = any(s.kind == "pasta" for s in self.specs) and any(m.name == "dns" for m in self.meas)
            servers.start("127.0.0.1", dns_upstream, PASTA_DNS_TARGET if needs_loopback53 else None)
            timing = [m for m in self.meas if m.name != "memory"]
            memory = [m for m in self.meas if m.name == "memory"]
            if timing:
                for run in range(self.runs):
                    self.one_run(run, ctx, factory, timing, f"run {run + 1}/{self.runs}")
            # memory on fresh stacks of its own: no bulk transfer before it, and the slow
            # teardown of thousands of connections (slirp4netns) disturbs no other figure
            if memory:
                runs = min(self.runs, self.profile.mem_runs)
                for run in range(runs):
                    self.one_run(run, ctx, factory, memory, f"memory run {run + 1}/{runs}")
        finally:
            servers.stop_all()
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)

    def one_run(self, run: int, ctx: Context, factory: StackFactory, meas: list[Measurement], title: str) -> None:
        n = len(self.specs)
        order = [self.specs[(i + run) % n] for i in range(n)]
        guests: dict[str, Guest] = {}
        veth_binds: list[str] = []
        self.log(f"== {title}: {', '.join(s.key for s in order)}")
        try:
            for spec in order:
                t0 = time.monotonic()
                g = None
                try:
                    g = factory.start(spec)
                    if g.server_bind != "127.0.0.1":
                        ctx.servers.start(g.server_bind, g.server_bind)
                        veth_binds.append(g.server_bind)
                except (StackError, OSError, subprocess.SubprocessError) as e:
                    reason = f"stack failed to start: {e}"
                    self.log(f"   {spec.key}: {reason}")
                    self.record(spec.key, {f: Failed(reason) for m in meas for f in m.figures}, run)
                    if g is not None:
                        g.stop()
                    continue
                guests[spec.key] = g
                self.guest_info[spec.key] = {"kind": spec.kind, "mtu": spec.mtu, "offload": spec.offload,
                                             "host_addr": g.host_addr, "server_bind": g.server_bind,
                                             "dns_addr": g.dns_addr, "notes": g.notes}
                self.log(f"   {spec.key}: up in {time.monotonic() - t0:.1f} s (guest reaches the host server "
                         f"at {g.host_addr}{'; ' + '; '.join(g.notes) if g.notes else ''})")
            for m in meas:
                for spec in order:
                    g = guests.get(spec.key)
                    if g is None:
                        continue
                    t0 = time.monotonic()
                    if not g.alive():
                        values = {f: Failed(g.death_reason()) for f in m.figures}
                    else:
                        try:
                            values = m.fn(ctx, g)
                        except (MeasureError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
                            reason = g.death_reason() if not g.alive() else f"{m.name}: {e}"
                            values = {f: Failed(reason) for f in m.figures}
                    self.record(spec.key, values, run)
                    shown = ", ".join(f"{f}={fmt_value(v)}" for f, v in values.items())
                    self.log(f"   {m.name:9s} {spec.key:20s} {shown} ({time.monotonic() - t0:.1f} s)")
                    for v in values.values():
                        if isinstance(v, (Failed, Unsupported, Limit)) and self.verbose:
                            self.log(f"      {v.status}: {v.reason}")
        finally:
            for g in guests.values():
                if not g.alive():
                    self.log(f"   {g.spec.key}: {g.death_reason()}")
                g.stop()
            for b in veth_binds:
                ctx.servers.stop(b)


# ----------------------------------------------------------------------------- summary
def summarize(raw: dict[str, dict[str, list]], figs: list[Figure]) -> dict:
    out: dict[str, dict] = {}
    for key, per_fig in raw.items():
        out[key] = {}
        for f in figs:
            entries = per_fig.get(f.key, [])
            nums = [e for e in entries if isinstance(e, float)]
            if nums:
                out[key][f.key] = {"status": "ok", "median": statistics.median(nums), "runs": entries}
            elif entries:
                bad = next((e for e in entries if e["status"] == "error"), entries[0])
                out[key][f.key] = {"status": bad["status"], "reason": bad["reason"], "runs": entries}
    return out


def ratios(summary: dict, specs: list[StackSpec], figs: list[Figure]) -> dict:
    out = {}
    for nk in specs:
        if not nk.kind.startswith("netkit"):
            continue
        for other in ("pasta", "slirp4netns"):
            okey = f"{other}/{nk.mtu}"
            if okey not in summary or nk.key not in summary:
                continue
            r = {}
            for f in figs:
                a, b = summary[nk.key].get(f.key, {}), summary[okey].get(f.key, {})
                if a.get("status") == "ok" and b.get("status") == "ok" and b["median"]:
                    r[f.key] = a["median"] / b["median"]
            out[f"{nk.key} / {okey}"] = r
    return out


def markdown_tables(summary: dict, rats: dict, specs: list[StackSpec], figs: list[Figure]) -> str:
    lines: list[str] = []
    for mtu in sorted({s.mtu for s in specs}):
        cols = [s for s in specs if s.mtu == mtu]
        rcols = [k for k in rats if k.endswith(f"/{mtu}") and k.split(" / ")[0].endswith(f"/{mtu}")]
        short = {"netkit": "nk", "netkit+offload": "nk+off", "pasta": "pasta", "slirp4netns": "slirp"}

        def rname(k: str) -> str:
            a, b = (x.split("/")[0] for x in k.split(" / "))
            return f"{short[a]}/{short[b]}"

        lines.append(f"MTU {mtu}")
        lines.append("")
        head = ["figure", "unit", *[LABELS[s.kind] for s in cols], *[rname(k) for k in rcols]]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
        for f in figs:
            row = [f.label, f.unit]
            for s in cols:
                e = summary.get(s.key, {}).get(f.key)
                if e is None:
                    row.append("–")
                elif e["status"] == "ok":
                    row.append(fmt_value(e["median"]))
                else:
                    row.append(MARKS[e["status"]])
            for k in rcols:
                v = rats[k].get(f.key)
                row.append(f"{v:.2f}" if v is not None else "–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    notes = []
    for key, per in summary.items():
        seen = set()
        for fk, e in per.items():
            if e["status"] != "ok" and (e["status"], e["reason"]) not in seen:
                seen.add((e["status"], e["reason"]))
                tag = MARKS[e["status"]]
                figs_same = [f for f, x in per.items() if x["status"] == e["status"] and x.get("reason") == e["reason"]]
                notes.append(f"- {tag} {key} ({', '.join(figs_same)}): {e['reason']}")
    if notes:
        lines.append("n/s = not supported (yet), n/a = not applicable, lim = not reached within the time limit, "
                     "ERR = the stack failed; ratios are netkit ÷ other (for µs, %, MiB lower is better).")
        lines.append("")
        lines.extend(notes)
        lines.append("")
    return "\n".join(lines)


def chart(path: str, summary: dict, specs: list[StackSpec], figs: list[Figure], title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); chart skipped"
    colors = {"netkit": "#1f77b4", "netkit+offload": "#17becf", "pasta": "#2ca02c", "slirp4netns": "#ff7f0e",
              "veth": "#7f7f7f"}
    ncols = 4
    nrows = (len(figs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, f in zip(axes.flat, figs):
        labels, heights, cols, texts = [], [], [], []
        for s in specs:
            e = summary.get(s.key, {}).get(f.key)
            labels.append(f"{s.kind.replace('netkit+offload', 'nk+off')}\n{s.mtu}")
            cols.append(colors[s.kind])
            if e and e["status"] == "ok":
                heights.append(e["median"])
                texts.append(fmt_value(e["median"]))
            else:
                heights.append(0)
                texts.append(MARKS.get(e["status"], "–") if e else "–")
        x = range(len(specs))
        bars = ax.bar(x, heights, color=cols)
        top = max(heights) if any(heights) else 1
        for b, t in zip(bars, texts):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + top * 0.01, t, ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=6.5)
        ax.set_ylim(0, top * 1.18)
        ax.set_title(f"{f.label}\n[{f.unit}, {f.better} is better]", fontsize=8.5)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(figs):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg(), "netkit_commit": git("rev-parse", "--short", "HEAD"),
            "netkit_tree_dirty": bool(git("status", "--porcelain", "--", "netkit")),
            "tools": {"iperf3": version(["iperf3", "--version"]),
                      "slirp4netns": version(["slirp4netns", "--version"]),
                      "pasta": _pasta_version()}}


def _pasta_version() -> str:
    try:
        p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "passt"], capture_output=True, text=True,
                           timeout=10)
        return f"passt {p.stdout.strip()}" if p.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="one short run with small counts (for make test)")
    p.add_argument("--runs", type=int, help="runs per figure (default 3; --smoke: 1); the median is reported")
    p.add_argument("--only", metavar="X[,Y]",
                   help="measurements (memory, tcp, tcp_up, tcp_down, conn, conn_seq, conn_conc, latency, udp, "
                        "dns), stacks (netkit, netkit+offload, pasta, slirp4netns, veth), KIND/MTU keys or MTUs")
    p.add_argument("--mem-runs", type=int, metavar="N",
                   help="runs that measure memory (default 1: RSS does not drift with CPU load, and 10000 "
                        "connections through slirp4netns take long)")
    p.add_argument("--json", metavar="PATH", help="JSON output (default benchmarks/results/<date>[-smoke].json); "
                                                  "the PNG chart goes next to it")
    p.add_argument("-v", "--verbose", action="store_true", help="print every unsupported/error reason as it happens")
    args = p.parse_args(argv)

    if os.geteuid() != 0:
        print("python -m benchmarks: must run as root (network namespaces, tap and veth devices)", file=sys.stderr)
        return 2
    profile = SMOKE if args.smoke else FULL
    if args.mem_runs is not None:
        import dataclasses
        profile = dataclasses.replace(profile, mem_runs=args.mem_runs)
    runs = args.runs if args.runs is not None else profile.runs
    if runs < 1:
        p.error("--runs: must be at least 1")
    figs_all = figures_for(profile)
    try:
        specs, meas = select_work(args.only, default_specs(), measurements_for(profile))
    except ValueError as e:
        p.error(f"--only: {e}")
    wanted = {f for m in meas for f in m.figures}
    figs = [f for f in figs_all if f.key in wanted]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = max(profile.mem_levels) + 512 if any(m.name == "memory" for m in meas) else 0
    if hard < need:
        print(f"warning: RLIMIT_NOFILE hard limit {hard} < {need}: the largest memory level may fail",
              file=sys.stderr)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    stamp = _dt.datetime.now()
    json_path = args.json or os.path.join(RESULTS_DIR, stamp.strftime("%Y-%m-%d") + ("-smoke" if args.smoke else "")
                                          + ".json")
    png_path = os.path.splitext(json_path)[0] + ".png"
    info = machine_info()
    t_start = time.monotonic()
    runner = Runner(profile, specs, meas, runs, args.verbose)
    print(f"netkit benchmarks ({profile.name}, {runs} run{'s' if runs != 1 else ''}) on {info['cores']} cores, "
          f"load {info['loadavg_start'][0]:.2f}: {len(specs)} stack configurations x {len(figs)} figures",
          file=sys.stderr, flush=True)
    interrupted = False
    try:
        runner.run()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaned up; writing partial results", file=sys.stderr)
    elapsed = time.monotonic() - t_start
    info["loadavg_end"] = os.getloadavg()

    summary = summarize(runner.raw, figs)
    rats = ratios(summary, specs, figs)
    tables = markdown_tables(summary, rats, specs, figs)
    title = (f"netkit benchmarks, {stamp:%Y-%m-%d}, {info['cores']} cores, {profile.name} "
             f"(median of {runs} run{'s' if runs != 1 else ''})")
    doc = {
        "date": stamp.isoformat(timespec="seconds"), "mode": profile.name, "runs": runs,
        "elapsed_s": round(elapsed, 1), "machine": info,
        "profile": {k: v for k, v in profile.__dict__.items()},
        "stacks": [s.key for s in specs],
        "stack_info": runner.guest_info,
        "figures": {f.key: {"label": f.label, "unit": f.unit, "better": f.better} for f in figs},
        "results": summary, "ratios": rats, "failures": runner.failures, "interrupted": interrupted,
    }
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    note = chart(png_path, summary, specs, figs, title)
    print()
    print(f"## {title}")
    print()
    print(tables)
    def shown(path: str) -> str:
        path = os.path.abspath(path)
        return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
    print(f"JSON: {shown(json_path)}")
    print(f"chart: {shown(png_path)}" if note is None else f"chart: {note}")
    print(f"elapsed: {elapsed:.0f} s")
    if runner.failures:
        print(f"\n{len(runner.failures)} failure(s):", file=sys.stderr)
        for line in runner.failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 130 if interrupted else 0
