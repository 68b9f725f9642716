"""netkit's HTTP proxy (vpnkit's http.docker.internal:3128), on trio streams.

- ``HttpProxy.handle_client(stream, client)``: the explicit proxy port. Absolute-form
  requests (``GET http://host/path``) are forwarded with bodies streamed both ways
  (Content-Length and chunked), keep-alive on both sides (idle origin connections are
  reused per client connection), hop-by-hop headers removed and ``Via: 1.1 netkit``
  added. ``CONNECT host:port`` opens a tunnel (half-close aware).
- ``HttpProxy.handle_transparent(stream, client, original_dst, tls)``: a guest
  connection to port 80/443 of any destination, routed by the Host header (HTTP) or by
  the TLS ClientHello's server name (falling back to the original IP).
- Upstream proxies (``ProxySettings.http``/``https``, ``user:pass@`` becomes Basic
  Proxy-Authorization), an exclude list that goes direct, an allow list (403 with a
  configurable message), readable 400/403/502/503/504 answers, and limits on header
  size and connections.
- One gate out: every connection (direct, transparent, to an upstream proxy) goes
  through ``netkit.nat.gate.HostGate`` with the guest's identity, so the outbound
  policy and its hook apply as for NAT; origin names are resolved on the host and the
  policy is applied to the addresses actually connected to (403 when refused).
- Fairness: a per-client share of the connections (``max_connections_per_client``,
  503 for that client only), a request-head deadline (``header_timeout``, 408) that
  trickled bytes cannot extend, and bounded buffers: per connection at most one head
  (``max_header_bytes``, 64 KiB) plus one 64 KiB read in flight each way.
- ``ProxySettings.from_vpnkit_json`` / ``from_environment``; ``HttpProxy.watch_file``
  reloads a vpnkit ``--http`` JSON file when it changes.
"""

from .proxy import Connector, GateConnector, HttpProxy, Outbound, split_authority
from .settings import ConfigError, HostPatterns, ProxySettings, Upstream
from .sni import MAX_CLIENT_HELLO, SniResult, SniStatus, parse_client_hello_untrusted

__all__ = [
    "HttpProxy", "Connector", "GateConnector", "Outbound", "ProxySettings", "Upstream", "HostPatterns", "ConfigError",
    "SniResult", "SniStatus", "parse_client_hello_untrusted", "MAX_CLIENT_HELLO",
    "split_authority",
]
