"""Fixtures for the 9P tests: a share on disk, a directory outside it, and connected
clients (netkit's scripted Client9P over an in-memory stream to serve_9p)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import trio
import trio.testing

from netkit.config import Share
from netkit.files import Client9P, serve_9p

ROOT_FID = 1


@pytest.fixture
def share_dir(tmp_path):
    """``share/`` with hello.txt, sub/inner.txt and an empty dir; ``outside/secret.txt``
    next to it (the share must never reach it)."""
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "hello.txt").write_text("hello, world\n")
    (share / "sub" / "inner.txt").write_text("inner\n")
    (share / "empty").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    os.chmod(outside / "secret.txt", 0o600)
    return share


@pytest.fixture
def outside_dir(share_dir):
    return share_dir.parent / "outside"


class Server:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.stats: Counter = Counter()
        self.finished: list[bool] = []

    async def connect(self, shares: dict[str, Share], *, attach: str | None = None, msize: int = 65536,
                      **kwargs) -> Client9P:
        client_end, server_end = trio.testing.memory_stream_pair()

        async def run() -> None:
            await serve_9p(server_end, shares, stats=self.stats, **kwargs)
            self.finished.append(True)

        self.nursery.start_soon(run)
        client = Client9P(client_end)
        if attach is not None:
            await client.version(msize)
            await client.attach(ROOT_FID, attach)
        return client


@pytest.fixture
async def server(nursery):
    return Server(nursery)


@pytest.fixture
def shares(share_dir):
    return {"src": Share("src", str(share_dir)), "ro": Share("ro", str(share_dir), read_only=True)}


@pytest.fixture
async def client(server, shares):
    c = await server.connect(shares, attach="src")
    yield c
    await c.aclose()


@pytest.fixture
async def ro_client(server, shares):
    c = await server.connect(shares, attach="ro")
    yield c
    await c.aclose()
