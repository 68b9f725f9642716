"""The virtual switch: one port per guest link, MAC learning, port security.

Each attached link gets a reader task that takes frames in batches and feeds them to
``Switch.input`` synchronously (no task or channel hop per frame), and a sender task
that drains the link's queue. Frames for the gateway's MAC go to the gateway endpoint;
broadcast and unknown unicast are flooded; known unicast goes to its port.

Port security: a port may send only from ``max_macs_per_port`` MACs, learned from what it
sends (a MAC without an address may be replaced by a new one, so a guest can change its
MAC before it leases), and never from a MAC another port or the gateway owns; once that
MAC holds a DHCP lease (or a reservation), IPv4 and ARP from it must carry the leased
address (or 0.0.0.0 while it asks for one). Violations are dropped and counted, never
raised.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import trio

from .config import Config, format_mac
from .links.base import Link, LinkClosed
from .policy import Policy
from .supervise import Supervisor

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["Switch", "Port", "SwitchError"]

log = logging.getLogger("netkit.switch")

_ETH_IPV4 = b"\x08\x00"
_ETH_ARP = b"\x08\x06"
_UNSPECIFIED_IP = b"\0\0\0\0"


class SwitchError(Exception):
    """The switch refused an operation (for example: too many ports)."""


@dataclass(eq=False)
class Port:
    """One guest attachment: a link and what the switch knows about its sender."""

    id: int
    link: Link
    macs: set[bytes] = field(default_factory=set)
    #: Set when the port's link is gone; frames for it are no longer delivered.
    detached: bool = False
    _done: trio.Event = field(default_factory=trio.Event, repr=False)

    #: A live capture (``netkit.links.middleware.PcapWriter``) taking every frame, or None.
    capture: object = None
    #: The switch's counters (``frames_out`` and ``drops``), so every send is counted.
    switch: "Switch | None" = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.link.name

    def send(self, frame, offload=None) -> bool:
        """Send a frame to this port's guest: the one way every component does it, so
        the live capture and the switch's ``frames_out`` / ``link-queue-full`` counters
        see every frame (NAT, services and flooding alike)."""
        if self.capture is not None:
            self.capture.write_frame(frame)
        accepted = self.link.send(frame, offload)
        switch = self.switch
        if switch is not None:
            if accepted:
                switch.frames_out += 1
            else:
                switch.drops["link-queue-full"] += 1
        return accepted

    async def wait_detached(self) -> None:
        await self._done.wait()

    def describe(self) -> dict:
        return {"id": self.id, "link": self.link.name, "macs": [format_mac(m) for m in sorted(self.macs)],
                "stats": dataclasses.asdict(self.link.statistics())}


class Switch:
    """MAC-learning switch; create it with ``netkit.open_switch`` rather than directly."""

    def __init__(self, config: Config, nursery: trio.Nursery, supervisor: Supervisor | None = None) -> None:
        self.config = config
        self._nursery = nursery
        #: Runs each port's reader (and is shared with every component by ``open_switch``):
        #: a link that fails ends its own port only. Its ``flow-errors`` show in statistics().
        self.supervisor = supervisor if supervisor is not None else Supervisor(nursery)
        self._ports: dict[int, Port] = {}
        self._port_ids = itertools.count(1)
        #: MAC -> port that owns it (learned from source addresses).
        self._mac_table: dict[bytes, Port] = {}
        #: MAC -> the only IPv4 address (packed) that MAC may send from.
        self._ip_bindings: dict[bytes, bytes] = {}
        self.frames_in = 0
        self.frames_out = 0
        self.macs_relearned = 0
        self.drops: collections.Counter[str] = collections.Counter()
        self.gateway: Gateway | None = None
        # Set by open_switch: the NAT handlers (netkit.nat.tcp/udp/icmp).
        self.tcp_nat = None
        self.udp_nat = None
        self.icmp_nat = None
        self.forwarder = None  # netkit.forward.PortForwarder
        self.dns = None  # netkit.dns.server.DnsService
        self.sntp = None  # netkit.ntp.SntpServer
        self.http_proxy = None  # netkit.http_proxy.HttpProxy
        self._detach_hooks: list[Callable[[Port], None]] = []
        self._batch_hooks: list[Callable[[], None]] = []
        self._capture = None
        #: Which destinations guests may reach (netkit.policy); install ``policy.hook`` to decide in Python.
        self.policy = Policy(config.allow, config.deny, config.default_deny)
        self._capture_path: str | None = None

    # ----- ports -----
    def attach(self, link: Link) -> Port:
        """Plug a link into the switch; its reader and sender run until it closes."""
        if len(self._ports) >= self.config.max_ports:
            self.drops["port-limit"] += 1
            raise SwitchError(f"switch has max_ports={self.config.max_ports} ports already")
        port = Port(next(self._port_ids), link, switch=self)
        port.capture = self._capture
        self._ports[port.id] = port
        log.info("port %d attached: %s", port.id, link.name)
        self.supervisor.start_soon(self._run_port, port, unit="port", name=f"port-{port.id}")
        return port

    async def attach_and_wait(self, link: Link) -> None:
        """Attach ``link`` and return when it has detached (for listeners' per-connection tasks)."""
        port = self.attach(link)
        await port.wait_detached()

    def on_detach(self, hook: Callable[[Port], None]) -> None:
        """Call ``hook(port)`` when a port goes away (flows it owned are torn down there)."""
        self._detach_hooks.append(hook)

    def on_batch_done(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after each batch of frames from a link has been input, so
        protocol machines can coalesce their output (one ACK for many segments)."""
        self._batch_hooks.append(hook)

    def ports(self) -> list[Port]:
        return list(self._ports.values())

    async def _run_port(self, port: Port) -> None:
        link = port.link
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run_sender)
                try:
                    while True:
                        batch = await link.receive_batch()
                        for frame in batch:
                            self.input(port, frame)
                        for hook in self._batch_hooks:
                            hook()
                except LinkClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self._detach(port)
            with trio.CancelScope(shield=True):
                await link.aclose()
            port._done.set()

    def _detach(self, port: Port) -> None:
        if port.detached:
            return
        port.detached = True
        self._ports.pop(port.id, None)
        for mac in port.macs:
            if self._mac_table.get(mac) is port:
                del self._mac_table[mac]
        for hook in self._detach_hooks:
            try:
                hook(port)
            except Exception:  # a hook's bug must not wedge the switch
                log.exception("detach hook failed for port %d", port.id)
        log.info("port %d detached: %s", port.id, port.link.name)

    # ----- IP port security -----
    def bind_ip(self, mac: bytes, ip: bytes | None) -> None:
        """Allow ``mac`` to send IPv4 only from ``ip`` (None lifts the restriction)."""
        if ip is None:
            self._ip_bindings.pop(mac, None)
        else:
            self._ip_bindings[mac] = ip

    def port_for_mac(self, mac: bytes) -> Port | None:
        return self._mac_table.get(mac)

    # ----- the frame path -----
    def input(self, port: Port, frame: bytes) -> None:
        """Handle one frame a guest sent on ``port``. Never raises."""
        self.frames_in += 1
        if port.capture is not None:
            port.capture.write_frame(frame)
        if len(frame) < 14:
            self.drops["runt"] += 1
            return
        src = frame[6:12]
        if src not in port.macs and not self._learn(port, src):
            return
        bound_ip = self._ip_bindings.get(src)
        if bound_ip is not None:
            ethertype = frame[12:14]
            if ethertype == _ETH_IPV4:
                sip = frame[26:30]
                if sip != bound_ip and sip != _UNSPECIFIED_IP:
                    self.drops["spoofed-ip"] += 1
                    return
            elif ethertype == _ETH_ARP:
                sip = frame[28:32]
                if sip != bound_ip and sip != _UNSPECIFIED_IP:
                    self.drops["spoofed-ip"] += 1
                    return
        dst = frame[0:6]
        gateway = self.gateway
        if gateway is not None and dst == gateway.mac:
            gateway.input(port, frame)
            return
        if dst[0] & 1:  # broadcast / multicast: every other port and the gateway
            for other in self._ports.values():
                if other is not port:
                    self._send(other, frame)
            if gateway is not None:
                gateway.input(port, frame)
            return
        target = self._mac_table.get(dst)
        if target is None:
            # Unknown unicast: flood to the other guests (the gateway only takes its own MAC).
            flooded = False
            for other in self._ports.values():
                if other is not port:
                    self._send(other, frame)
                    flooded = True
            if not flooded:
                self.drops["no-destination"] += 1
        elif target is port:
            self.drops["hairpin"] += 1
        else:
            self._send(target, frame)

    def _learn(self, port: Port, src: bytes) -> bool:
        if src[0] & 1:
            self.drops["multicast-source"] += 1
            return False
        gateway = self.gateway
        if gateway is not None and src == gateway.mac:
            self.drops["spoofed-mac"] += 1
            return False
        owner = self._mac_table.get(src)
        if owner is not None and owner is not port:
            self.drops["spoofed-mac"] += 1
            return False
        if len(port.macs) >= self.config.max_macs_per_port:
            # A guest may change its MAC (ip link set address) until that MAC holds an
            # address: then the port is locked to it.
            unbound = next((mac for mac in port.macs if mac not in self._ip_bindings), None)
            if unbound is None:
                self.drops["spoofed-mac"] += 1
                return False
            port.macs.discard(unbound)
            if self._mac_table.get(unbound) is port:
                del self._mac_table[unbound]
            self.macs_relearned += 1
        port.macs.add(src)
        self._mac_table[src] = port
        log.debug("port %d learned %s", port.id, format_mac(src))
        return True

    def _send(self, port: Port, frame, offload=None) -> None:
        port.send(frame, offload)

    def deliver(self, dst_mac: bytes, frame, offload=None) -> bool:
        """Send a frame from the gateway towards a guest MAC (or flood a broadcast)."""
        if dst_mac[0] & 1:
            for p in self._ports.values():
                self._send(p, frame)
            return True
        port = self._mac_table.get(dst_mac)
        if port is None:
            self.drops["no-port-for-mac"] += 1
            return False
        self._send(port, frame, offload)
        return True

    # ----- live capture -----
    def start_capture(self, path: str, *, max_bytes: int | None = None) -> None:
        """Record every frame of every port (present and future) to a pcap file."""
        from .links.middleware import PcapWriter

        if self._capture is not None:
            raise SwitchError("a capture is already running; stop it first")
        self._capture = PcapWriter(path, max_bytes=max_bytes)
        self._capture_path = path
        for port in self._ports.values():
            port.capture = self._capture

    def stop_capture(self) -> str | None:
        """Stop the live capture; returns the file's path (None if none was running)."""
        writer = self._capture
        if writer is None:
            return None
        self._capture = None
        for port in self._ports.values():
            port.capture = None
        writer.close()
        return self._capture_path

    @property
    def capturing(self) -> bool:
        return self._capture is not None

    async def listen(self, listener) -> None:
        """Serve ``listener`` (anything with ``serve(on_link, task_status=...)``) in the
        switch's nursery; returns once it is listening. Each connection becomes a port."""
        await self._nursery.start(listener.serve, self.attach_and_wait)

    def leases(self) -> list:
        """Current DHCP leases (``netkit.dhcp.leases.Lease``)."""
        return self.gateway.leases.leases() if self.gateway else []

    def statistics(self) -> dict:
        return {
            "gateway": self.gateway.statistics() if self.gateway else None,
            "port_stats": [p.describe() for p in self._ports.values()],
            "ports": len(self._ports),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "macs_relearned": self.macs_relearned,
            "drops": {k: v for k, v in self.drops.items() if v},
            **self.supervisor.statistics(),
        }
