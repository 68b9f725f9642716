"""Host-side TCP test server for netkit's NAT tests (runs as its own process).

Listens on 127.0.0.1:PORT (printed on stdout once ready). Each connection starts with
one command line:
  upload            read until EOF, answer the sha256 hex of what arrived, close
  download N SEED   send N pseudo-random bytes (from SEED), then close
  hostclose N SEED TOKEN
                    send N bytes, shut down our write side, read until EOF, and write
                    the sha256 of what arrived to RESULTS/TOKEN
  reset N SEED      send N bytes, then reset the connection (SO_LINGER 0)
  echo              echo everything until EOF
"""

import hashlib
import os
import random
import socket
import struct
import sys
import threading


def stream(n: int, seed: int):
    rng = random.Random(seed)
    block = rng.randbytes(1 << 16)
    sent = 0
    while sent < n:
        chunk = block[: min(len(block), n - sent)]
        yield chunk
        sent += len(chunk)
        block = block[1:] + block[:1] if sent % (1 << 20) == 0 else block


def read_line(conn: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        b = conn.recv(1)
        if not b:
            break
        buf += b
    return buf.decode().strip()


def handle(conn: socket.socket, results: str) -> None:
    try:
        words = read_line(conn).split()
        if not words:
            return
        cmd = words[0]
        if cmd == "upload":
            h = hashlib.sha256()
            while data := conn.recv(1 << 20):
                h.update(data)
            conn.sendall(h.hexdigest().encode())
        elif cmd in ("download", "hostclose", "reset"):
            for chunk in stream(int(words[1]), int(words[2])):
                conn.sendall(chunk)
            if cmd == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif cmd == "hostclose":
                conn.shutdown(socket.SHUT_WR)
                h = hashlib.sha256()
                while data := conn.recv(1 << 20):
                    h.update(data)
                with open(os.path.join(results, words[3]), "w") as f:
                    f.write(h.hexdigest())
        elif cmd == "echo":
            while data := conn.recv(1 << 20):
                conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()


def main() -> None:
    results = sys.argv[1] if len(sys.argv) > 1 else "."
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((os.environ.get("BIND", "127.0.0.1"), int(os.environ.get("PORT", "0"))))
    srv.listen(4096)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, results), daemon=True).start()


if __name__ == "__main__":
    main()
