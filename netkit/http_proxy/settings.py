"""HTTP proxy settings: upstream proxies, the exclude (NO_PROXY) list and the allow list.

``ProxySettings`` is immutable and separate from ``netkit.Config`` because it is
reconfigured at run time (``HttpProxy.reconfigure``, or a vpnkit ``--http FILE`` that
changes). Everything is parsed and checked once, when the object is built: a bad URL
or pattern raises ``ConfigError`` here, never later while serving a guest.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from ..config import ConfigError

__all__ = ["ProxySettings", "Upstream", "HostPatterns", "ConfigError", "split_list"]

_LABEL_RE = re.compile(r"^[A-Za-z0-9_*-]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def split_list(text: str) -> tuple[str, ...]:
    """Split a NO_PROXY-style list: commas and/or whitespace separate, empties dropped."""
    return tuple(part for part in re.split(r"[,\s]+", text) if part)


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Pattern:
    """One entry of a host list: a CIDR/IP, or a DNS name suffix with ``*`` labels."""

    text: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    labels: tuple[str | None, ...]  # reversed; None matches any one label
    port: int | None
    everything: bool

    @classmethod
    def parse(cls, text: str, setting: str) -> "_Pattern":
        raw = text.strip()
        body, port = raw, None
        # "host:port" (not an IPv6 literal): restrict the pattern to one port.
        m = re.fullmatch(r"(.*[^:]):(\d{1,5})", raw)
        if m and (raw.count(":") == 1 or raw.startswith("[")):
            body, port = m.group(1), int(m.group(2))
            if not 0 < port < 65536:
                raise ConfigError(f"{setting}: bad port in {text!r}")
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        if body == "*":
            return cls(raw, None, (), port, True)
        try:
            network = ipaddress.ip_network(body, strict=False)
        except ValueError:
            network = None
        if network is not None:
            return cls(raw, network, (), port, False)
        name = body.lower().rstrip(".")
        if not name or not name.isascii():
            raise ConfigError(f"{setting}: not a domain, IP or CIDR: {text!r}")
        labels = name.split(".")
        if not all(_LABEL_RE.match(label) for label in labels):
            raise ConfigError(f"{setting}: not a domain, IP or CIDR: {text!r}")
        out: list[str | None] = []
        for label in reversed(labels):
            if label in ("", "*"):
                out.append(None)
            elif "*" in label:
                raise ConfigError(f"{setting}: '*' must be a whole label in {text!r}")
            else:
                out.append(label)
        return cls(raw, None, tuple(out), port, False)

    def matches(self, host: str, ip, port: int | None) -> bool:
        if self.port is not None and port is not None and port != self.port:
            return False
        if self.everything:
            return True
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        if ip is not None:
            return False
        bits = host.split(".")[::-1]
        if len(bits) < len(self.labels):
            return False
        return all(p is None or p == b for p, b in zip(self.labels, bits))


class HostPatterns:
    """A list of host patterns, matched like vpnkit's exclude list (and NO_PROXY):

    - ``example.com`` matches ``example.com`` and every name under it;
    - ``*.example.com`` and ``.example.com`` match names under ``example.com`` only;
      a ``*`` label matches any one label;
    - ``*`` matches everything;
    - ``10.0.0.0/8``, ``192.168.1.5``, ``::1``, ``fd00::/8`` match IP literals;
    - a trailing ``:port`` restricts any of the above to that port.

    Names match names and addresses match addresses: no DNS lookups are made.
    """

    __slots__ = ("_patterns",)

    def __init__(self, patterns: Iterable[str], setting: str = "patterns") -> None:
        self._patterns = tuple(_Pattern.parse(p, setting) for p in patterns)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def __repr__(self) -> str:
        return f"HostPatterns({[p.text for p in self._patterns]!r})"

    def matches(self, host: str, port: int | None = None) -> bool:
        host = host.lower().rstrip(".")
        ip = _parse_ip(host)
        if ip is not None and getattr(ip, "ipv4_mapped", None) is not None:
            ip = ip.ipv4_mapped
        return any(p.matches(host, ip, port) for p in self._patterns)


@dataclass(frozen=True, slots=True)
class Upstream:
    """A parsed upstream proxy URL (``http://user:pass@host:port`` or ``host:port``)."""

    host: str
    port: int
    #: The ``Proxy-Authorization`` value for ``user:pass@`` (Basic), or None.
    authorization: bytes | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, setting: str) -> "Upstream":
        text = url.strip()
        if not text:
            raise ConfigError(f"{setting}: empty proxy URL")
        if "://" not in text:
            text = "http://" + text  # vpnkit and curl accept a bare host:port
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as e:
            raise ConfigError(f"{setting}: bad proxy URL {_redact(url)!r}: {e}") from None
        if parts.scheme.lower() != "http":
            raise ConfigError(
                f"{setting}: unsupported proxy scheme {parts.scheme!r} in {_redact(url)!r} "
                "(only http:// proxies are supported)")
        host = parts.hostname or ""
        if not host or not (_HOST_RE.match(host) or _parse_ip(host)):
            raise ConfigError(f"{setting}: proxy URL {_redact(url)!r} has no valid host")
        if port is None:
            port = 80
        if not 0 < port < 65536:
            raise ConfigError(f"{setting}: bad port in proxy URL {_redact(url)!r}")
        auth = None
        if parts.username is not None:
            userpass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            auth = b"Basic " + base64.b64encode(userpass.encode("utf-8"))
        return cls(host=host, port=port, authorization=auth)

    @property
    def key(self) -> tuple:
        return ("proxy", self.host, self.port, self.authorization)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'***@' if self.authorization else ''}{host}:{self.port}"


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)


def _ports(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        value = split_list(str(value)) if isinstance(value, str) else [value]
    try:
        ports = tuple(int(p) for p in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: not a list of ports: {value!r}") from None
    for p in ports:
        if not 0 < p < 65536:
            raise ConfigError(f"{name}: {p} is not a TCP port")
    return ports


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return split_list(value)
    if not isinstance(value, Iterable):
        raise ConfigError(f"{name}: not a list of hosts: {value!r}")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{name}: not a host pattern: {item!r}")
        out.extend(split_list(item))
    return tuple(out)


#: The keys of vpnkit's ``--http`` JSON file; absent ones take their defaults.
VPNKIT_KEYS = ("http", "https", "exclude", "transparent_http_ports", "transparent_https_ports")


@dataclass(frozen=True, slots=True, repr=False)
class ProxySettings:
    """What the proxy does; replace the whole object to reconfigure (``HttpProxy.reconfigure``)."""

    #: Upstream proxy URL for plain http requests (absolute-form is sent to it), or None.
    http: str | None = None
    #: Upstream proxy URL for https / CONNECT (a CONNECT is sent to it), or None.
    https: str | None = None
    #: Hosts that bypass the upstream proxies (NO_PROXY syntax, see ``HostPatterns``).
    exclude: tuple[str, ...] = ()
    #: Guest destination ports the gateway should hand to ``handle_transparent(tls=False)``.
    transparent_http_ports: tuple[int, ...] = (80,)
    #: Guest destination ports the gateway should hand to ``handle_transparent(tls=True)``.
    transparent_https_ports: tuple[int, ...] = (443,)
    #: If not None, only these hosts (``HostPatterns``) may be reached; others get 403.
    allow: tuple[str, ...] | None = None
    #: Body of the 403 for hosts outside ``allow``; ``{host}`` is replaced by the host.
    deny_message: str = ("Connections to {host} are forbidden by policy. "
                         "Please contact your IT administrator.")
    #: Hosts that always go direct, in addition to ``exclude`` (for netkit's own host
    #: aliases); not part of vpnkit's JSON, so it survives a reload of that file.
    direct: tuple[str, ...] = ()
    #: Seconds to open a TCP connection to an origin or upstream proxy (then 504).
    connect_timeout: float = 15.0
    #: Seconds from the end of a request to the response headers (then 504).
    response_timeout: float = 60.0
    #: Seconds a client connection may sit between requests, and most seconds without
    #: progress while a body is moving, before the connection is closed.
    idle_timeout: float = 300.0
    #: Seconds from the first byte of a request to the end of its headers (a deadline,
    #: not reset by each byte); then 408 and close. Also the longest wait for the first
    #: request of a new connection.
    header_timeout: float = 30.0
    #: Seconds an idle origin connection is kept for reuse.
    pool_idle_timeout: float = 30.0
    #: Seconds to wait for a TLS ClientHello in transparent mode (then use the IP).
    sni_timeout: float = 10.0
    #: Most client connections handled at once; more get 503.
    max_connections: int = 1024
    #: Most of those one client (guest address) may hold; its next ones get 503 while
    #: other clients are still served.
    max_connections_per_client: int = 64
    #: Most bytes of a request or response head (request line + headers); then 431/502.
    max_header_bytes: int = 64 * 1024

    _http: Upstream | None = field(default=None, init=False, repr=False, compare=False)
    _https: Upstream | None = field(default=None, init=False, repr=False, compare=False)
    _exclude: HostPatterns | None = field(default=None, init=False, repr=False, compare=False)
    _allow: HostPatterns | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("http", "https"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name}: proxy URL must be a string")
            if value is not None and not value.strip():
                put(name, None)
        put("exclude", _patterns("exclude", self.exclude))
        put("direct", _patterns("direct", self.direct))
        if self.allow is not None:
            put("allow", _patterns("allow", self.allow))
        put("transparent_http_ports", _ports("transparent_http_ports", self.transparent_http_ports))
        put("transparent_https_ports", _ports("transparent_https_ports", self.transparent_https_ports))
        put("_http", Upstream.parse(self.http, "http") if self.http else None)
        put("_https", Upstream.parse(self.https, "https") if self.https else None)
        put("_exclude", HostPatterns(self.exclude + self.direct, "exclude"))
        put("_allow", HostPatterns(self.allow, "allow") if self.allow is not None else None)
        for name in ("connect_timeout", "response_timeout", "idle_timeout", "header_timeout",
                     "pool_idle_timeout", "sni_timeout"):
            try:
                value = float(getattr(self, name))
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: not a number") from None
            if not value > 0:
                raise ConfigError(f"{name}: must be positive")
            put(name, value)
        for name, low in (("max_connections", 1), ("max_connections_per_client", 1), ("max_header_bytes", 1024)):
            try:
                value = int(getattr(self, name))
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: not an integer") from None
            if value < low:
                raise ConfigError(f"{name}: must be at least {low}")
            put(name, value)
        if not isinstance(self.deny_message, str):
            raise ConfigError("deny_message: must be a string")

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if f.name in ("http", "https") and value:
                value = _redact(value)
            parts.append(f"{f.name}={value!r}")
        return f"ProxySettings({', '.join(parts)})"

    # --- decisions ---------------------------------------------------------------

    @property
    def http_upstream(self) -> Upstream | None:
        return self._http

    @property
    def https_upstream(self) -> Upstream | None:
        return self._https

    def allowed(self, host: str, port: int | None = None) -> bool:
        """Whether the allow list (if any) lets a request to ``host`` through."""
        return self._allow is None or self._allow.matches(host, port)

    def upstream_for(self, host: str, port: int, *, tls: bool) -> Upstream | None:
        """The upstream proxy to use for ``host:port`` (None: connect directly)."""
        upstream = self._https if tls else self._http
        if upstream is None or self._exclude.matches(host, port):
            return None
        return upstream

    def deny_text(self, host: str) -> str:
        return self.deny_message.replace("{host}", host)

    def transparent_kind(self, port: int) -> str | None:
        """``"http"``/``"https"`` if a guest connection to ``port`` on any destination
        should go to ``handle_transparent`` (an upstream proxy or an allow list is
        configured for that kind and the port is listed), else None (plain NAT)."""
        if port in self.transparent_http_ports and (self._http is not None or self._allow is not None):
            return "http"
        if port in self.transparent_https_ports and (self._https is not None or self._allow is not None):
            return "https"
        return None

    # --- construction ------------------------------------------------------------

    def replace(self, **changes: Any) -> "ProxySettings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: "ProxySettings | None" = None) -> "ProxySettings":
        """Settings from a dict of field names (``-`` or ``_``) over ``base``."""
        base = base or cls()
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        changes: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ConfigError(f"unknown proxy setting {key!r}")
            changes[name] = value
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_vpnkit_json(cls, data: Mapping[str, Any] | str | bytes,
                         base: "ProxySettings | None" = None) -> "ProxySettings":
        """Settings from vpnkit's ``--http`` JSON (a dict, or its text).

        vpnkit's keys are ``http``, ``https``, ``exclude`` (a comma- or space-separated
        string), ``transparent_http_ports`` and ``transparent_https_ports``; absent ones
        take their defaults. ``allow`` (a list) is read as vpnkit does. Other netkit
        fields (``deny_message``, timeouts, ``direct``...) are read when present and
        otherwise kept from ``base``; unknown keys are ignored, as vpnkit does.
        """
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as e:
                raise ConfigError(f"http proxy JSON: {e}") from None
        if not isinstance(data, Mapping):
            raise ConfigError("http proxy JSON: must be an object")
        base = base or cls()
        defaults = cls()
        changes: dict[str, Any] = {k: getattr(defaults, k) for k in VPNKIT_KEYS}
        changes["allow"] = None
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                continue
            if name in ("http", "https") and value is not None and not isinstance(value, str):
                raise ConfigError(f"{name}: proxy URL must be a string")
            changes[name] = value
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str],
                         base: "ProxySettings | None" = None) -> "ProxySettings":
        """Settings from ``http_proxy``/``https_proxy``/``no_proxy`` (lowercase wins, as
        in curl and Python; the uppercase names are read too; ``all_proxy`` fills in)."""

        def get(name: str) -> str | None:
            for key in (name.lower(), name.upper()):
                value = environ.get(key)
                if value is not None and value.strip():
                    return value.strip()
            return None

        fallback = get("all_proxy")
        return dataclasses.replace(
            base or cls(),
            http=get("http_proxy") or fallback,
            https=get("https_proxy") or fallback,
            exclude=split_list(get("no_proxy") or ""),
        )

    def to_vpnkit_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.http:
            out["http"] = self.http
        if self.https:
            out["https"] = self.https
        out["exclude"] = ",".join(self.exclude)
        out["transparent_http_ports"] = list(self.transparent_http_ports)
        out["transparent_https_ports"] = list(self.transparent_https_ports)
        if self.allow is not None:
            out["allow"] = list(self.allow)
        return out
