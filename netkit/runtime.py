"""``open_switch``: the library entry point that wires switch, gateway and services together."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from .config import Config
from .gateway import Gateway
from .nat.host import HostNetwork
from .nat.icmp import IcmpNat
from .nat.tcp import TcpNat
from .nat.udp import UdpNat
from .switch import Switch

__all__ = ["open_switch", "LEASE_EXPIRY_INTERVAL"]

log = logging.getLogger("netkit")

#: How often expired DHCP leases are swept (seconds).
LEASE_EXPIRY_INTERVAL = 10.0


async def _sweep_leases(gateway: Gateway) -> None:
    while True:
        await trio.sleep(LEASE_EXPIRY_INTERVAL)
        gateway.expire_leases()


@asynccontextmanager
async def open_switch(config: Config | None = None, *, host: HostNetwork | None = None) -> AsyncIterator[Switch]:
    """Run a switch with its gateway for the duration of the ``async with`` block.

    ``switch.attach(link)`` plugs guests in; ``switch.listen(listener)`` serves a
    listener (qemu, vfkit, vpnkit...) whose connections become ports. Leaving the block
    closes every link. ``host`` creates the host sockets for guest flows (inject a
    subclass to simulate refused, unreachable or slow destinations).
    """
    config = config or Config()
    async with trio.open_nursery() as nursery:
        switch = Switch(config, nursery)
        gateway = Gateway(config, switch, trio.current_time)
        switch.tcp_nat = TcpNat(config, gateway, nursery, host)
        switch.udp_nat = UdpNat(config, gateway, nursery, host)
        switch.icmp_nat = IcmpNat(config, gateway, nursery, host)
        nursery.start_soon(_sweep_leases, gateway, name="lease-sweeper")
        try:
            yield switch
        finally:
            nursery.cancel_scope.cancel()
            # Flows' host sockets belong to the switch: close them with it.
            switch.tcp_nat.close()
            switch.udp_nat.close()
            switch.icmp_nat.close()
