"""What a connection tells its application, collected by ``TcpConnection.take_events``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Event", "Connected", "DataReceived", "SendSpace", "PeerFinished", "Reset",
           "TimedOut", "Closed"]


class Event:
    """Base class of connection events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """The three-way handshake completed (state ESTABLISHED)."""


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """New in-order data is waiting in ``received()``. At most one per batch of events."""


@dataclass(frozen=True, slots=True)
class SendSpace(Event):
    """Acknowledged data freed send-buffer space after it had run low (below half).

    ``send_space()`` says how much. At most one per batch of events.
    """


@dataclass(frozen=True, slots=True)
class PeerFinished(Event):
    """The peer sent FIN: everything it will ever send is in ``received()``."""


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """The peer reset the connection. ``refused``: it did so to our SYN (active open)."""

    refused: bool = False


@dataclass(frozen=True, slots=True)
class TimedOut(Event):
    """Retransmissions (or window probes, or the handshake) went unanswered too long."""


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The connection reached CLOSED; after reading what is left of ``received()`` the
    runtime may discard it. Always the last event."""
