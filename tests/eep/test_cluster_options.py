"""`eep launch`'s options for one host of several: refused with a message naming the problem."""

from __future__ import annotations

import pytest

from eep.config import RuntimeConfig
from eep.launcher import Cluster, ClusterOptions
from eep.membership.host import ENV_HOST_ADDR, ENV_HOST_ID, this_host


def _cfg() -> RuntimeConfig:
    return RuntimeConfig.for_cluster("opts", "/nonexistent", 4, num_experts=8, fabric="te")


def test_joining_needs_the_clusters_etcd():
    with pytest.raises(ValueError, match="join=True needs the cluster's etcd"):
        ClusterOptions(_cfg(), join=True)


@pytest.mark.parametrize("slots", [(0, 4), (1, 1), (-1,)])
def test_host_slots_must_be_distinct_slots_of_the_cluster(slots):
    with pytest.raises(ValueError, match="must be distinct slots of 0...3"):
        ClusterOptions(_cfg(), slots=slots)


def test_an_address_moves_the_front_end_there_and_names_the_hosts_processes():
    opts = ClusterOptions(_cfg(), slots=(1, 3), host_id="b", address="10.9.8.2")
    assert opts.host == "10.9.8.2"
    cluster = Cluster(opts)
    assert cluster.local_slots == (1, 3)
    assert cluster._host_env() == {ENV_HOST_ID: "b", ENV_HOST_ADDR: "10.9.8.2"}


def test_this_host_reads_its_identity_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_HOST_ID, "h7")
    monkeypatch.setenv(ENV_HOST_ADDR, "10.1.2.3")
    assert (this_host().host_id, this_host().address) == ("h7", "10.1.2.3")
    monkeypatch.delenv(ENV_HOST_ID)
    monkeypatch.delenv(ENV_HOST_ADDR)
    assert this_host().address == "127.0.0.1" and this_host().host_id
