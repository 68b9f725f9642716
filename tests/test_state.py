"""Leases survive a restart through the state file; a corrupt file is set aside."""

import json
import os
from ipaddress import IPv4Address

import netkit
from netkit.links.memory import memory_link_pair
from netkit.testing import FakeGuest
from netkit.testing.wait import wait_until


async def _leased_guest(switch, nursery, mac):
    guest_end, switch_end = memory_link_pair()
    switch.attach(switch_end)
    guest = FakeGuest(guest_end, mac)
    await nursery.start(guest.run)
    return guest, await guest.dhcp()


async def test_leases_survive_restart(tmp_path, nursery):
    state = str(tmp_path / "leases.json")
    config = netkit.Config(state_file=state)
    mac = bytes.fromhex("020000001234")
    async with netkit.open_switch(config) as switch:
        guest, first = await _leased_guest(switch, nursery, mac)
        switch.gateway.reserve(bytes.fromhex("020000005678"), IPv4Address("192.168.65.200"))
        await guest.link.aclose()
    assert oct(os.stat(state).st_mode & 0o777) == "0o600"
    document = json.load(open(state))
    assert document["format"] == "netkit-leases"
    async with netkit.open_switch(config) as switch:
        leases = {lease.mac: lease for lease in switch.leases()}
        assert leases[mac].ip == first.ip and leases[mac].state == "bound"
        assert leases[bytes.fromhex("020000005678")].ip == IPv4Address("192.168.65.200")
        # The restored binding is enforced at once: the guest may only use its address.
        assert switch._ip_bindings[mac] == first.ip.packed
        _, again = await _leased_guest(switch, nursery, mac)
        assert again.ip == first.ip


async def test_corrupt_state_is_set_aside(tmp_path, caplog):
    state = tmp_path / "leases.json"
    state.write_text("{ this is not json")
    async with netkit.open_switch(netkit.Config(state_file=str(state))) as switch:
        assert switch.leases() == []

        def fresh_file_written():
            try:
                return json.loads(state.read_text())["format"] == "netkit-leases"
            except (FileNotFoundError, ValueError):  # set aside, not yet rewritten
                return False

        await wait_until(fresh_file_written, timeout=5)  # while running, not only at exit
    aside = [p for p in os.listdir(tmp_path) if p.startswith("leases.json.corrupt-")]
    assert len(aside) == 1
    assert json.load(open(state))["format"] == "netkit-leases"  # a fresh, valid file
    assert "corrupt" in caplog.text
