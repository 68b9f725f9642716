"""Fixtures for the control API tests: an in-process switch with its API on a temp socket."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from netkit.api.server import serve_api

from api_helpers import ApiHarness


@pytest.fixture
def api_dir():
    directory = tempfile.mkdtemp(prefix="nkapi")  # short: unix socket paths are limited to 107 bytes
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def api_limits() -> dict:
    """Override in a test module to change ``max_body``, ``idle_timeout``, ``max_connections``."""
    return {}


@pytest.fixture
def api_token() -> str | None:
    return None


@pytest.fixture
async def api(netkit_switch, nursery, api_dir, api_limits, api_token):
    path = f"{api_dir}/api.sock"
    server = await nursery.start(lambda task_status: serve_api(netkit_switch, path, token=api_token,
                                                               task_status=task_status, **api_limits))
    yield ApiHarness(path, server, netkit_switch, api_token)
