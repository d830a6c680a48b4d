"""Fixtures shared by every test package: a real etcd server on free ports."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

# Triton kernels run in the interpreter on a machine without CUDA; TRITON_INTERPRET must be set
# before the first @triton.jit definition, which any test package may trigger at collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import numpy as np
    import triton.runtime.interpreter as _interp

    # Triton 3.6's interpreter turns a scalar into an int with int(array), which numpy >= 2.4
    # refuses for the 1-element arrays it holds (so `range(0, n)` over a kernel argument
    # fails). Take the element explicitly; on GPUs the interpreter is not used.
    _patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor_np24(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(
            tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
        )

    _interp._patch_lang_tensor = _patch_lang_tensor_np24

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
def etcd_cluster():
    """A 3-member etcd cluster of the test's own (free ports, temp data dirs, every member
    stopped by pid at the end), for tests that kill, restart or stop its members."""
    from eep.membership.server import EtcdCluster

    members = EtcdCluster(3).start()
    yield members
    members.cleanup()


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
