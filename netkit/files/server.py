"""9P2000.L file server: one client connection, many shares, bounded state.

``serve_9p(stream, shares)`` serves one connection (the guest kernel's v9fs client) until
EOF. Requests are read one at a time and each runs as its own task, so a slow read does
not hold up a ``stat``; at most ``max_outstanding`` run at once (the reader stops
reading until one finishes, so memory is bounded by ``max_outstanding x msize``).

Every call into the host filesystem runs in a worker thread (``trio.to_thread``), even a
``stat``: the event loop also carries every guest's network traffic, and one slow
filesystem call (a network or FUSE filesystem, a cold disk, a hung mount) would
otherwise stall all of it. A thread hop costs some tens of microseconds, small beside a
9P round trip through a userspace TCP stack. Threads for one connection are limited by
their own ``CapacityLimiter`` (at most ``max_outstanding``), so one guest cannot use up
the process-wide default pool.

State the guest controls is bounded: ``max_fids`` fids per connection, ``msize`` at
most ``msize_max``, and at most ``max_outstanding`` requests in progress. A fid's
descriptor is closed only when no request still uses it (a Tclunk racing a Tread on the
same fid cannot make the read hit a recycled descriptor number).

Failure modes: a bad frame (size below 7 or above msize, or a tag reused while its
request is in progress) closes the connection; a message whose fields do not fit, or
an unknown type, gets ``Rlerror``; host ``OSError``s become ``Rlerror(errno)`` with
Linux errno numbers; anything unexpected is logged, counted and answered with
``Rlerror(EIO)``. Nothing a client sends can raise out of ``serve_9p``.

No host privilege passes through a share (hostfs masks and clears set-ID bits, and
refuses device nodes, chown and privileged hard links); this module passes each share's
``owners`` option and the guest's uid (from Tattach) and gid (from each create) down,
and counts what was refused (``privilege_refused``, ``xattr_refused``) or stripped
(``setid_stripped``).

Path confinement is hostfs's job (``openat`` per component with ``O_NOFOLLOW``); this
module keeps each fid's path as a tuple of names and resolves ``..`` lexically, never
above the share root (walking ``..`` from the root stays at the root, as 9P requires).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as statmod
import struct
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import trio

from ..config import Share
from . import hostfs
from .protocol import (HEADER, LAYOUTS, MAXWELEM, NAMES, NOFID, NUMBERS, QTDIR, QTFILE,
                       QTSYMLINK, MalformedMessage, Qid, decode, encode_dirent)

__all__ = ["serve_9p", "Share", "DEFAULT_MSIZE_MAX", "DEFAULT_MAX_FIDS", "DEFAULT_MAX_OUTSTANDING"]

log = logging.getLogger("netkit.files")

DEFAULT_MSIZE_MAX = 1024 * 1024  # Linux's TCP transport accepts up to 1 MiB
DEFAULT_MAX_FIDS = 4096
DEFAULT_MAX_OUTSTANDING = 32
#: Directory entries kept in readdir snapshots per connection (~100 bytes each).
DEFAULT_MAX_SNAPSHOT_ENTRIES = 200_000
MIN_MSIZE = 4096
VERSION = "9P2000.L"

_T = NUMBERS
_RLERROR = 7
_GETATTR_BASIC = 0x7FF
_V9FS_MAGIC = 0x01021997
_LOCK_SUCCESS = 0
_LOCK_TYPE_UNLCK = 2
_MAX_OFFSET = 1 << 63  # off_t is signed


# 9P2000.L carries Linux errno numbers; other hosts translate by name.
_LINUX_ERRNO = {
    "EPERM": 1, "ENOENT": 2, "ESRCH": 3, "EINTR": 4, "EIO": 5, "ENXIO": 6, "E2BIG": 7, "ENOEXEC": 8,
    "EBADF": 9, "ECHILD": 10, "EAGAIN": 11, "ENOMEM": 12, "EACCES": 13, "EFAULT": 14, "EBUSY": 16,
    "EEXIST": 17, "EXDEV": 18, "ENODEV": 19, "ENOTDIR": 20, "EISDIR": 21, "EINVAL": 22, "ENFILE": 23,
    "EMFILE": 24, "ENOTTY": 25, "ETXTBSY": 26, "EFBIG": 27, "ENOSPC": 28, "ESPIPE": 29, "EROFS": 30,
    "EMLINK": 31, "EPIPE": 32, "ERANGE": 34, "EDEADLK": 35, "ENAMETOOLONG": 36, "ENOLCK": 37,
    "ENOSYS": 38, "ENOTEMPTY": 39, "ELOOP": 40, "ENODATA": 61, "EPROTO": 71, "EOVERFLOW": 75,
    "EOPNOTSUPP": 95, "ENOTSUP": 95, "ESTALE": 116, "EDQUOT": 122,
}
_ON_LINUX = sys.platform.startswith("linux")


def _linux_errno(code: int | None) -> int:
    if not code:
        return 5  # EIO
    if _ON_LINUX:
        return code
    return _LINUX_ERRNO.get(errno.errorcode.get(code, ""), 5)


class _Error(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


class _Root:
    """A share as opened by one connection: its root descriptor and flags."""

    __slots__ = ("share", "fd")

    def __init__(self, share: Share, fd: int) -> None:
        self.share, self.fd = share, fd


class _Fid:
    __slots__ = ("root", "path", "uid", "fd", "is_dir", "writing", "dirents", "xattr", "users", "clunked",
                 "busy")

    def __init__(self, root: _Root, path: hostfs.Path, uid: int) -> None:
        self.root = root
        self.path = path
        self.uid = uid                    # the attaching user (n_uname), -1 if none given
        self.fd: int | None = None        # open file or directory (after Tlopen/Tlcreate)
        self.is_dir = False
        self.writing = False              # opened for writing (Twrite is refused otherwise)
        self.dirents: list | None = None  # readdir snapshot
        self.xattr: bytes | None = None   # contents of an xattr fid (Txattrwalk)
        self.users = 0
        self.clunked = False
        self.busy = False                 # a Tlopen/Tlcreate is in progress


class _Connection:
    def __init__(self, stream: trio.abc.Stream, shares: Mapping[str, Share], msize_max: int,
                 max_fids: int, max_outstanding: int, stats: Counter, max_snapshot_entries: int) -> None:
        self.stream = stream
        self.shares = shares
        self.msize_max = msize_max
        self.msize = msize_max
        self.max_fids = max_fids
        self.versioned = False
        self.fids: dict[int, _Fid] = {}
        self.roots: dict[str, _Root] = {}
        self.inflight: dict[int, trio.Event] = {}
        self.flushes: set[trio.Event] = set()
        self.snapshots: OrderedDict[_Fid, int] = OrderedDict()
        self.snapshot_entries = 0
        self.max_snapshot_entries = max_snapshot_entries
        self.slots = trio.Semaphore(max_outstanding)
        self.limiter = trio.CapacityLimiter(max_outstanding)
        self.send_lock = trio.Lock()
        self.stats = stats
        self.devs: dict[int, int] = {}
        self.broken = False
        self.handlers: dict[int, Callable[[dict[str, Any]], Any]] = {
            _T["Tattach"]: self.attach, _T["Tauth"]: self.auth, _T["Twalk"]: self.walk,
            _T["Tlopen"]: self.lopen, _T["Tlcreate"]: self.lcreate, _T["Tread"]: self.read,
            _T["Twrite"]: self.write, _T["Tclunk"]: self.clunk, _T["Tremove"]: self.remove,
            _T["Tgetattr"]: self.getattr, _T["Tsetattr"]: self.setattr, _T["Treaddir"]: self.readdir,
            _T["Tmkdir"]: self.mkdir, _T["Tsymlink"]: self.symlink, _T["Treadlink"]: self.readlink,
            _T["Trename"]: self.rename, _T["Trenameat"]: self.renameat, _T["Tunlinkat"]: self.unlinkat,
            _T["Tfsync"]: self.fsync, _T["Tstatfs"]: self.statfs,
            _T["Txattrwalk"]: self.xattrwalk, _T["Txattrcreate"]: self.xattrcreate,
            _T["Tlink"]: self.link, _T["Tmknod"]: self.mknod, _T["Tlock"]: self.lock,
            _T["Tgetlock"]: self.getlock,
        }

    # ------------------------------------------------------------------ plumbing

    async def run(self) -> None:
        buf = bytearray()
        self._start = 0
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            while not self.broken:
                frame = await self._next_frame(buf)
                if frame is None:
                    break
                mtype, tag, body = frame
                self.stats[NAMES.get(mtype, "unknown")] += 1
                if mtype == _T["Tversion"]:
                    await self._version(tag, body)
                    continue
                if tag in self.inflight:
                    self.stats["protocol_error"] += 1
                    log.warning("9p: tag %d reused while in progress; closing", tag)
                    break
                await self.slots.acquire()
                done = trio.Event()
                flush_target = None
                if mtype == _T["Tflush"] and len(body) >= 2:
                    # Decided now, in arrival order: a flush waits only for a request that
                    # arrived before it and is not itself a flush (so flushes never wait
                    # on each other, or on themselves, in a cycle).
                    old = self.inflight.get(int.from_bytes(body[:2], "little"))
                    if old is not None and old not in self.flushes:
                        flush_target = old
                    self.flushes.add(done)
                self.inflight[tag] = done
                nursery.start_soon(self._request, mtype, tag, body, done, flush_target)
            # EOF (or a protocol error): let requests in progress finish, then close.
            if self.broken:
                nursery.cancel_scope.cancel()

    async def _next_frame(self, buf: bytearray) -> tuple[int, int, bytes] | None:
        """The next ``(type, tag, body)``; ``None`` at EOF or on a bad frame size.
        ``buf`` holds received bytes from ``self._start`` on (compacted lazily, so a
        burst of small pipelined requests is not copied once per request)."""
        while True:
            avail = len(buf) - self._start
            if avail >= 4:
                size = int.from_bytes(buf[self._start:self._start + 4], "little")
                if size < HEADER.size or size > self.msize:
                    self.stats["protocol_error"] += 1
                    log.warning("9p: frame size %d outside 7..%d; closing", size, self.msize)
                    return None
                if avail >= size:
                    _, mtype, tag = HEADER.unpack_from(buf, self._start)
                    body = bytes(buf[self._start + HEADER.size:self._start + size])
                    self._start += size
                    return mtype, tag, body
            if self._start:
                del buf[:self._start]
                self._start = 0
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                if buf:
                    self.stats["truncated_frame"] += 1
                return None
            buf += data

    async def _send(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            self.nursery.cancel_scope.cancel()

    async def _request(self, mtype: int, tag: int, body: bytes, done: trio.Event,
                       flush_target: trio.Event | None) -> None:
        try:
            if mtype == _T["Tflush"]:
                decode(mtype, body)
                if flush_target is not None:
                    # Every operation here finishes on its own, so "abort" means: let it
                    # finish and send its reply first; the client sees it before Rflush.
                    await flush_target.wait()
                reply = (mtype + 1, b"")
            else:
                reply = await self._dispatch(mtype, body)
        except _Error as e:
            reply = (_RLERROR, e.code.to_bytes(4, "little"))
        except hostfs.Refused as e:
            self.stats["privilege_refused"] += 1
            log.debug("9p: %s %s", NAMES.get(mtype, mtype), e.strerror)
            reply = (_RLERROR, _linux_errno(e.errno).to_bytes(4, "little"))
        except OSError as e:
            reply = (_RLERROR, _linux_errno(e.errno).to_bytes(4, "little"))
        except MalformedMessage:
            self.stats["malformed"] += 1
            reply = (_RLERROR, errno.EINVAL.to_bytes(4, "little"))
        except Exception:  # a bug must not take the connection (or the gateway) down
            self.stats["internal_error"] += 1
            log.exception("9p: internal error handling %s", NAMES.get(mtype, mtype))
            reply = (_RLERROR, errno.EIO.to_bytes(4, "little"))
        rtype, rbody = reply
        if rtype == _RLERROR:
            self.stats["errors"] += 1
        try:
            async with self.send_lock:
                # Forget the tag before the reply can reach the client (which may then
                # reuse it at once), and wake Tflush waiters only after it was sent.
                del self.inflight[tag]
                if isinstance(rbody, tuple):  # (header-less body parts) for big reads
                    parts = rbody
                    size = HEADER.size + sum(len(p) for p in parts)
                    await self._send(b"".join((HEADER.pack(size, rtype, tag), *parts)))
                else:
                    await self._send(HEADER.pack(HEADER.size + len(rbody), rtype, tag) + rbody)
        finally:
            done.set()
            self.flushes.discard(done)
            self.slots.release()

    async def _dispatch(self, mtype: int, body: bytes) -> tuple[int, Any]:
        handler = self.handlers.get(mtype)
        if handler is None or mtype not in LAYOUTS:
            self.stats["unsupported"] += 1
            raise _Error(errno.EOPNOTSUPP)
        if not self.versioned:
            raise _Error(errno.EPROTO)
        fields = decode(mtype, body)
        result = await handler(fields)
        return mtype + 1, result

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def _version(self, tag: int, body: bytes) -> None:
        """Tversion: negotiate msize and reset the session (all fids clunked)."""
        for done in list(self.inflight.values()):
            await done.wait()
        try:
            fields = decode(_T["Tversion"], body)
        except MalformedMessage:
            reply = _RLERROR, errno.EINVAL.to_bytes(4, "little")
        else:
            for fid_no in list(self.fids):
                self._drop_fid(fid_no)
            msize = min(fields["msize"], self.msize_max)
            version = fields["version"]
            if version.startswith(VERSION) and msize >= MIN_MSIZE:
                self.versioned, self.msize = True, msize
                version = VERSION
            else:
                self.versioned, version = False, "unknown"
            name_bytes = version.encode()
            reply = (_T["Rversion"], msize.to_bytes(4, "little") + len(name_bytes).to_bytes(2, "little") + name_bytes)
        rtype, rbody = reply
        async with self.send_lock:
            await self._send(HEADER.pack(HEADER.size + len(rbody), rtype, tag) + rbody)

    # ------------------------------------------------------------------ fids

    def _fid(self, fid_no: int) -> _Fid:
        fid = self.fids.get(fid_no)
        if fid is None:
            raise _Error(errno.EBADF)
        return fid

    def _new_fid_ok(self, fid_no: int) -> None:
        if fid_no == NOFID:
            raise _Error(errno.EBADF)
        if fid_no in self.fids:
            raise _Error(errno.EEXIST)
        if len(self.fids) >= self.max_fids:
            self.stats["fid_limit"] += 1
            raise _Error(errno.EMFILE)

    def _add_fid(self, fid_no: int, fid: _Fid) -> None:
        self._new_fid_ok(fid_no)
        self.fids[fid_no] = fid

    def _drop_fid(self, fid_no: int) -> None:
        fid = self.fids.pop(fid_no, None)
        if fid is None:
            return
        fid.clunked = True
        self._forget_snapshot(fid)
        if fid.users == 0:
            self._close_fd(fid)

    def _keep_snapshot(self, fid: _Fid, entries: list) -> None:
        """Directory snapshots are kept per fid (readdir offsets index into them), within
        a per-connection budget of entries: the least recently read are dropped first
        (a later Treaddir on one simply lists the directory again)."""
        self._forget_snapshot(fid)
        fid.dirents = entries
        self.snapshots[fid] = len(entries)
        self.snapshot_entries += len(entries)
        while self.snapshot_entries > self.max_snapshot_entries and len(self.snapshots) > 1:
            self._forget_snapshot(next(iter(self.snapshots)))

    def _forget_snapshot(self, fid: _Fid) -> None:
        n = self.snapshots.pop(fid, None)
        if n is not None:
            self.snapshot_entries -= n
        fid.dirents = None

    @staticmethod
    def _close_fd(fid: _Fid) -> None:
        if fid.fd is not None:
            fd, fid.fd = fid.fd, None
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass

    class _Use:
        """Borrow fids for the duration of a request (their descriptors stay open)."""

        def __init__(self, conn: "_Connection", *fids: _Fid) -> None:
            self.conn, self.fids = conn, fids

        def __enter__(self) -> None:
            for fid in self.fids:
                fid.users += 1

        def __exit__(self, *exc: object) -> None:
            for fid in self.fids:
                fid.users -= 1
                if fid.clunked and fid.users == 0:
                    self.conn._close_fd(fid)

    def _use(self, *fids: _Fid) -> "_Connection._Use":
        return self._Use(self, *fids)

    def _writable(self, fid: _Fid) -> None:
        if fid.root.share.read_only:
            self.stats["erofs"] += 1
            raise _Error(errno.EROFS)

    @staticmethod
    def _owner(fid: _Fid, gid: int) -> hostfs.Owner:
        """Who a new object made through ``fid`` belongs to: on an ``owners`` share the
        attaching user and the gid the guest sent; elsewhere ``None`` (netkit's own
        identity: the guest's gid is ignored, as any uid it might name)."""
        if not fid.root.share.owners:
            return None
        return fid.uid, _uid(gid)

    def _stripped(self, dropped: bool) -> None:
        if dropped:
            self.stats["setid_stripped"] += 1

    def _qid(self, st: os.stat_result) -> Qid:
        mode = st.st_mode
        qtype = QTDIR if statmod.S_ISDIR(mode) else QTSYMLINK if statmod.S_ISLNK(mode) else QTFILE
        index = self.devs.setdefault(st.st_dev, len(self.devs))
        # Inode numbers are unique per device; other devices (mounts inside a share) get
        # their device's index in the top byte so qid paths stay distinct.
        path = st.st_ino if index == 0 else (st.st_ino ^ (index << 56)) & 0xFFFFFFFFFFFFFFFF
        return Qid(qtype, 0, path)

    def _qid_raw(self, dev: int, ino: int, dtype: int) -> Qid:
        qtype = QTDIR if dtype == hostfs.DT_DIR else QTSYMLINK if dtype == hostfs.DT_LNK else QTFILE
        index = self.devs.setdefault(dev, len(self.devs))
        path = ino if index == 0 else (ino ^ (index << 56)) & 0xFFFFFFFFFFFFFFFF
        return Qid(qtype, 0, path)

    @staticmethod
    def _join(path: hostfs.Path, name: str) -> hostfs.Path:
        return (*path, hostfs.check_name(name))

    def _rename_fids(self, root: _Root, old: hostfs.Path, new: hostfs.Path) -> None:
        """After a rename, fids under the old path follow the object (as QEMU does)."""
        n = len(old)
        for fid in self.fids.values():
            if fid.root is root and fid.path[:n] == old:
                fid.path = new + fid.path[n:]

    # ------------------------------------------------------------------ session

    async def auth(self, f: dict) -> bytes:
        raise _Error(errno.EOPNOTSUPP)  # no authentication: attach directly

    async def attach(self, f: dict) -> bytes:
        self._new_fid_ok(f["fid"])
        share = self.shares.get(f["aname"])
        if share is None:
            self.stats["unknown_share"] += 1
            raise _Error(errno.ENOENT)
        root = self.roots.get(share.name)
        if root is None:
            fd, st = await self._thread(_open_root, share.path)
            root = self.roots.get(share.name)
            if root is None:
                root = self.roots[share.name] = _Root(share, fd)
                self.devs.setdefault(st.st_dev, len(self.devs))
            else:
                os.close(fd)  # another attach opened it meanwhile
        else:
            st = await self._thread(os.stat, root.fd)
        self._add_fid(f["fid"], _Fid(root, (), _uid(f["n_uname"])))
        return self._qid(st).pack()

    # ------------------------------------------------------------------ lookup

    async def walk(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        names = f["wnames"]
        if len(names) > MAXWELEM:
            raise _Error(errno.EINVAL)
        newfid_no = f["newfid"]
        if newfid_no != f["fid"]:
            self._new_fid_ok(newfid_no)
        elif fid.fd is not None or fid.xattr is not None:
            raise _Error(errno.EBUSY)  # an open fid cannot walk in place
        with self._use(fid):
            qids, path, failure = await self._thread(_walk_sync, fid.root.fd, fid.path, names)
        if len(qids) < len(names):
            if not qids:
                raise _Error(failure)
            return len(qids).to_bytes(2, "little") + b"".join(self._qid(st).pack() for st in qids)
        if fid.clunked:
            raise _Error(errno.EBADF)
        if newfid_no == f["fid"]:
            fid.path = path
        else:
            self._add_fid(newfid_no, _Fid(fid.root, path, fid.uid))
        return len(qids).to_bytes(2, "little") + b"".join(self._qid(st).pack() for st in qids)

    # ------------------------------------------------------------------ attributes

    async def getattr(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        with self._use(fid):
            if fid.fd is not None:
                st = await self._thread(os.stat, fid.fd)  # works after unlink, too
            else:
                st = await self._thread(hostfs.lstat, fid.root.fd, fid.path)
        blocks = getattr(st, "st_blocks", (st.st_size + 511) // 512)
        blksize = getattr(st, "st_blksize", 4096)
        return (_GETATTR_BASIC.to_bytes(8, "little") + self._qid(st).pack() +
                _pack("<IIIQQQQQ", st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
                      getattr(st, "st_rdev", 0), st.st_size, blksize, blocks) +
                _pack("<QQQQQQQQQQ", *_split_ns(st.st_atime_ns), *_split_ns(st.st_mtime_ns),
                      *_split_ns(st.st_ctime_ns), 0, 0, 0, 0))

    async def setattr(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        self._writable(fid)
        with self._use(fid):
            dropped = await self._thread(hostfs.setattr, fid.root.fd, fid.path, fid.fd, f["valid"], f["mode"],
                                         _uid(f["uid"]), _uid(f["gid"]), f["size"],
                                         (f["atime_sec"], f["atime_nsec"]), (f["mtime_sec"], f["mtime_nsec"]),
                                         fid.root.share.owners)
        self._stripped(dropped)
        return b""

    async def statfs(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        with self._use(fid):
            s = await self._thread(hostfs.statfs, fid.root.fd)
        return _pack("<IIQQQQQQI", _V9FS_MAGIC, s.f_frsize or s.f_bsize, s.f_blocks, s.f_bfree, s.f_bavail,
                     s.f_files, s.f_ffree, getattr(s, "f_fsid", 0) & 0xFFFFFFFFFFFFFFFF, s.f_namemax)

    async def xattrwalk(self, f: dict) -> bytes:
        """No extended attributes: listing gives an empty list; any name is ENODATA."""
        fid = self._fid(f["fid"])
        if f["name"]:
            raise _Error(errno.ENODATA)
        xfid = _Fid(fid.root, fid.path, fid.uid)
        xfid.xattr = b""
        self._add_fid(f["newfid"], xfid)
        return (0).to_bytes(8, "little")

    async def xattrcreate(self, f: dict) -> bytes:
        """Refused, on every share: ``security.capability`` would give a file the
        capabilities of a set-user-ID root program, ``trusted.*`` and ``security.*``
        are the host's, and ``system.posix_acl_*`` would grant access by ACL."""
        self._writable(self._fid(f["fid"]))
        self.stats["xattr_refused"] += 1
        raise _Error(errno.EOPNOTSUPP)

    # ------------------------------------------------------------------ open, read, write

    async def lopen(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        if fid.fd is not None or fid.busy or fid.xattr is not None:
            raise _Error(errno.EBUSY)
        if hostfs.is_write_open(f["flags"]):
            self._writable(fid)
        fid.busy = True
        try:
            with self._use(fid):
                fd, st, dropped = await self._thread(hostfs.lopen, fid.root.fd, fid.path, f["flags"])
        finally:
            fid.busy = False
        self._stripped(dropped)
        if fid.clunked:
            os.close(fd)
            raise _Error(errno.EBADF)
        fid.fd, fid.is_dir, fid.dirents = fd, statmod.S_ISDIR(st.st_mode), None
        fid.writing = f["flags"] & 3 in (1, 2)
        return self._qid(st).pack() + (0).to_bytes(4, "little")

    async def lcreate(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        self._writable(fid)
        if fid.fd is not None or fid.busy or fid.xattr is not None:
            raise _Error(errno.EBUSY)
        path = self._join(fid.path, f["name"])
        fid.busy = True
        try:
            with self._use(fid):
                fd, st, dropped = await self._thread(hostfs.lcreate, fid.root.fd, fid.path, f["name"],
                                                     f["flags"], f["mode"], self._owner(fid, f["gid"]))
        finally:
            fid.busy = False
        self._stripped(dropped)
        if fid.clunked:
            os.close(fd)
            raise _Error(errno.EBADF)
        fid.fd, fid.is_dir, fid.dirents, fid.path = fd, False, None, path
        fid.writing = f["flags"] & 3 in (1, 2)
        return self._qid(st).pack() + (0).to_bytes(4, "little")

    async def read(self, f: dict) -> tuple[bytes, bytes]:
        fid = self._fid(f["fid"])
        count = min(f["count"], self.msize - 11)
        if f["offset"] >= _MAX_OFFSET:
            raise _Error(errno.EINVAL)
        if fid.xattr is not None:
            data = fid.xattr[f["offset"]:f["offset"] + count]
        elif fid.fd is None:
            raise _Error(errno.EBADF)
        elif fid.is_dir:
            raise _Error(errno.EISDIR)
        else:
            with self._use(fid):
                data = await self._thread(os.pread, fid.fd, count, f["offset"])
        return (len(data).to_bytes(4, "little"), data)

    async def write(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        self._writable(fid)
        if fid.fd is None or fid.xattr is not None or not fid.writing:
            # Not open for writing (as write(2) says): refused before hostfs would clear
            # set-ID bits for a write that cannot happen.
            raise _Error(errno.EBADF)
        data = f["data"]
        if f["offset"] >= _MAX_OFFSET:
            raise _Error(errno.EINVAL)
        with self._use(fid):
            n, dropped = await self._thread(hostfs.pwrite_all, fid.fd, data, f["offset"])
        self._stripped(dropped)
        return n.to_bytes(4, "little")

    async def readdir(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        if fid.fd is None or not fid.is_dir:
            raise _Error(errno.EBADF if fid.fd is None else errno.ENOTDIR)
        offset, count = f["offset"], min(f["count"], self.msize - 11)
        with self._use(fid):
            if offset == 0 or fid.dirents is None:
                entries = await self._thread(hostfs.read_dir, fid.fd, not fid.path)
                if not fid.clunked:
                    self._keep_snapshot(fid, entries)
            else:
                entries = fid.dirents
                self.snapshots.move_to_end(fid)
        out: list[bytes] = []
        used = 0
        for index in range(min(offset, len(entries)), len(entries)):
            name, dev, ino, dtype = entries[index]
            raw = encode_dirent(self._qid_raw(dev, ino, dtype), index + 1, dtype,
                                name.encode("utf-8", "surrogateescape"))
            if used + len(raw) > count:
                if not out:
                    raise _Error(errno.EINVAL)  # buffer too small for one entry
                break
            out.append(raw)
            used += len(raw)
        return used.to_bytes(4, "little") + b"".join(out)

    async def fsync(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        if fid.fd is None:
            raise _Error(errno.EBADF)
        if not fid.root.share.read_only:
            with self._use(fid):
                await self._thread(os.fdatasync if f["datasync"] else os.fsync, fid.fd)
        return b""

    async def clunk(self, f: dict) -> bytes:
        self._fid(f["fid"])
        self._drop_fid(f["fid"])
        return b""

    async def remove(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        try:
            self._writable(fid)
            with self._use(fid):
                await self._thread(hostfs.remove, fid.root.fd, fid.path)
        finally:
            self._drop_fid(f["fid"])  # Tremove clunks the fid even when it fails
        return b""

    # ------------------------------------------------------------------ directory changes

    async def mkdir(self, f: dict) -> bytes:
        d = self._fid(f["dfid"])
        self._writable(d)
        with self._use(d):
            st = await self._thread(hostfs.mkdir, d.root.fd, d.path, f["name"], f["mode"],
                                    self._owner(d, f["gid"]))
        self._stripped(bool(f["mode"] & hostfs.SETID_BITS))
        return self._qid(st).pack()

    async def symlink(self, f: dict) -> bytes:
        d = self._fid(f["fid"])
        self._writable(d)
        with self._use(d):
            st = await self._thread(hostfs.symlink, d.root.fd, d.path, f["name"], f["symtgt"],
                                    self._owner(d, f["gid"]))
        return self._qid(st).pack()

    async def mknod(self, f: dict) -> bytes:
        d = self._fid(f["dfid"])
        self._writable(d)
        with self._use(d):
            st = await self._thread(hostfs.mknod, d.root.fd, d.path, f["name"], f["mode"],
                                    self._owner(d, f["gid"]))
        self._stripped(bool(f["mode"] & hostfs.SETID_BITS))
        return self._qid(st).pack()

    async def link(self, f: dict) -> bytes:
        d, target = self._fid(f["dfid"]), self._fid(f["fid"])
        self._writable(d)
        if d.root is not target.root:
            raise _Error(errno.EXDEV)
        with self._use(d, target):
            await self._thread(hostfs.link, d.root.fd, target.path, d.path, f["name"])
        return b""

    async def readlink(self, f: dict) -> bytes:
        fid = self._fid(f["fid"])
        with self._use(fid):
            target = await self._thread(hostfs.readlink, fid.root.fd, fid.path)
        raw = target.encode("utf-8", "surrogateescape")
        if len(raw) > min(0xFFFF, self.msize - 9):
            raise _Error(errno.ENAMETOOLONG)
        return len(raw).to_bytes(2, "little") + raw

    async def rename(self, f: dict) -> bytes:
        fid, d = self._fid(f["fid"]), self._fid(f["dfid"])
        self._writable(fid)
        if not fid.path:
            raise _Error(errno.EBUSY)
        return await self._do_rename(fid.root, d.root, fid.path[:-1], fid.path[-1], d.path, f["name"], fid, d)

    async def renameat(self, f: dict) -> bytes:
        od, nd = self._fid(f["olddirfid"]), self._fid(f["newdirfid"])
        self._writable(od)
        return await self._do_rename(od.root, nd.root, od.path, f["oldname"], nd.path, f["newname"], od, nd)

    async def _do_rename(self, root: _Root, other: _Root, olddir: hostfs.Path, oldname: str,
                         newdir: hostfs.Path, newname: str, *used: _Fid) -> bytes:
        if root is not other:
            raise _Error(errno.EXDEV)
        old, new = self._join(olddir, oldname), self._join(newdir, newname)
        with self._use(*used):
            await self._thread(hostfs.rename, root.fd, olddir, oldname, newdir, newname)
        if old != new:
            self._rename_fids(root, old, new)
        return b""

    async def unlinkat(self, f: dict) -> bytes:
        d = self._fid(f["dirfid"])
        self._writable(d)
        with self._use(d):
            await self._thread(hostfs.unlinkat, d.root.fd, d.path, f["name"], f["flags"])
        return b""

    # ------------------------------------------------------------------ locks

    async def lock(self, f: dict) -> bytes:
        """Advisory locks are granted without being tracked (as with ``-o localflock``,
        but answered by the server): enough for tools that lock, not for coordination."""
        self._fid(f["fid"])
        return bytes([_LOCK_SUCCESS])

    async def getlock(self, f: dict) -> bytes:
        self._fid(f["fid"])
        cid = f["client_id"].encode("utf-8", "surrogateescape")
        return (bytes([_LOCK_TYPE_UNLCK]) + _pack("<QQI", f["start"], f["length"], f["proc_id"]) +
                len(cid).to_bytes(2, "little") + cid)

    # ------------------------------------------------------------------ teardown

    def close_all(self) -> None:
        for fid_no in list(self.fids):
            self._drop_fid(fid_no)
        for root in self.roots.values():
            try:
                os.close(root.fd)
            except OSError:  # pragma: no cover
                pass
        self.roots.clear()


def _walk_sync(root_fd: int, path: hostfs.Path, names: list[str]) -> tuple[list, hostfs.Path, int]:
    """Stat each step of a walk; stops at the first failure (partial walks are legal)."""
    stats: list[os.stat_result] = []
    cur = path
    for name in names:
        try:
            if name == "..":
                cur = cur[:-1]  # lexical, clamped at the share root
            elif name in ("", ".") or "/" in name or "\0" in name:
                raise OSError(errno.ENOENT, "bad name")
            else:
                if stats and not statmod.S_ISDIR(stats[-1].st_mode):
                    raise OSError(errno.ENOTDIR, "not a directory")
                cur = (*cur, name)
            stats.append(hostfs.lstat(root_fd, cur))
        except OSError as e:
            return stats, cur, _linux_errno(e.errno)
    return stats, cur, 0


def _open_root(path: str) -> tuple[int, os.stat_result]:
    fd = hostfs.open_root(path)
    return fd, os.stat(fd)


def _pack(fmt: str, *values: int) -> bytes:
    return struct.pack(fmt, *values)


def _split_ns(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec & 0xFFFFFFFFFFFFFFFF, nsec


def _uid(value: int) -> int:
    return -1 if value == 0xFFFFFFFF else value


async def serve_9p(stream: trio.abc.Stream, shares: Mapping[str, Share], *,
                   msize_max: int = DEFAULT_MSIZE_MAX, max_fids: int = DEFAULT_MAX_FIDS,
                   max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
                   max_snapshot_entries: int = DEFAULT_MAX_SNAPSHOT_ENTRIES,
                   stats: Counter | None = None) -> None:
    """Serve one 9P2000.L client on ``stream`` until it closes; ``shares`` maps the
    attach name (``aname``) to a :class:`Share`. ``stats`` (optional) accumulates
    per-message and per-error counts across calls. Closes ``stream`` on return."""
    if msize_max < MIN_MSIZE:
        raise ValueError(f"msize_max must be at least {MIN_MSIZE}")
    conn = _Connection(stream, shares, msize_max, max_fids, max_outstanding,
                       stats if stats is not None else Counter(), max_snapshot_entries)
    try:
        await conn.run()
    finally:
        conn.close_all()
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):  # pragma: no cover
                pass
