"""Fixtures shared by every test package: a real etcd server on free ports."""

from __future__ import annotations

import uuid

import pytest

# etcd fixtures import the membership package lazily: the GPU machine runs the kernel tests
# without the etcd client installed.


@pytest.fixture(scope="session")
def etcd_server():
    """One etcd for the session (temp data dir, free ports, stopped by pid at the end)."""
    from eep.membership.server import EtcdServer

    server = EtcdServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def etcd_fresh():
    """An etcd of the test's own, for tests that restart, compact or stop it."""
    from eep.membership.server import EtcdServer

    server = EtcdServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def cluster() -> str:
    """A cluster name of the test's own, so tests sharing one etcd never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def etcd(etcd_server):
    from eep.membership.etcd import EtcdClient

    client = EtcdClient(etcd_server.endpoint)
    yield client
    client.close()
