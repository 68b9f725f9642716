"""The Linux kernel's own 9P client (v9fs) mounts a share from serve_9p and uses it.

Two ways to get a real v9fs client:

- the host kernel, mounting ``trans=tcp`` from a trio listener on 127.0.0.1 (needs root
  and a kernel with 9P; many sandboxes' kernels have none, and then the test skips,
  even with NETKIT_REQUIRE_PRIVILEGED, because nothing can be installed to fix it);
- a QEMU guest (the Debian kernel and busybox initramfs of tests/guest/build.sh, with
  the 9p modules) on QEMU's user-mode network, where the guest's 10.0.2.2 is the host's
  127.0.0.1. The guest boots our own /init (appended to the initramfs as a second cpio
  archive), mounts the share from 10.0.2.2:PORT and runs the same shell script.

The script exercises ls, cat, stat, write, append, mkdir, mv, ln -s, readlink, ln,
chmod, truncate, touch -d, big files, a large directory, mkfifo, rm/rmdir, df and a
read-only share; then the host checks what landed on disk.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import pytest
import trio

from netkit.config import Share
from netkit.files import serve_9p
from netkit.testing.privileged import privileged_required, require_privileged, require_tool

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tests" / "guest" / "build.sh"
GUEST_DIR = Path(os.environ.get("NETKIT_GUEST_DIR", ROOT / "build" / "guest"))
STEP_RE = re.compile(r"NK9P (\S+) (ok|fail) ?(.*?)\r?$", re.M)

# The checks, for busybox sh (guest) and dash/bash (host). $1: the share's mount point,
# $2: a mount point of the read-only share ("" to skip).
OPS = r'''
M=$1 RO=$2
one() { tr '\n' ' ' | sed 's/ *$//' | cut -c1-300; }
ok() { echo "NK9P $STEP ok $*"; }
fail() { echo "NK9P $STEP fail $*"; }
run() { STEP=$1; shift; if out=$("$@" 2>&1); then ok "$(echo "$out" | one)"; else fail "exit $?: $(echo "$out" | one)"; fi; }
expect() { STEP=$1; want=$2; shift 2; out=$("$@" 2>&1 | one); if [ "$out" = "$want" ]; then ok "$out"; else fail "got [$out] want [$want]"; fi; }

expect ls "empty hello.txt sub" sh -c "ls '$M'"
expect cat "hello, world" cat "$M/hello.txt"
expect stat "13 644 regular file" stat -c '%s %a %F' "$M/hello.txt"
expect stat-dir "directory" stat -c '%F' "$M/sub"
run write sh -c "echo written > '$M/new.txt'"
run append sh -c "echo more >> '$M/new.txt'"
expect read-back "written more" cat "$M/new.txt"
run mkdir mkdir "$M/d"
run mkdir-p mkdir -p "$M/d/e/f"
run mv mv "$M/new.txt" "$M/d/moved.txt"
expect mv-gone "gone" sh -c "test -e '$M/new.txt' || echo gone"
run symlink ln -s moved.txt "$M/d/link"
expect readlink "moved.txt" readlink "$M/d/link"
expect follow-link "written more" cat "$M/d/link"
run hardlink ln "$M/d/moved.txt" "$M/d/hard"
expect nlink "2" stat -c %h "$M/d/moved.txt"
run chmod chmod 640 "$M/d/moved.txt"
expect chmod-seen "640" stat -c %a "$M/d/moved.txt"
run truncate truncate -s 3 "$M/d/moved.txt"
expect truncated "wri" sh -c "cat '$M/d/moved.txt'; echo"
run touch touch -d "2001-02-03 04:05:06" "$M/d/moved.txt"
expect mtime "981173106" stat -c %Y "$M/d/moved.txt"
run big sh -c "dd if=/dev/urandom of=/tmp/big bs=65536 count=40 2>/dev/null && cp /tmp/big '$M/big' && cmp /tmp/big '$M/big' && md5sum /tmp/big | cut -d' ' -f1"
run ls-l ls -la "$M" "$M/d"
run mvdir mv "$M/d" "$M/sub/d2"
expect mvdir-read "wri" sh -c "cat '$M/sub/d2/moved.txt'; echo"
run mvdir-back mv "$M/sub/d2" "$M/d"
expect open-then-rename "inner" sh -c "exec 3<'$M/sub/inner.txt'; mv '$M/sub/inner.txt' '$M/sub/renamed.txt' && cat <&3"
expect open-then-unlink "wri" sh -c "exec 3<'$M/d/hard'; rm '$M/d/hard' && cat <&3; echo"
expect nlink-after "1" stat -c %h "$M/d/moved.txt"
run many sh -c "i=0; while [ \$i -lt 300 ]; do : > '$M/d/e/f'\$i || exit 1; i=\$((i+1)); done"
expect many-listed "301" sh -c "ls '$M/d/e' | wc -l"
run mkfifo mkfifo "$M/fifo"
expect fifo-type "fifo" stat -c %F "$M/fifo"
run rm rm "$M/hello.txt"
run rm-r rm -r "$M/d/e"
run rmdir rmdir "$M/empty"
expect ls-after "big d fifo sub" sh -c "ls '$M'"
run df df "$M"
if [ -n "$RO" ]; then
  expect ro-read "inner" cat "$RO/sub/renamed.txt"
  expect ro-write "refused" sh -c "if (echo x > '$RO/x') 2>/tmp/ro-err; then echo written; else echo refused; fi"
  expect ro-erofs "Read-only file system" grep -o "Read-only file system" /tmp/ro-err
  expect ro-mkdir "refused" sh -c "mkdir '$RO/x' 2>/dev/null && echo made || echo refused"
fi
sync
echo NK9P-DONE
'''

GUEST_INIT = r'''#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox --install -s /bin 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
dmesg -n 1
PORT= 
for arg in $(cat /proc/cmdline); do case "$arg" in nk9p.port=*) PORT=${arg#*=} ;; esac; done
for m in $(cat /lib/modules/load-order); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i + 1)); done
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
mkdir -p /mnt/s /mnt/ro
if mount -t 9p -o trans=tcp,port=$PORT,version=9p2000.L,aname=src 10.0.2.2 /mnt/s 2>/tmp/err \
   && mount -t 9p -o trans=tcp,port=$PORT,version=9p2000.L,aname=ro 10.0.2.2 /mnt/ro 2>>/tmp/err; then
  echo "NK9P mount ok $(uname -r)"
  sh /ops.sh /mnt/s /mnt/ro
  umount /mnt/s && umount /mnt/ro && echo "NK9P umount ok"
else
  echo "NK9P mount fail $(cat /tmp/err | tr '\n' ' ')"
  echo NK9P-DONE
fi
poweroff -f
'''


def _cpio_newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (the initramfs format) of (name, mode, data)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate([*files, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        pad()
        out += data
        pad()
    return bytes(out)


def _populate(share: Path) -> None:
    (share / "sub").mkdir(parents=True)
    (share / "empty").mkdir()
    (share / "hello.txt").write_text("hello, world\n")
    (share / "sub" / "inner.txt").write_text("inner\n")
    os.chmod(share / "hello.txt", 0o644)


def _steps(console: str) -> dict[str, tuple[str, str]]:
    return {m.group(1): (m.group(2), m.group(3)) for m in STEP_RE.finditer(console)}


def _check(console: str, share: Path, guest: bool) -> None:
    steps = _steps(console)
    assert "NK9P-DONE" in console, console[-4000:]
    failed = {k: v for k, v in steps.items() if v[0] != "ok"}
    assert not failed, f"failed steps: {failed}\n{console[-4000:]}"
    for must in ("ls", "cat", "write", "symlink", "truncate", "big", "rm-r", "df"):
        assert must in steps, console[-4000:]
    if guest:
        assert "ro-write" in steps
    # what the guest did, as the host sees it
    moved = share / "d" / "moved.txt"
    assert moved.read_bytes() == b"wri"
    assert moved.stat().st_mode & 0o777 == 0o640
    assert int(moved.stat().st_mtime) == 981173106
    assert os.readlink(share / "d" / "link") == "moved.txt"
    assert not (share / "d" / "hard").exists() and moved.stat().st_nlink == 1
    assert (share / "sub" / "renamed.txt").read_text() == "inner\n"
    assert hashlib.md5((share / "big").read_bytes()).hexdigest() == steps["big"][1].split()[-1]
    assert not (share / "hello.txt").exists() and not (share / "empty").exists()
    assert sorted(os.listdir(share)) == ["big", "d", "fifo", "sub"]


async def _serve(nursery: trio.Nursery, shares: dict[str, Share]) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        await serve_9p(stream, shares)

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


@pytest.fixture
def host_9p() -> None:
    """Skips (in a sync fixture, so the reason shows) unless the host kernel can mount 9p."""
    require_privileged()
    with open("/proc/filesystems") as f:
        if "9p" in f.read().split():
            return
    modprobe = shutil.which("modprobe")
    if modprobe is None or subprocess.run([modprobe, "9p"], capture_output=True).returncode != 0:
        # Not a missing tool that could be installed: the running kernel lacks 9P, so
        # this skips even under NETKIT_REQUIRE_PRIVILEGED.
        pytest.skip("the host kernel has no 9p filesystem (CONFIG_NET_9P off or module missing); "
                    "test_guest_kernel_mounts_share covers the kernel client in a QEMU guest")


@pytest.mark.privileged
async def test_host_kernel_mounts_share(tmp_path, host_9p):
    share = tmp_path / "share"
    _populate(share)
    mnt = Path(tempfile.mkdtemp(prefix="netkit-9p-mnt-"))
    ro_mnt = Path(tempfile.mkdtemp(prefix="netkit-9p-ro-"))
    shares = {"src": Share("src", str(share)), "ro": Share("ro", str(share), read_only=True)}
    mounted: list[Path] = []
    try:
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, shares)
            try:
                for aname, where in (("src", mnt), ("ro", ro_mnt)):
                    with trio.fail_after(30):
                        await trio.run_process(["mount", "-t", "9p", "-o",
                                                f"trans=tcp,port={port},version=9p2000.L,aname={aname}",
                                                "127.0.0.1", str(where)])
                    mounted.append(where)
                with trio.fail_after(120):
                    proc = await trio.run_process(["sh", "-c", OPS, "ops", str(mnt), str(ro_mnt)],
                                                  capture_stdout=True, capture_stderr=True, check=False)
            finally:
                with trio.CancelScope(shield=True):
                    for where in mounted:
                        with trio.move_on_after(30):
                            await trio.run_process(["umount", "-l", str(where)], check=False)
            nursery.cancel_scope.cancel()
    finally:
        for where in (mnt, ro_mnt):
            try:
                where.rmdir()
            except OSError:
                pass
    _check(proc.stdout.decode(errors="replace"), share, guest=True)


@pytest.fixture(scope="module")
def guest_image() -> tuple[Path, Path]:
    require_privileged()
    require_tool("qemu-system-x86_64")
    try:
        proc = subprocess.run([str(BUILD_SCRIPT), str(GUEST_DIR)], capture_output=True, text=True, timeout=900)
    except (subprocess.TimeoutExpired, OSError) as e:
        reason = f"cannot build the guest image (tests/guest/build.sh): {e}"
        pytest.fail(reason) if privileged_required() else pytest.skip(reason)
    if proc.returncode != 0:
        reason = f"cannot build the guest image (tests/guest/build.sh):\n{proc.stderr[-3000:]}"
        pytest.fail(reason) if privileged_required() else pytest.skip(reason)
    return GUEST_DIR / "vmlinuz", GUEST_DIR / "initramfs.gz"


@pytest.mark.privileged
async def test_guest_kernel_mounts_share(tmp_path, guest_image):
    from netkit.vm import choose_accel

    kernel, base_initrd = guest_image
    share = tmp_path / "share"
    _populate(share)
    initrd = tmp_path / "initrd.gz"
    extra = _cpio_newc([("nk9p-init", 0o100755, GUEST_INIT.encode()), ("ops.sh", 0o100644, OPS.encode())])
    initrd.write_bytes(base_initrd.read_bytes() + gzip.compress(extra))
    shares = {"src": Share("src", str(share)), "ro": Share("ro", str(share), read_only=True)}
    accel = choose_accel("auto")
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, shares)
        argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-no-reboot", "-accel", accel, "-m", "256",
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", f"console=ttyS0 rdinit=/nk9p-init panic=-1 nk9p.port={port}",
                "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
        if accel == "kvm":
            argv[argv.index("-m"):argv.index("-m")] = ["-cpu", "host"]
        with trio.fail_after(240):
            proc = await trio.run_process(argv, stdin=subprocess.DEVNULL, capture_stdout=True,
                                          capture_stderr=True, check=False)
        nursery.cancel_scope.cancel()
    console = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    steps = _steps(console)
    assert steps.get("mount", ("",))[0] == "ok", console[-4000:]
    _check(console, share, guest=True)
    assert steps.get("umount", ("",))[0] == "ok", console[-4000:]
