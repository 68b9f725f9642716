"""Nothing a 9P client sends reaches outside its share: `..`, symlinks (relative,
absolute, swapped in by the host mid-way), special files, and read-only shares."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from netkit.files import RemoteError
from netkit.files.protocol import QTDIR, QTSYMLINK

ROOT = 1
RDONLY, WRONLY, RDWR, CREAT, TRUNC = 0, 1, 2, 0o100, 0o1000
NOTHING = dict(mode=0, uid=0, gid=0, size=0, atime_sec=0, atime_nsec=0, mtime_sec=0, mtime_nsec=0)


def code(excinfo) -> int:
    return excinfo.value.errno


async def test_dotdot_is_clamped_at_the_share_root(client, share_dir):
    root_ino = os.stat(share_dir).st_ino
    qids = await client.walk(ROOT, 2, "..", "..", "..")
    assert [q.path for q in qids] == [root_ino] * 3 and all(q.type == QTDIR for q in qids)
    # ../outside/secret.txt would exist on the host, but .. from the root is the root
    qids = await client.walk(ROOT, 3, "..", "outside", "secret.txt")
    assert len(qids) == 1
    # sub/../.. is the root too
    qids = await client.walk(ROOT, 4, "sub", "..", "..", "hello.txt")
    assert len(qids) == 4
    await client.call("Tlopen", fid=4, flags=RDONLY)
    assert await client.read_all(4) == b"hello, world\n"


async def test_names_with_slashes_never_resolve(client):
    for names in (["sub/inner.txt"], ["../outside"], ["."], [""], ["sub", "/etc"]):
        with pytest.raises(RemoteError):
            qids = await client.walk(ROOT, 2, *names)
            assert len(qids) < len(names)  # partial walks are fine, complete ones are not
            raise RemoteError(errno.ENOENT)


async def test_create_names_are_plain(client):
    for op, fields in (("Tmkdir", dict(dfid=ROOT, mode=0o755, gid=0)),
                       ("Tsymlink", dict(fid=ROOT, symtgt="x", gid=0)),
                       ("Tmknod", dict(dfid=ROOT, mode=stat.S_IFIFO | 0o644, major=0, minor=0, gid=0))):
        for name in ("..", "../escape", "a/b", ".", ""):
            with pytest.raises(RemoteError) as e:
                await client.call(op, name=name, **fields)
            assert code(e) == errno.EINVAL, (op, name)
    with pytest.raises(RemoteError) as e:
        await client.call("Trenameat", olddirfid=ROOT, oldname="hello.txt", newdirfid=ROOT, newname="../escaped")
    assert code(e) == errno.EINVAL
    with pytest.raises(RemoteError) as e:
        await client.call("Tunlinkat", dirfid=ROOT, name="../outside/secret.txt", flags=0)
    assert code(e) == errno.EINVAL


@pytest.mark.parametrize("target", ["../outside", "OUTSIDE_ABSOLUTE", "/"])
async def test_symlinked_directory_out_of_the_share_is_not_followed(client, share_dir, outside_dir, target):
    target = str(outside_dir) if target == "OUTSIDE_ABSOLUTE" else target
    os.symlink(target, share_dir / "door")
    # the symlink itself is visible, as a symlink
    qids = await client.walk(ROOT, 2, "door")
    assert qids[0].type == QTSYMLINK
    assert (await client.call("Treadlink", fid=2))["target"] == target
    # but walking through it stops there
    qids = await client.walk(ROOT, 3, "door", "secret.txt")
    assert len(qids) == 1
    # opening it, as a file or a directory, fails
    for flags in (RDONLY, RDONLY | 0o200000):
        await client.walk(ROOT, 4, "door")
        with pytest.raises(RemoteError) as e:
            await client.call("Tlopen", fid=4, flags=flags)
        assert code(e) == errno.ELOOP
        await client.call("Tclunk", fid=4)
    # creating inside it fails (the host never resolves it as a directory)
    await client.walk(ROOT, 5, "door")
    for op, fields in (("Tmkdir", dict(dfid=5, name="x", mode=0o755, gid=0)),
                       ("Tlcreate", dict(fid=5, name="x", flags=RDWR | CREAT, mode=0o644, gid=0)),
                       ("Tunlinkat", dict(dirfid=5, name="secret.txt", flags=0))):
        with pytest.raises(RemoteError) as e:
            await client.call(op, **fields)
        assert code(e) == errno.ENOTDIR, op
    assert sorted(os.listdir(outside_dir)) == ["secret.txt"]


@pytest.mark.parametrize("absolute", [False, True])
async def test_symlinked_file_out_of_the_share_is_not_touched(client, share_dir, outside_dir, absolute):
    secret = outside_dir / "secret.txt"
    os.symlink(str(secret) if absolute else "../outside/secret.txt", share_dir / "leak")
    before = os.stat(secret)
    await client.walk(ROOT, 2, "leak")
    attrs = await client.call("Tgetattr", fid=2, request_mask=0x7FF)
    assert stat.S_ISLNK(attrs["mode"])  # the link, not the secret
    for flags in (RDONLY, RDWR, WRONLY | TRUNC):
        with pytest.raises(RemoteError) as e:
            await client.call("Tlopen", fid=2, flags=flags)
        assert code(e) == errno.ELOOP
    with pytest.raises(RemoteError) as e:  # chmod
        await client.call("Tsetattr", fid=2, **{**NOTHING, "mode": 0o777}, valid=0x1)
    assert code(e) == errno.EOPNOTSUPP
    with pytest.raises(RemoteError) as e:  # truncate
        await client.call("Tsetattr", fid=2, **NOTHING, valid=0x8)
    assert code(e) == errno.EINVAL
    # utimes applies to the link itself
    await client.call("Tsetattr", fid=2, **{**NOTHING, "mtime_sec": 1000}, valid=0x20 | 0x100)
    assert os.lstat(share_dir / "leak").st_mtime == 1000
    # Tlcreate over the link's name does not follow it
    await client.walk(ROOT, 3)
    with pytest.raises(RemoteError) as e:
        await client.call("Tlcreate", fid=3, name="leak", flags=WRONLY | CREAT | TRUNC, mode=0o644, gid=0)
    assert code(e) == errno.ELOOP
    # a hard link to the link is a link to the link
    await client.call("Tlink", dfid=ROOT, fid=2, name="hard")
    assert os.path.islink(share_dir / "hard")
    # the secret is untouched
    after = os.stat(secret)
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (before.st_mode, before.st_size, before.st_mtime_ns)
    assert secret.read_text() == "secret\n"


async def test_directory_swapped_for_symlink_after_walk(client, share_dir, outside_dir):
    """The host replaces a directory by a symlink out of the share between the guest's
    walk and its open: the open is resolved again, component by component, and fails."""
    await client.walk(ROOT, 2, "sub", "inner.txt")
    os.rename(share_dir / "sub", share_dir / "sub.old")
    (outside_dir / "inner.txt").write_text("outside\n")
    os.symlink(str(outside_dir), share_dir / "sub")
    with pytest.raises(RemoteError) as e:
        await client.call("Tlopen", fid=2, flags=RDONLY)
    assert code(e) == errno.ENOTDIR
    with pytest.raises(RemoteError) as e:
        await client.call("Tgetattr", fid=2, request_mask=0x7FF)
    assert code(e) == errno.ENOTDIR


async def test_special_files_are_never_opened(client, share_dir):
    os.mkfifo(share_dir / "fifo")
    await client.walk(ROOT, 2, "fifo")
    with pytest.raises(RemoteError) as e:  # would block a worker thread forever
        await client.call("Tlopen", fid=2, flags=RDONLY)
    assert code(e) == errno.ENXIO
    await client.walk(ROOT, 3)
    with pytest.raises(RemoteError) as e:
        await client.call("Tlcreate", fid=3, name="fifo", flags=WRONLY | CREAT, mode=0o644, gid=0)
    assert code(e) == errno.ENXIO
    if os.geteuid() == 0:
        os.mknod(share_dir / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        await client.walk(ROOT, 4, "null")
        with pytest.raises(RemoteError) as e:
            await client.call("Tlopen", fid=4, flags=RDWR)
        assert code(e) == errno.EACCES


async def test_read_only_share_refuses_every_write(ro_client, share_dir):
    c = ro_client
    before = {p: p.stat().st_mtime_ns for p in share_dir.rglob("*")}
    await c.walk(ROOT, 2, "hello.txt")
    await c.walk(ROOT, 3, "sub")
    await c.walk(ROOT, 4, "empty")
    attempts = [
        ("Tlcreate", dict(fid=3, name="new", flags=RDWR | CREAT, mode=0o644, gid=0)),
        ("Tmkdir", dict(dfid=ROOT, name="d", mode=0o755, gid=0)),
        ("Tsymlink", dict(fid=ROOT, name="s", symtgt="x", gid=0)),
        ("Tmknod", dict(dfid=ROOT, name="f", mode=stat.S_IFIFO | 0o644, major=0, minor=0, gid=0)),
        ("Tlink", dict(dfid=ROOT, fid=2, name="h")),
        ("Trename", dict(fid=2, dfid=ROOT, name="r")),
        ("Trenameat", dict(olddirfid=ROOT, oldname="hello.txt", newdirfid=ROOT, newname="r")),
        ("Tunlinkat", dict(dirfid=ROOT, name="hello.txt", flags=0)),
        ("Tunlinkat", dict(dirfid=ROOT, name="empty", flags=0x200)),
        ("Tsetattr", dict(fid=2, valid=0x1, **{**NOTHING, "mode": 0o777})),
        ("Tsetattr", dict(fid=2, valid=0x8, **NOTHING)),
        ("Txattrcreate", dict(fid=2, name="user.x", attr_size=1, flags=0)),
        ("Tlopen", dict(fid=2, flags=WRONLY)),
        ("Tlopen", dict(fid=2, flags=RDWR)),
        ("Tlopen", dict(fid=2, flags=RDONLY | TRUNC)),
        ("Tremove", dict(fid=4)),
    ]
    for op, fields in attempts:
        with pytest.raises(RemoteError) as e:
            await c.call(op, **fields)
        assert code(e) == errno.EROFS, op
    # reads work
    await c.call("Tlopen", fid=2, flags=RDONLY)
    assert await c.read_all(2) == b"hello, world\n"
    with pytest.raises(RemoteError) as e:
        await c.call("Twrite", fid=2, offset=0, data=b"x")
    assert code(e) == errno.EROFS
    await c.call("Tfsync", fid=2, datasync=0)
    assert {p: p.stat().st_mtime_ns for p in share_dir.rglob("*")} == before
    assert (await c.call("Tstatfs", fid=ROOT))["namelen"] > 0


async def test_shares_are_separate(server, tmp_path):
    from netkit.config import Share
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "only-in-b").write_text("b")
    c = await server.connect({"a": Share("a", str(a)), "b": Share("b", str(b))}, attach="a")
    await c.attach(2, "b")
    with pytest.raises(RemoteError):
        await c.walk(ROOT, 3, "only-in-b")
    await c.walk(2, 3, "only-in-b")
    await c.walk(ROOT, 4)
    with pytest.raises(RemoteError) as e:  # no renames or links across shares
        await c.call("Trenameat", olddirfid=2, oldname="only-in-b", newdirfid=4, newname="x")
    assert code(e) == errno.EXDEV
    with pytest.raises(RemoteError) as e:
        await c.call("Tlink", dfid=4, fid=3, name="x")
    assert code(e) == errno.EXDEV
