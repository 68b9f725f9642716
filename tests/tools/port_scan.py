"""Guest-side TCP connect scan of every port of one address (run inside the guest).

Up to IN_FLIGHT connection attempts at once (non-blocking connect + epoll); prints
"open=N refused=M other=K".
"""

import errno
import resource
import select
import socket
import sys

target = sys.argv[1]
in_flight = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
resource.setrlimit(resource.RLIMIT_NOFILE, (in_flight + 1000, in_flight + 1000))
ports = iter(range(1, 65536))
ep = select.epoll()
pending = {}
counts = {"open": 0, "refused": 0, "other": 0}


def start(port):
    s = socket.socket()
    s.setblocking(False)
    err = s.connect_ex((target, port))
    if err not in (0, errno.EINPROGRESS):
        counts["other"] += 1
        s.close()
        return
    pending[s.fileno()] = s
    ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLERR)


exhausted = False
while True:
    while not exhausted and len(pending) < in_flight:
        port = next(ports, None)
        if port is None:
            exhausted = True
            break
        start(port)
    if not pending:
        break
    for fd, _ev in ep.poll(5):
        s = pending.pop(fd)
        ep.unregister(fd)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        counts["open" if err == 0 else "refused" if err == errno.ECONNREFUSED else "other"] += 1
        s.close()
print(" ".join(f"{k}={v}" for k, v in counts.items()))
