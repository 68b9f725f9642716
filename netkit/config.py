"""netkit configuration: one object, passed in, never global.

Every limit netkit enforces is a named field here with a sane default. ``Config`` is
immutable; build variations with ``dataclasses.replace`` or ``Config.from_toml``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

__all__ = ["Config", "ConfigError", "StaticLease", "Share", "parse_share", "parse_mac", "format_mac",
           "parse_dns_server"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting at fault."""


def parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ConfigError(f"not a MAC address: {text!r}")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"not a MAC address: {text!r}") from None
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True, slots=True)
class StaticLease:
    """A fixed address for a guest, by MAC or by vpnkit UUID."""

    ip: IPv4Address
    mac: bytes | None = None
    uuid: str | None = None


@dataclass(frozen=True, slots=True)
class Share:
    """A host directory exported to guests over 9P; guests mount it with ``aname=NAME``.

    Whatever the options, a guest never gets set-user-ID or set-group-ID bits, device
    nodes or extended attributes onto the host (see the README's 9P section)."""

    name: str
    path: str
    #: Every change is refused with EROFS.
    read_only: bool = False
    #: Guests may set file owners: chown/chgrp to any uid and gid, and new files get the
    #: guest's uid (from Tattach) and the gid it asks for. Off: chown is refused (EPERM)
    #: and new files belong to the user netkit runs as.
    owners: bool = False


#: ``NAME=PATH`` suffixes and the ``Share`` flag each one sets.
SHARE_OPTIONS = {"ro": "read_only", "owners": "owners"}


def parse_share(text: str) -> Share:
    """``NAME=PATH[:ro][:owners]`` (options in any order, at the end; a path may
    itself contain ``:``, as long as it does not end in an option's name)."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise ConfigError(f"shares: expected NAME=PATH[:ro][:owners], got {text!r}")
    flags: dict[str, bool] = {}
    while True:
        head, colon, tail = rest.rpartition(":")
        if not colon or tail not in SHARE_OPTIONS or SHARE_OPTIONS[tail] in flags:
            break
        flags[SHARE_OPTIONS[tail]] = True
        rest = head
    return Share(name, rest, **flags)


def _ip(name: str, value: Any) -> IPv4Address:
    try:
        return IPv4Address(str(value))
    except ValueError:
        raise ConfigError(f"{name}: not an IPv4 address: {value!r}") from None


@dataclass(frozen=True, slots=True)
class Config:
    # --- addressing (defaults as vpnkit / Docker Desktop) ---
    subnet: IPv4Network = IPv4Network("192.168.65.0/24")
    gateway_ip: IPv4Address = IPv4Address("192.168.65.1")
    #: The address guests use to reach the host's own loopback (127.0.0.1).
    host_ip: IPv4Address = IPv4Address("192.168.65.2")
    lowest_ip: IPv4Address = IPv4Address("192.168.65.3")
    highest_ip: IPv4Address = IPv4Address("192.168.65.254")
    gateway_mac: bytes = bytes.fromhex("f616 36bc f9c6")
    #: IP MTU offered to guests (DHCP option 26) and used to clamp TCP MSS.
    mtu: int = 1500
    #: Map the host alias IP to host 127.0.0.1 (``--no-host-loopback`` turns it off).
    host_loopback: bool = True
    #: Extra virtual IP -> real IP translations (``--nat VIRTUAL=REAL``).
    nat: tuple[tuple[IPv4Address, IPv4Address], ...] = ()

    # --- DHCP ---
    lease_seconds: int = 7200
    domain_name: str = "netkit.internal"
    domain_search: tuple[str, ...] = ()
    static_leases: tuple[StaticLease, ...] = ()
    #: How long an address offered in a DHCPOFFER stays held for the client that was
    #: offered it. Short, so a DISCOVER flood cannot hold the pool for long.
    offer_seconds: float = 30.0
    #: How long an address a client rejected with DHCPDECLINE (because something else
    #: answered ARP for it) is kept out of the pool.
    decline_seconds: float = 600.0
    #: Most addresses one switch port's DHCPDECLINEs keep in quarantine at once; another
    #: decline from that port returns its oldest to the pool (0: never quarantine).
    decline_max_per_port: int = 4
    #: Most of the DHCP pool (a fraction below 1) in quarantine at once, whoever declined;
    #: beyond, the oldest quarantined address returns to the pool. Declines never take
    #: the whole pool from the other guests.
    decline_max_pool_fraction: float = 0.25

    # --- switch limits ---
    #: Most guest ports on one switch; attaches beyond are refused.
    max_ports: int = 256
    #: Most MAC addresses (guest identities) a single port may send from. A new MAC
    #: beyond this replaces the port's oldest, whose DHCP lease is released (1: one
    #: port is one guest; a guest that changes its MAC starts afresh).
    max_macs_per_port: int = 1
    #: Bytes a link may queue towards a slow guest before frames are dropped.
    link_send_queue_bytes: int = 4 * 1024 * 1024

    # --- TCP NAT ---
    tcp_connect_timeout: float = 15.0
    #: Once the guest has closed its side (FIN passed on to the host), how long the host
    #: side may stay silent and open before both are reset. A guest that closed and went
    #: away can never say so, and a host peer that never closes would otherwise hold the
    #: flow forever (vpnkit's sockets stuck in CLOSE_WAIT). Open connections are never
    #: timed out, however idle.
    tcp_half_close_timeout: float = 300.0
    max_connections: int = 65536
    #: Most TCP connections one guest (switch port) may hold at once.
    max_connections_per_guest: int = 16384

    # --- buffer budgets (netkit.budget) ---
    #: Bytes of TCP data netkit may buffer for one guest (switch port), all its
    #: connections together: host data waiting for the guest to acknowledge it, guest data
    #: waiting for a host socket to take it, and out-of-order segments. At the limit the
    #: guest's receive windows stop opening, its host sockets are left unread,
    #: out-of-order data is dropped and new connections get RST (``budget-*`` in the TCP
    #: NAT statistics). A flow holding next to nothing may still move one MSS each way,
    #: so no flow deadlocks. 64 MiB lets a guest keep tens of fast transfers going
    #: (each engine buffers at most 1 MiB each way) and caps a hostile guest that opens
    #: hundreds of connections and never reads (300 such took 300 MB before budgets).
    guest_buffer_bytes: int = 64 * 1024 * 1024
    #: The same, for all guests together; a guest never gets more than this. 256 MiB:
    #: four guests at their limit. When the total is used up, guests holding less than a
    #: fair share may still open connections.
    total_buffer_bytes: int = 256 * 1024 * 1024

    # --- UDP and ICMP NAT ---
    #: A UDP flow (guest address and port) with no traffic either way for this long is closed.
    udp_idle_timeout: float = 60.0
    #: Most UDP flows at once; when full, the guest holding the most flows gives up its
    #: least recently used one (so a guest's flood never evicts a smaller guest's flows).
    udp_max_flows: int = 4096
    #: Most UDP flows one guest (switch port) may hold; beyond, its own least recently
    #: used flow is evicted, never another guest's.
    udp_max_flows_per_guest: int = 2048
    #: An ICMP echo flow (guest address and identifier) idle this long is closed.
    icmp_idle_timeout: float = 30.0
    #: Most ICMP echo flows at once (when full, as for UDP: the biggest holder gives one up).
    icmp_max_flows: int = 1024
    #: Most ICMP echo flows one guest may hold (beyond, its own least recently used goes).
    icmp_max_flows_per_guest: int = 512
    #: Bytes of incomplete fragmented datagrams held at once, and how long one may wait.
    reassembly_max_bytes: int = 4 * 1024 * 1024
    reassembly_timeout: float = 30.0
    #: One guest's (switch port's) share of ``reassembly_max_bytes``: beyond it, that
    #: guest's own oldest incomplete datagrams are dropped, never another guest's. 1 MiB
    #: holds 16 datagrams of 64 KiB; a quarter of the default total, so a guest flooding
    #: incomplete fragments leaves the rest to the others.
    reassembly_guest_bytes: int = 1024 * 1024

    # --- DNS (netkit/dns) ---
    #: Names that resolve to ``host_ip`` (the host, as seen from guests).
    host_names: tuple[str, ...] = ("host.docker.internal", "host.containers.internal", "host.internal")
    #: Names that resolve to ``gateway_ip``.
    gateway_names: tuple[str, ...] = ("gateway.docker.internal", "gateway.containers.internal",
                                      "gateway.internal", "http.docker.internal")
    #: Names that resolve to the asking guest's own address (``--vm-names``).
    vm_names: tuple[str, ...] = ()
    #: "forward": every non-local query goes to ``dns_upstreams``. "getaddrinfo": A and AAAA
    #: go through the host's getaddrinfo (so they follow the host's own resolver setup:
    #: VPN split DNS, nsswitch, mDNS); other types are forwarded, or answered NOTIMP when
    #: there is no upstream.
    dns_mode: str = "forward"
    #: Upstream servers, "ADDR", "ADDR:PORT" or "[V6ADDR]:PORT". Empty: the nameservers of
    #: ``dns_resolv_conf``, re-read when that file changes.
    dns_upstreams: tuple[str, ...] = ()
    dns_resolv_conf: str = "/etc/resolv.conf"
    #: A file in /etc/hosts syntax whose names are answered locally (re-read on change).
    dns_hosts_file: str | None = None
    #: Every query is answered within this many seconds (SERVFAIL at worst).
    dns_timeout: float = 2.0
    #: Extra rounds over the upstream list within ``dns_timeout``.
    dns_retries: int = 2
    #: Most upstream resolutions at once; queries beyond get SERVFAIL at once.
    dns_max_in_flight: int = 256
    #: Most answers cached (LRU; 0 turns the cache off).
    dns_cache_entries: int = 10000
    #: Longest a positive answer stays cached, whatever its TTL says.
    dns_cache_max_ttl: int = 86400
    #: Longest a negative answer (NXDOMAIN, NODATA; RFC 2308) stays cached.
    dns_negative_cache_max_ttl: int = 300
    #: A DNS-over-TCP connection with nothing to do for this long is closed.
    dns_tcp_idle_timeout: float = 10.0
    #: Most queries answered at once on one DNS-over-TCP connection (more are not read yet).
    dns_tcp_pipeline: int = 32

    # --- 9P file sharing (TCP 564 on the gateway) ---
    #: Host directories guests may mount (``mount -t 9p -o trans=tcp,aname=NAME``); as
    #: strings ``NAME=PATH[:ro][:owners]``, or TOML tables (name, path, read_only, owners).
    shares: tuple[Share, ...] = ()
    #: Largest 9P message size negotiated (Linux's TCP transport goes up to 1 MiB).
    files_msize_max: int = 1024 * 1024
    #: Most fids (open handles and walked names) one 9P connection may hold.
    files_max_fids: int = 4096
    #: Most 9P requests of one connection in progress at once.
    files_max_outstanding: int = 32

    # --- outbound policy (netkit.policy) ---
    #: Destinations guests may reach, ``[PROTO:]CIDR[:PORTS]``; when any are given, only those.
    allow: tuple[str, ...] = ()
    #: Destinations guests may never reach (wins over allow).
    deny: tuple[str, ...] = ()
    #: Refused unless an allow rule names them: the cloud metadata address, as gvproxy does.
    default_deny: tuple[str, ...] = ("169.254.169.254/32",)

    # --- port forwards ---
    #: Static forwards, as ``tcp:[ADDR:]PORT:GUEST_IP:GUEST_PORT``, ``udp:...`` or
    #: ``unix:PATH:GUEST_IP:GUEST_PORT`` (see netkit.forward).
    forwards: tuple[str, ...] = ()

    # --- HTTP proxy (netkit.http_proxy) on the gateway ---
    #: Gateway port of the explicit proxy (http.docker.internal:3128); 0 turns it off.
    http_proxy_port: int = 3128
    #: vpnkit's ``--http`` JSON file (http, https, exclude, transparent_*_ports), watched
    #: for changes. Without it, HTTP_PROXY/HTTPS_PROXY/NO_PROXY of the netkit process apply.
    http_proxy_file: str | None = None
    #: Most guest connections the proxy serves at once (explicit and transparent, all
    #: guests); more get 503.
    http_proxy_max_connections: int = 1024
    #: Most of those one guest may hold, so one guest cannot keep the others on 503;
    #: its own next ones get 503.
    http_proxy_max_connections_per_guest: int = 64
    #: Seconds a guest has to send a request line and headers, counted from their first
    #: byte and not extended by bytes trickled in: then 408 and close. A new connection
    #: that sends nothing for this long is closed too.
    http_proxy_header_timeout: float = 30.0
    #: Most origin-name lookups (the host's resolver, a bounded thread pool) one guest's
    #: proxy requests may have in progress; more get 503 at once.
    http_proxy_max_lookups_per_guest: int = 8

    # --- persistence ---
    #: Where DHCP leases are kept across restarts (None: not kept). See netkit.state.
    state_file: str | None = None

    # --- misc ---
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.subnet, IPv4Network):
            raise ConfigError("subnet: must be an IPv4 network")
        for name in ("gateway_ip", "host_ip", "lowest_ip", "highest_ip"):
            addr = getattr(self, name)
            if addr not in self.subnet:
                raise ConfigError(f"{name}: {addr} is not inside subnet {self.subnet}")
            if addr in (self.subnet.network_address, self.subnet.broadcast_address):
                raise ConfigError(f"{name}: {addr} is the subnet's network or broadcast address")
        if self.gateway_ip == self.host_ip:
            raise ConfigError("host_ip: must differ from gateway_ip")
        if int(self.lowest_ip) > int(self.highest_ip):
            raise ConfigError(f"lowest_ip: {self.lowest_ip} is above highest_ip {self.highest_ip}")
        if not 576 <= self.mtu <= 65520:
            raise ConfigError(f"mtu: {self.mtu} is outside 576..65520")
        if len(self.gateway_mac) != 6 or self.gateway_mac[0] & 1:
            raise ConfigError("gateway_mac: must be a 6-byte unicast MAC")
        if self.lease_seconds < 60:
            raise ConfigError("lease_seconds: must be at least 60")
        if self.offer_seconds <= 0:
            raise ConfigError("offer_seconds: must be positive")
        if self.decline_seconds < 0:
            raise ConfigError("decline_seconds: must not be negative")
        if self.decline_max_per_port < 0:
            raise ConfigError("decline_max_per_port: must not be negative")
        if not 0 <= self.decline_max_pool_fraction < 1:
            raise ConfigError("decline_max_pool_fraction: must be at least 0 and below 1")
        # An empty domain_name means "send no option 15".
        if self.domain_name and not _is_dns_name(self.domain_name):
            raise ConfigError(f"domain_name: {self.domain_name!r} is not a valid DNS name")
        for name in self.domain_search:
            if not _is_dns_name(name):
                raise ConfigError(f"domain_search: {name!r} is not a valid DNS name")
        reserved_ips = {self.gateway_ip, self.host_ip}
        seen_ips: set[IPv4Address] = set()
        seen_keys: set[bytes | str] = set()
        for lease in self.static_leases:
            if lease.ip not in self.subnet:
                raise ConfigError(f"static_leases: {lease.ip} is not inside subnet {self.subnet}")
            if lease.ip in reserved_ips or lease.ip in (self.subnet.network_address,
                                                        self.subnet.broadcast_address):
                raise ConfigError(f"static_leases: {lease.ip} is the gateway, host, network or broadcast address")
            if (lease.mac is None) == (lease.uuid is None):
                raise ConfigError("static_leases: each needs exactly one of mac or uuid")
            if lease.mac is not None and (len(lease.mac) != 6 or lease.mac[0] & 1):
                raise ConfigError("static_leases: mac must be a 6-byte unicast MAC")
            key = lease.mac if lease.mac is not None else lease.uuid
            if lease.ip in seen_ips or key in seen_keys:
                # Two owners for one address (or two addresses for one guest) would make
                # the lease a guest gets depend on the order of the list.
                raise ConfigError(f"static_leases: duplicate address or guest for {lease.ip}")
            seen_ips.add(lease.ip)
            seen_keys.add(key)  # type: ignore[arg-type]
        for name in ("max_ports", "max_macs_per_port", "link_send_queue_bytes",
                     "max_connections", "max_connections_per_guest", "udp_max_flows", "icmp_max_flows",
                     "udp_max_flows_per_guest", "icmp_max_flows_per_guest", "reassembly_max_bytes", "reassembly_guest_bytes", "http_proxy_max_connections", "http_proxy_max_connections_per_guest",
                     "http_proxy_max_lookups_per_guest"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        for name in ("guest_buffer_bytes", "total_buffer_bytes"):
            # Below one maximum-size segment a budget could not hold a single segment.
            if getattr(self, name) < 65536:
                raise ConfigError(f"{name}: must be at least 65536")
        for name in ("tcp_connect_timeout", "tcp_half_close_timeout", "udp_idle_timeout", "icmp_idle_timeout",
                     "reassembly_timeout", "http_proxy_header_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        self._validate_shares()
        self._validate_policy()
        self._validate_dns()

    def _validate_dns(self) -> None:
        for name in ("host_names", "gateway_names", "vm_names"):
            for dns_name in getattr(self, name):
                if not _is_dns_name(dns_name):
                    raise ConfigError(f"{name}: {dns_name!r} is not a valid DNS name")
        if self.dns_mode not in ("forward", "getaddrinfo"):
            raise ConfigError(f"dns_mode: {self.dns_mode!r} is not 'forward' or 'getaddrinfo'")
        for server in self.dns_upstreams:
            parse_dns_server(server, "dns_upstreams")
        for name in ("dns_timeout", "dns_tcp_idle_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        for name in ("dns_retries", "dns_cache_entries", "dns_cache_max_ttl", "dns_negative_cache_max_ttl"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        for name in ("dns_max_in_flight", "dns_tcp_pipeline"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")

    def _validate_shares(self) -> None:
        share_names: set[str] = set()
        for share in self.shares:
            if not share.name or "/" in share.name or "\0" in share.name or len(share.name) > 255:
                raise ConfigError(f"shares: {share.name!r} is not a valid share name")
            if share.name in share_names:
                raise ConfigError(f"shares: duplicate share name {share.name!r}")
            if not share.path.startswith("/"):
                raise ConfigError(f"shares: path of {share.name!r} must be absolute, not {share.path!r}")
            share_names.add(share.name)
        if not 4096 <= self.files_msize_max <= 16 * 1024 * 1024:
            raise ConfigError("files_msize_max: must be 4096..16777216")
        for name in ("files_max_fids", "files_max_outstanding"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")

    def shares_by_name(self) -> dict[str, Share]:
        """The shares keyed by attach name (``aname``), as ``serve_9p`` takes them."""
        return {share.name: share for share in self.shares}

    def _validate_policy(self) -> None:
        from .policy import PolicyError, parse_rule

        for name in ("allow", "deny", "default_deny"):
            for rule in getattr(self, name):
                try:
                    parse_rule(rule)
                except PolicyError as e:
                    raise ConfigError(f"{name}: {e}") from None

    def pool(self) -> range:
        """The integer addresses DHCP may hand out dynamically."""
        return range(int(self.lowest_ip), int(self.highest_ip) + 1)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], base: "Config | None" = None) -> "Config":
        """Build a Config from TOML-like keys (strings for addresses), over ``base``."""
        base = base or cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"unknown setting {key!r}")
            changes[name] = _coerce(name, value)
        if "subnet" in changes and not any(k in changes for k in ("gateway_ip", "host_ip", "lowest_ip", "highest_ip")):
            changes.update(_addresses_for_subnet(changes["subnet"]))
        try:
            return dataclasses.replace(base, **changes)
        except TypeError as e:  # pragma: no cover - field mismatch
            raise ConfigError(str(e)) from None

    @classmethod
    def from_toml(cls, path: str, base: "Config | None" = None) -> "Config":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
        return cls.from_mapping(data, base)


def _addresses_for_subnet(subnet: IPv4Network) -> dict[str, IPv4Address]:
    """Default gateway/host/pool addresses for a subnet, laid out as vpnkit does."""
    first = int(subnet.network_address)
    last = int(subnet.broadcast_address)
    if last - first < 4:
        raise ConfigError(f"subnet: {subnet} is too small (need at least a /29)")
    return {
        "gateway_ip": IPv4Address(first + 1),
        "host_ip": IPv4Address(first + 2),
        "lowest_ip": IPv4Address(first + 3),
        "highest_ip": IPv4Address(last - 1),
    }


def parse_dns_server(text: str, setting: str = "dns_upstreams") -> tuple[str, int]:
    """Split a DNS server "ADDR", "ADDR:PORT", "V6ADDR" or "[V6ADDR]:PORT" into (address,
    port); the address must be an IP literal (an IPv6 one may carry a %scope)."""
    text = str(text).strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{setting}: not ADDR[:PORT]: {text!r}")
        if rest:
            port = _port(setting, text, rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(setting, text, port_text)
    try:
        ipaddress.ip_address(host.split("%", 1)[0] if ":" in host else host)
    except ValueError:
        raise ConfigError(f"{setting}: not an IP address: {text!r}") from None
    return host, port


def _port(setting: str, text: str, port_text: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{setting}: bad port in {text!r}")
    return int(port_text)


def _is_dns_name(name: str) -> bool:
    """True if ``name`` can be sent in DHCP options 15 and 119: ASCII labels of 1..63
    bytes, at most 253 characters in all (a trailing dot is allowed)."""
    if not name or not name.isascii() or len(name.rstrip(".")) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return all(0 < len(label) <= 63 and label.isprintable() and " " not in label for label in labels)


def _coerce(name: str, value: Any) -> Any:
    try:
        if name == "subnet":
            return IPv4Network(str(value), strict=False)
        if name in ("gateway_ip", "host_ip", "lowest_ip", "highest_ip"):
            return _ip(name, value)
        if name == "gateway_mac":
            return parse_mac(value) if isinstance(value, str) else bytes(value)
        if name == "nat":
            pairs = value.items() if isinstance(value, dict) else (s.split("=", 1) for s in value)
            return tuple((_ip("nat", v), _ip("nat", r)) for v, r in pairs)
        if name in ("domain_search", "host_names", "gateway_names", "vm_names", "dns_upstreams"):
            if isinstance(value, str):  # a comma-separated list, as on a command line
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
        if name == "dns_hosts_file":
            return str(value) if value else None
        if name == "shares":
            return _coerce_shares(value)
        if name == "static_leases":
            out = []
            for item in value:
                mac = parse_mac(item["mac"]) if "mac" in item else None
                out.append(StaticLease(ip=_ip("static_leases", item["ip"]), mac=mac, uuid=item.get("uuid")))
            return tuple(out)
        # Every plain number and flag: by the type the field declares, so a new limit
        # needs no entry here.
        scalar = _SCALAR_FIELDS.get(name)
        return scalar(value) if scalar is not None else value
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{name}: invalid value {value!r}") from None


#: Config fields holding an int, a float or a bool -> that type (annotations are strings
#: under ``from __future__ import annotations``).
_SCALAR_FIELDS = {f.name: {"int": int, "float": float, "bool": bool}[f.type]
                  for f in dataclasses.fields(Config) if f.type in ("int", "float", "bool")}


def _coerce_shares(value: Any) -> tuple[Share, ...]:
    """TOML ``[[shares]]`` tables (name, path, read_only, owners) or
    ``NAME=PATH[:ro][:owners]`` strings."""
    out = []
    for item in value:
        if isinstance(item, Share):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_share(item))
        else:
            unknown = set(item) - {"name", "path", *SHARE_OPTIONS.values()}
            if unknown:
                raise ConfigError(f"shares: unknown key(s) {', '.join(sorted(unknown))} in {item!r}")
            out.append(Share(str(item["name"]), str(item["path"]), _flag(item.get("read_only", False)),
                             _flag(item.get("owners", False))))
    return tuple(out)


def _flag(value: Any) -> bool:
    """A TOML boolean (``"owners" = "false"`` must not turn ownership on)."""
    if not isinstance(value, bool):
        raise ConfigError(f"shares: expected true or false, got {value!r}")
    return value


def subnet_mask(subnet: IPv4Network) -> IPv4Address:
    return ipaddress.IPv4Address(int(subnet.netmask))
