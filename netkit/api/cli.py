"""``netkit expose|unexpose|forwards|leases|stats|connections|capture``: the control API
from the command line (``netkit.cli.main`` dispatches here)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence, TextIO

from .client import ApiClient, ApiClientError
from .paths import API_TOKEN_ENV, DEFAULT_PATH_HELP, default_api_path

__all__ = ["api_parsers", "api_main", "API_COMMANDS"]

API_COMMANDS = ("expose", "unexpose", "forwards", "leases", "stats", "connections", "capture")


def _common(json_output: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("control API")
    g.add_argument("--api", metavar="PATH", default=None,
                   help=f"the switch's API socket (netkit-switch --api PATH). Default: {DEFAULT_PATH_HELP}")
    g.add_argument("--api-token", metavar="TOKEN", default=None,
                   help=f"bearer token, if the switch requires one (default: ${API_TOKEN_ENV})")
    if json_output:
        g.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    return p


def _proto_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tcp", dest="proto", action="store_const", const="tcp", help="a TCP forward (the default)")
    g.add_argument("--udp", dest="proto", action="store_const", const="udp", help="a UDP forward")
    g.add_argument("--unix", dest="proto", action="store_const", const="unix",
                   help="LOCAL is a unix socket path on the host")
    p.set_defaults(proto="tcp")


def api_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    """Add the control-API subcommands to ``netkit``'s subparsers."""
    common = _common()
    parsers: dict[str, argparse.ArgumentParser] = {}

    p = sub.add_parser("expose", parents=[common], help="forward a host port into a guest (running switch)",
                       description="Ask a running netkit-switch to forward LOCAL on the host to REMOTE in a guest. "
                                   "LOCAL is [ADDR:]PORT (ADDR defaults to 127.0.0.1; 0.0.0.0 or :PORT listens on "
                                   "every address), or a socket path with --unix. REMOTE is GUEST_IP:PORT.")
    _proto_options(p)
    p.add_argument("local", metavar="LOCAL")
    p.add_argument("remote", metavar="REMOTE")
    parsers["expose"] = p

    p = sub.add_parser("unexpose", parents=[common], help="remove a port forward (running switch)",
                       description="Close a forward's host listener (connections in flight carry on).")
    _proto_options(p)
    p.add_argument("local", metavar="LOCAL")
    parsers["unexpose"] = p

    parsers["forwards"] = sub.add_parser("forwards", parents=[common], help="list port forwards (running switch)")
    parsers["leases"] = sub.add_parser("leases", parents=[common], help="list DHCP leases (running switch)")
    parsers["stats"] = sub.add_parser("stats", parents=[common], help="show switch statistics (running switch)")
    p = sub.add_parser("connections", parents=[common], help="list live guest connections (running switch)",
                       description="The live TCP and UDP flow table: guest, destination, state, bytes each way "
                                   "and age.")
    p.add_argument("--protocol", choices=["tcp", "udp"], help="only this protocol")
    p.add_argument("--limit", type=int, metavar="N", help="at most N rows (oldest first)")
    parsers["connections"] = p

    p = sub.add_parser("capture", help="start or stop a live pcap capture (running switch)",
                       description="Record every frame of every guest link of a running switch to a pcap file.")
    capture = p.add_subparsers(dest="capture_action", required=True)
    start = capture.add_parser("start", parents=[common], help="start capturing to FILE")
    start.add_argument("file", metavar="FILE", help="pcap file to write (made absolute here)")
    start.add_argument("--max-bytes", type=int, metavar="N", help="stop writing after N bytes")
    capture.add_parser("stop", parents=[common], help="stop the capture")
    capture.add_parser("status", parents=[common], help="is a capture running?")
    parsers["capture"] = p
    return parsers


# ----------------------------------------------------------------------------- output
def _table(rows: list[list[str]], header: list[str], out: TextIO) -> None:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    for row in [header, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _counts(mapping: dict) -> str:
    items = [f"{k}={v}" for k, v in sorted(mapping.items()) if isinstance(v, (int, float)) and v]
    return ", ".join(items) if items else "none"


def _print_stats(stats: dict, out: TextIO) -> None:
    frames, data, flows = stats.get("frames", {}), stats.get("bytes", {}), stats.get("flows", {})
    dns = stats.get("dns") or {}
    proxy = stats.get("http_proxy")
    drops = stats.get("drops") or {}
    lines = [
        ("frames", f"in {frames.get('in', 0)}, out {frames.get('out', 0)}"),
        ("bytes", f"in {_size(data.get('in', 0))}, out {_size(data.get('out', 0))} (attached links)"),
        ("flows", ", ".join(f"{k} {v}" for k, v in flows.items()) or "none"),
        ("ports", str(len(stats.get("ports") or []))),
        ("leases", str(stats.get("leases", 0))),
        ("forwards", str(stats.get("forwards", 0))),
        ("dns", f"{dns.get('queries', 0)} queries (local {dns.get('answered_local', 0)}, forwarded "
                f"{dns.get('forwarded', 0)}, cache hits {dns.get('cache_hits', 0)}, servfail "
                f"{dns.get('servfail', 0)})" if dns else "not running"),
        ("http proxy", f"{proxy.get('requests', 0)} requests, {proxy.get('active_connections', 0)} open"
         if proxy is not None else "not enabled"),
        ("flow errors", f"{(stats.get('flow_errors') or {}).get('total', 0)} "
                        f"({_counts((stats.get('flow_errors') or {}).get('by_unit') or {})})"),
        ("drops", f"switch: {_counts(drops.get('switch') or {})}; gateway: {_counts(drops.get('gateway') or {})}"),
        ("capture", "running" if (stats.get("capture") or {}).get("active") else "off"),
    ]
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        out.write(f"{name.ljust(width)}  {value}\n")


def _print_json(value: Any, out: TextIO) -> None:
    json.dump(value, out, indent=2)
    out.write("\n")


# ----------------------------------------------------------------------------- commands
def _run(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    command = args.subcommand
    as_json = getattr(args, "json", False)
    if command == "expose":
        local = os.path.abspath(args.local) if args.proto == "unix" else args.local
        forward = api.expose(args.proto, local, args.remote)
        if as_json:
            _print_json(forward, out)
        else:
            out.write(f"forwarding {forward['proto']} {forward['local']} -> {forward['remote']}\n")
    elif command == "unexpose":
        local = os.path.abspath(args.local) if args.proto == "unix" else args.local
        result = api.unexpose(args.proto, local)
        if as_json:
            _print_json(result, out)
        else:
            removed = result["removed"]
            out.write(f"removed {removed['proto']} {removed['local']} -> {removed['remote']}\n")
    elif command == "forwards":
        forwards = api.forwards()
        if as_json:
            _print_json(forwards, out)
        elif not forwards:
            out.write("no port forwards\n")
        else:
            _table([[f["proto"], f["local"], f["remote"], str(f.get("connections", 0))] for f in forwards],
                   ["PROTO", "LOCAL", "REMOTE", "CONNECTIONS"], out)
    elif command == "leases":
        leases = api.leases()
        if as_json:
            _print_json(leases, out)
        elif not leases:
            out.write("no leases\n")
        else:
            _table([[lease["ip"], lease["mac"], lease["state"] + (" (static)" if lease.get("static") else ""),
                     lease.get("hostname") or "-", _duration(lease.get("expires_in"))] for lease in leases],
                   ["IP", "MAC", "STATE", "HOSTNAME", "EXPIRES IN"], out)
    elif command == "stats":
        stats = api.stats()
        if as_json:
            _print_json(stats, out)
        else:
            _print_stats(stats, out)
    elif command == "connections":
        table = api.connections(protocol=args.protocol, limit=args.limit)
        if as_json:
            _print_json(table, out)
        elif not table["connections"]:
            out.write("no connections\n")
        else:
            _table([[c["protocol"], c["guest"], c["destination"], c["state"], _size(c["bytes_to_host"]),
                     _size(c["bytes_to_guest"]), _duration(c["age"])] for c in table["connections"]],
                   ["PROTO", "GUEST", "DESTINATION", "STATE", "TO HOST", "TO GUEST", "AGE"], out)
            if table.get("truncated"):
                out.write(f"... {table['total'] - len(table['connections'])} more (use --limit)\n")
    elif command == "capture":
        if args.capture_action == "start":
            result = api.capture_start(args.file, args.max_bytes)
            if as_json:
                _print_json(result, out)
            else:
                out.write(f"capturing to {result['path']}\n")
        elif args.capture_action == "stop":
            result = api.capture_stop()
            if as_json:
                _print_json(result, out)
            elif result.get("path"):
                out.write(f"capture stopped: {result['path']}\n")
            else:
                out.write("no capture was running\n")
        else:
            result = api.capture_status()
            if as_json:
                _print_json(result, out)
            else:
                out.write(f"capturing to {result['path']}\n" if result.get("capturing") else "not capturing\n")
    else:  # pragma: no cover - argparse only offers the commands above
        raise ValueError(command)
    return 0


def api_main(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one control-API subcommand; 0 on success, 1 with a message on stderr otherwise."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = args.api or default_api_path()
    token = args.api_token or os.environ.get(API_TOKEN_ENV) or None
    try:
        with ApiClient(path, token=token) as api:
            return _run(args, api, out)
    except ApiClientError as e:
        err.write(f"netkit {args.subcommand}: {e}\n")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m netkit.api.cli``); ``netkit`` itself calls ``api_main``."""
    parser = argparse.ArgumentParser(prog="netkit")
    api_parsers(parser.add_subparsers(dest="subcommand", required=True))
    return api_main(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
