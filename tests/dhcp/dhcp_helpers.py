"""Helpers for DHCP tests: build client messages with scapy, read replies with dpkt."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

import dpkt
from scapy.layers.dhcp import BOOTP, DHCP

from netkit.config import Config
from netkit.dhcp import DhcpReply, DhcpServer, LeaseTable

MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
MAC_C = bytes.fromhex("02000000000c")


def client_message(message_type: str, mac: bytes, *, xid: int = 0x1234, ciaddr: str = "0.0.0.0",
                   flags: int = 0, options: list | tuple = ()) -> bytes:
    """A client's DHCP message; ``options`` are scapy (name, value) pairs."""
    return bytes(BOOTP(op=1, chaddr=mac, xid=xid, ciaddr=ciaddr, flags=flags)
                 / DHCP(options=[("message-type", message_type), *options, "end"]))


@dataclass
class ParsedReply:
    reply: DhcpReply
    message: dpkt.dhcp.DHCP
    options: dict[int, bytes]

    @property
    def message_type(self) -> int:
        return self.options[53][0]

    @property
    def yiaddr(self) -> IPv4Address:
        return IPv4Address(self.message.yiaddr)

    @property
    def ciaddr(self) -> IPv4Address:
        return IPv4Address(self.message.ciaddr)


def parse_reply(reply: DhcpReply) -> ParsedReply:
    message = dpkt.dhcp.DHCP(reply.payload)
    options: dict[int, bytes] = {}
    for code, value in message.opts:
        options[code] = options.get(code, b"") + value
    return ParsedReply(reply, message, options)


class Exchange:
    """A server plus shorthand for sending one client message and reading the reply."""

    def __init__(self, config: Config, leases: LeaseTable | None = None) -> None:
        self.config = config
        self.leases = leases if leases is not None else LeaseTable(config)
        self.server = DhcpServer(config, self.leases)

    @property
    def stats(self):
        return self.server.stats

    def send(self, message_type: str, mac: bytes, now: float, *, src_mac: bytes | None = None,
             **kwargs) -> ParsedReply | None:
        payload = client_message(message_type, mac, **kwargs)
        reply = self.server.handle_untrusted(payload, src_mac=src_mac or mac, now=now)
        return parse_reply(reply) if reply is not None else None

    def lease(self, mac: bytes, now: float, *, hostname: str | None = None) -> IPv4Address:
        """DISCOVER, then REQUEST the offered address; returns it (asserting the ACK)."""
        offer = self.send("discover", mac, now)
        assert offer is not None and offer.message_type == 2
        options = [("server_id", str(self.config.gateway_ip)), ("requested_addr", str(offer.yiaddr))]
        if hostname:
            options.append(("hostname", hostname))
        ack = self.send("request", mac, now, options=options)
        assert ack is not None and ack.message_type == 5, ack and ack.options
        assert ack.yiaddr == offer.yiaddr
        return ack.yiaddr


def tiny_config(addresses: int = 2, **changes) -> Config:
    """The default subnet with a pool of ``addresses`` addresses from .10 up."""
    return Config(lowest_ip=IPv4Address("192.168.65.10"),
                  highest_ip=IPv4Address("192.168.65.10") + (addresses - 1), **changes)
