"""What the API shows: JSON views of a running switch, and its Prometheus metrics.

Every function here is a quick synchronous read of public switch attributes; none of
them awaits or does I/O, so calling one from the switch's trio thread is safe.
"""

from __future__ import annotations

import math
from typing import Iterable

import trio

from ..config import format_mac

__all__ = ["lease_view", "leases_view", "stats_view", "connections_view", "forward_view",
           "render_metrics", "MetricsBuilder"]


def _stats_of(component) -> dict:
    """A component's ``statistics()``, or {} for a component this switch does not run.

    A component that fails here has a bug: the exception reaches the API server, which
    answers 500 and logs the traceback, rather than a view quietly showing nothing."""
    return {} if component is None else component.statistics()


def forward_view(forward) -> dict:
    return forward.describe()


def lease_view(lease, now: float) -> dict:
    expires = lease.expires
    return {
        "ip": str(lease.ip),
        "mac": format_mac(lease.mac),
        "state": lease.state,
        "hostname": lease.hostname,
        "uuid": lease.uuid,
        "static": bool(lease.static),
        # Seconds left; None for a reservation that never expires.
        "expires_in": None if math.isinf(expires) else max(0.0, round(expires - now, 1)),
    }


def leases_view(switch) -> list[dict]:
    now = trio.current_time()
    return sorted((lease_view(lease, now) for lease in switch.leases()), key=lambda d: _ip_key(d["ip"]))


def _ip_key(text: str) -> tuple:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (999, text)


def _link_bytes(ports: Iterable[dict]) -> tuple[int, int]:
    received = sent = 0
    for port in ports:
        stats = port.get("stats") or {}
        received += int(stats.get("bytes_received", 0))
        sent += int(stats.get("bytes_sent", 0))
    return received, sent


def _flow_counts(switch) -> dict[str, int]:
    counts = {}
    for name in ("tcp", "udp", "icmp"):
        counts[name] = int(_stats_of(getattr(switch, f"{name}_nat")).get("flows", 0))
    return counts


def stats_view(switch, api_stats: dict | None = None) -> dict:
    """``GET /stats``: frames, bytes, drops by reason, flows by protocol, DNS, proxy."""
    sw = _stats_of(switch)
    gateway = sw.get("gateway") or {}
    ports = sw.get("port_stats") or []
    bytes_in, bytes_out = _link_bytes(ports)
    dns = _stats_of(switch.dns)
    proxy = switch.http_proxy
    forwarder = switch.forwarder
    return {
        "frames": {"in": sw.get("frames_in", 0), "out": sw.get("frames_out", 0)},
        # Link-level bytes of the guest links attached now (gone links' counts go with them).
        "bytes": {"in": bytes_in, "out": bytes_out},
        "drops": {
            "switch": dict(sw.get("drops") or {}),
            "gateway": dict(gateway.get("drops") or {}),
        },
        "flows": _flow_counts(switch),
        # Units of per-flow work (flows, service connections, queries, forwards, ports)
        # that failed and were ended alone by the supervisor.
        "flow_errors": {"total": sw.get("flow-errors", 0), "by_unit": dict(sw.get("flow-errors-by-unit") or {})},
        "ports": ports,
        "leases": len(switch.leases()),
        "forwards": len(forwarder.forwards()) if forwarder is not None else 0,
        "dns": dns,
        "http_proxy": _stats_of(proxy) if proxy is not None else None,
        # 9P file service (None without shares): messages, errors and privilege refusals.
        "files": _stats_of(switch.files) if switch.files is not None else None,
        "dhcp": dict(gateway.get("dhcp") or {}),
        "gateway": {"frames_in": gateway.get("frames_in", 0), "counters": dict(gateway.get("counters") or {}),
                    "reassembly": dict(gateway.get("reassembly") or {})},
        "nat": {name: _stats_of(getattr(switch, f"{name}_nat")) for name in ("tcp", "udp", "icmp")},
        "capture": {"active": switch.capturing},
        "api": dict(api_stats or {}),
    }


def connections_view(switch, *, protocol: str | None = None, limit: int | None = None) -> dict:
    """``GET /connections``: the live flow table, oldest first."""
    now = trio.current_time()
    rows: list[tuple[float, dict]] = []
    tcp_nat = switch.tcp_nat
    udp_nat = switch.udp_nat
    if tcp_nat is not None and protocol in (None, "tcp"):
        for flow in tcp_nat.flows():
            rows.append((flow.created, flow.describe()))
    if udp_nat is not None and protocol in (None, "udp"):
        for flow in list(udp_nat.flows.values()):
            rows.append((flow.created, flow.describe()))
    rows.sort(key=lambda row: row[0])
    total = len(rows)
    if limit is not None:
        rows = rows[:limit]
    out = []
    for created, view in rows:
        view = dict(view)
        view["age"] = round(max(0.0, now - created), 3)
        out.append(view)
    return {"total": total, "truncated": len(out) < total, "connections": out}


# ----------------------------------------------------------------------------- metrics
def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class MetricsBuilder:
    """Collects metric families and renders the Prometheus text exposition format (0.0.4)."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[tuple[tuple[tuple[str, str], ...], float]]]] = {}

    def family(self, name: str, kind: str, help_text: str, /) -> None:
        if name not in self._families:
            self._families[name] = (kind, help_text, [])

    def add(self, name: str, kind: str, help_text: str, value, /, **labels: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        self.family(name, kind, help_text)
        samples = self._families[name][2]
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        samples.append((key, value))

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            seen: set = set()
            for labels, value in samples:
                if labels in seen:  # one sample per label set
                    continue
                seen.add(labels)
                if labels:
                    text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{text}}} {_format_value(value)}")
                else:
                    lines.append(f"{name} {_format_value(value)}")
        return "\n".join(lines) + "\n"


def _numeric_items(mapping: dict) -> Iterable[tuple[str, float]]:
    for key, value in mapping.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield str(key), value


def render_metrics(switch, api_stats: dict | None = None) -> str:
    """``GET /metrics``: counters and gauges of the switch in Prometheus text format."""
    m = MetricsBuilder()
    sw = _stats_of(switch)
    gateway = sw.get("gateway") or {}

    m.family("netkit_frames_total", "counter", "Ethernet frames the switch received from and sent to guests.")
    m.add("netkit_frames_total", "counter", "", sw.get("frames_in", 0), direction="in")
    m.add("netkit_frames_total", "counter", "", sw.get("frames_out", 0), direction="out")

    m.family("netkit_drops_total", "counter", "Frames dropped, by layer and reason.")
    for reason, count in _numeric_items(sw.get("drops") or {}):
        m.add("netkit_drops_total", "counter", "", count, layer="switch", reason=reason)
    for reason, count in _numeric_items(gateway.get("drops") or {}):
        m.add("netkit_drops_total", "counter", "", count, layer="gateway", reason=reason)

    m.add("netkit_gateway_frames_total", "counter", "Frames delivered to the gateway endpoint.",
          gateway.get("frames_in", 0))
    m.family("netkit_gateway_events_total", "counter", "Gateway events (ARP replies, echo replies, services).")
    for event, count in _numeric_items(gateway.get("counters") or {}):
        m.add("netkit_gateway_events_total", "counter", "", count, event=event)
    m.family("netkit_reassembly_events_total", "counter", "IPv4 fragment reassembly events.")
    for event, count in _numeric_items(gateway.get("reassembly") or {}):
        m.add("netkit_reassembly_events_total", "counter", "", count, event=event)
    m.family("netkit_dhcp_messages_total", "counter", "DHCP server messages and events, by kind.")
    for kind, count in _numeric_items(gateway.get("dhcp") or {}):
        m.add("netkit_dhcp_messages_total", "counter", "", count, kind=kind)

    ports = sw.get("port_stats") or []
    m.add("netkit_ports", "gauge", "Guest links attached to the switch.", len(ports))
    m.family("netkit_link_bytes_total", "counter", "Bytes moved on each attached guest link.")
    m.family("netkit_link_frames_total", "counter", "Frames moved on each attached guest link.")
    m.family("netkit_link_send_dropped_total", "counter", "Frames dropped because a link's queue was full.")
    for port in ports:
        stats = port.get("stats") or {}
        link = str(port.get("link", port.get("id")))
        port_id = str(port.get("id"))
        m.add("netkit_link_bytes_total", "counter", "", stats.get("bytes_received", 0), port=port_id, link=link,
              direction="in")
        m.add("netkit_link_bytes_total", "counter", "", stats.get("bytes_sent", 0), port=port_id, link=link,
              direction="out")
        m.add("netkit_link_frames_total", "counter", "", stats.get("frames_received", 0), port=port_id, link=link,
              direction="in")
        m.add("netkit_link_frames_total", "counter", "", stats.get("frames_sent", 0), port=port_id, link=link,
              direction="out")
        m.add("netkit_link_send_dropped_total", "counter", "", stats.get("send_dropped", 0), port=port_id,
              link=link)

    m.add("netkit_flow_errors_total", "counter",
          "Units of per-flow work (flows, service connections, queries, forwards, ports) that failed and were "
          "ended alone.", sw.get("flow-errors", 0))
    m.family("netkit_flow_errors_by_unit_total", "counter", "Failed units of per-flow work, by kind of unit.")
    for unit, count in _numeric_items(sw.get("flow-errors-by-unit") or {}):
        m.add("netkit_flow_errors_by_unit_total", "counter", "", count, unit=unit)
    m.family("netkit_flows", "gauge", "Live NAT flows, by protocol.")
    for protocol, count in _flow_counts(switch).items():
        m.add("netkit_flows", "gauge", "", count, protocol=protocol)
    m.family("netkit_nat_events_total", "counter", "NAT events (flows opened, refused, evicted...), by protocol.")
    for protocol in ("tcp", "udp", "icmp"):
        for event, count in _numeric_items(_stats_of(getattr(switch, f"{protocol}_nat"))):
            if event in ("flows", "destinations"):
                continue
            m.add("netkit_nat_events_total", "counter", "", count, protocol=protocol, event=event)
    tcp_stats = _stats_of(switch.tcp_nat)
    if "destinations" in tcp_stats:
        m.add("netkit_tcp_destinations", "gauge", "Remote addresses with a per-destination TCP stack.",
              tcp_stats["destinations"])

    leases = switch.leases()
    m.family("netkit_leases", "gauge", "DHCP leases, by state.")
    by_state: dict[str, int] = {"bound": 0, "offered": 0}
    for lease in leases:
        by_state[lease.state] = by_state.get(lease.state, 0) + 1
    for state, count in by_state.items():
        m.add("netkit_leases", "gauge", "", count, state=state)
    forwarder = switch.forwarder
    if forwarder is not None:
        m.family("netkit_forwards", "gauge", "Port forwards, by protocol.")
        by_proto = {"tcp": 0, "udp": 0, "unix": 0}
        for forward in forwarder.forwards():
            by_proto[forward.proto] = by_proto.get(forward.proto, 0) + 1
        for proto, count in by_proto.items():
            m.add("netkit_forwards", "gauge", "", count, protocol=proto)

    dns = _stats_of(switch.dns)
    if dns:
        m.add("netkit_dns_queries_total", "counter", "DNS queries received by the gateway resolver.",
              dns.get("queries", 0))
        m.family("netkit_dns_results_total", "counter", "DNS query outcomes and events, by kind.")
        for kind, count in _numeric_items(dns):
            if kind in ("queries", "in_flight", "cache_entries", "zones"):
                continue
            m.add("netkit_dns_results_total", "counter", "", count, kind=kind)
        m.add("netkit_dns_in_flight", "gauge", "DNS queries being answered now.", dns.get("in_flight", 0))
        m.add("netkit_dns_cache_entries", "gauge", "Entries in the DNS cache.", dns.get("cache_entries", 0))
        m.add("netkit_dns_zones", "gauge", "Local DNS zones.", dns.get("zones", 0))

    proxy = switch.http_proxy
    if proxy is not None:
        pstats = _stats_of(proxy)
        m.add("netkit_http_proxy_requests_total", "counter", "HTTP requests handled by the proxy.",
              pstats.get("requests", 0))
        m.add("netkit_http_proxy_active_connections", "gauge", "Client connections open on the proxy.",
              pstats.get("active_connections", 0))
        m.family("netkit_http_proxy_events_total", "counter", "HTTP proxy events and response statuses, by kind.")
        for kind, count in _numeric_items(pstats):
            if kind in ("requests", "active_connections"):
                continue
            m.add("netkit_http_proxy_events_total", "counter", "", count, kind=kind)

    if switch.files is not None:
        m.family("netkit_files_events_total", "counter",
                 "9P file service messages, errors and refusals (setid_stripped, privilege_refused...).")
        for kind, count in _numeric_items(_stats_of(switch.files)):
            m.add("netkit_files_events_total", "counter", "", count, kind=kind)

    m.add("netkit_capture_active", "gauge", "1 while a live pcap capture is running.",
          1 if switch.capturing else 0)
    if api_stats:
        m.family("netkit_api_requests_total", "counter", "Control API requests, by status code.")
        for status, count in sorted((api_stats.get("responses") or {}).items()):
            m.add("netkit_api_requests_total", "counter", "", count, status=str(status))
        m.add("netkit_api_connections", "gauge", "Control API connections open now.",
              api_stats.get("active_connections", 0))
        m.add("netkit_api_connections_rejected_total", "counter",
              "Control API connections refused because too many were open.", api_stats.get("rejected_connections", 0))
    return m.render()
