"""DHCP server: a sans-I/O lease table and message handler (RFC 2131/2132).

The gateway owns the I/O: it passes UDP payloads for port 67 to
:meth:`DhcpServer.handle_untrusted` and sends the :class:`DhcpReply` it gets back.
"""

from .leases import BOUND, OFFERED, Lease, LeaseError, LeaseTable
from .server import DhcpReply, DhcpRequest, DhcpServer

__all__ = ["BOUND", "OFFERED", "Lease", "LeaseError", "LeaseTable", "DhcpReply", "DhcpRequest",
           "DhcpServer"]
