"""A tiny authoritative DNS server on 127.0.0.1 for tests (UDP and TCP, same port).

Prints its port once ready. Answers from the fixed zone below; everything else NXDOMAIN.
"""

import socket
import struct
import threading

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.zoneresolver import ZoneResolver

ZONE = """
www.example.test.      60 IN A     10.11.12.13
www.example.test.      60 IN AAAA  fd00::1213
example.test.          60 IN MX    10 mail.example.test.
example.test.          60 IN TXT   "hello netkit"
_http._tcp.example.test. 60 IN SRV 0 5 80 www.example.test.
alias.example.test.    60 IN CNAME www.example.test.
13.12.11.10.in-addr.arpa. 60 IN PTR www.example.test.
""" + "".join(f'big.example.test. 60 IN TXT "{i:03d}-{"x" * 200}"\n' for i in range(12))

resolver = ZoneResolver(ZONE)


def answer(data: bytes) -> bytes:
    request = DNSRecord.parse(data)
    reply = request.reply()
    qname, qtype = request.q.qname, QTYPE[request.q.qtype]
    for name, rtype, rr in resolver.zone:
        if name == qname and (rtype == qtype or rtype == "CNAME"):
            reply.add_answer(rr)
            if rtype == "CNAME":
                for name2, rtype2, rr2 in resolver.zone:
                    if name2 == rr.rdata.label and rtype2 == qtype:
                        reply.add_answer(rr2)
    if not reply.rr and not any(name == qname for name, _, _ in resolver.zone):
        reply.header.rcode = RCODE.NXDOMAIN
    return reply.pack()


def serve_udp(sock):
    while True:
        data, addr = sock.recvfrom(65535)
        out = answer(data)
        if len(out) > 512:  # classic UDP limit: truncate, the client retries over TCP
            record = DNSRecord.parse(data).reply()
            record.header.tc = 1
            out = record.pack()
        sock.sendto(out, addr)


def serve_tcp_client(conn):
    with conn:
        while True:
            head = conn.recv(2)
            if len(head) < 2:
                return
            (n,) = struct.unpack("!H", head)
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    return
                data += chunk
            out = answer(data)
            conn.sendall(struct.pack("!H", len(out)) + out)


def main():
    while True:  # one port number free for both UDP and TCP
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket()
        try:
            tcp.bind(("127.0.0.1", port))
            break
        except OSError:
            udp.close()
            tcp.close()
    tcp.listen(64)
    threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
    print(port, flush=True)
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=serve_tcp_client, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
