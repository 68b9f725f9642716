"""Shared fixtures for the link tests."""

from __future__ import annotations

import gc
import os
import secrets
import subprocess

import pytest


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak():
    """Every link test must give back every fd it opened (sockets, taps, pipes).

    Sync and autouse, so it brackets the whole trio run of an async test.
    """
    gc.collect()
    before = open_fd_count()
    yield
    gc.collect()
    after = open_fd_count()
    assert after == before, f"fd leak: {before} open before the test, {after} after"


@pytest.fixture
def sock_dir(tmp_path_factory):
    """A short directory for unix socket paths (sun_path is limited to 108 bytes)."""
    return tmp_path_factory.mktemp("s")


@pytest.fixture
def netns():
    """A fresh, uniquely named network namespace, deleted afterwards."""
    from netkit.testing.privileged import require_privileged, require_tool

    require_privileged()
    require_tool("ip")
    name = f"nklt{os.getpid() % 100000}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
