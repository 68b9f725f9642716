"""A real Linux guest: a network namespace attached to a switch through a tap device."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import trio

from ..links.base import Link
from ..netns import Netns, udhcpc, unique_name
from ..switch import Port, Switch

__all__ = ["NetnsGuest", "open_netns_guest"]


@dataclass
class NetnsGuest:
    """A namespace whose only interface (``ifname``) is a tap into a netkit switch."""

    netns: Netns
    ifname: str
    link: Link
    port: Port

    @property
    def name(self) -> str:
        return self.netns.name

    async def run(self, argv: list[str], *, timeout: float = 60, check: bool = False,
                  stdin: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the namespace without blocking the switch."""
        with trio.fail_after(timeout):
            return await trio.run_process(self.netns.exec_args(argv), capture_stdout=True,
                                          capture_stderr=True, check=check, stdin=stdin or b"")

    async def udhcpc(self, *, timeout: float = 20, extra: tuple[str, ...] = ()) -> dict[str, str]:
        """Lease an address with busybox udhcpc and netkit's event script (which configures
        the interface); returns the DHCP environment of the last event (ip, mask, router,
        dns, mtu, lease, ...)."""
        return await udhcpc(self.netns, self.ifname, timeout=timeout, extra=extra)


class open_netns_guest:
    """``async with open_netns_guest(switch) as guest``: netns + tap attached to ``switch``.

    ``offload`` negotiates virtio-net offloads on the tap; ``wrap`` applies link
    middleware (fault injection, pcap) before the link is attached. The namespace, the
    tap and ``/etc/netns/NAME`` are removed on exit.
    """

    def __init__(self, switch: Switch, *, offload: bool = False, ifname: str = "eth0", wrap=None) -> None:
        self.switch = switch
        self.offload = offload
        self.ifname = ifname
        self.wrap = wrap
        self.guest: NetnsGuest | None = None

    async def __aenter__(self) -> NetnsGuest:
        from ..links.tap import TapLink

        netns = Netns.create(unique_name("nkg"))
        try:
            tap_name = unique_name("nkt")
            link: Link = TapLink.create(tap_name, netns=netns.name, offload=self.offload,
                                        mtu=self.switch.config.mtu)
            netns.rename(tap_name, self.ifname)
            # ip netns exec bind-mounts this over /etc/resolv.conf: DNS goes to the gateway.
            netns.write_resolv_conf(self.switch.config.gateway_ip, self.switch.config.domain_search)
            if self.wrap is not None:
                link = self.wrap(link)
            port = self.switch.attach(link)
        except BaseException:
            netns.delete()
            raise
        self.guest = NetnsGuest(netns, self.ifname, link, port)
        return self.guest

    async def __aexit__(self, *exc: object) -> None:
        assert self.guest is not None
        with trio.CancelScope(shield=True):
            await self.guest.link.aclose()
            with trio.move_on_after(5):
                await self.guest.port.wait_detached()
        self.guest.netns.delete()
