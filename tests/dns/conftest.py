"""Fixtures for the DNS tests (helpers live in dns_helpers.py)."""

import dataclasses

import pytest
from dns_helpers import FakeUpstream

from netkit.config import Config
from netkit.dns import DnsService


@pytest.fixture
async def upstream(nursery) -> FakeUpstream:
    fake = FakeUpstream()
    fake.add("example.test. 300 IN A 10.0.0.1")
    return await fake.start(nursery)


@pytest.fixture
async def upstream2(nursery) -> FakeUpstream:
    fake = FakeUpstream()
    fake.add("example.test. 300 IN A 10.0.0.2")
    return await fake.start(nursery)


@pytest.fixture
def make_service(tmp_path):
    """make_service(*upstreams, **config_changes) -> DnsService with a short timeout.

    resolv.conf points at a test-written file, so nothing ever reads the real one."""
    empty_resolv = tmp_path / "resolv.conf.empty"
    empty_resolv.write_text("")

    def make(*upstreams, clock=None, resolver=None, **changes) -> DnsService:
        settings = dict(dns_upstreams=tuple(u if isinstance(u, str) else u.address for u in upstreams),
                        dns_timeout=1.0, dns_resolv_conf=str(empty_resolv))
        settings.update(changes)
        config = dataclasses.replace(Config(), **settings)
        kwargs = {"resolver": resolver}
        if clock is not None:
            kwargs["clock"] = clock
        return DnsService(config, **kwargs)

    return make
