"""Batched verification in real pulls: Mooncake over loopback TCP, real holder processes.

A batch is one checksum computation over many landed tensors; what it finds must still name
single tensors: a bad one is fetched again alone, the rest of its batch stands.
"""

from __future__ import annotations

import signal
import uuid

import pytest
import torch

from eep.expert_arena import ExpertArena
from eep.model.config import ModelConfig
from eep.model.qwen3_moe import Qwen3MoeModel
from eep.tools.holder_proc import fill_arena, spec_tensors
from eep.transfer.arena import Arena, ArenaLayout
from eep.transfer.checksum import checksum, format_checksum, range_checksums
from eep.transfer.executor import Puller, _Run
from eep.transfer.manifest import ManifestStore

from .conftest import Holders, tcp_config

KiB, MiB = 1 << 10, 1 << 20
FEW = spec_tensors(16, 256 * KiB, prefix="few")  # 4 MiB: each holder's half is one request
MANY = spec_tensors(512, 16 * KiB, prefix="many")  # 8 MiB likewise, in 512 tensors
BAD = FEW[2][0]  # in holder 0's half of FEW (the planner gives it the first run)


@pytest.fixture(scope="module")
def pair(etcd_server):
    """Holder 0 (its copy of ``BAD`` rotten after publishing) and holder 1, both holding FEW and
    MANY, shared by the tests that only read from them."""
    hs = Holders(etcd_server.endpoint, f"t{uuid.uuid4().hex[:10]}")
    a = hs.start("0", FEW + MANY, corrupt=(BAD,))
    b = hs.start("1", FEW + MANY)
    hs.wait_ready(a, b)
    yield hs
    hs.close()


def _original(tensors) -> Arena:
    arena = Arena("experts", ArenaLayout.pack(tensors))
    fill_arena(arena)
    return arena


def _fresh(tensors) -> Arena:
    arena = Arena("experts", ArenaLayout.pack(tensors))
    arena.buffer.fill_(0xA5)  # poison: every byte must be written
    return arena


def _pull(transport, arena, store, cfg, **kw):
    arena.register(transport)
    try:
        return Puller(transport, arena, cfg, kw.pop("progress", None)).pull(store.live(), **kw)
    finally:
        arena.unregister()


def test_a_corrupt_tensor_inside_a_batch_is_fetched_again_alone(pair, transport, etcd):
    arena, plans, bad = _fresh(FEW), [], BAD
    store = ManifestStore(etcd, pair.cluster)
    # one verifier: a landed request is verified as one batch of its 8 tensors
    report = _pull(transport, arena, store, tcp_config(verify_workers=1), on_plan=plans.append)
    first = plans[0].bytes_by_holder()
    assert bad in [r.name for r in plans[0].reads if r.holder == "0"]
    assert report.corrupt == [("0", bad)]  # the batch named the one bad tensor
    assert report.replans == 1
    assert report.bytes_by_holder["0"] == first["0"]
    assert report.bytes_by_holder["1"] == first["1"] + 256 * KiB  # only it came again
    assert report.batches <= 3  # two requests and the re-fetch, not one per tensor
    assert torch.equal(arena.buffer, _original(FEW).buffer)


def test_a_hung_holders_late_write_is_caught_by_the_check_at_the_end(
    holders, transport, etcd, cluster, monkeypatch
):
    tensors = spec_tensors(16, 512 * KiB)
    a, b = holders.start("0", tensors), holders.start("1", tensors)
    holders.wait_ready(a, b)
    arena, stopped, scribbled = _fresh(tensors), [], []

    def progress(done: int, total: int) -> None:
        if not stopped and done > 0:  # holder 0 still owes most of its half
            a.kill(signal.SIGSTOP)  # alive, connected, silent: only a deadline catches it
            stopped.append(done)

    recheck = _Run._recheck_tainted

    def late_write(run: _Run) -> int:
        # what an abandoned read of the hung holder does when it lands late: other bytes over a
        # copy that has passed its checksum (simulated, so it lands exactly before the check)
        name = sorted(run.tainted)[0]
        arena.bytes_of(arena.layout[name])[:64].bitwise_not_()
        scribbled.append(name)
        return recheck(run)

    monkeypatch.setattr(_Run, "_recheck_tainted", late_write)
    store = ManifestStore(etcd, cluster)
    # one 1 MiB request at a time: holder 0 has requests left when it stops
    cfg = tcp_config(op_timeout_s=1.0, chunk_nbytes=1 * MiB, max_inflight=1)
    report = _pull(transport, arena, store, cfg, progress=progress)
    assert stopped and "timed out" in report.failed_holders["0"]
    assert scribbled and report.overwritten == scribbled  # the others it re-checked are intact
    assert not report.corrupt  # holder 1's bytes had passed: it is not blamed
    assert torch.equal(arena.buffer, _original(tensors).buffer)


def test_many_small_tensors_are_verified_in_a_few_batches_with_the_holders_checksums(
    pair, transport, etcd
):
    arena = _fresh(MANY)
    store = ManifestStore(etcd, pair.cluster)
    report = _pull(transport, arena, store, tcp_config(verify_workers=2))
    assert not report.corrupt and not report.failed_holders
    assert report.batches <= 4  # each landed request split over at most the two verifiers
    assert torch.equal(arena.buffer, _original(MANY).buffer)
    # the batch computes exactly what the holders published, tensor by tensor
    specs = arena.layout.specs
    values = range_checksums(arena.buffer, [s.offset for s in specs], [s.nbytes for s in specs])
    published = store.get("1").tensors
    assert [format_checksum(v) for v in values.tolist()] == [
        published[s.name].checksum for s in specs
    ]
    # and the report names each tensor with the checksum it was verified against (what the
    # puller then publishes without computing it again)
    assert report.verified == {s.name: published[s.name].checksum for s in specs}


def test_expert_arena_publishes_the_per_tensor_checksums(transport, etcd, cluster):
    model = Qwen3MoeModel(ModelConfig.tiny(), (5, 1, 6), dtype=torch.bfloat16)
    experts = ExpertArena(model, "cpu")
    fill_arena(experts.arena)
    store = ManifestStore(etcd, cluster)
    experts.publish(transport, store, "3", "testhost", 3, 1, lease=0)
    try:
        published = store.get("3").tensors
        for spec in experts.arena.layout.specs:
            assert published[spec.name].checksum == checksum(experts.arena.bytes_of(spec))
    finally:
        experts.arena.unregister()


def test_expert_arena_publishes_known_checksums_as_given_and_computes_the_rest(
    transport, etcd, cluster
):
    model = Qwen3MoeModel(ModelConfig.tiny(), (5, 1, 6), dtype=torch.bfloat16)
    experts = ExpertArena(model, "cpu")
    fill_arena(experts.arena)
    first, *rest = experts.arena.layout.specs
    odd = format_checksum(42)  # not the bytes' checksum: shows it is taken as given
    store = ManifestStore(etcd, cluster)
    experts.publish(transport, store, "3", "testhost", 3, 1, lease=0, known={first.name: odd})
    try:
        published = store.get("3").tensors
        assert published[first.name].checksum == odd  # a pull verified it: not recomputed
        for spec in rest:
            assert published[spec.name].checksum == checksum(experts.arena.bytes_of(spec))
        assert list(published) == experts.arena.layout.names
    finally:
        experts.arena.unregister()
