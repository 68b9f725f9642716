"""Attacks by a hostile guest, and what the other guests must still have afterwards.

Fixtures:

- ``netkit_config``: an allow-list policy (the host alias and 127.0.0.0/8 only), so a
  mutated or made-up destination can never become a real ``connect()`` anywhere but
  this machine's loopback. Tests that need a wider policy use a fake ``HostNetwork``.
- ``hostile_factory``: ``await hostile_factory(via="memory"|"qemu", mac=..., lease=...)``
  attaches a ``FakeGuest`` that an attack drives with raw frames (scapy packets or
  bytes) through ``send`` — over the in-memory link, or over a real ``--listen-qemu``
  unix socket as an attacker VM would.
- ``victim_factory``: a well-behaved fake guest with a lease (``fake_guest_factory``).
"""

from __future__ import annotations

import pytest

from netkit import Config
from netkit.links.qemu import QemuListener, qemu_connect
from netkit.testing.fake_guest import FakeGuest, attach_fake_guest

#: Destinations an attack may make netkit reach: the host alias and host loopback only.
LOOPBACK_ONLY = ("192.168.65.2/32", "127.0.0.0/8")


@pytest.fixture
def netkit_config() -> Config:
    return Config(dns_upstreams=("127.0.0.1:9",), allow=LOOPBACK_ONLY)


class HostileGuest(FakeGuest):
    """A fake guest whose test sends whatever frames it likes."""

    def send(self, packet) -> None:
        """Send a scapy packet (or raw bytes) as one frame."""
        self.send_frame(bytes(packet))

    async def disconnect(self) -> None:
        await self.link.aclose()


@pytest.fixture
async def hostile_factory(netkit_switch, nursery, tmp_path):
    qemu_path: list[str] = []

    async def make(*, via: str = "memory", mac: bytes | None = None, lease: bool = False) -> HostileGuest:
        if via == "memory":
            return await attach_fake_guest(netkit_switch, nursery, lease=lease, mac=mac, guest_class=HostileGuest)
        if via == "qemu":
            if not qemu_path:
                qemu_path.append(str(tmp_path / "qemu.sock"))
                await netkit_switch.listen(QemuListener(qemu_path[0]))
            link = await qemu_connect(qemu_path[0])
        else:
            raise ValueError(f"unknown link {via!r}")
        guest = HostileGuest(link, mac)
        await nursery.start(guest.run)
        if lease:
            await guest.dhcp()
        return guest

    return make


@pytest.fixture
async def victim_factory(fake_guest_factory):
    return fake_guest_factory
