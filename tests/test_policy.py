"""Outbound policy: rules, the Python hook, and enforcement on real guest traffic."""

import os
import subprocess
import sys
from ipaddress import IPv4Address

import pytest
import trio
import trio.testing

import netkit
from netkit.policy import ALLOW, DENY, Decision, DnsRequest, FlowRequest, Policy, PolicyError, parse_rule
from netkit.testing import require_privileged, require_tool
from netkit.testing.netns_guest import open_netns_guest

TOOLS = os.path.join(os.path.dirname(__file__), "tools")
HOST = "192.168.65.2"


def test_rules():
    p = Policy(deny=("tcp:10.0.0.0/8:22,8000-8100",))
    assert p.check_flow("tcp", IPv4Address("192.168.65.3"), IPv4Address("10.1.2.3"), 22) == DENY
    assert p.check_flow("tcp", IPv4Address("192.168.65.3"), IPv4Address("10.1.2.3"), 8050) == DENY
    assert p.check_flow("tcp", IPv4Address("192.168.65.3"), IPv4Address("10.1.2.3"), 80) == ALLOW
    assert p.check_flow("udp", IPv4Address("192.168.65.3"), IPv4Address("10.1.2.3"), 22) == ALLOW
    assert p.check_flow("tcp", IPv4Address("192.168.65.3"), IPv4Address("169.254.169.254"), 80) == DENY
    allow_only = Policy(allow=("192.168.65.2", "169.254.169.254"))
    assert allow_only.check_flow("icmp", IPv4Address("192.168.65.3"), IPv4Address("8.8.8.8"), 0) == DENY
    assert allow_only.check_flow("tcp", IPv4Address("192.168.65.3"), IPv4Address("169.254.169.254"), 80) == ALLOW
    assert p.counters["tcp-denied"] == 3
    with pytest.raises(PolicyError):
        parse_rule("tcp:10.0.0.0/8:99999")
    with pytest.raises(netkit.ConfigError, match="deny"):
        netkit.Config(deny=("not-an-address",))


def test_hook_sees_requests_and_failures_refuse():
    p = Policy()
    seen = []

    def hook(request):
        seen.append(request)
        if isinstance(request, DnsRequest) and request.name == "blocked.test":
            return DENY
        if isinstance(request, FlowRequest) and request.port == 666:
            raise RuntimeError("hook bug")
        return None

    p.hook = hook
    assert p.check_flow("tcp", IPv4Address("192.168.65.3"), IPv4Address("1.2.3.4"), 80) == ALLOW
    assert p.check_flow("tcp", IPv4Address("192.168.65.3"), IPv4Address("1.2.3.4"), 666) == DENY
    assert p.check_dns(IPv4Address("192.168.65.3"), "Blocked.Test.", "A") == DENY
    assert seen[0] == FlowRequest("tcp", IPv4Address("192.168.65.3"), IPv4Address("1.2.3.4"), 80)
    assert p.counters["hook-errors"] == 1


@pytest.fixture
def udp_echo():
    proc = subprocess.Popen([sys.executable, os.path.join(TOOLS, "udp_echo_server.py")], stdout=subprocess.PIPE,
                            text=True)
    yield int(proc.stdout.readline())
    proc.kill()
    proc.wait()


@pytest.mark.privileged
async def test_policy_enforced_for_tcp_udp_icmp_and_dns(udp_echo):
    require_privileged()
    require_tool("busybox")
    require_tool("dig")
    config = netkit.Config(deny=(f"udp:{HOST}:{udp_echo}",), dns_upstreams=("127.0.0.1:9",))
    async with netkit.open_switch(config) as switch:
        policy = switch.policy

        def hook(request):
            if isinstance(request, FlowRequest) and request.protocol == "icmp":
                return DENY
            if isinstance(request, DnsRequest) and request.name == "pinned.test":
                return Decision.redirect("10.20.30.40")
            if isinstance(request, FlowRequest) and request.port == 7777:
                return Decision.redirect("127.0.0.1", listener_port)
            return None

        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener_port = listener.getsockname()[1]
        policy.hook = hook
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            ping = await guest.run(["ping", "-c", "1", "-W", "2", HOST])
            assert ping.returncode != 0
            assert switch.icmp_nat.counters["policy-denied"] == 1
            udp = await guest.run([sys.executable, "-c", f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.connect(("{HOST}", {udp_echo}))
s.send(b"x")
try:
    s.recv(10); print("answered")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e)
"""])
            assert udp.stdout.decode().strip() in ("refused", "error [Errno 113] No route to host"), udp
            assert switch.udp_nat.counters["policy-denied"] == 1
            metadata = await guest.run([sys.executable, "-c", "import socket; s = socket.socket(); s.settimeout(3);"
                                        "s.connect(('169.254.169.254', 80))"])
            assert b"Connection refused" in metadata.stderr, metadata.stderr
            assert switch.tcp_nat.counters["policy-denied"] == 1
            redirected = await guest.run([sys.executable, "-c", f"import socket; socket.create_connection(('{HOST}', 7777), timeout=3); print('ok')"])
            assert redirected.stdout.strip() == b"ok"
            dig = await guest.run(["dig", "@192.168.65.1", "+short", "+time=2", "+tries=1", "pinned.test"])
            assert dig.stdout.decode().strip() == "10.20.30.40"
        listener.close()
        assert policy.counters["icmp-denied"] == 1 and policy.counters["dns-redirect"] == 1


# ----------------------------------------------------------------------------- the gate
class _TableHost(netkit.nat.host.HostNetwork):
    """Names from a table; records connects and never makes one."""

    def __init__(self, names):
        self.names = names
        self.connects = []

    async def resolve(self, name):
        if name not in self.names:
            import socket
            raise socket.gaierror(socket.EAI_NONAME, "not in the test table")
        return [IPv4Address(a) for a in self.names[name]]

    async def connect_tcp(self, address, port):
        self.connects.append((str(address), port))
        raise ConnectionRefusedError(111, "test host")


GUEST = IPv4Address("192.168.65.3")


def _gate(names=None, **config):
    from netkit.nat.gate import HostGate

    cfg = netkit.Config(dns_upstreams=("127.0.0.1:9",), **config)
    return HostGate(cfg, Policy(cfg.allow, cfg.deny, cfg.default_deny), _TableHost(names or {}))


def test_flow_request_stays_compatible():
    request = FlowRequest("tcp", GUEST, IPv4Address("10.0.0.1"), 80)
    assert (request.via, request.name, request.switch_port, request.upstream) == ("nat", None, None, None)


def test_gate_routes_translate_then_ask_the_policy():
    from netkit.nat.gate import DENIED, UNREACHABLE, Route

    gate = _gate(deny=("tcp:192.168.65.2/32:22",), nat=((IPv4Address("192.168.65.9"), IPv4Address("10.9.9.9")),))
    assert gate.route("tcp", GUEST, IPv4Address("192.168.65.2"), 80) == Route(IPv4Address("127.0.0.1"), 80)
    assert gate.route("tcp", GUEST, IPv4Address("192.168.65.2"), 22) is DENIED
    assert gate.route("udp", GUEST, IPv4Address("192.168.65.9"), 53) == Route(IPv4Address("10.9.9.9"), 53)
    assert gate.route("tcp", GUEST, IPv4Address("169.254.169.254"), 80) is DENIED
    # Loopback, 0.0.0.0 and the gateway addressed by a guest reach nothing.
    for address in ("127.0.0.1", "127.1.2.3", "0.0.0.0", "192.168.65.1"):
        assert gate.route("tcp", GUEST, IPv4Address(address), 80) is UNREACHABLE
    gate.policy.hook = lambda r: Decision.redirect("127.0.0.1", 8080) if r.port == 81 else None
    assert gate.route("tcp", GUEST, IPv4Address("10.0.0.1"), 81) == Route(IPv4Address("127.0.0.1"), 8080, True)
    assert _gate(host_loopback=False).route("tcp", GUEST, IPv4Address("192.168.65.2"), 80) is UNREACHABLE


async def test_gate_proxy_streams_check_what_is_connected_to():
    from netkit.policy import Refused

    gate = _gate({"multi.test": ["10.0.0.1", "169.254.169.254"], "ok.test": ["10.0.0.1", "10.0.0.2"]})

    async def refused(host, port=80, **kw):
        with pytest.raises(Refused) as info:
            await gate.open_proxy_stream(GUEST, host, port, **kw)
        return info.value.reason

    assert await refused("multi.test") == "denied"
    assert await refused("[fe80::1]") == "unreachable"
    assert await refused("192.168.65.1") == "unreachable"
    assert await refused("nowhere.test") == "unresolved"
    assert gate.host.connects == []
    # Every address that passed is tried, in order; none that did not.
    with pytest.raises(ConnectionRefusedError):
        await gate.open_proxy_stream(GUEST, "ok.test", 80)
    assert gate.host.connects == [("10.0.0.1", 80), ("10.0.0.2", 80)]
    # Upstream: a name the host cannot resolve is asked as 0.0.0.0; the upstream is
    # connected to only when the origin passes.
    gate.host.connects.clear()
    with pytest.raises(ConnectionRefusedError):
        await gate.open_proxy_stream(GUEST, "intranet.test", 80, upstream=("127.0.0.1", 3129))
    assert gate.host.connects == [("127.0.0.1", 3129)]
    strict = _gate({}, allow=("10.0.0.0/8",))
    with pytest.raises(Refused):
        await strict.open_proxy_stream(GUEST, "intranet.test", 80, upstream=("127.0.0.1", 3129))
    assert strict.host.connects == []
    assert strict.policy.counters["proxy-denied"] == 1 and strict.counters["proxy-denied"] == 1


async def test_gate_bounds_name_lookups_per_guest():
    """The host resolver is a bounded thread pool: one guest's slow names get 503 beyond
    its share, and another guest's lookups still run."""
    from netkit.policy import Refused

    release = trio.Event()

    class SlowHost(_TableHost):
        async def resolve(self, name):
            if name.startswith("slow"):
                await release.wait()
            return await super().resolve(name)

    gate = _gate(http_proxy_max_lookups_per_guest=2)
    gate.host = SlowHost({"fast.test": ["10.0.0.1"], "slow1.test": ["10.0.0.1"], "slow2.test": ["10.0.0.1"]})
    other = IPv4Address("192.168.65.4")
    async with trio.open_nursery() as nursery:
        for name in ("slow1.test", "slow2.test"):
            nursery.start_soon(lambda n=name: _expect_refused_connect(gate, n))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Refused) as info:
            await gate.open_proxy_stream(GUEST, "fast.test", 80)
        assert info.value.reason == "busy" and gate.counters["lookups-busy"] == 1
        with pytest.raises(ConnectionRefusedError):  # resolved and allowed; the test host refuses
            await gate.open_proxy_stream(other, "fast.test", 80)
        release.set()
    assert gate._lookups == {}


async def _expect_refused_connect(gate, name):
    with pytest.raises(ConnectionRefusedError):
        await gate.open_proxy_stream(GUEST, name, 80)


async def test_icmp_echo_asks_the_policy_once_per_flow_and_destination(fake_guest, netkit_switch):
    """Like TCP and UDP, an echo flow asks the gate once per destination, not per request."""
    asked = []

    def hook(request):
        if isinstance(request, FlowRequest) and request.protocol == "icmp":
            asked.append(request.destination)
        return None

    netkit_switch.policy.hook = hook
    assert len(await fake_guest.ping(HOST, count=5)) == 5
    assert asked == [IPv4Address(HOST)]
