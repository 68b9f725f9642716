"""Command-line entry points: ``netkit-switch`` (the daemon) and ``netkit`` (run, ...)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Sequence

import trio

from .config import Config, ConfigError
from .runtime import open_switch

__all__ = ["main", "switch_main", "build_config"]

log = logging.getLogger("netkit")


class UsageError(Exception):
    """A command-line problem; the message names the flag at fault."""


# ----------------------------------------------------------------------------- options
def add_switch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("addressing")
    g.add_argument("--config", metavar="FILE", help="TOML file with Config settings (flags override it)")
    g.add_argument("--subnet", metavar="CIDR", help="guest subnet (default 192.168.65.0/24)")
    g.add_argument("--gateway-ip", metavar="IP", help="gateway address (default .1 of the subnet)")
    g.add_argument("--host-ip", metavar="IP", help="address that reaches host 127.0.0.1 (default .2)")
    g.add_argument("--lowest-ip", metavar="IP", help="first DHCP pool address (default .3)")
    g.add_argument("--highest-ip", metavar="IP", help="last DHCP pool address (default .254)")
    g.add_argument("--mtu", type=int, metavar="N", help="MTU offered to guests (default 1500)")
    g.add_argument("--nat", action="append", default=[], metavar="VIRTUAL=REAL",
                   help="translate a virtual IP to a real one (repeatable)")
    g.add_argument("--no-host-loopback", action="store_true",
                   help="do not map the host IP to host 127.0.0.1")
    g.add_argument("--pcap", metavar="FILE", help="capture every guest link's frames to a pcap file")
    g.add_argument("--forward", action="append", default=[], metavar="SPEC",
                   help="forward a host port into a guest: tcp:[ADDR:]PORT:GUEST_IP:GUEST_PORT, udp:... or "
                        "unix:PATH:GUEST_IP:GUEST_PORT (repeatable; ADDR defaults to 127.0.0.1)")
    g = p.add_argument_group("DNS (the gateway answers on port 53)")
    g.add_argument("--dns-upstream", action="append", default=[], metavar="ADDR[:PORT]",
                   help="forward queries to this server (repeatable; default: the host's /etc/resolv.conf)")
    g.add_argument("--dns-mode", choices=["forward", "getaddrinfo"],
                   help="forward: send queries upstream; getaddrinfo: resolve A/AAAA with the host's "
                        "resolver (follows VPN split DNS)")
    g.add_argument("--hosts", metavar="FILE", help="an /etc/hosts-style file whose names win (reloaded on change)")
    g.add_argument("--host-names", metavar="NAMES",
                   help="comma-separated names for the host alias (default host.docker.internal,...)")
    g.add_argument("--gateway-names", metavar="NAMES",
                   help="comma-separated names for the gateway (default gateway.docker.internal,...)")
    g.add_argument("--vm-names", metavar="NAMES", help="comma-separated names that resolve to the asking guest")
    g.add_argument("--domain-search", metavar="DOMAINS", help="comma-separated DHCP search domains (option 119)")
    g.add_argument("--state", metavar="FILE", dest="state_file",
                   help="keep DHCP leases in FILE across restarts (written atomically)")
    g = p.add_argument_group("HTTP proxy (on the gateway, like http.docker.internal:3128)")
    g.add_argument("--http", metavar="FILE", dest="http_proxy_file",
                   help="vpnkit-style JSON proxy settings (http, https, exclude, transparent_http_ports, "
                        "transparent_https_ports), reloaded when the file changes; default: the "
                        "HTTP_PROXY/HTTPS_PROXY/NO_PROXY environment")
    g.add_argument("--http-proxy-port", type=int, metavar="PORT",
                   help="gateway port of the explicit proxy (default 3128; 0 turns it off)")
    g.add_argument("--http-proxy-max-connections", type=int, metavar="N",
                   help="most proxy connections at once, all guests (default 1024; more get 503)")
    g.add_argument("--http-proxy-max-connections-per-guest", type=int, metavar="N",
                   help="most proxy connections one guest may hold (default 64; its next get 503)")
    g.add_argument("--http-proxy-header-timeout", type=float, metavar="SECONDS",
                   help="a request line and headers must arrive within this (default 30; then 408)")
    g = p.add_argument_group("outbound policy")
    g.add_argument("--allow", action="append", default=[], metavar="[PROTO:]CIDR[:PORTS]",
                   help="only these destinations may be reached (repeatable); also lifts the default "
                        "metadata-address deny for what it names")
    g.add_argument("--deny", action="append", default=[], metavar="[PROTO:]CIDR[:PORTS]",
                   help="never reach these destinations (repeatable; wins over --allow). "
                        "169.254.169.254 is denied unless allowed")
    g = p.add_argument_group("limits")
    g.add_argument("--max-connections", type=int, metavar="N",
                   help="most guest TCP connections at once; SYNs beyond get RST (default 65536)")
    g.add_argument("--max-connections-per-guest", type=int, metavar="N",
                   help="most TCP connections one guest (switch port) may hold (default 16384)")
    g.add_argument("--guest-buffer-bytes", type=int, metavar="BYTES",
                   help="most TCP data buffered for one guest, all its connections together; beyond, "
                        "windows close, host sockets wait and new connections get RST (default 64 MiB)")
    g.add_argument("--total-buffer-bytes", type=int, metavar="BYTES",
                   help="the same for all guests together (default 256 MiB)")
    g.add_argument("--tcp-connect-timeout", type=float, metavar="SECONDS",
                   help="how long a host connect() may take before the guest gets RST (default 15)")
    g.add_argument("--udp-idle-timeout", type=float, metavar="SECONDS",
                   help="close UDP flows idle this long (default 60)")
    g.add_argument("--udp-max-flows", type=int, metavar="N",
                   help="most UDP flows; beyond, the biggest guest's least recently used is evicted (default 4096)")
    g.add_argument("--udp-max-flows-per-guest", type=int, metavar="N",
                   help="most UDP flows of one guest; beyond, its own least recently used is evicted (default 2048)")
    g.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default info)")


#: Config settings whose command-line flag has another name.
_FLAG_FOR_SETTING = {"state_file": "state", "shares": "share", "http_proxy_file": "http", "dns_upstreams": "dns-upstream", "dns_hosts_file": "hosts", "forwards": "forward",
                     "host_loopback": "no-host-loopback"}


def build_config(args: argparse.Namespace) -> Config:
    """Config from --config, then the flags; errors name the flag at fault."""
    base = Config()
    if args.config:
        base = Config.from_toml(args.config)
    overrides: dict[str, object] = {}
    for flag in ("subnet", "gateway_ip", "host_ip", "lowest_ip", "highest_ip", "mtu", "log_level",
                 "max_connections", "max_connections_per_guest", "guest_buffer_bytes", "total_buffer_bytes",
                 "tcp_connect_timeout", "udp_idle_timeout",
                 "udp_max_flows", "udp_max_flows_per_guest", "state_file", "http_proxy_file", "http_proxy_port", "http_proxy_max_connections",
                 "http_proxy_max_connections_per_guest", "http_proxy_header_timeout"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = value
    if getattr(args, "nat", None):
        for item in args.nat:
            if "=" not in item:
                raise ConfigError(f"--nat: expected VIRTUAL=REAL, got {item!r}")
        overrides["nat"] = list(args.nat)
    for flag, field in (("dns_upstream", "dns_upstreams"),):
        if getattr(args, flag, None):
            overrides[field] = list(getattr(args, flag))
    for flag in ("host_names", "gateway_names", "vm_names", "domain_search"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = [name.strip() for name in value.split(",") if name.strip()]
    for flag in ("allow", "deny"):
        if getattr(args, flag, None):
            overrides[flag] = list(getattr(args, flag))
    if getattr(args, "dns_mode", None):
        overrides["dns_mode"] = args.dns_mode
    if getattr(args, "hosts", None):
        overrides["dns_hosts_file"] = args.hosts
    if getattr(args, "forward", None):
        from .forward import ForwardError, parse_forward_spec
        for spec in args.forward:
            try:
                parse_forward_spec(spec)
            except ForwardError as e:
                raise ConfigError(f"forward: {e}") from None
        overrides["forwards"] = list(args.forward)
    if getattr(args, "share", None) and isinstance(args.share[0], str) and "=" in args.share[0] \
            and getattr(args, "subcommand", None) != "vm":
        overrides["shares"] = list(args.share)
    if getattr(args, "no_host_loopback", False):
        overrides["host_loopback"] = False
    try:
        return Config.from_mapping(overrides, base)
    except ConfigError as e:
        setting, _, message = str(e).partition(":")
        flag = _FLAG_FOR_SETTING.get(setting, setting.replace("_", "-"))
        raise ConfigError(f"--{flag}: {message.strip()}") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# ----------------------------------------------------------------------------- netkit-switch
def switch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netkit-switch",
        description="Run a netkit virtual switch: guests attached over taps or sockets get DHCP, "
                    "and their connections become ordinary host socket calls.")
    add_switch_options(p)
    g = p.add_argument_group("guest links (any number, all on one switch)")
    g.add_argument("--tap", action="append", default=[], metavar="NAME",
                   help="create a tap device NAME; its MAC is derived from NAME and --netns, so with "
                        "--state a restarted switch gives the guest the same address")
    g.add_argument("--netns", metavar="NS", help="move the --tap devices into this existing network namespace")
    g.add_argument("--offload", action="store_true",
                   help="negotiate virtio-net offloads (checksum, TSO) on --tap devices")
    g.add_argument("--listen-qemu", action="append", default=[], metavar="PATH",
                   help="unix socket for QEMU -netdev stream/socket (4-byte length framing)")
    g.add_argument("--listen-vfkit", action="append", default=[], metavar="PATH",
                   help="unix datagram socket for vfkit")
    g.add_argument("--listen-vpnkit", "--ethernet", action="append", default=[], metavar="PATH",
                   dest="listen_vpnkit", help="unix socket speaking the hyperkit/vpnkit protocol")
    g.add_argument("--listen-vsock", action="append", default=[], type=int, metavar="PORT",
                   help="AF_VSOCK port speaking the vpnkit protocol")
    g.add_argument("--stdio", action="store_true", help="one guest on stdin/stdout (u16 LE framing)")
    g.add_argument("--share", action="append", default=[], metavar="NAME=PATH[:ro][:owners]",
                   help="export a host directory over 9P on the gateway (TCP 564); guests mount it with "
                        "mount -t 9p -o trans=tcp,port=564,version=9p2000.L,aname=NAME 192.168.65.1 /mnt; "
                        ":ro refuses every change, :owners lets guests chown (never setuid/setgid bits or "
                        "device nodes)")
    g.add_argument("--user", metavar="NAME",
                   help="after creating taps and listeners as root, continue as this user")
    from .api.paths import DEFAULT_PATH_HELP, default_api_path
    g = p.add_argument_group("control")
    g.add_argument("--api", nargs="?", const=default_api_path(), default=None, metavar="PATH",
                   help="serve the control API (HTTP+JSON, gvproxy-compatible forwarder routes) on a unix socket "
                        f"created mode 0600; without PATH: {DEFAULT_PATH_HELP}")
    g.add_argument("--api-token", metavar="TOKEN", default=None,
                   help="require 'Authorization: Bearer TOKEN' on API requests (default: $NETKIT_API_TOKEN, "
                        "if set)")
    return p


async def _open_link_sources(switch, args: argparse.Namespace, pcap_writer) -> None:
    """Attach taps and start listeners named on the command line."""
    from .links.middleware import PcapCapture

    def wrap(link):
        return PcapCapture(link, pcap_writer) if pcap_writer is not None else link

    config = switch.config
    for name in args.tap:
        from .links.tap import TapLink
        try:
            link = TapLink.create(name, netns=args.netns, offload=args.offload, mtu=config.mtu)
        except OSError as e:
            raise UsageError(f"--tap {name}: {e}") from None
        switch.attach(wrap(link))
        log.info("tap %s ready%s", name, f" in netns {args.netns}" if args.netns else "")
    for path in args.listen_qemu:
        from .links.qemu import QemuListener
        await switch.listen(_WrappingListener(QemuListener(path), wrap))
        log.info("listening for QEMU on %s", path)
    for path in args.listen_vfkit:
        from .links.vfkit import VfkitLink
        try:
            link = VfkitLink.bind(path)
        except OSError as e:
            raise UsageError(f"--listen-vfkit {path}: {e}") from None
        switch.attach(wrap(link))
        log.info("listening for vfkit on %s", path)
    for path in args.listen_vpnkit:
        from .links.vpnkit import VpnkitListener
        listener = VpnkitListener(path, mtu=config.mtu, allocate=switch.gateway.allocate_for_uuid)
        await switch.listen(_WrappingListener(listener, wrap))
        log.info("listening for vpnkit protocol on %s", path)
    for port in args.listen_vsock:
        from .links.vsock import VsockListener
        try:
            listener = VsockListener(port, mtu=config.mtu, allocate=switch.gateway.allocate_for_uuid)
        except OSError as e:
            raise UsageError(f"--listen-vsock {port}: {e}") from None
        await switch.listen(_WrappingListener(listener, wrap))
        log.info("listening for vsock on port %d", port)
    if args.stdio:
        from .links.stdio import StdioLink
        switch.attach(wrap(StdioLink()))


class _WrappingListener:
    """Applies link middleware (pcap) to every connection a listener accepts."""

    def __init__(self, listener, wrap) -> None:
        self.listener = listener
        self.wrap = wrap

    async def serve(self, on_link, *, task_status=trio.TASK_STATUS_IGNORED):
        async def wrapped(link):
            await on_link(self.wrap(link))
        await self.listener.serve(wrapped, task_status=task_status)


def _drop_privileges(user: str, owned_paths: list[str]) -> None:
    """Become ``user`` (and its group, with no supplementary groups) for good."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--user: no such user {user!r}") from None
    for path in owned_paths:  # files the switch keeps writing must stay writable
        try:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        except FileNotFoundError:
            pass
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    log.info("dropped privileges: running as %s (uid %d)", user, entry.pw_uid)


async def _wait_for_signal() -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            return signum
    return 0


def _open_pcap(path: str | None):
    """One capture file shared by every link (one pcap header, frames interleaved)."""
    if not path:
        return None
    from .links.middleware import PcapWriter
    try:
        return PcapWriter(path)
    except OSError as e:
        raise UsageError(f"--pcap {path}: {e.strerror or e}") from None


async def _run_switch(args: argparse.Namespace, config: Config) -> None:
    from contextlib import AsyncExitStack

    from .api.server import ApiServerError, open_api
    from .forward import ForwardError

    pcap_file = _open_pcap(args.pcap)
    try:
        async with open_switch(config) as switch, AsyncExitStack() as control:
            await _open_link_sources(switch, args, pcap_file)
            try:  # the control API (nothing without --api); the socket is made here
                await control.enter_async_context(
                    open_api(switch, args.api, token=args.api_token or os.environ.get("NETKIT_API_TOKEN")))
            except ApiServerError as e:
                raise UsageError(f"--api: {e}") from None
            if args.user:
                switch.icmp_nat.prepare()  # a raw ICMP socket needs root: open it first
                _drop_privileges(args.user, [path for path in (config.state_file,) if path])
            log.info("netkit switch up: gateway %s, host %s, subnet %s", config.gateway_ip, config.host_ip,
                     config.subnet)
            await _wait_for_signal()
    except ForwardError as e:
        raise UsageError(f"--forward: {e}") from None
    finally:
        if pcap_file is not None:
            pcap_file.close()


def switch_main(argv: Sequence[str] | None = None) -> int:
    parser = switch_parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as e:
        parser.error(str(e))
    if not (args.tap or args.listen_qemu or args.listen_vfkit or args.listen_vpnkit or args.listen_vsock
            or args.stdio):
        parser.error("no guest link given: use --tap, --listen-qemu, --listen-vfkit, --listen-vpnkit, "
                     "--listen-vsock or --stdio")
    if args.netns and not args.tap:
        parser.error("--netns: only applies to --tap devices")
    if args.user and os.geteuid() != 0:
        parser.error("--user: only root can switch to another user")
    _setup_logging(config.log_level)
    try:
        trio.run(_run_switch, args, config)
    except UsageError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        pass
    return 0


# ----------------------------------------------------------------------------- netkit run
def run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run", help="run a command in a fresh network namespace connected through netkit",
        description="Make a fresh network namespace, attach it to a netkit switch through a tap "
                    "(as eth0, with address, route, MTU and resolv.conf set), run CMD inside, "
                    "exit with its status and clean up. Like `pasta -- CMD`.")
    add_switch_options(p)
    p.add_argument("--offload", action="store_true", help="negotiate virtio-net offloads on the tap")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    return p


async def _run_command(config: Config, args: argparse.Namespace, argv: list[str]) -> int:
    from .links.tap import TapLink
    from .netns import Netns, unique_name

    pcap_file = _open_pcap(args.pcap)
    ns = Netns.create(unique_name("nkrun"))
    try:
        async with open_switch(config) as switch:
            tap_name = unique_name("nkt")
            link = TapLink.create(tap_name, netns=ns.name, offload=args.offload, mtu=config.mtu)
            if pcap_file is not None:
                from .links.middleware import PcapCapture
                link = PcapCapture(link, pcap_file)
            ns.rename(tap_name, "eth0")
            mac = ns.mac_of("eth0")
            lease = switch.gateway.reserve(mac)
            ns.configure("eth0", lease.ip, config.subnet, config.gateway_ip, config.mtu)
            ns.write_resolv_conf(config.gateway_ip, config.domain_search)
            switch.attach(link)
            log.info("guest %s in netns %s", lease.ip, ns.name)
            proc = await trio.run_process(ns.exec_args(argv), check=False, stdin=None)
            switch_status = proc.returncode
            # nursery exit cancels the switch
            return switch_status if switch_status >= 0 else 128 - switch_status
    finally:
        ns.delete()
        if pcap_file is not None:
            pcap_file.close()


# ----------------------------------------------------------------------------- netkit vm
def vm_parser(sub) -> argparse.ArgumentParser:
    from .vm import add_vm_options
    p = sub.add_parser(
        "vm", help="boot a QEMU VM whose network is netkit",
        description="Start a netkit switch in this process and boot a QEMU guest (virtio-net over "
                    "QEMU's stream netdev) on it, with its serial console on this terminal. "
                    "Exits with QEMU's status.")
    add_switch_options(p)
    add_vm_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netkit", description="netkit: a userspace network stack for "
                                     "VMs and network namespaces.")
    sub = parser.add_subparsers(dest="subcommand", required=True)
    rp = run_parser(sub)
    vp = vm_parser(sub)
    from .api.cli import API_COMMANDS, api_main, api_parsers
    api_parsers(sub)
    args = parser.parse_args(argv)
    if args.subcommand == "run":
        command = list(args.command)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            rp.error("no command given: netkit run [options] -- CMD ARGS...")
        try:
            config = build_config(args)
        except ConfigError as e:
            rp.error(str(e))
        if os.geteuid() != 0:
            rp.error("must run as root to create a network namespace and a tap device")
        _setup_logging(config.log_level if args.log_level else "warning")
        try:
            return trio.run(_run_command, config, args, command)
        except UsageError as e:
            rp.error(str(e))
        except KeyboardInterrupt:
            return 130
    elif args.subcommand == "vm":
        from .vm import vm_main
        return vm_main(args, vp)
    elif args.subcommand in API_COMMANDS:
        return api_main(args)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
