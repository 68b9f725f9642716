"""Small helpers shared by the link implementations (not public API)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

__all__ = ["MAX_BATCH_FRAMES", "prepare_unix_path", "unlink_if_same", "ACCEPT_RETRY_ERRNOS", "logger"]

logger = logging.getLogger("netkit.links")

#: Most frames one ``receive_batch`` returns. Batches amortise the per-call cost; the cap
#: keeps one busy link from starving the other tasks (and bounds the batch's memory).
MAX_BATCH_FRAMES = 64

#: accept() errors that mean "out of resources right now", not "the listener is broken".
#: The listener backs off and retries instead of dying (as trio.serve_listeners does).
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def prepare_unix_path(path: str, sock_type: int) -> None:
    """Make ``path`` free for ``bind``: unlink a *stale* unix socket left behind.

    A socket file that still has a live listener behind it is not stale (raises
    ``OSError(EADDRINUSE)``), and a file that is not a socket is never deleted (raises
    ``FileExistsError``): both mean the caller picked the wrong path.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a unix socket", path)
    probe = socket.socket(socket.AF_UNIX, sock_type)
    # Non-blocking, so a live listener with a full backlog answers EAGAIN instead of
    # blocking us; that, like a successful connect, means the path is in use.
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody is listening: a leftover from a previous run
        return
    except BlockingIOError:
        pass
    except OSError as e:
        # EPROTOTYPE (a live socket of another type), EACCES, ...: not ours to remove.
        raise OSError(e.errno, f"unix socket path is in use or inaccessible: {e.strerror}", path) from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening on this unix socket", path)


def unlink_if_same(path: str, inode: int | None) -> None:
    """Unlink ``path`` only if it is still the socket file we bound (same inode).

    A newer process may have replaced it after we stopped; that one is not ours to delete.
    """
    if inode is None:
        return
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
