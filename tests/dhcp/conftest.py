"""Fixtures for the DHCP tests (helpers live in dhcp_helpers.py)."""

import pytest
from dhcp_helpers import Exchange

from netkit.config import Config


@pytest.fixture
def config() -> Config:
    return Config()


@pytest.fixture
def exchange(config) -> Exchange:
    return Exchange(config)
