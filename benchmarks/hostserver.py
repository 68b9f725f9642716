"""Host-side servers for the benchmark harness (runs as its own process, on the host).

    python -m benchmarks.hostserver --tcp ADDR:PORT [--udp-echo ADDR:PORT] [--dns ADDR:PORT]

Prints one line ``ready [ADDR:PORT=ok|busy(ERRNO)...]`` on stdout once every socket is bound
(the optional DNS sockets say whether they could be bound), then serves until killed.

TCP: the first byte a client sends picks the mode:
  ``r``  request/response: answer ``R`` and close (the connection-rate test)
  ``p``  ping-pong: echo every byte that follows until EOF (the latency test)
  ``h``  hold: answer ``H`` and keep the connection open, idle, until EOF (the memory test)
UDP echo: every datagram goes back to its sender (the UDP-support probe).
DNS: a minimal authoritative responder that answers every A question with 10.0.0.1
(no forwarding, no cache: the upstream a stack's DNS forwarder talks to).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import struct
import sys

ANSWER_IP = bytes([10, 0, 0, 1])


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class BenchTcp(asyncio.Protocol):
    __slots__ = ("transport", "mode")

    def __init__(self) -> None:
        self.transport = None
        self.mode = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if self.mode == 0:
            self.mode = data[0]
            rest = data[1:]
            if self.mode == 0x72:  # r
                self.transport.write(b"R")
                self.transport.close()
                return
            if self.mode == 0x68:  # h
                self.transport.write(b"H")
                return
            if self.mode == 0x70:  # p
                if rest:
                    self.transport.write(rest)
                return
            self.transport.close()
            return
        if self.mode == 0x70:
            self.transport.write(data)

    def eof_received(self):
        return False  # close


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(data, addr)


def dns_answer(query: bytes) -> bytes | None:
    """A response to a standard query with one question; None for anything else."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack_from("!HHH", query)
    if flags & 0x8000 or qdcount != 1:
        return None
    i = 12
    while True:
        if i >= len(query):
            return None
        n = query[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            return None
        i += 1 + n
    if i + 4 > len(query):
        return None
    qtype = struct.unpack_from("!H", query, i)[0]
    question = query[12:i + 4]
    rflags = 0x8400 | (flags & 0x0100) | 0x0080  # QR, AA, RD copied, RA
    if qtype == 1:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + ANSWER_IP
        return struct.pack("!HHHHHH", qid, rflags, 1, 1, 0, 0) + question + answer
    return struct.pack("!HHHHHH", qid, rflags, 1, 0, 0, 0) + question


class DnsServer(asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        reply = dns_answer(data)
        if reply is not None:
            self.transport.sendto(reply, addr)


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in args.tcp:
        host, port = split_addr(spec)
        servers.append(await loop.create_server(BenchTcp, host, port, backlog=4096, reuse_address=True))
    for spec in args.udp_echo:
        host, port = split_addr(spec)
        await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, port))
    for spec in args.dns:
        host, port = split_addr(spec)
        await loop.create_datagram_endpoint(DnsServer, local_addr=(host, port))
    optional = []
    for spec in args.dns_optional:
        host, port = split_addr(spec)
        try:
            await loop.create_datagram_endpoint(DnsServer, local_addr=(host, port))
            optional.append(f"{spec}=ok")
        except OSError as e:
            optional.append(f"{spec}=busy({e.errno})")
    print(" ".join(["ready", *optional]), flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hostserver")
    p.add_argument("--tcp", action="append", default=[], metavar="ADDR:PORT")
    p.add_argument("--udp-echo", action="append", default=[], metavar="ADDR:PORT")
    p.add_argument("--dns", action="append", default=[], metavar="ADDR:PORT")
    p.add_argument("--dns-optional", action="append", default=[], metavar="ADDR:PORT",
                   help="also answer DNS here if the port is free (reported on the ready line)")
    args = p.parse_args(argv)
    raise_nofile()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
