"""Frames over two fds (stdin/stdout by default): u16 LE length prefix, no handshake.

This is what ``netkit-switch --stdio`` speaks, so a parent process (or ``socat``) can
plug a guest in through pipes.
"""

from __future__ import annotations

import sys

from .base import DEFAULT_SEND_QUEUE_BYTES
from .stream import LE16_LENGTH, StreamFramedLink, adopt_fds

__all__ = ["StdioLink"]


class StdioLink(StreamFramedLink):
    """u16 LE length-prefixed frames over ``read_fd`` and ``write_fd``
    (default: this process's stdin and stdout).

    The fds are made non-blocking while the link is open. By default they are not
    closed on ``aclose`` (closing a process's stdin/stdout surprises everyone else);
    their blocking mode is restored instead. Pass ``close_fds=True`` for fds the link
    should own. Non-blocking mode belongs to the open file, so it is shared with any
    other process holding the same pipe or terminal.
    """

    def __init__(
        self,
        read_fd: int | None = None,
        write_fd: int | None = None,
        *,
        close_fds: bool = False,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
        name: str = "stdio",
    ) -> None:
        if read_fd is None:
            read_fd = sys.stdin.fileno()
        if write_fd is None:
            write_fd = sys.stdout.fileno()
        super().__init__(
            read_fd,
            write_fd,
            release=adopt_fds(read_fd, write_fd, close_fds),
            length_prefix=LE16_LENGTH,
            max_frame=65535,
            name=name,
            send_queue_bytes=send_queue_bytes,
        )

