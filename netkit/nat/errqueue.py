"""Reading ICMP errors a Linux socket received (IP_RECVERR / MSG_ERRQUEUE)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from ..config import Config
from ..wire import icmp_frame
from ..wire.ipv4 import build_ipv4_header
from .host import IP_RECVERR, translate_source

__all__ = ["IcmpError", "read_errors", "error_frame_for_guest"]

MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_ICMP = 2
_sock_extended_err = struct.Struct("=IBBBBII")


@dataclass(frozen=True, slots=True)
class IcmpError:
    """One ICMP error for a datagram we sent to ``destination``, reported by ``offender``."""

    type: int
    code: int
    info: int
    destination: tuple[IPv4Address, int]
    offender: IPv4Address | None


def read_errors(sock: socket.socket, limit: int = 64) -> list[IcmpError]:
    """Drain the socket's error queue (non-blocking)."""
    errors = []
    for _ in range(limit):
        try:
            _data, ancdata, _flags, address = sock.recvmsg(512, 512, MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        for level, kind, payload in ancdata:
            if level != socket.SOL_IP or kind != IP_RECVERR or len(payload) < _sock_extended_err.size:
                continue
            _errno, origin, icmp_type, icmp_code, _pad, info, _data32 = _sock_extended_err.unpack_from(payload)
            if origin != SO_EE_ORIGIN_ICMP:
                continue
            offender = None
            rest = payload[_sock_extended_err.size:]
            if len(rest) >= 8 and struct.unpack_from("=H", rest)[0] == socket.AF_INET:
                offender = IPv4Address(rest[4:8])
            destination = (IPv4Address(address[0]), address[1]) if address else (IPv4Address(0), 0)
            errors.append(IcmpError(icmp_type, icmp_code, info, destination, offender))
    return errors


def error_frame_for_guest(config: Config, gateway_mac: bytes, guest_mac: bytes, guest_ip: bytes, icmp_type: int,
                          code: int, rest: bytes, real_dst: IPv4Address, offender: IPv4Address | None,
                          protocol: int, transport_head: bytes) -> bytes:
    """An ICMP error telling the guest what the host was told about its packet.

    The quote is the guest's own view of what it sent (its address, the virtual
    destination, ``protocol`` and the first 8 bytes of the transport header); the error
    comes from the offender as the guest sees it (or from the destination)."""
    virtual_dst = translate_source(config, real_dst).packed
    quoted = bytes(build_ipv4_header(guest_ip, virtual_dst, protocol, len(transport_head))) + transport_head
    source = translate_source(config, offender).packed if offender else virtual_dst
    return icmp_frame(guest_mac, gateway_mac, source, guest_ip, icmp_type, code, rest, quoted)
