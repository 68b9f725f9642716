"""The gateway's HTTP proxy used by a real kernel guest (curl), origins on host loopback."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import trio

import netkit
from netkit.testing import require_privileged, require_tool
from netkit.testing.netns_guest import open_netns_guest

pytestmark = pytest.mark.privileged

TOOLS = os.path.join(os.path.dirname(__file__), "tools")
PROXY = "http://192.168.65.1:3128"


@pytest.fixture(autouse=True)
def _privileged():
    require_privileged()
    require_tool("busybox")
    require_tool("curl")


@pytest.fixture
def origin():
    proc = subprocess.Popen([sys.executable, os.path.join(TOOLS, "http_origin.py")], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, TOKEN="origin-token-42"))
    yield int(proc.stdout.readline())
    proc.kill()
    proc.wait()


@pytest.fixture
def tls_origin(tmp_path):
    openssl = require_tool("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=tls.test"], check=True, capture_output=True)
    code = f"""
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"secret over tls"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain("{cert}", "{key}")
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True); s.serve_forever()
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    yield int(proc.stdout.readline())
    proc.kill()
    proc.wait()


@pytest.fixture
async def guest_and_switch(tmp_path):
    http_file = tmp_path / "http.json"
    http_file.write_text(json.dumps({"http": "", "https": "", "exclude": ""}))
    config = netkit.Config(http_proxy_file=str(http_file), dns_upstreams=("127.0.0.1:9",))
    async with netkit.open_switch(config) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            yield guest, switch, http_file


async def test_explicit_get_post_and_connect(guest_and_switch, origin, tls_origin, tmp_path):
    guest, switch, _ = guest_and_switch
    got = await guest.run(["curl", "-sS", "--max-time", "10", "-x", PROXY, f"http://127.0.0.1:{origin}/token"])
    assert got.stdout == b"origin-token-42", got.stderr
    body = os.urandom(50 << 20)
    upload = tmp_path / "body.bin"
    upload.write_bytes(body)
    post = await guest.run(["curl", "-sS", "--max-time", "60", "-x", PROXY, "-H", "Transfer-Encoding: chunked",
                            "--data-binary", f"@{upload}", f"http://host.docker.internal:{origin}/hash"], timeout=90)
    assert post.stdout.decode() == hashlib.sha256(body).hexdigest(), post.stderr
    tls = await guest.run(["curl", "-sS", "-k", "--max-time", "10", "-x", PROXY,
                           f"https://host.docker.internal:{tls_origin}/"])
    assert tls.stdout == b"secret over tls", tls.stderr
    stats = switch.http_proxy.statistics()
    assert stats.get("tunnels", 0) >= 1 and stats.get("requests", 0) >= 2, stats


async def test_malformed_request_gets_400_and_dead_origin_502(guest_and_switch):
    guest, switch, _ = guest_and_switch
    garbage = await guest.run([sys.executable, "-c", """
import socket
s = socket.create_connection(("192.168.65.1", 3128), timeout=5)
s.sendall(b"THIS IS NOT HTTP\\r\\n\\r\\n")
print(s.recv(100).split(b"\\r\\n")[0].decode())
"""])
    assert garbage.stdout.decode().startswith("HTTP/1.1 400"), garbage
    dead = await guest.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-x", PROXY,
                            "http://127.0.0.1:9/"])
    assert dead.stdout == b"502"


async def test_transparent_mode_follows_the_file(guest_and_switch, origin):
    guest, switch, http_file = guest_and_switch
    before = switch.http_proxy.statistics().get("requests", 0)
    http_file.write_text(json.dumps({"transparent_http_ports": [origin], "allow": ["*"]}))
    with trio.fail_after(5):
        while switch.http_proxy.settings.transparent_kind(origin) is None:
            await trio.sleep(0.1)
    got = await guest.run(["curl", "-sS", "--max-time", "10", f"http://host.docker.internal:{origin}/token"])
    assert got.stdout == b"origin-token-42", got.stderr
    assert switch.http_proxy.statistics().get("requests", 0) == before + 1
