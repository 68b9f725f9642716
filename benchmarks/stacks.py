"""The stacks under test, each giving the same kind of guest: a fresh network namespace
whose only network is the stack's tap (or, for the kernel upper limit, a veth pair).

Everything made here is named after this process's PID and removed by exact name; every
process started here is stopped by its PID. The only traffic a guest sends goes to the
address that the stack maps to host loopback (or to the veth's host end).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)

#: Kinds of stack, in table order.
KINDS = ("netkit", "netkit+offload", "pasta", "slirp4netns", "veth")
LABELS = {"netkit": "netkit", "netkit+offload": "netkit --offload", "pasta": "pasta",
          "slirp4netns": "slirp4netns", "veth": "veth (kernel)"}

# pasta guest addressing (private, only inside the guest namespace; the gateway address
# is what pasta maps to host loopback, --map-gw being its default)
PASTA_GUEST = "10.214.0.2"
PASTA_GW = "10.214.0.1"


class StackError(RuntimeError):
    """A stack failed to start or died."""


@dataclass(frozen=True)
class StackSpec:
    kind: str
    mtu: int

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.mtu}"

    @property
    def offload(self) -> bool:
        return self.kind == "netkit+offload"


def default_specs() -> list[StackSpec]:
    """MTU 1500 and 65520 for every stack; netkit --offload at 1500 only."""
    specs = []
    for mtu in (1500, 65520):
        for kind in KINDS:
            if kind == "netkit+offload" and mtu != 1500:
                continue
            specs.append(StackSpec(kind, mtu))
    return specs


def sh(argv: list[str], *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise StackError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ns_exec(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)),
                                      None)
    if path is None:
        raise StackError(f"{name}: command not found (make bench installs it: scripts/install-debian-tools.sh bench)")
    return path


def tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[-n:].strip()


_ERROR_LINE = re.compile(r"^[\s|+]*([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*)$")
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def log_gist(path: str) -> str:
    """One line from a stack's log: the last exception (with where it was raised), else
    the last non-empty line."""
    text = tail(path, 20000)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        m = _ERROR_LINE.match(lines[i])
        if m and not m.group(1).startswith(("ExceptionGroup", "BaseExceptionGroup")):
            where = ""
            for j in range(i - 1, -1, -1):
                f = _FILE_LINE.search(lines[j])
                if f:
                    where = f" (at {os.path.relpath(f.group(1), ROOT) if f.group(1).startswith(ROOT) else f.group(1)}"\
                            f":{f.group(2)})"
                    break
            return m.group(1).strip() + where
    return lines[-1].strip()[:300] if lines else "(no output)"


def stop_process(proc: subprocess.Popen | None, timeout: float = 5) -> None:
    """SIGTERM our own child by PID, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


@dataclass
class Guest:
    """A running stack with its guest namespace."""

    spec: StackSpec
    ns: str
    ifname: str = ""
    #: Address the guest uses to reach the host server.
    host_addr: str = ""
    #: Address the host server must listen on for this guest (127.0.0.1 except veth).
    server_bind: str = "127.0.0.1"
    #: DNS address the guest queries (None: no DNS for this stack; dns_note says why).
    dns_addr: str | None = None
    dns_note: str = ""
    proc: subprocess.Popen | None = None
    log_path: str = ""
    notes: list[str] = field(default_factory=list)
    _cleanup: list = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def death_reason(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        return f"{self.spec.kind} process exited with status {self.proc.returncode}: {log_gist(self.log_path)}"

    def exec_args(self, argv: list[str]) -> list[str]:
        return ns_exec(self.ns, argv)

    def stop(self) -> None:
        while self._cleanup:
            fn = self._cleanup.pop()
            try:
                fn()
            except Exception as e:  # cleanup must go on
                print(f"warning: cleanup of {self.spec.key}: {e}", file=sys.stderr)


class StackFactory:
    """Starts guests; names are unique to this process (``<prefix><pid>x<n>``)."""

    def __init__(self, workdir: str, dns_upstream: str) -> None:
        self.workdir = workdir
        self.dns_upstream = dns_upstream
        self.pid = os.getpid() % 100000
        self.counter = 0
        self.resolv = os.path.join(workdir, "resolv.conf")
        with open(self.resolv, "w") as f:
            f.write(f"nameserver {dns_upstream}\n")
        # veth host ends: a private /28 per harness process inside 10.213.0.0/16
        self.veth_base = (os.getpid() % 4096) * 16
        self.veth_count = 0

    def _name(self, prefix: str) -> str:
        self.counter += 1
        name = f"{prefix}{self.pid}x{self.counter}"
        assert len(name) <= 15, name
        return name

    def start(self, spec: StackSpec) -> Guest:
        ns = self._name("nkb")
        guest = Guest(spec, ns)
        sh(["ip", "netns", "add", ns])
        guest._cleanup.append(lambda: self._del_netns(ns))
        try:
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            {"netkit": self._netkit, "netkit+offload": self._netkit, "pasta": self._pasta,
             "slirp4netns": self._slirp, "veth": self._veth}[spec.kind](guest)
            mtu = self._if_mtu(guest)
            if mtu != spec.mtu:
                guest.notes.append(f"guest MTU was {mtu}, set to {spec.mtu}")
                sh(["ip", "-n", ns, "link", "set", "dev", guest.ifname, "mtu", str(spec.mtu)])
        except BaseException:
            guest.stop()
            raise
        return guest

    @staticmethod
    def _del_netns(ns: str) -> None:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        d = os.path.join("/etc/netns", ns)
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)

    def _if_mtu(self, guest: Guest) -> int:
        out = sh(["ip", "-n", guest.ns, "-o", "link", "show", "dev", guest.ifname]).stdout
        words = out.split()
        return int(words[words.index("mtu") + 1])

    def _spawn(self, guest: Guest, argv: list[str], *, private_resolv: bool) -> None:
        """Start the stack process (stopped by its PID at cleanup).

        ``private_resolv``: run it in a private mount namespace where /etc/resolv.conf names
        only our DNS upstream on host loopback, so its DNS forwarder can never reach anything
        but that (the host's real resolver is never contacted)."""
        if private_resolv:
            argv = [tool("unshare"), "-m", "--propagation", "private", "sh", "-c",
                    'mount --bind "$0" /etc/resolv.conf && exec "$@"', self.resolv, *argv]
        guest.log_path = os.path.join(self.workdir, f"{guest.ns}.log")
        log = open(guest.log_path, "w")
        guest.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=self.workdir)
        log.close()
        guest._cleanup.append(lambda: stop_process(guest.proc))

    def _wait(self, guest: Guest, what: str, cond, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not guest.alive():
                raise StackError(guest.death_reason())
            if cond():
                return
            if time.monotonic() > deadline:
                raise StackError(f"{guest.spec.key}: timed out waiting for {what}; log: {log_gist(guest.log_path)}")
            time.sleep(0.05)

    def _has_link(self, guest: Guest) -> bool:
        return sh(["ip", "-n", guest.ns, "link", "show", "dev", guest.ifname], check=False).returncode == 0

    def _has_ipv4(self, guest: Guest) -> bool:
        out = sh(["ip", "-n", guest.ns, "-4", "-o", "addr", "show", "dev", guest.ifname], check=False).stdout
        return " inet " in out

    # ------------------------------------------------------------------ netkit
    def _netkit(self, guest: Guest) -> None:
        from netkit.netns import UDHCPC_SCRIPT

        spec = guest.spec
        guest.ifname = self._name("nkt")
        argv = [os.path.join(VENV_BIN, "netkit-switch"), "--tap", guest.ifname, "--netns", guest.ns,
                "--mtu", str(spec.mtu), "--log-level", "warning"]
        config = self._netkit_config()
        if config:
            argv += ["--config", config]
        if spec.offload:
            argv.append("--offload")
        self._spawn(guest, argv, private_resolv=True)
        self._wait(guest, "the tap in the namespace", lambda: self._has_link(guest))
        proc = subprocess.run(ns_exec(guest.ns, ["busybox", "udhcpc", "-i", guest.ifname, "-s", UDHCPC_SCRIPT,
                                                 "-f", "-q", "-n", "-t", "5", "-T", "1"]),
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 or not self._has_ipv4(guest):
            if not guest.alive():
                raise StackError(guest.death_reason())
            raise StackError(f"{spec.key}: udhcpc got no lease: {proc.stderr.strip()[-500:]}; "
                             f"log: {log_gist(guest.log_path)}")
        guest.host_addr = "192.168.65.2"
        guest.dns_addr = "192.168.65.1"

    def _netkit_config(self) -> str | None:
        """A TOML config pointing netkit's DNS forwarder at our upstream only (the fields
        that this netkit has; the private /etc/resolv.conf covers older ones)."""
        import dataclasses

        try:
            from netkit.config import Config
        except ImportError:
            return None
        names = {f.name for f in dataclasses.fields(Config)}
        lines = []
        if "dns_mode" in names:
            lines.append('dns_mode = "forward"')
        if "dns_upstreams" in names:
            lines.append(f'dns_upstreams = ["{self.dns_upstream}:53"]')
        if "dns_resolv_conf" in names:
            lines.append(f'dns_resolv_conf = "{self.resolv}"')
        if not lines:
            return None
        path = os.path.join(self.workdir, "netkit.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    # ------------------------------------------------------------------ pasta
    def _pasta(self, guest: Guest) -> None:
        guest.ifname = "eth0"
        argv = [tool("pasta"), "-f", "-4", "--runas", "0", "--config-net", "-I", "eth0",
                "-a", PASTA_GUEST, "-n", "24", "-g", PASTA_GW,
                # DNS: never the host's resolver. This pasta sends what it forwards to a
                # loopback resolver to 127.0.0.1:53 and answers from the gateway address (so
                # --dns-forward answers never match the query); the guest therefore asks the
                # gateway, which pasta maps to host 127.0.0.1:53, where the harness's
                # upstream answers.
                "-D", "127.0.0.1",
                # no port forwarding either way: only guest -> gateway (= host loopback)
                "-t", "none", "-u", "none", "-T", "none", "-U", "none",
                "-m", str(guest.spec.mtu), "--netns", f"/run/netns/{guest.ns}"]
        self._spawn(guest, argv, private_resolv=False)
        self._wait(guest, "pasta's interface address", lambda: self._has_link(guest) and self._has_ipv4(guest))
        guest.host_addr = PASTA_GW
        guest.dns_addr = PASTA_GW
        guest.dns_note = "gateway:53, mapped by pasta to host 127.0.0.1:53"

    # ------------------------------------------------------------------ slirp4netns
    def _slirp(self, guest: Guest) -> None:
        guest.ifname = "tap0"
        argv = [tool("slirp4netns"), "--configure", "--mtu", str(guest.spec.mtu), "--netns-type=path",
                f"/run/netns/{guest.ns}", "tap0"]
        self._spawn(guest, argv, private_resolv=True)
        self._wait(guest, "slirp4netns's interface address",
                   lambda: self._has_link(guest) and self._has_ipv4(guest))
        guest.host_addr = "10.0.2.2"  # host loopback (--disable-host-loopback not set)
        guest.dns_addr = "10.0.2.3"

    # ------------------------------------------------------------------ veth (kernel upper limit)
    def _veth(self, guest: Guest) -> None:
        i = self.veth_count % 4  # four /30s; at most two veth guests are up at once
        self.veth_count += 1
        base = self.veth_base + 4 * i
        host_ip = f"10.213.{base >> 8}.{(base & 255) + 1}"
        guest_ip = f"10.213.{base >> 8}.{(base & 255) + 2}"
        host_if, peer = self._name("bvh"), self._name("bvg")
        mtu = str(guest.spec.mtu)
        sh(["ip", "link", "add", host_if, "mtu", mtu, "type", "veth", "peer", "name", peer, "mtu", mtu])
        guest._cleanup.append(lambda: subprocess.run(["ip", "link", "del", host_if], capture_output=True))
        subprocess.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{host_if}.disable_ipv6=1"], capture_output=True)
        sh(["ip", "link", "set", peer, "netns", guest.ns])
        sh(["ip", "-n", guest.ns, "link", "set", "dev", peer, "name", "eth0"])
        guest.ifname = "eth0"
        sh(["ip", "addr", "add", f"{host_ip}/30", "dev", host_if])
        sh(["ip", "link", "set", host_if, "up"])
        sh(["ip", "-n", guest.ns, "addr", "add", f"{guest_ip}/30", "dev", "eth0"])
        sh(["ip", "-n", guest.ns, "link", "set", "eth0", "up"])
        guest.host_addr = host_ip
        guest.server_bind = host_ip
        guest.dns_addr = host_ip  # straight to the upstream: no forwarder in the way
        guest.dns_note = "no DNS forwarder: queries go straight to the upstream"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # wait until the address is usable (no DAD for v4, but be safe)
            if "state UP" in sh(["ip", "link", "show", host_if]).stdout:
                break
            time.sleep(0.05)


def make_workdir() -> str:
    return tempfile.mkdtemp(prefix="netkit-bench-")
