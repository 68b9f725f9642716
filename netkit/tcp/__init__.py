"""netkit's sans-I/O TCP engine.

* :class:`TcpConnection` -- one connection's protocol machine (how a runtime drives it is
  described in :mod:`netkit.tcp.connection`);
* :class:`Segment`, :func:`rst_for`, :func:`is_connection_request` -- the engine's segment
  type (no addresses or ports) and answers for segments that match no connection;
* :class:`TcpSettings` -- tuning shared by many connections;
* :mod:`netkit.tcp.events` -- what a connection tells its application;
* :data:`TRANSITIONS` (:mod:`netkit.tcp.state`) -- the state transition table.
"""

from .connection import TcpConnection, TcpStats
from .events import Closed, Connected, DataReceived, Event, PeerFinished, Reset, SendSpace, TimedOut
from .segment import NO_OPTIONS, Segment, is_connection_request, rst_for, segment_length
from .seq import seq_diff, seq_geq, seq_gt, seq_leq, seq_lt
from .settings import TcpSettings
from .state import TRANSITIONS, TcpState, Trigger

__all__ = [
    "TcpConnection", "TcpStats", "TcpSettings", "TcpState", "Trigger", "TRANSITIONS",
    "Segment", "NO_OPTIONS", "rst_for", "is_connection_request", "segment_length",
    "Event", "Connected", "DataReceived", "SendSpace", "PeerFinished", "Reset", "TimedOut",
    "Closed",
    "seq_lt", "seq_leq", "seq_gt", "seq_geq", "seq_diff",
]
