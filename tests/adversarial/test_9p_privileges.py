"""Issue 12, attack 3: gain host privileges through 9P.

netkit usually runs as root, so the 9P server's file operations carry root's
CAP_FSETID, CAP_CHOWN, CAP_MKNOD and CAP_FOWNER. Before the fix a guest made
``-rwsr-xr-x root`` files in its share (Tlcreate, then Tsetattr(mode=0o104755)) that
gave euid 0 to any host user who ran them, chowned files to any uid, made set-group-ID
directories, wrote into a host's set-user-ID program without clearing the bit, and
hard-linked it elsewhere in the share.

Every attack here is a hostile guest on the switch (a fake guest over the in-memory
link, leased by DHCP) speaking 9P with netkit's scripted client over TCP to the
gateway's port 564, the path a guest kernel's v9fs takes. Each test asserts what the
host file system holds afterwards with ``os.stat``, that the defence counter moved, and
that another guest still reads and writes its own share.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections import Counter

import pytest
import trio

from netkit import Config
from netkit.config import Share
from netkit.files import Client9P, RemoteError
from netkit.runtime import NINEP_PORT
from netkit.testing.privileged import privileged_required

from .conftest import LOOPBACK_ONLY

ROOT = 1
RDONLY, WRONLY, RDWR, CREAT, EXCL, TRUNC = 0, 1, 2, 0o100, 0o200, 0o1000
MODE, UID, GID, SIZE = 0x1, 0x2, 0x4, 0x8
KEEP = 0xFFFFFFFF  # "no change" for a uid or gid in Tsetattr
SETID = stat.S_ISUID | stat.S_ISGID
NOTHING = dict(mode=0, uid=KEEP, gid=KEEP, size=0, atime_sec=0, atime_nsec=0, mtime_sec=0, mtime_nsec=0)
#: A guest-chosen uid and gid that exist on no host.
STRANGER = 1234
#: security.capability, VFS_CAP_REVISION_2 with CAP_SETUID permitted and effective.
CAP_SETUID_XATTR = struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)


@pytest.fixture(autouse=True)
def as_root():
    """The attack is root's privileges leaking: without root netkit has none to leak
    (and the test could not make a set-user-ID root file to attack)."""
    if os.geteuid() != 0:
        if privileged_required():
            pytest.fail("needs root (NETKIT_REQUIRE_PRIVILEGED=1 forbids skipping)")
        pytest.skip("needs root: the attack is netkit's root privileges passing to a guest")


@pytest.fixture
def dirs(tmp_path):
    out = {}
    for name in ("plain", "owned", "victim"):
        d = tmp_path / name
        d.mkdir()
        (d / "hello.txt").write_text("hello\n")
        out[name] = d
    # One that any host user can reach (pytest's tmp_path is root's alone), to run a
    # program from it as nobody.
    world = tempfile.mkdtemp(prefix="netkit-9p-")
    os.chmod(world, 0o755)
    out["world"] = type(tmp_path)(world)
    yield out
    shutil.rmtree(world)


@pytest.fixture
def netkit_config(dirs) -> Config:
    return Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY,
                  shares=(Share("plain", str(dirs["plain"])),
                          Share("owned", str(dirs["owned"]), owners=True),
                          Share("victim", str(dirs["victim"])),
                          Share("world", str(dirs["world"]))))


@pytest.fixture
async def ninep_stats(netkit_switch) -> Counter:
    """The counters of the gateway's 9P service (also in ``netkit stats`` and /metrics)."""
    return netkit_switch.files.stats


@pytest.fixture
def mount(netkit_switch, ninep_stats, hostile_factory, victim_factory):
    """``await mount(aname, guest=None, n_uname=0)``: a 9P session to the gateway from a
    leased guest (a new hostile one by default), attached to ``aname`` as fid 1."""
    async def connect(aname: str, guest=None, n_uname: int = 0) -> Client9P:
        if guest is None:
            guest = await hostile_factory(lease=True)
        stream = await guest.open_tcp_stream(netkit_switch.config.gateway_ip, NINEP_PORT)
        client = Client9P(stream)
        await client.version(65536)
        await client.attach(ROOT, aname, n_uname=n_uname)
        return client

    return connect


async def errno_of(call) -> int:
    with pytest.raises(RemoteError) as e:
        await call
    return e.value.errno


async def assert_others_unaffected(mount, victim_factory, victim_dir) -> None:
    """Another guest still reads and writes its own share through the same service."""
    victim = await victim_factory()
    c = await mount("victim", victim)
    await c.walk(ROOT, 2, "hello.txt")
    await c.call("Tlopen", fid=2, flags=RDONLY)
    assert await c.read_all(2) == b"hello\n"
    await c.walk(ROOT, 3)
    await c.call("Tlcreate", fid=3, name="from-victim", flags=WRONLY | CREAT | EXCL, mode=0o644, gid=0)
    await c.call("Twrite", fid=3, offset=0, data=b"still here")
    assert (victim_dir / "from-victim").read_bytes() == b"still here"
    await c.aclose()


def setid_of(path) -> int:
    return os.lstat(path).st_mode & SETID


# ----------------------------------------------------------------------------- set-ID bits

async def test_guest_program_run_by_nobody_on_the_host_is_not_root(mount, ninep_stats, dirs):
    """The attack end to end: the guest copies id(1) into the share and makes it
    set-user-ID; a host user (nobody) runs it. Before: euid 0."""
    id_path = shutil.which("id")
    if id_path is None:
        pytest.skip("no id(1) on this host")
    with open(id_path, "rb") as f:
        program = f.read()
    c = await mount("world")
    await c.walk(ROOT, 2)
    await c.call("Tlcreate", fid=2, name="id", flags=RDWR | CREAT | EXCL, mode=0o755, gid=0)
    for offset in range(0, len(program), 32768):
        await c.call("Twrite", fid=2, offset=offset, data=program[offset:offset + 32768])
    await c.call("Tsetattr", fid=2, valid=MODE, **{**NOTHING, "mode": 0o104755})
    await c.call("Tclunk", fid=2)
    nobody = 65534
    run = await trio.to_thread.run_sync(lambda: subprocess.run(
        [str(dirs["world"] / "id"), "-u"], capture_output=True, text=True, timeout=30,
        user=nobody, group=nobody, extra_groups=[]))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(nobody)
    assert ninep_stats["setid_stripped"] == 1


async def test_create_then_chmod_setuid_leaves_no_setid_file(mount, ninep_stats, dirs, victim_factory):
    """The reported attack: Tlcreate, write a program, Tsetattr(mode=0o104755)."""
    c = await mount("plain")
    await c.walk(ROOT, 2)
    await c.call("Tlcreate", fid=2, name="rootshell", flags=RDWR | CREAT | EXCL, mode=0o100755, gid=0)
    await c.call("Twrite", fid=2, offset=0, data=b"#!/bin/sh\nid -u\n")
    await c.call("Tsetattr", fid=2, valid=MODE, **{**NOTHING, "mode": 0o104755})
    st = os.lstat(dirs["plain"] / "rootshell")
    assert st.st_uid == 0 and st.st_mode & SETID == 0
    assert stat.S_IMODE(st.st_mode) == 0o755  # the rest of the chmod applied
    # created with the bits already set, and chmod'ed with set-group-ID (and sticky, which is harmless)
    await c.walk(ROOT, 3)
    await c.call("Tlcreate", fid=3, name="born-setid", flags=RDWR | CREAT | EXCL, mode=0o106755, gid=0)
    assert stat.S_IMODE(os.lstat(dirs["plain"] / "born-setid").st_mode) == 0o755
    await c.call("Tsetattr", fid=3, valid=MODE, **{**NOTHING, "mode": 0o3755})
    assert stat.S_IMODE(os.lstat(dirs["plain"] / "born-setid").st_mode) == 0o1755
    # the guest sees what the host holds
    assert (await c.call("Tgetattr", fid=3, request_mask=0x7FF))["mode"] & SETID == 0
    assert ninep_stats["setid_stripped"] == 3
    await assert_others_unaffected(mount, victim_factory, dirs["victim"])


async def test_mkdir_and_mknod_never_set_setid(mount, ninep_stats, dirs, victim_factory):
    share = dirs["plain"]
    c = await mount("plain")
    await c.call("Tmkdir", dfid=ROOT, name="team", mode=0o2775, gid=0)
    assert stat.S_IMODE(os.lstat(share / "team").st_mode) == 0o775
    # Linux hands a set-group-ID parent's bit on to new directories; not from a guest
    os.mkdir(share / "host-sgid")
    os.chmod(share / "host-sgid", 0o2775)
    await c.walk(ROOT, 2, "host-sgid")
    await c.call("Tmkdir", dfid=2, name="inner", mode=0o755, gid=0)
    assert setid_of(share / "host-sgid" / "inner") == 0
    await c.call("Tlcreate", fid=2, name="f", flags=RDWR | CREAT | EXCL, mode=0o2755, gid=0)
    assert setid_of(share / "host-sgid" / "f") == 0
    await c.call("Tmknod", dfid=ROOT, name="reg", mode=stat.S_IFREG | 0o4755, major=0, minor=0, gid=0)
    await c.call("Tmknod", dfid=ROOT, name="fifo", mode=stat.S_IFIFO | 0o6666, major=0, minor=0, gid=0)
    assert setid_of(share / "reg") == 0 and stat.S_IMODE(os.lstat(share / "reg").st_mode) == 0o755
    assert stat.S_ISFIFO(os.lstat(share / "fifo").st_mode) and setid_of(share / "fifo") == 0
    assert ninep_stats["setid_stripped"] == 4
    await assert_others_unaffected(mount, victim_factory, dirs["victim"])


@pytest.mark.parametrize("how", ["Twrite", "Tlopen-trunc", "Tlcreate-trunc", "Tsetattr-size"])
async def test_changing_a_host_setuid_file_clears_its_bits(mount, ninep_stats, dirs, victim_factory, how):
    """A set-user-ID root program the host keeps in a writable share: the guest replaces
    its contents. The kernel clears the bits for a writer without CAP_FSETID; netkit as
    root must do it itself, before the contents change."""
    share = dirs["plain"]
    target = share / "host-tool"
    target.write_bytes(b"\x7fELF original")
    os.chmod(target, 0o6755)
    c = await mount("plain")
    if how == "Twrite":
        await c.walk(ROOT, 2, "host-tool")
        await c.call("Tlopen", fid=2, flags=WRONLY)
        await c.call("Twrite", fid=2, offset=0, data=b"#!/bin/sh\nexec sh\n")
    elif how == "Tlopen-trunc":
        await c.walk(ROOT, 2, "host-tool")
        await c.call("Tlopen", fid=2, flags=WRONLY | TRUNC)
    elif how == "Tlcreate-trunc":
        await c.walk(ROOT, 2)
        await c.call("Tlcreate", fid=2, name="host-tool", flags=WRONLY | CREAT | TRUNC, mode=0o755, gid=0)
    else:
        await c.walk(ROOT, 2, "host-tool")
        await c.call("Tsetattr", fid=2, valid=SIZE, **{**NOTHING, "size": 3})
    st = os.lstat(target)
    assert st.st_mode & SETID == 0 and stat.S_IMODE(st.st_mode) == 0o755
    assert ninep_stats["setid_stripped"] == 1
    await assert_others_unaffected(mount, victim_factory, dirs["victim"])


async def test_bits_set_by_the_host_after_the_open_are_cleared_on_the_next_write(mount, ninep_stats, dirs):
    share = dirs["plain"]
    c = await mount("plain")
    await c.walk(ROOT, 2)
    await c.call("Tlcreate", fid=2, name="later", flags=RDWR | CREAT | EXCL, mode=0o755, gid=0)
    os.chmod(share / "later", 0o4755)  # the host, while the guest holds the file open
    await c.call("Twrite", fid=2, offset=0, data=b"payload")
    assert setid_of(share / "later") == 0
    assert ninep_stats["setid_stripped"] == 1


async def test_reading_a_setuid_file_keeps_its_bits(mount, ninep_stats, dirs):
    """Only changes clear the bits: a guest reading the host's program changes nothing."""
    target = dirs["plain"] / "host-tool"
    target.write_bytes(b"tool")
    os.chmod(target, 0o4755)
    c = await mount("plain")
    await c.walk(ROOT, 2, "host-tool")
    await c.call("Tlopen", fid=2, flags=RDONLY)
    assert await c.read_all(2) == b"tool"
    # a write on a fid opened for reading fails before anything is touched
    assert await errno_of(c.call("Twrite", fid=2, offset=0, data=b"x")) == errno.EBADF
    assert target.read_bytes() == b"tool"
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o4755
    assert ninep_stats["setid_stripped"] == 0


# ----------------------------------------------------------------------------- ownership

@pytest.mark.parametrize("valid,uid,gid", [(UID, 0, KEEP), (UID, STRANGER, KEEP), (GID, KEEP, STRANGER),
                                           (UID | GID, STRANGER, STRANGER)])
async def test_chown_is_refused_without_the_owners_option(mount, ninep_stats, dirs, victim_factory,
                                                          valid, uid, gid):
    target = dirs["plain"] / "mine"
    target.write_text("x")
    os.chown(target, 4321, 4321)  # a host user's file, so chown to 0 would be a change
    c = await mount("plain")
    await c.walk(ROOT, 2, "mine")
    assert await errno_of(c.call("Tsetattr", fid=2, valid=valid | MODE,
                                 **{**NOTHING, "mode": 0o600, "uid": uid, "gid": gid})) == errno.EPERM
    st = os.lstat(target)
    assert (st.st_uid, st.st_gid) == (4321, 4321)
    assert stat.S_IMODE(st.st_mode) == 0o644  # refused as a whole: the chmod did not apply either
    # a chown that changes nothing is not a privilege (cp -p, tar as root do it)
    await c.call("Tsetattr", fid=2, valid=UID | GID, **{**NOTHING, "uid": 4321, "gid": 4321})
    assert ninep_stats["privilege_refused"] == 1
    await assert_others_unaffected(mount, victim_factory, dirs["victim"])


async def test_chown_with_the_owners_option_still_never_sets_setid(mount, ninep_stats, dirs, victim_factory):
    share = dirs["owned"]
    c = await mount("owned")
    await c.walk(ROOT, 2)
    await c.call("Tlcreate", fid=2, name="f", flags=RDWR | CREAT | EXCL, mode=0o755, gid=0)
    for uid in (STRANGER, 0):
        await c.call("Tsetattr", fid=2, valid=UID | GID, **{**NOTHING, "uid": uid, "gid": uid})
        assert (os.lstat(share / "f").st_uid, os.lstat(share / "f").st_gid) == (uid, uid)
    # owned by root now: still no set-user-ID root program
    await c.call("Tsetattr", fid=2, valid=MODE, **{**NOTHING, "mode": 0o104755})
    await c.call("Tsetattr", fid=2, valid=MODE | UID, **{**NOTHING, "mode": 0o6755, "uid": 0})
    assert setid_of(share / "f") == 0 and os.lstat(share / "f").st_uid == 0
    # a host set-user-ID file given to root by the guest loses its bits too
    (share / "host-tool").write_text("tool")
    os.chown(share / "host-tool", 4321, 4321)
    os.chmod(share / "host-tool", 0o4755)
    await c.walk(ROOT, 3, "host-tool")
    await c.call("Tsetattr", fid=3, valid=UID, **{**NOTHING, "uid": 0})
    assert os.lstat(share / "host-tool").st_uid == 0 and setid_of(share / "host-tool") == 0
    # and devices stay refused
    assert await errno_of(c.call("Tmknod", dfid=ROOT, name="sda", mode=stat.S_IFBLK | 0o666,
                                 major=8, minor=0, gid=0)) == errno.EPERM
    assert not os.path.lexists(share / "sda")
    # the two chmods; the chown's clearing was the kernel's own (as it does for any chown)
    assert ninep_stats["privilege_refused"] == 1 and ninep_stats["setid_stripped"] == 2
    await assert_others_unaffected(mount, victim_factory, dirs["victim"])


async def test_group_of_new_files_is_the_guests_only_with_the_owners_option(mount, dirs):
    """Tlcreate/Tmkdir/Tmknod/Tsymlink carry a gid: ignored on a plain share (new
    objects are netkit's own), honoured with the owners option (with the uid the guest
    attached as)."""
    plain, owned = dirs["plain"], dirs["owned"]
    c = await mount("plain", n_uname=STRANGER)
    await c.walk(ROOT, 2)
    await c.call("Tlcreate", fid=2, name="f", flags=RDWR | CREAT | EXCL, mode=0o644, gid=STRANGER)
    await c.call("Tmkdir", dfid=ROOT, name="d", mode=0o755, gid=STRANGER)
    await c.call("Tmknod", dfid=ROOT, name="p", mode=stat.S_IFIFO | 0o644, major=0, minor=0, gid=STRANGER)
    await c.call("Tsymlink", fid=ROOT, name="l", symtgt="f", gid=STRANGER)
    for name in ("f", "d", "p", "l"):
        st = os.lstat(plain / name)
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()), name
    c = await mount("owned", n_uname=STRANGER)
    await c.walk(ROOT, 2)
    await c.call("Tlcreate", fid=2, name="f", flags=RDWR | CREAT | EXCL, mode=0o2755, gid=STRANGER + 1)
    await c.call("Tmkdir", dfid=ROOT, name="d", mode=0o2775, gid=STRANGER + 1)
    await c.call("Tmknod", dfid=ROOT, name="p", mode=stat.S_IFIFO | 0o644, major=0, minor=0, gid=STRANGER + 1)
    await c.call("Tsymlink", fid=ROOT, name="l", symtgt="f", gid=STRANGER + 1)
    for name in ("f", "d", "p", "l"):
        st = os.lstat(owned / name)
        assert (st.st_uid, st.st_gid) == (STRANGER, STRANGER + 1), name
        assert st.st_mode & SETID == 0, name


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize("aname", ["plain", "owned"])
@pytest.mark.parametrize("kind,major,minor", [(stat.S_IFBLK, 8, 0), (stat.S_IFCHR, 1, 1)])  # sda, /dev/mem
async def test_device_nodes_are_refused(mount, ninep_stats, dirs, victim_factory, aname, kind, major, minor):
    c = await mount(aname)
    assert await errno_of(c.call("Tmknod", dfid=ROOT, name="dev", mode=kind | 0o666,
                                 major=major, minor=minor, gid=0)) == errno.EPERM
    assert not os.path.lexists(dirs[aname] / "dev")
    assert ninep_stats["privilege_refused"] == 1
    await assert_others_unaffected(mount, victim_factory, dirs["victim"])


# ----------------------------------------------------------------------------- links, renames

async def test_privileged_files_are_never_hard_linked(mount, ninep_stats, dirs, victim_factory):
    """A second name keeps a host's set-user-ID program (or file with capabilities, or
    device node) alive after the host upgrades or deletes it (protected_hardlinks)."""
    share = dirs["plain"]
    (share / "suid").write_text("tool")
    os.chmod(share / "suid", 0o4755)
    (share / "sgid").write_text("tool")
    os.chmod(share / "sgid", 0o2755)
    (share / "caps").write_text("tool")
    os.setxattr(share / "caps", "security.capability", CAP_SETUID_XATTR)
    os.mknod(share / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    c = await mount("plain")
    for fid, name in enumerate(("suid", "sgid", "caps", "null"), start=2):
        await c.walk(ROOT, fid, name)
        assert await errno_of(c.call("Tlink", dfid=ROOT, fid=fid, name=name + "-again")) == errno.EPERM, name
        assert not os.path.lexists(share / (name + "-again")) and os.lstat(share / name).st_nlink == 1
    # an ordinary file links as before
    await c.walk(ROOT, 9, "hello.txt")
    await c.call("Tlink", dfid=ROOT, fid=9, name="hello-again")
    assert os.lstat(share / "hello.txt").st_nlink == 2
    assert ninep_stats["privilege_refused"] == 4
    await assert_others_unaffected(mount, victim_factory, dirs["victim"])


async def test_privileged_files_never_move_between_shares(mount, dirs):
    """Links and renames stay within one share: nothing comes in from, or goes out to,
    another share (or anywhere else: names never hold '/' or '..')."""
    (dirs["plain"] / "suid").write_text("tool")
    os.chmod(dirs["plain"] / "suid", 0o4755)
    c = await mount("plain")
    await c.attach(2, "owned")
    await c.walk(ROOT, 3, "suid")
    assert await errno_of(c.call("Tlink", dfid=2, fid=3, name="suid")) == errno.EXDEV
    assert await errno_of(c.call("Trename", fid=3, dfid=2, name="suid")) == errno.EXDEV
    assert await errno_of(c.call("Trenameat", olddirfid=ROOT, oldname="suid", newdirfid=2,
                                 newname="suid")) == errno.EXDEV
    assert await errno_of(c.call("Trenameat", olddirfid=ROOT, oldname="suid", newdirfid=ROOT,
                                 newname="../suid")) == errno.EINVAL
    assert not os.path.lexists(dirs["owned"] / "suid")
    assert os.lstat(dirs["plain"] / "suid").st_nlink == 1


# ----------------------------------------------------------------------------- xattrs

@pytest.mark.parametrize("aname", ["plain", "owned"])
async def test_capability_xattr_is_refused(mount, ninep_stats, dirs, victim_factory, aname):
    """security.capability would make the file a CAP_SETUID program: no xattr is ever
    written (trusted.*, system.posix_acl_* and user.* neither)."""
    share = dirs[aname]
    c = await mount(aname)
    await c.walk(ROOT, 2)
    await c.call("Tlcreate", fid=2, name="prog", flags=RDWR | CREAT | EXCL, mode=0o755, gid=0)
    for name in ("security.capability", "trusted.overlay.opaque", "system.posix_acl_access", "user.x"):
        await c.walk(ROOT, 3, "prog")
        assert await errno_of(c.call("Txattrcreate", fid=3, name=name, attr_size=len(CAP_SETUID_XATTR),
                                     flags=0)) == errno.EOPNOTSUPP
        # had it been accepted, the value would come as a write on that fid
        assert await errno_of(c.call("Twrite", fid=3, offset=0, data=CAP_SETUID_XATTR)) == errno.EBADF
        await c.call("Tclunk", fid=3)
    assert os.listxattr(share / "prog") == []
    assert ninep_stats["xattr_refused"] == 4
    await assert_others_unaffected(mount, victim_factory, dirs["victim"])


async def test_writing_a_file_with_capabilities_drops_them(mount, dirs):
    """The host's file with capabilities in a writable share: the kernel drops
    security.capability on any write, even root's (unlike set-ID bits)."""
    target = dirs["plain"] / "capped"
    target.write_bytes(b"tool")
    os.setxattr(target, "security.capability", CAP_SETUID_XATTR)
    c = await mount("plain")
    await c.walk(ROOT, 2, "capped")
    await c.call("Tlopen", fid=2, flags=WRONLY)
    await c.call("Twrite", fid=2, offset=0, data=b"evil")
    assert "security.capability" not in os.listxattr(target)


async def test_switch_survives_every_attack_in_a_row(mount, netkit_switch, dirs, victim_factory):
    """All of it from one connection, pipelined with the victim's traffic: the victim's
    share is untouched and the service still answers both."""
    c = await mount("plain")
    await c.walk(ROOT, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(assert_others_unaffected, mount, victim_factory, dirs["victim"])
        await c.call("Tlcreate", fid=2, name="x", flags=RDWR | CREAT | EXCL, mode=0o6777, gid=0)
        await c.call("Tsetattr", fid=2, valid=MODE, **{**NOTHING, "mode": 0o6777})
        for call in (c.call("Tsetattr", fid=2, valid=UID, **{**NOTHING, "uid": STRANGER}),
                     c.call("Tmknod", dfid=ROOT, name="mem", mode=stat.S_IFCHR | 0o666, major=1, minor=1, gid=0)):
            assert await errno_of(call) == errno.EPERM
    assert setid_of(dirs["plain"] / "x") == 0 and os.lstat(dirs["plain"] / "x").st_uid == 0
    assert sorted(os.listdir(dirs["victim"])) == ["from-victim", "hello.txt"]
    assert netkit_switch.statistics()["ports"] >= 2
