"""Guest-side TCP client for netkit's NAT tests (run inside the guest's namespace).

  upload HOST PORT N SEED          send N bytes, half-close, print "sent=<sha> got=<sha>"
  download HOST PORT N SEED        print "got=<sha> expected=<sha> bytes=<n>"
  hostclose HOST PORT N SEED TOKEN read the host's N bytes to EOF, then send N bytes and
                                   close; print "got=<sha> expected=<sha> sent=<sha>"
  reset HOST PORT N SEED           read until the host resets; print "reset after=<n>"
  many HOST PORT CONNS BYTES       CONNS concurrent uploads of BYTES each; print "ok=<k>"
"""

import asyncio
import hashlib
import socket
import sys

sys.path.insert(0, __import__("os").path.dirname(__file__))
from tcp_test_server import stream  # noqa: E402


def expected(n, seed):
    h = hashlib.sha256()
    for chunk in stream(n, seed):
        h.update(chunk)
    return h.hexdigest()


def connect(host, port, command):
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(command.encode() + b"\n")
    return s


def main():
    mode, host, port = sys.argv[1:4]
    args = sys.argv[4:]
    if mode == "upload":
        n, seed = int(args[0]), int(args[1])
        s = connect(host, port, "upload")
        h = hashlib.sha256()
        for chunk in stream(n, seed):
            s.sendall(chunk)
            h.update(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while data := s.recv(4096):
            reply += data
        print(f"sent={h.hexdigest()} got={reply.decode()}")
    elif mode in ("download", "hostclose"):
        n, seed = int(args[0]), int(args[1])
        command = f"download {n} {seed}" if mode == "download" else f"hostclose {n} {seed} {args[2]}"
        s = connect(host, port, command)
        h = hashlib.sha256()
        total = 0
        while data := s.recv(1 << 20):
            h.update(data)
            total += len(data)
        line = f"got={h.hexdigest()} expected={expected(n, seed)} bytes={total}"
        if mode == "hostclose":  # the host shut its side; we keep sending
            sent = hashlib.sha256()
            for chunk in stream(n, seed + 1):
                s.sendall(chunk)
                sent.update(chunk)
            s.close()
            line += f" sent={sent.hexdigest()}"
        print(line)
    elif mode == "reset":
        s = connect(host, port, f"reset {args[0]} {args[1]}")
        total = 0
        try:
            while data := s.recv(1 << 20):
                total += len(data)
            print(f"eof after={total}")
        except ConnectionResetError:
            print(f"reset after={total}")
    elif mode == "many":
        conns, size = int(args[0]), int(args[1])

        async def one(i):
            reader, writer = await asyncio.open_connection(host, int(port))
            payload = (str(i).encode() * size)[:size]
            writer.write(b"upload\n" + payload)
            await writer.drain()
            writer.write_eof()
            reply = await reader.read()
            writer.close()
            return reply.decode() == hashlib.sha256(payload).hexdigest()

        async def run():
            results = await asyncio.gather(*(one(i) for i in range(conns)), return_exceptions=True)
            ok = sum(1 for r in results if r is True)
            errors = {repr(r) for r in results if isinstance(r, BaseException)}
            print(f"ok={ok} errors={sorted(errors)[:3]}")

        asyncio.run(run())


if __name__ == "__main__":
    main()
