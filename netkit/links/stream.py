"""Length-prefixed frames over a byte stream (unix/TCP/vsock sockets, pipes).

QEMU's ``-netdev stream``/``-netdev socket`` put a 4-byte big-endian length before
each frame; vpnkit/hyperkit and ``netkit-switch --stdio`` use a 2-byte little-endian
length. ``StreamFramedLink`` does either, chosen by ``length_prefix``.

I/O goes straight to the non-blocking fd with ``os.readv``/``os.writev`` (no trio
stream in between) so a whole burst of frames costs one wakeup and a few syscalls, and
a frame is written with its prefix in one ``writev`` without being copied. When the
peer's buffer is full mid-frame, the unwritten tail is kept and finished by
``run_sender`` (the base class's pending-tail hooks), so ``send`` never blocks.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .base import DEFAULT_SEND_QUEUE_BYTES, Frame, Link, LinkClosed, TxOffload
from ._util import ACCEPT_RETRY_ERRNOS, MAX_BATCH_FRAMES, logger, prepare_unix_path, unlink_if_same

__all__ = [
    "StreamFramedLink",
    "BE32_LENGTH",
    "LE16_LENGTH",
    "DEFAULT_MAX_FRAME",
    "StreamListener",
    "OnLink",
]

#: QEMU stream/socket netdev framing: 4-byte big-endian length.
BE32_LENGTH = struct.Struct(">I")
#: vpnkit/hyperkit and stdio framing: 2-byte little-endian length.
LE16_LENGTH = struct.Struct("<H")

#: Largest frame accepted by default: a 64 KiB IP packet plus Ethernet and VLAN headers,
#: with headroom. A larger length prefix means the stream is corrupt or hostile.
DEFAULT_MAX_FRAME = 65535 + 1024

#: Bytes asked of the kernel per read. Also the slack kept in the receive buffer.
_READ_CHUNK = 64 * 1024
#: Most bytes read per wakeup before frames are handed up (bounds batch latency).
_READ_BUDGET = 4 * _READ_CHUNK

#: Called with each new link; see ``StreamListener.serve``.
OnLink = Callable[[Link], Awaitable[Any]]


class StreamFramedLink(Link):
    """A link carrying length-prefixed Ethernet frames over a byte stream.

    Build one with ``from_socket`` (a connected stream socket, trio or stdlib) or
    ``from_fds`` (a read fd and a write fd, e.g. pipes or stdin/stdout). The link owns
    what it is given and releases it on ``aclose``.

    Receiving: a length prefix above ``max_frame`` cannot be resynchronised, so it is
    counted in ``stats.receive_errors`` and the connection is shut down; a zero length
    is counted and skipped; a truncated frame at EOF is counted. Sending: frames above
    ``max_send_frame`` are dropped (counted in ``stats.send_dropped``). ``TxOffload``
    is ignored: this link has no offloads (``offload`` is False).
    """

    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        *,
        release: Callable[[], None],
        abort: Callable[[], None] | None = None,
        length_prefix: struct.Struct = BE32_LENGTH,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_send_frame: int | None = None,
        name: str = "stream",
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
        initial_data: bytes = b"",
    ) -> None:
        super().__init__(send_queue_bytes=send_queue_bytes)
        self.name = name
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._release = release
        self._abort = abort
        self._prefix = length_prefix
        self._prefix_len = length_prefix.size
        # The prefix limits what can be expressed; never promise more than that.
        prefix_max = (1 << (8 * length_prefix.size)) - 1
        self._max_frame = min(max_frame, prefix_max)
        self._max_send_frame = min(max_send_frame if max_send_frame is not None else max_frame, prefix_max)
        # Receive buffer: [start, end) holds bytes not yet parsed. Sized so one maximal
        # frame plus one read always fits after compaction, so memory is bounded.
        capacity = self._prefix_len + self._max_frame + _READ_CHUNK
        self._rbuf = bytearray(max(capacity, len(initial_data) + _READ_CHUNK))
        self._rview = memoryview(self._rbuf)
        self._rbuf[: len(initial_data)] = initial_data
        self._rstart = 0
        self._rend = len(initial_data)
        self._eof = False
        # Unwritten tail of a partially written frame (a private copy).
        self._pending: memoryview | None = None
        self._write_error: OSError | None = None

    # ----- construction -----
    @classmethod
    def from_socket(cls, sock: Any, **kwargs: Any) -> "StreamFramedLink":
        """Wrap a connected stream socket (``trio.socket`` or stdlib); the link owns it."""
        if isinstance(sock, socket.socket):
            sock.setblocking(False)  # trio sockets are non-blocking already
        fd = sock.fileno()

        def release() -> None:
            trio.lowlevel.notify_closing(fd)  # wake our own waiters before the fd goes
            sock.close()

        def abort() -> None:
            # Tell the peer at once (it sees EOF) rather than when the owner gets round
            # to aclose(); the fd itself stays ours until then.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        return cls(fd, fd, release=release, abort=abort, **kwargs)

    @classmethod
    def from_fds(cls, read_fd: int, write_fd: int, *, close_fds: bool = True, **kwargs: Any) -> "StreamFramedLink":
        """Wrap two fds (may be the same). They are made non-blocking; on close they are
        closed if ``close_fds``, else their original blocking mode is restored."""
        return cls(read_fd, write_fd, release=adopt_fds(read_fd, write_fd, close_fds), **kwargs)

    # ----- receiving -----
    async def _receive_batch(self) -> list[Frame]:
        # Checkpoint before consuming anything, so a cancellation never loses frames and
        # a peer that keeps the buffer full cannot starve other tasks.
        await trio.lowlevel.checkpoint()
        while True:
            frames = self._parse_frames()
            if frames:
                return frames
            if self._eof or self._closed:
                raise LinkClosed(self.name)
            try:
                await trio.lowlevel.wait_readable(self._read_fd)
            except (trio.ClosedResourceError, OSError):
                raise LinkClosed(self.name) from None
            self._fill()

    def _fill(self) -> None:
        """Read what the fd has now (up to a budget) into the receive buffer."""
        budget = _READ_BUDGET
        while budget > 0:
            free = len(self._rbuf) - self._rend
            if free < _READ_CHUNK and self._rstart > 0:
                # Move the unparsed bytes (at most one partial frame plus a read) to the
                # front. The RHS slice is a copy, and the size is unchanged, so this is
                # safe with the memoryview exported.
                n = self._rend - self._rstart
                self._rbuf[:n] = self._rbuf[self._rstart : self._rend]
                self._rstart, self._rend = 0, n
                free = len(self._rbuf) - n
            if free == 0:
                return  # full of complete frames waiting to be parsed
            try:
                got = os.readv(self._read_fd, [self._rview[self._rend :]])
            except BlockingIOError:
                return
            except OSError:
                # ECONNRESET and friends: the peer is gone, same as EOF for us.
                self._eof = True
                return
            if got == 0:
                self._eof = True
                return
            self._rend += got
            budget -= got
            if got < free:
                return  # short read: the kernel had no more; don't spend a syscall on EAGAIN

    def _parse_frames(self) -> list[Frame]:
        frames: list[Frame] = []
        buf, view = self._rbuf, self._rview
        start, end = self._rstart, self._rend
        hlen = self._prefix_len
        unpack = self._prefix.unpack_from
        while len(frames) < MAX_BATCH_FRAMES and end - start >= hlen:
            (length,) = unpack(buf, start)
            if length > self._max_frame:
                self._bad_framing(f"length prefix {length} > max_frame {self._max_frame}")
                start = end  # discard: there is no way to find the next frame boundary
                break
            if length == 0:
                self.stats.receive_errors += 1  # meaningless, but framing is intact
                start += hlen
                continue
            if end - start - hlen < length:
                break  # partial frame: wait for the rest
            body = start + hlen
            frames.append(bytes(view[body : body + length]))
            start = body + length
        if start == end:
            start = end = 0
        if self._eof and not frames and start != end:
            # The stream ended inside a frame: count the truncated frame once.
            self.stats.receive_errors += 1
            start = end = 0
        self._rstart, self._rend = start, end
        return frames

    def _bad_framing(self, why: str) -> None:
        self.stats.receive_errors += 1
        logger.warning("%s: closing connection: %s", self.name, why)
        self._eof = True
        if self._abort is not None:
            self._abort()

    # ----- sending -----
    def _try_send(self, frame: Frame, offload: TxOffload | None) -> bool:
        if self._pending is not None:
            return False  # never interleave a new frame with an unfinished one
        if self._write_error is not None:
            raise self._write_error
        length = len(frame)
        if length > self._max_send_frame or length == 0:
            raise OSError(errno.EMSGSIZE, f"frame of {length} bytes cannot be sent on {self.name}")
        header = self._prefix.pack(length)
        try:
            written = os.writev(self._write_fd, (header, frame))
        except BlockingIOError:
            return False
        except OSError as e:
            self._write_error = e
            raise
        total = self._prefix_len + length
        if written < total:
            # Keep a private copy of the tail: the caller may reuse its buffer once
            # send() returns.
            if written < self._prefix_len:
                tail = header[written:] + bytes(frame)
            else:
                tail = bytes(memoryview(frame)[written - self._prefix_len :])
            self._pending = memoryview(tail)
        return True

    def _has_pending(self) -> bool:
        return self._pending is not None

    def _flush_pending(self) -> bool:
        pending = self._pending
        if pending is None:
            return True
        try:
            written = os.write(self._write_fd, pending)
        except BlockingIOError:
            return False
        except OSError as e:
            # The peer is gone: the tail can never be delivered. Drop it; later sends
            # fail fast with the same error and are counted as dropped.
            self._write_error = e
            self._pending = None
            return True
        if written < len(pending):
            self._pending = pending[written:]
            return False
        self._pending = None
        return True

    async def _wait_send_ready(self) -> None:
        if self._write_error is not None:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.wait_writable(self._write_fd)

    # ----- lifecycle -----
    async def _close(self) -> None:
        self._pending = None
        self._release()
        await trio.lowlevel.checkpoint()


class StreamListener:
    """Accepts stream connections on a unix socket (or a given listening socket) and
    turns each into a link; subclasses say how (``_make_link``).

    ``serve(on_link)`` runs until cancelled. Each connection is handled in its own task,
    which calls ``await on_link(link)``. ``on_link`` may return at once after attaching
    the link elsewhere, or run until the link is done: either way the link then belongs
    to ``on_link``'s side, which must ``aclose`` it. If ``on_link`` raises (or is
    cancelled when ``serve`` stops), the listener closes the link, and an ``Exception``
    is logged rather than taking down the other connections.
    """

    #: Prefix for link names: "<kind>:<path>#<n>".
    kind = "stream"

    def __init__(self, socket_or_path: Any, *, backlog: int = 128) -> None:
        if isinstance(socket_or_path, (str, os.PathLike)):
            self.path: str | None = os.fspath(socket_or_path)
            self._sock: Any = None
        else:
            self.path = None
            self._sock = socket_or_path
        self._backlog = backlog
        self._connections = 0
        self.listening = False

    async def _open(self) -> tuple[Any, int | None]:
        """Return the listening trio socket, and the inode of the path we bound."""
        if self._sock is not None:
            sock = self._sock
            if isinstance(sock, socket.socket):
                sock = trio.socket.from_stdlib_socket(sock)
            self._sock = None  # serve() owns it from here on, and closes it
            return sock, None
        if self.path is None:
            raise RuntimeError("this listener's socket has already been served (and closed)")
        prepare_unix_path(self.path, socket.SOCK_STREAM)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(self.path)
            sock.listen(self._backlog)
            inode = os.lstat(self.path).st_ino
        except BaseException:
            sock.close()
            raise
        return sock, inode

    async def serve(self, on_link: OnLink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, call ``task_status.started()``, then hand each connection to ``on_link``."""
        sock, inode = await self._open()
        label = self.path if self.path is not None else _sockname(sock)
        try:
            async with trio.open_nursery() as nursery:
                self.listening = True
                task_status.started()
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as e:
                        if e.errno in ACCEPT_RETRY_ERRNOS:
                            logger.error("%s: accept failed (%s); retrying shortly", label, e)
                            await trio.sleep(0.1)
                            continue
                        raise
                    self._connections += 1
                    nursery.start_soon(self._handle, conn, f"{self.kind}:{label}#{self._connections}", on_link)
        finally:
            self.listening = False
            sock.close()
            if self.path is not None:
                unlink_if_same(self.path, inode)

    async def _handle(self, conn: Any, name: str, on_link: OnLink) -> None:
        try:
            link = await self._make_link(conn, name)
        except Exception:
            logger.exception("%s: could not set up the link", name)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        if link is None:
            return  # _make_link refused the connection (and closed it)
        try:
            await on_link(link)
        except Exception:
            logger.exception("%s: on_link failed; closing the link", name)
            with trio.CancelScope(shield=True):
                await link.aclose()
        except BaseException:
            with trio.CancelScope(shield=True):
                await link.aclose()
            raise

    async def _make_link(self, conn: Any, name: str) -> Link | None:
        """Build the link for an accepted connection, or close it and return None."""
        raise NotImplementedError


def adopt_fds(read_fd: int, write_fd: int, close_fds: bool) -> Callable[[], None]:
    """Make the fds non-blocking; return the function that gives them back."""
    fds = [read_fd] if read_fd == write_fd else [read_fd, write_fd]
    was_blocking = {fd: os.get_blocking(fd) for fd in fds}
    for fd in fds:
        os.set_blocking(fd, False)

    def release() -> None:
        for fd in fds:
            trio.lowlevel.notify_closing(fd)  # wake our own waiters first
            if close_fds:
                os.close(fd)
            else:
                try:
                    os.set_blocking(fd, was_blocking[fd])
                except OSError:
                    pass

    return release


def _sockname(sock: Any) -> str:
    try:
        return str(sock.getsockname())
    except OSError:
        return "?"
