"""``netkit vm``: boot a QEMU guest whose only network is an in-process netkit switch.

The switch (``open_switch``, configured like ``netkit-switch``) serves a ``QemuListener``
on a unix socket in a private temporary directory; QEMU is started with::

    -netdev stream,id=n0,server=off,addr.type=unix,addr.path=SOCK
    -device virtio-net-pci,netdev=n0

The listener is up before QEMU starts, and QEMU must connect within
``--connect-timeout`` seconds: QEMU 7.2 does not retry a failed stream connection and
would otherwise boot a guest with a dead NIC. The serial console is this process's
stdin/stdout (``-serial mon:stdio``: Ctrl-A X quits, Ctrl-A C is the monitor). The
command exits with QEMU's status; SIGINT/SIGTERM stop QEMU (SIGTERM, then SIGKILL) and
exit with 128+signal.

Acceleration is KVM when ``/dev/kvm`` can be opened read-write, TCG otherwise
(``--accel`` forces one).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO

import trio

from .config import Config, ConfigError, Share, parse_mac
from .config import parse_share as _parse_share_spec

__all__ = [
    "VmError", "VmOptions", "add_vm_options", "vm_options_from_args", "kvm_usable", "choose_accel",
    "qemu_argv", "run_vm", "vm_main", "DEFAULT_APPEND",
]

log = logging.getLogger("netkit.vm")

#: Kernel command line put before ``--append``: console on the serial port, and a
#: kernel panic ends the VM (``-no-reboot`` turns the reboot into QEMU exiting).
DEFAULT_APPEND = "console=ttyS0 panic=1"
QCOW2_MAGIC = b"QFI\xfb"


class VmError(Exception):
    """The VM could not be started (QEMU missing, exited early, never connected...)."""


@dataclass
class VmOptions:
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    memory: str = "512M"
    cpus: int = 1
    disks: list[str] = field(default_factory=list)
    #: 9P shares for the gateway's 9P service (``--share NAME=PATH[:ro][:owners]``).
    shares: list[Share] = field(default_factory=list)
    accel: str = "auto"  # auto | kvm | tcg
    qemu: str = "qemu-system-x86_64"
    mac: str | None = None
    extra: list[str] = field(default_factory=list)
    #: Seconds QEMU has to connect to the switch socket.
    connect_timeout: float = 10.0
    #: Print progress lines on stderr.
    progress: bool = True


# ----------------------------------------------------------------------------- pieces
def _cpu_has_hw_virt(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[-1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        pass
    return False


def kvm_usable(path: str = "/dev/kvm", cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True if KVM can run an ordinary guest: the device opens read-write (as QEMU will
    open it) and the CPU has hardware virtualization (vmx/svm).

    The second check matters: some cloud sandboxes expose a ``/dev/kvm`` backed by a
    paravirtual KVM (e.g. ``kvm_pvm``) without vmx/svm; a stock Debian kernel then takes
    minutes just to decompress itself, where TCG boots it in seconds.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return _cpu_has_hw_virt(cpuinfo)


def choose_accel(requested: str = "auto", *, kvm_check: Callable[[], bool] = kvm_usable) -> str:
    if requested == "auto":
        return "kvm" if kvm_check() else "tcg"
    if requested == "kvm" and not kvm_check():
        raise VmError("--accel kvm: /dev/kvm is missing or cannot be opened read-write")
    if requested not in ("kvm", "tcg"):
        raise VmError(f"--accel: expected auto, kvm or tcg, got {requested!r}")
    return requested


def _disk_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise VmError(f"--disk {path}: {e.strerror or e}") from None
    return "qcow2" if magic == QCOW2_MAGIC else "raw"


def qemu_argv(opts: VmOptions, socket_path: str, accel: str) -> list[str]:
    """The QEMU command line for ``opts``, with the NIC on ``socket_path``."""
    argv = [opts.qemu, "-nodefaults", "-no-user-config", "-nographic", "-serial", "mon:stdio",
            "-no-reboot", "-accel", accel]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-m", opts.memory, "-smp", str(opts.cpus)]
    if opts.kernel:
        argv += ["-kernel", opts.kernel]
        if opts.initrd:
            argv += ["-initrd", opts.initrd]
        argv += ["-append", " ".join(part for part in (DEFAULT_APPEND, opts.append) if part)]
    argv += ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={socket_path}"]
    # romfile=: no iPXE option ROM (we never netboot; it only slows the BIOS down).
    nic = "virtio-net-pci,netdev=n0,romfile="
    if opts.mac:
        nic += f",mac={opts.mac}"
    argv += ["-device", nic]
    for i, disk in enumerate(opts.disks):
        if "," in disk:
            raise VmError(f"--disk {disk}: a comma in the path is not supported")
        argv += ["-drive", f"file={disk},if=virtio,format={_disk_format(disk)},index={i}"]
    argv += list(opts.extra)
    return argv


def parse_share(text: str) -> Share:
    """``--share NAME=PATH[:ro][:owners]``, as netkit-switch and the config file take it;
    the path must be an existing directory (made absolute here)."""
    try:
        share = _parse_share_spec(text)
    except ConfigError as e:
        raise VmError(f"--share: {str(e).partition(': ')[2]}") from None
    if not share.name or not share.path:
        raise VmError(f"--share: expected NAME=PATH[:ro][:owners], got {text!r}")
    if "/" in share.name or any(c.isspace() for c in share.name):
        raise VmError(f"--share {text}: the name may not contain '/' or spaces")
    if not os.path.isdir(share.path):
        raise VmError(f"--share {text}: {share.path} is not a directory")
    return dataclasses.replace(share, path=os.path.abspath(share.path))


def apply_shares(config: Config, shares: Sequence[Share]) -> Config:
    """Record ``--share`` in the config for the gateway's 9P service."""
    if not shares:
        return config
    try:
        return Config.from_mapping({"shares": list(shares)}, config)
    except ConfigError as e:
        raise VmError(f"--share: {e}") from None


# ----------------------------------------------------------------------------- running
class _ConnectWatch:
    """Wraps a listener: applies link middleware and notes each connection."""

    def __init__(self, listener, wrap) -> None:
        self.listener = listener
        self.wrap = wrap
        self.connected = trio.Event()
        self.link_name: str | None = None

    async def serve(self, on_link, *, task_status=trio.TASK_STATUS_IGNORED):
        async def wrapped(link):
            self.link_name = link.name
            self.connected.set()
            await on_link(self.wrap(link))
        await self.listener.serve(wrapped, task_status=task_status)


class _Progress:
    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr

    def write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()


async def _stop_process(proc: trio.Process, grace: float = 5.0) -> None:
    """SIGTERM (QEMU restores the terminal on it), then SIGKILL after ``grace`` seconds."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            try:
                proc.terminate()
            except ProcessLookupError:
                pass
            with trio.move_on_after(grace):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _wait_connected(proc: trio.Process, watch: _ConnectWatch, timeout: float) -> None:
    async with trio.open_nursery() as nursery:
        async def exited() -> None:
            await proc.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(exited)
        with trio.move_on_after(timeout):
            await watch.connected.wait()
        nursery.cancel_scope.cancel()
    if watch.connected.is_set():
        return
    if proc.returncode is not None:
        raise VmError(f"QEMU exited with status {proc.returncode} before connecting to the switch "
                      "(see its messages above)")
    raise VmError(f"QEMU did not connect to the switch socket within {timeout:g}s; its NIC would be "
                  "dead, so the VM was stopped")


async def run_vm(config: Config, opts: VmOptions, *, pcap_path: str | None = None,
                 stdin: int | None = None, stdout: int | None = None,
                 progress_stream: TextIO | None = None) -> int:
    """Run the VM to completion on a fresh switch; return QEMU's exit status
    (128+N if QEMU was killed by signal N, or if we were asked to stop by signal N)."""
    from .links.middleware import PcapCapture, PcapWriter
    from .links.qemu import QemuListener
    from .runtime import open_switch

    progress = _Progress(opts.progress, progress_stream)
    if shutil.which(opts.qemu) is None:
        raise VmError(f"{opts.qemu} not found (Debian: apt-get install qemu-system-x86)")
    for what, path in (("--kernel", opts.kernel), ("--initrd", opts.initrd)):
        if path is not None and not os.path.isfile(path):
            raise VmError(f"{what} {path}: no such file")
    accel = choose_accel(opts.accel)
    config = apply_shares(config, opts.shares)

    pcap = None
    if pcap_path:
        try:
            pcap = PcapWriter(pcap_path)
        except OSError as e:
            raise VmError(f"--pcap {pcap_path}: {e.strerror or e}") from None

    def wrap(link):
        return PcapCapture(link, pcap) if pcap is not None else link

    # Errors are carried out of the nurseries (open_switch's and ours) as values and
    # raised at the end, so callers get a plain VmError, never an ExceptionGroup.
    error: VmError | None = None
    stop_signal: list[int] = []
    proc: trio.Process | None = None
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, \
                tempfile.TemporaryDirectory(prefix="netkit-vm-") as tmp:
            sock_path = os.path.join(tmp, "qemu.sock")
            argv = qemu_argv(opts, sock_path, accel)
            async with open_switch(config) as switch:
                watch = _ConnectWatch(QemuListener(sock_path), wrap)
                await switch.listen(watch)
                log.debug("starting %s", shlex.join(argv))
                progress.write(f"netkit vm: starting QEMU ({accel}); waiting for it to connect... ")
                try:
                    proc = await trio.lowlevel.open_process(argv, stdin=stdin, stdout=stdout)
                except OSError as e:
                    progress.write("failed\n")
                    error = VmError(f"cannot start {opts.qemu}: {e.strerror or e}")
                if proc is not None:
                    try:
                        error = await _supervise(proc, watch, signals, stop_signal, opts, progress)
                    finally:
                        await _stop_process(proc)
    finally:
        if pcap is not None:
            pcap.close()
    if stop_signal:  # we were asked to stop, and stopped QEMU
        return 128 + stop_signal[0]
    if error is not None:
        raise error
    assert proc is not None and proc.returncode is not None
    status = proc.returncode
    if status < 0:
        status = 128 - status
    if status != 0:
        progress.write(f"netkit vm: QEMU exited with status {status}\n")
    return status


async def _supervise(proc: trio.Process, watch: _ConnectWatch, signals, stop_signal: list[int],
                     opts: VmOptions, progress: _Progress) -> VmError | None:
    """Wait for QEMU to connect, then to exit; a signal stops it. Returns the error, if any."""
    error: VmError | None = None
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            async for signum in signals:
                stop_signal.append(signum)
                log.info("received %s, stopping the VM", signal.Signals(signum).name)
                await _stop_process(proc)
                return

        nursery.start_soon(on_signal)
        try:
            await _wait_connected(proc, watch, opts.connect_timeout)
        except VmError as e:
            progress.write("failed\n")
            error = e
        else:
            progress.write(f"connected ({watch.link_name}); booting\n")
            await proc.wait()
        nursery.cancel_scope.cancel()
    return error


# ----------------------------------------------------------------------------- CLI
def add_vm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("virtual machine")
    g.add_argument("--kernel", metavar="FILE", help="kernel to boot (QEMU -kernel); without it, "
                   "QEMU boots from the first --disk")
    g.add_argument("--initrd", metavar="FILE", help="initramfs (QEMU -initrd)")
    g.add_argument("--append", default="", metavar="ARGS",
                   help=f"kernel command line, after {DEFAULT_APPEND!r}")
    g.add_argument("--memory", "-m", default="512M", metavar="SIZE", help="guest memory (default 512M)")
    g.add_argument("--cpus", type=int, default=1, metavar="N", help="virtual CPUs (default 1)")
    g.add_argument("--disk", action="append", default=[], metavar="FILE",
                   help="a virtio disk (raw or qcow2; repeatable)")
    g.add_argument("--share", action="append", default=[], metavar="NAME=PATH[:ro][:owners]",
                   help="export host directory PATH to the guest over 9P as NAME "
                        "(mount -t 9p -o trans=tcp,port=564,aname=NAME GATEWAY DIR); :ro refuses every "
                        "change, :owners lets the guest chown (never setuid/setgid bits or device nodes)")
    g.add_argument("--mac", metavar="MAC", help="the guest NIC's MAC address (default: QEMU's)")
    g.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="KVM or software emulation (default auto: KVM when /dev/kvm is usable)")
    g.add_argument("--qemu", default="qemu-system-x86_64", metavar="PROGRAM",
                   help="the QEMU binary (default qemu-system-x86_64)")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="SEC",
                   help="how long QEMU has to connect to the switch (default 10)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    p.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- QEMU ARGS",
                   help="extra arguments passed to QEMU as they are")


def vm_options_from_args(args: argparse.Namespace) -> VmOptions:
    extra = list(args.qemu_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if not args.kernel and not args.disk:
        raise VmError("give --kernel (and usually --initrd), or a bootable --disk")
    if args.initrd and not args.kernel:
        raise VmError("--initrd: needs --kernel")
    if args.append and not args.kernel:
        raise VmError("--append: needs --kernel")
    if args.cpus < 1:
        raise VmError("--cpus: must be at least 1")
    if args.connect_timeout <= 0:
        raise VmError("--connect-timeout: must be positive")
    mac = None
    if args.mac:
        try:
            raw = parse_mac(args.mac)
        except ConfigError as e:
            raise VmError(f"--mac: {e}") from None
        if raw[0] & 1:
            raise VmError("--mac: must be a unicast MAC")
        mac = ":".join(f"{b:02x}" for b in raw)
    return VmOptions(
        kernel=args.kernel, initrd=args.initrd, append=args.append, memory=args.memory, cpus=args.cpus,
        disks=list(args.disk), shares=[parse_share(s) for s in args.share], accel=args.accel,
        qemu=args.qemu, mac=mac, extra=extra, connect_timeout=args.connect_timeout,
        progress=not args.quiet)


def vm_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``netkit vm`` subcommand (parser built by ``netkit.cli.vm_parser``)."""
    from .cli import _setup_logging, build_config

    try:
        config = build_config(args)
    except ConfigError as e:
        parser.error(str(e))
    try:
        opts = vm_options_from_args(args)
    except VmError as e:
        parser.error(str(e))
    _setup_logging(config.log_level if args.log_level else "warning")
    try:
        return trio.run(functools.partial(run_vm, config, opts, pcap_path=args.pcap))
    except VmError as e:
        print(f"netkit vm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
