"""The planner is pure: plain manifests in, a plan out; no processes."""

from __future__ import annotations

import pytest

from eep.transfer.arena import ArenaLayout
from eep.transfer.engine import Region
from eep.transfer.errors import LayoutMismatch, NoSource
from eep.transfer.manifest import Manifest, ManifestEntry
from eep.transfer.planner import Tier, plan_pull, requests_of

MiB = 1 << 20


def _layout(n: int, mib: int = 1) -> ArenaLayout:
    return ArenaLayout.pack([(f"e{i}", "uint8", (mib * MiB,)) for i in range(n)])


def _manifest(holder: str, layout: ArenaLayout, host: str = "h0", names=None) -> Manifest:
    specs = [s for s in layout.specs if names is None or s.name in names]
    entries = {
        s.name: ManifestEntry("experts", s.offset, s.nbytes, s.dtype, s.shape, f"w64-{holder}")
        for s in specs
    }
    region = Region("experts", 1 << 32, layout.nbytes, "device", "cuda:0")
    return Manifest(holder, f"{host}:1", "tcp", host, (region,), entries)


def test_bytes_are_spread_evenly_over_same_host_holders():
    lay = _layout(12)
    plan = plan_pull(lay.specs, [_manifest(h, lay) for h in "abc"], local_host="h0")
    assert plan.bytes_by_holder() == {h: 4 * MiB for h in "abc"}
    assert {r.tier for r in plan.reads} == {Tier.SAME_HOST}


def test_same_host_holders_are_preferred_over_remote_ones():
    lay = _layout(8)
    ms = [_manifest("near", lay, "h0"), _manifest("far", lay, "h1")]
    by = plan_pull(lay.specs, ms, local_host="h0", remote_weight=0.25).bytes_by_holder()
    assert by["near"] > 4 * by.get("far", 0) * 0.9  # far gets at most its bandwidth share


def test_remote_holder_serves_when_no_same_host_holder_has_the_tensor():
    lay = _layout(2)
    ms = [_manifest("near", lay, "h0", {"e0"}), _manifest("far", lay, "h1")]
    plan = plan_pull(lay.specs, ms, local_host="h0")
    assert {(r.name, r.holder, r.tier) for r in plan.reads} == {
        ("e0", "near", Tier.SAME_HOST),
        ("e1", "far", Tier.OTHER_HOST),
    }


def test_disk_serves_only_what_no_live_rank_holds():
    lay = _layout(3)
    ms = [_manifest("0", lay, names={"e0"}), _manifest("1", lay, "h1", names={"e0", "e1"})]
    plan = plan_pull(lay.specs, ms, local_host="h0", checkpoint={"e0", "e1", "e2"})
    assert {(r.name, r.holder, r.tier) for r in plan.reads} == {
        ("e0", "0", Tier.SAME_HOST),
        ("e1", "1", Tier.OTHER_HOST),
    }
    assert [d.name for d in plan.disk] == ["e2"]


def test_exclusions_steer_around_dead_holders_and_corrupt_copies():
    lay = _layout(4)
    ms = [_manifest(h, lay) for h in "abc"]
    plan = plan_pull(
        lay.specs,
        ms,
        local_host="h0",
        exclude_holders={"a"},
        exclude_pairs={("b", "e0"), ("b", "e1")},
    )
    assert "a" not in plan.bytes_by_holder()
    assert {r.holder for r in plan.reads if r.name in ("e0", "e1")} == {"c"}


def test_tensor_without_any_source_raises_no_source_naming_it():
    lay = _layout(2)
    with pytest.raises(NoSource, match="'e1'"):
        plan_pull(lay.specs, [_manifest("a", lay, names={"e0"})], local_host="h0")


def test_holder_with_another_layout_raises_layout_mismatch():
    lay = _layout(2)
    other = ArenaLayout.pack([("e0", "uint8", (2 * MiB,)), ("e1", "uint8", (MiB,))])
    with pytest.raises(LayoutMismatch, match="'e0'"):
        plan_pull(lay.specs, [_manifest("a", other)], local_host="h0")


def test_plans_are_deterministic_and_carry_the_holders_addresses_and_checksums():
    lay = _layout(7)
    ms = [_manifest(h, lay) for h in "ba"]
    p1 = plan_pull(lay.specs, ms, local_host="h0")
    p2 = plan_pull(list(reversed(lay.specs)), list(reversed(ms)), local_host="h0")
    assert p1 == p2
    for r in p1.reads:
        assert r.remote_addr == (1 << 32) + lay[r.name].offset
        assert r.checksum == f"w64-{r.holder}"


def test_full_replicas_get_contiguous_runs_that_the_executor_coalesces():
    lay = _layout(12)
    plan = plan_pull(lay.specs, [_manifest(h, lay) for h in "ab"], local_host="h0")
    for reads in plan.by_holder().values():
        chunks = requests_of(reads, step=64 * MiB)
        assert len(chunks) == 1 and chunks[0].nbytes == 6 * MiB  # one request per holder
    big = plan_pull(lay.specs, [_manifest("a", lay)], local_host="h0")
    sizes = [c.nbytes for c in requests_of(list(big.reads), step=5 * MiB)]
    assert sizes == [5 * MiB, 5 * MiB, 2 * MiB]
