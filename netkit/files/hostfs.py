"""Host filesystem operations confined to a share, resolved one component at a time.

A path inside a share is a tuple of names (never containing ``/``, ``.`` or ``..``).
To reach an object we start from the share root's file descriptor and open each
directory on the way with ``openat(dir_fd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW)``;
the final component is then acted on with an ``*at`` call that does not follow symlinks
(``fstatat(AT_SYMLINK_NOFOLLOW)``, ``unlinkat``, ``renameat``, ``readlinkat``...).

So the host never follows a symlink inside a share: a symlink where a directory is
expected fails with ``ENOTDIR`` and a symlink as the final component is the symlink
itself. Guests' symlinks are still useful, because the guest kernel (v9fs) reads them
with Treadlink and resolves them in the guest's own namespace. ``..`` never reaches the
host (the server resolves it lexically, clamped at the share root). Because each step is
an ``openat`` relative to the previous step's descriptor, swapping a directory for a
symlink between steps cannot redirect us (no check-then-use window on paths); the one
race left is a directory being *moved out* of the share by a host process while we are
inside it, which a guest cannot cause (it can only rename within the share).

Calls that only exist in a symlink-following form (``chmod``, ``truncate``, opening an
existing file) go through an ``O_PATH | O_NOFOLLOW`` descriptor of the object itself,
checked with ``fstat``, and then ``/proc/self/fd/N``, which names exactly that inode.
That makes this module Linux-only (``O_PATH`` and ``/proc``). Special files (devices,
FIFOs, sockets) can be listed and stat'ed but never opened: opening a device could have
side effects on the host and a FIFO would block a worker thread.

No privilege ever passes through a share (netkit usually runs as root, so every call
here carries root's CAP_FSETID, CAP_CHOWN, CAP_MKNOD, CAP_FOWNER): set-user-ID and
set-group-ID bits are masked out of every mode a guest gives (create, mkdir, mknod,
chmod) and cleared from an existing file before it is written or truncated (the kernel
does that only for writers without CAP_FSETID); device nodes are never created; a
set-ID file, a file with capabilities or a device node is never hard-linked; chown is
refused unless the share has the ``owners`` option. Such refusals raise
:class:`Refused` (EPERM). Functions that may clear set-ID bits say so in what they
return, so the server can count it.

Everything here is synchronous and is run in worker threads by the server.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "Path", "Owner", "Refused", "check_name", "open_root", "parent_of", "lstat", "open_dir", "lopen",
    "lcreate", "mkdir", "symlink", "mknod", "link", "rename", "unlinkat", "remove",
    "readlink", "setattr", "statfs", "read_dir", "host_open_flags", "dirent_type", "pwrite_all",
    "SETID_BITS",
]

Path = tuple[str, ...]
#: Who a new object should belong to, ``(uid, gid)`` with -1 for "leave as created";
#: ``None`` when the share does not let guests choose owners.
Owner = tuple[int, int] | None

SETID_BITS = stat.S_ISUID | stat.S_ISGID
#: The mode bits a guest may set: permissions and the sticky bit, never set-user-ID or
#: set-group-ID (a set-ID file the guest wrote, owned by root, is root for any host user).
_GUEST_MODE_BITS = 0o1777
#: The capability set of an executable (``setcap``): as good as set-user-ID root.
_XATTR_CAPS = "security.capability"


class Refused(PermissionError):
    """EPERM: the request would pass a host privilege to the guest."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EPERM, f"refused: {why}")

O_PATH: int = getattr(os, "O_PATH", 0)
_DIR = O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OBJ = O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def check_name(name: str) -> str:
    """A name that may be created inside a directory: not empty, ``.``, ``..``, and
    without ``/`` or NUL."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise _err(errno.EINVAL)
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise _err(errno.ENAMETOOLONG)
    return name


def open_root(path: str) -> int:
    """The share root as an ``O_PATH`` directory descriptor (the configured path may
    itself go through symlinks: the host's owner chose it)."""
    if not O_PATH:  # pragma: no cover - non-Linux hosts
        raise _err(errno.EOPNOTSUPP)
    return os.open(path, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir(root_fd: int, path: Path) -> int:
    """An ``O_PATH`` descriptor of the directory at ``path`` (the caller closes it)."""
    fd = os.dup(root_fd)
    try:
        for name in path:
            nfd = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def parent_of(root_fd: int, path: Path) -> Iterator[tuple[int, str | None]]:
    """``(dir_fd, name)`` for the object at ``path``; for the share root, ``(root_fd, None)``."""
    if not path:
        yield root_fd, None
        return
    fd = open_dir(root_fd, path[:-1])
    try:
        yield fd, path[-1]
    finally:
        os.close(fd)


def lstat(root_fd: int, path: Path) -> os.stat_result:
    with parent_of(root_fd, path) as (d, name):
        return os.stat(d) if name is None else os.stat(name, dir_fd=d, follow_symlinks=False)


@contextmanager
def _object(root_fd: int, path: Path) -> Iterator[tuple[int, os.stat_result]]:
    """An ``O_PATH | O_NOFOLLOW`` descriptor of the object itself, with its stat."""
    with parent_of(root_fd, path) as (d, name):
        fd = os.dup(d) if name is None else os.open(name, _OBJ, dir_fd=d)
    try:
        yield fd, os.stat(fd)
    finally:
        os.close(fd)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


# Linux open flags as 9P2000.L carries them (P9_DOTL_*), whatever the host's values.
_DOTL_FLAGS = (
    (0o1000, os.O_TRUNC), (0o2000, os.O_APPEND), (0o10000, getattr(os, "O_DSYNC", 0)),
    (0o200000, os.O_DIRECTORY), (0o4000000, os.O_SYNC),
)
_DOTL_CREAT, _DOTL_EXCL = 0o100, 0o200
_ACCMODE = {0: os.O_RDONLY, 1: os.O_WRONLY, 2: os.O_RDWR}


def host_open_flags(dotl: int) -> int:
    """Host ``open`` flags for 9P2000.L flags. Kept: access mode, truncate, append,
    (d)sync, directory. Dropped: create/excl (Tlcreate handles them), O_NOCTTY,
    O_NONBLOCK, O_ASYNC, O_DIRECT (alignment rules), O_LARGEFILE, O_NOATIME (EPERM
    unless owner), O_NOFOLLOW and O_CLOEXEC (always applied here)."""
    try:
        flags = _ACCMODE[dotl & 3]
    except KeyError:
        raise _err(errno.EINVAL) from None
    for bit, host in _DOTL_FLAGS:
        if dotl & bit:
            flags |= host
    return flags | os.O_CLOEXEC


def is_write_open(dotl: int) -> bool:
    return (dotl & 3) != 0 or bool(dotl & (0o1000 | _DOTL_CREAT))


def _check_openable(st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise _err(errno.ELOOP)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise _err(errno.EACCES)  # as on a nodev mount
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise _err(errno.ENXIO)  # FIFOs and sockets


def _writes(flags: int) -> bool:
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC))


def _clear_setid(path_or_fd: int | str, st: os.stat_result) -> bool:
    """Clear set-user-ID and set-group-ID from a file about to change (what the kernel
    does on write, truncate and chown for a caller without CAP_FSETID; as root it would
    keep them). ``path_or_fd``: an open descriptor, or a ``/proc/self/fd`` path for an
    ``O_PATH`` one. True if there was anything to clear."""
    if not st.st_mode & SETID_BITS or stat.S_ISLNK(st.st_mode):
        return False
    os.chmod(path_or_fd, stat.S_IMODE(st.st_mode) & ~SETID_BITS)
    return True


def lopen(root_fd: int, path: Path, dotl: int) -> tuple[int, os.stat_result, bool]:
    """Open an existing file or directory; returns the descriptor, its stat, and whether
    set-ID bits were cleared (a file opened for writing loses them first)."""
    flags = host_open_flags(dotl)
    cleared = False
    with _object(root_fd, path) as (obj, st):
        _check_openable(st)
        if stat.S_ISDIR(st.st_mode):
            if _writes(flags):
                raise _err(errno.EISDIR)
            flags |= os.O_DIRECTORY
        elif flags & os.O_DIRECTORY:
            raise _err(errno.ENOTDIR)
        elif _writes(flags):
            # Before O_TRUNC or the first write can change the contents.
            cleared = _clear_setid(_proc(obj), st)
        # /proc/self/fd/N is the inode we just checked, whatever the path now names.
        fd = os.open(_proc(obj), flags)
    try:
        return fd, os.stat(fd), cleared
    except BaseException:
        os.close(fd)
        raise


def pwrite_all(fd: int, data: bytes, offset: int) -> tuple[int, bool]:
    """Write all of ``data`` at ``offset``; returns the count and whether set-ID bits
    were cleared first (they may have been set by a host process since the open)."""
    cleared = _clear_setid(fd, os.stat(fd))
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n == 0:
            break
        done += n
    return done, cleared


def _give(fd_or_path: int | str, owner: Owner) -> None:
    """Chown a new object to the guest's choice on an ``owners`` share. Best effort:
    netkit not running as root cannot give files away, and the object stays as made."""
    if owner is None or owner == (-1, -1):
        return
    try:
        os.chown(fd_or_path, owner[0], owner[1])
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EINVAL):  # not permitted / unmapped id
            raise


def _give_link(d: int, name: str, owner: Owner) -> None:
    """``_give`` for a symlink (lchown by name: a symlink has no descriptor to chown)."""
    if owner is None or owner == (-1, -1):
        return
    try:
        os.chown(name, owner[0], owner[1], dir_fd=d, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EINVAL):
            raise


def lcreate(root_fd: int, dirpath: Path, name: str, dotl: int, mode: int,
            owner: Owner = None) -> tuple[int, os.stat_result, bool]:
    """Create (or, without O_EXCL, open) regular file ``name`` in ``dirpath``. Returns
    the descriptor, its stat and whether set-ID bits were dropped (asked for, or cleared
    from an existing file, which is opened for writing)."""
    check_name(name)
    flags = host_open_flags(dotl) | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    if dotl & _DOTL_EXCL:
        flags |= os.O_EXCL
    perm = mode & _GUEST_MODE_BITS
    stripped = bool(mode & SETID_BITS)
    d = open_dir(root_fd, dirpath)
    try:
        try:
            before = os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            before = None
        if before is not None and not (flags & os.O_EXCL):
            _check_openable(before)  # never open an existing device or FIFO
            if stat.S_ISDIR(before.st_mode):
                raise _err(errno.EISDIR)
            if _writes(flags) and before.st_mode & SETID_BITS:
                # Cleared before O_TRUNC empties it, as Tlopen does.
                obj = os.open(name, _OBJ, dir_fd=d)
                try:
                    stripped = _clear_setid(_proc(obj), os.stat(obj)) or stripped
                finally:
                    os.close(obj)
        fd = os.open(name, flags, perm, dir_fd=d)
    finally:
        os.close(d)
    try:
        st = os.stat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced under us by a host process
            raise _err(errno.ENXIO)
        os.set_blocking(fd, True)
        if before is None:
            _give(fd, owner)
            if stat.S_IMODE(st.st_mode) != perm:
                # The server's umask is process-wide (the guest already applied its own),
                # and a set-group-ID directory hands its bit on.
                os.fchmod(fd, perm)
        elif _writes(flags):
            # An existing file, opened for writing (again: the host may have set them since).
            stripped = _clear_setid(fd, st) or stripped
        return fd, os.stat(fd), stripped
    except BaseException:
        os.close(fd)
        raise


def mkdir(root_fd: int, dirpath: Path, name: str, mode: int, owner: Owner = None) -> os.stat_result:
    """A new directory; its mode never has set-ID bits, even in a set-group-ID parent
    (whose bit Linux would hand on): a set-group-ID directory made by root gives every
    file a host user later creates in it root's group."""
    check_name(name)
    perm = mode & _GUEST_MODE_BITS
    d = open_dir(root_fd, dirpath)
    try:
        os.mkdir(name, perm, dir_fd=d)
        nfd = os.open(name, _DIR, dir_fd=d)
        try:
            _give(_proc(nfd), owner)
            st = os.stat(nfd)
            if stat.S_IMODE(st.st_mode) != perm:
                os.chmod(_proc(nfd), perm)
                st = os.stat(nfd)
            return st
        finally:
            os.close(nfd)
    finally:
        os.close(d)


def symlink(root_fd: int, dirpath: Path, name: str, target: str, owner: Owner = None) -> os.stat_result:
    """Store a symlink verbatim: the host never follows it; the guest resolves it."""
    check_name(name)
    if not target or "\0" in target:
        raise _err(errno.EINVAL)
    d = open_dir(root_fd, dirpath)
    try:
        os.symlink(target, name, dir_fd=d)
        _give_link(d, name, owner)
        return os.stat(name, dir_fd=d, follow_symlinks=False)
    finally:
        os.close(d)


def mknod(root_fd: int, dirpath: Path, name: str, mode: int, owner: Owner = None) -> os.stat_result:
    """Regular files, FIFOs and sockets (harmless: netkit never opens them, and a host
    process that does gets a pipe or a socket, not a privilege). Device nodes are
    refused with EPERM, whatever the share's options: a node made by root, mode 0666,
    is raw access to a host disk or to /dev/mem for any host user."""
    check_name(name)
    kind = stat.S_IFMT(mode)
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        raise Refused("device node")
    if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, 0):
        raise _err(errno.EPERM)  # directories and symlinks have their own messages
    perm = mode & _GUEST_MODE_BITS
    d = open_dir(root_fd, dirpath)
    try:
        os.mknod(name, (kind or stat.S_IFREG) | perm, 0, dir_fd=d)
        with _object(root_fd, (*dirpath, name)) as (obj, st):
            if stat.S_IFMT(st.st_mode) == (kind or stat.S_IFREG):  # not replaced meanwhile
                _give(_proc(obj), owner)
                if stat.S_IMODE(os.stat(obj).st_mode) != perm:
                    os.chmod(_proc(obj), perm)
        return os.stat(name, dir_fd=d, follow_symlinks=False)
    finally:
        os.close(d)


def _is_privileged(obj: int, st: os.stat_result) -> bool:
    """Set-user-ID, set-group-ID and executable by group, a device node, or a file with
    capabilities (``obj``: its ``O_PATH`` descriptor)."""
    mode = st.st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return True
    if mode & stat.S_ISUID or (mode & stat.S_ISGID and mode & stat.S_IXGRP):
        return True
    if not stat.S_ISREG(mode):
        return False
    try:
        os.getxattr(_proc(obj), _XATTR_CAPS)
    except OSError:  # ENODATA, or no xattr support on this filesystem
        return False
    return True


def link(root_fd: int, target: Path, dirpath: Path, name: str) -> None:
    """A hard link, within one share (the server refuses links across shares). Like
    the kernel's ``protected_hardlinks`` for a user who does not own the file (netkit
    as root would bypass it), privileged files are never linked: a second name for a
    set-user-ID program keeps it alive after the host upgrades or removes the first."""
    check_name(name)
    if not target:
        raise _err(errno.EPERM)  # hard links to the share root: never
    with parent_of(root_fd, target) as (sd, sname):
        obj = os.open(sname, _OBJ, dir_fd=sd)
        try:
            if _is_privileged(obj, os.stat(obj)):
                raise Refused("hard link to a set-ID file, a file with capabilities or a device")
            d = open_dir(root_fd, dirpath)
            try:
                # The inode just checked, not whatever the name means by now (a guest
                # could rename a set-ID file onto it in between).
                os.link(_proc(obj), name, dst_dir_fd=d, follow_symlinks=True)
            finally:
                os.close(d)
        finally:
            os.close(obj)


def rename(root_fd: int, olddir: Path, oldname: str, newdir: Path, newname: str) -> None:
    check_name(oldname)
    check_name(newname)
    od = open_dir(root_fd, olddir)
    try:
        nd = open_dir(root_fd, newdir)
        try:
            os.rename(oldname, newname, src_dir_fd=od, dst_dir_fd=nd)
        finally:
            os.close(nd)
    finally:
        os.close(od)


AT_REMOVEDIR = 0x200


def unlinkat(root_fd: int, dirpath: Path, name: str, flags: int) -> None:
    check_name(name)
    d = open_dir(root_fd, dirpath)
    try:
        if flags & AT_REMOVEDIR:
            os.rmdir(name, dir_fd=d)
        else:
            os.unlink(name, dir_fd=d)
    finally:
        os.close(d)


def remove(root_fd: int, path: Path) -> None:
    if not path:
        raise _err(errno.EBUSY)  # the share root
    with parent_of(root_fd, path) as (d, name):
        st = os.stat(name, dir_fd=d, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=d)
        else:
            os.unlink(name, dir_fd=d)


def readlink(root_fd: int, path: Path) -> str:
    with parent_of(root_fd, path) as (d, name):
        if name is None:
            raise _err(errno.EINVAL)
        return os.readlink(name, dir_fd=d)


# Tsetattr valid bits
SETATTR_MODE, SETATTR_UID, SETATTR_GID, SETATTR_SIZE = 0x1, 0x2, 0x4, 0x8
SETATTR_ATIME, SETATTR_MTIME, SETATTR_CTIME = 0x10, 0x20, 0x40
SETATTR_ATIME_SET, SETATTR_MTIME_SET = 0x80, 0x100


def setattr(root_fd: int, path: Path, open_fd: int | None, valid: int, mode: int, uid: int, gid: int,
            size: int, atime: tuple[int, int], mtime: tuple[int, int], owners: bool = False) -> bool:
    """chmod, chown, truncate and utimes, in that order (as Linux's notify_change).

    A mode never gets set-ID bits (they are masked out, and the rest applies). chown
    without ``owners`` is refused (EPERM) unless it changes nothing; with ``owners`` it
    clears set-ID bits as the kernel does. A truncate clears them as a write does.
    Returns True if set-ID bits were dropped or cleared."""
    stripped = changes = False
    with _object(root_fd, path) as (obj, st):
        is_link = stat.S_ISLNK(st.st_mode)
        if valid & (SETATTR_UID | SETATTR_GID):
            new_uid = uid if valid & SETATTR_UID else -1
            new_gid = gid if valid & SETATTR_GID else -1
            changes = new_uid not in (-1, st.st_uid) or new_gid not in (-1, st.st_gid)
            if changes and not owners:
                # Checked before anything else changes: the request fails as a whole.
                raise Refused("chown on a share without the owners option")
        if valid & SETATTR_MODE:
            if is_link:
                raise _err(errno.EOPNOTSUPP)
            stripped = bool(mode & SETID_BITS)
            os.chmod(_proc(obj), mode & _GUEST_MODE_BITS)
        if changes:
            if is_link:
                with parent_of(root_fd, path) as (d, name):
                    os.chown(name, new_uid, new_gid, dir_fd=d, follow_symlinks=False)
            else:
                os.chown(_proc(obj), new_uid, new_gid)
                # The kernel clears them on chown of a non-directory; here a directory
                # loses its set-group-ID bit too (it hands the new group on).
                stripped = _clear_setid(_proc(obj), os.stat(obj)) or stripped
        if valid & SETATTR_SIZE:
            if size >= 1 << 63:
                raise _err(errno.EFBIG)
            if stat.S_ISDIR(st.st_mode):
                raise _err(errno.EISDIR)
            if not stat.S_ISREG(st.st_mode):
                raise _err(errno.EINVAL)
            stripped = _clear_setid(_proc(obj), os.stat(obj)) or stripped
            if open_fd is not None:
                try:
                    os.ftruncate(open_fd, size)
                except OSError as e:  # opened read-only: fall back to the path (truncate(2))
                    if e.errno not in (errno.EBADF, errno.EINVAL):
                        raise
                    os.truncate(_proc(obj), size)
            else:
                os.truncate(_proc(obj), size)
        if valid & (SETATTR_ATIME | SETATTR_MTIME):
            now = time.time_ns()
            cur = os.stat(obj)

            def pick(bit: int, set_bit: int, given: tuple[int, int], current: int) -> int:
                if not valid & bit:
                    return current
                if valid & set_bit:
                    sec, nsec = given
                    if sec >= 1 << 63:  # the wire's u64 holds a signed time64_t
                        sec -= 1 << 64
                    if nsec >= 1_000_000_000:
                        raise _err(errno.EINVAL)
                    return sec * 1_000_000_000 + nsec
                return now

            ns = (pick(SETATTR_ATIME, SETATTR_ATIME_SET, atime, cur.st_atime_ns),
                  pick(SETATTR_MTIME, SETATTR_MTIME_SET, mtime, cur.st_mtime_ns))
            if is_link:
                with parent_of(root_fd, path) as (d, name):
                    os.utime(name, ns=ns, dir_fd=d, follow_symlinks=False)
            else:
                os.utime(_proc(obj), ns=ns)
    return stripped



def statfs(root_fd: int) -> os.statvfs_result:
    return os.statvfs(root_fd)


DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 0, 1, 2, 4, 6, 8, 10, 12


def dirent_type(mode: int) -> int:
    kind = stat.S_IFMT(mode)
    return {stat.S_IFDIR: DT_DIR, stat.S_IFREG: DT_REG, stat.S_IFLNK: DT_LNK, stat.S_IFIFO: DT_FIFO,
            stat.S_IFCHR: DT_CHR, stat.S_IFBLK: DT_BLK, stat.S_IFSOCK: DT_SOCK}.get(kind, DT_UNKNOWN)


def read_dir(dir_fd: int, is_root: bool) -> list[tuple[str, int, int, int]]:
    """A snapshot of an open directory: ``(name, st_dev, st_ino, dirent type)`` for
    ``.``, ``..`` and every entry. At the share root, ``..`` is the root itself."""
    own = os.stat(dir_fd)
    parent = own if is_root else os.stat("..", dir_fd=dir_fd, follow_symlinks=False)
    out = [(".", own.st_dev, own.st_ino, DT_DIR), ("..", parent.st_dev, parent.st_ino, DT_DIR)]
    with os.scandir(dir_fd) as it:
        for entry in it:
            if entry.is_symlink():
                dtype = DT_LNK
            elif entry.is_dir(follow_symlinks=False):
                dtype = DT_DIR
            elif entry.is_file(follow_symlinks=False):
                dtype = DT_REG
            else:
                try:
                    dtype = dirent_type(entry.stat(follow_symlinks=False).st_mode)
                except OSError:
                    dtype = DT_UNKNOWN
            out.append((entry.name, own.st_dev, entry.inode(), dtype))
    return out
