"""Fixtures for the HTTP proxy tests (helpers live in proxy_helpers.py).

Everything runs on 127.0.0.1: see proxy_helpers.LoopbackConnector."""

import pytest
from proxy_helpers import LoopbackConnector, Origin, TlsServer, make_cert

from netkit.http_proxy import HttpProxy, ProxySettings


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def cafile(cert):
    return cert[0]


@pytest.fixture
async def origin(nursery):
    return await Origin("origin").start(nursery)


@pytest.fixture
async def tls_server(nursery, cert):
    return await TlsServer(*cert).start(nursery)


@pytest.fixture
def connector(origin):
    return LoopbackConnector({"origin.test": origin.port})


@pytest.fixture
def proxy(connector):
    return HttpProxy(ProxySettings(), connect=connector)
