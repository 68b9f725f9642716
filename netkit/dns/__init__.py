"""The DNS service on the gateway (see :mod:`netkit.dns.server`)."""

from .gai import GetaddrinfoResolver
from .local import LocalNames
from .message import Question
from .server import DnsService, default_resolver
from .upstream import Forwarder, Resolver, UpstreamError, UpstreamReply

__all__ = ["DnsService", "default_resolver", "Forwarder", "GetaddrinfoResolver", "LocalNames",
           "Question", "Resolver", "UpstreamError", "UpstreamReply"]
