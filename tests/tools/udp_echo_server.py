"""Host-side UDP echo server on 127.0.0.1 (prints its port once ready)."""

import socket

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind((__import__("os").environ.get("BIND", "127.0.0.1"), int(__import__("os").environ.get("PORT", "0"))))
print(sock.getsockname()[1], flush=True)
while True:
    data, addr = sock.recvfrom(65535)
    sock.sendto(data, addr)
