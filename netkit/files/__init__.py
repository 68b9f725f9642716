"""9P2000.L file sharing: host directories served to guests (TCP 564 on the gateway).

The guest mounts a share with::

    mount -t 9p -o trans=tcp,port=564,version=9p2000.L,aname=NAME GATEWAY /mnt

``serve_9p(stream, shares)`` serves one such connection; ``shares`` maps attach names to
:class:`~netkit.config.Share` (``Config.shares_by_name()``).
"""

from ..config import Share
from .client import Client9P, RemoteError
from .server import DEFAULT_MAX_FIDS, DEFAULT_MAX_OUTSTANDING, DEFAULT_MSIZE_MAX, serve_9p

__all__ = ["serve_9p", "Share", "Client9P", "RemoteError", "DEFAULT_MSIZE_MAX", "DEFAULT_MAX_FIDS",
           "DEFAULT_MAX_OUTSTANDING"]
