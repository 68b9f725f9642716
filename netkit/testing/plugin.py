"""pytest plugin (registered through the ``pytest11`` entry point): netkit fixtures.

Fixtures (async ones need pytest-trio):

- ``netkit_config``: the ``netkit.Config`` the other fixtures use; override it in your
  conftest to change addressing or limits.
- ``netkit_switch``: a running in-process switch (``netkit.open_switch``).
- ``fake_guest_factory``: ``await fake_guest_factory(lease=True)`` attaches a new
  ``FakeGuest`` over an in-memory link (and leases an address by DHCP).
- ``fake_guest``: one fake guest with a lease.
- ``netns_guest``: a real Linux kernel guest in a fresh network namespace, attached to
  ``netkit_switch`` through a tap (needs root; skipped with a reason otherwise, failed
  instead when ``NETKIT_REQUIRE_PRIVILEGED=1``).
"""

from __future__ import annotations

import pytest

from ..config import Config


@pytest.fixture
def netkit_config() -> Config:
    return Config()


@pytest.fixture
async def netkit_switch(netkit_config):
    from ..runtime import open_switch

    async with open_switch(netkit_config) as switch:
        yield switch


@pytest.fixture
async def fake_guest_factory(netkit_switch, nursery):
    from .fake_guest import FakeGuest, attach_fake_guest

    async def make(*, lease: bool = True, mac: bytes | None = None, wrap=None) -> FakeGuest:
        return await attach_fake_guest(netkit_switch, nursery, lease=lease, mac=mac, wrap=wrap)

    yield make


@pytest.fixture
async def fake_guest(fake_guest_factory):
    return await fake_guest_factory()


@pytest.fixture
async def netns_guest(netkit_switch):
    from .netns_guest import open_netns_guest
    from .privileged import require_privileged

    require_privileged()
    async with open_netns_guest(netkit_switch) as guest:
        yield guest
