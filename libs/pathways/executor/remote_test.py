"""Tests for the remote executor's replica bookkeeping: replicas follow their source at runtime."""

from __future__ import annotations

import grpc
import pytest

from pathways import spec as spec_lib
from pathways.executor.remote import RemoteExecutor
from pathways.executor.replicas import RemoteError, ReplicaSet
from pathways.sampling import SamplingParams
from pathways.v1 import module_pb2

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "embed": {"kind": "embedding", "vocab_size": 11, "d_model": 8, "max_seq_len": 16},
            "attn": {
                "kind": "attention",
                "d_model": 8,
                "n_layers": 1,
                "n_heads": 2,
                "max_seq_len": 16,
            },
            "head": {"kind": "decoding", "d_model": 8, "vocab_size": 11},
        },
        "pathways": {"deep": ["embed", "attn", "head"], "shallow": ["embed", "head"]},
    }
)


class Source:
    """A ReplicaSource whose addresses the test changes (as discovery does when pods come/go)."""

    def __init__(self, addresses: dict[str, list[str]]):
        self.addresses = addresses

    def replicas(self, module: str) -> list[str]:
        return list(self.addresses.get(module, []))

    def subscribe(self, callback) -> None:
        pass


def _closed(replica) -> bool:
    try:
        replica.stub.Describe(module_pb2.DescribeRequest(), timeout=0.01)
    except ValueError as e:  # grpc refuses calls on a closed channel
        return "closed channel" in str(e)
    except grpc.RpcError:
        return False  # open (nothing listens at the address)
    return False


def test_new_sessions_follow_the_source_and_held_replicas_stay_open():
    src = Source({"attn": ["10.0.0.1:50051"]})
    rset = ReplicaSet("attn", src, options=[])
    a = rset.acquire()
    assert a.address == "10.0.0.1:50051"

    src.addresses["attn"] = ["10.0.0.1:50051", "10.0.0.2:50051"]  # scaled up
    b = rset.acquire()
    assert b.address == "10.0.0.2:50051"  # the new replica, least loaded
    assert {rset.acquire().address, rset.acquire().address} == {a.address, b.address}

    src.addresses["attn"] = ["10.0.0.2:50051"]  # a scaled away while two sessions hold it
    assert all(rset.acquire() is b for _ in range(3))
    assert a.retired and not _closed(a)  # its sessions keep using it
    rset.release(a)
    assert not _closed(a)
    rset.release(a)
    assert _closed(a)  # the last session left: channel closed, forgotten
    assert [r.address for r in rset.replicas] == ["10.0.0.2:50051"]

    src.addresses["attn"] = []  # b leaves while held, then comes back: the same replica
    assert rset.acquire() is None and b.retired
    src.addresses["attn"] = ["10.0.0.2:50051"]
    assert rset.acquire() is b and not b.retired
    src.addresses["attn"] = ["10.0.0.3:50051"]  # a fresh address is a fresh replica
    assert rset.acquire().address == "10.0.0.3:50051"
    rset.close()
    assert _closed(b)


def test_a_live_source_serves_every_pathway_and_fails_unavailable_without_replicas():
    ex = RemoteExecutor(SPEC, Source({"embed": ["127.0.0.1:1"]}))
    try:
        assert ex.served == {"deep", "shallow"}
        with pytest.raises(RemoteError) as e:
            ex.open_session("shallow", [SamplingParams()])
        # embed's address refuses connections; head has no replica at all.
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert ex.replicas["embed"].replicas[0].sessions == 0  # released after the failure
        assert ex._sessions == {}
        with pytest.raises(RemoteError, match="module 'embed': no replica available"):
            RemoteExecutor(SPEC, Source({})).forward("shallow", [[1, 2]])
    finally:
        ex.close()


def test_fixed_addresses_are_checked_and_limit_the_pathways():
    with pytest.raises(ValueError, match="module 'head' has no replica addresses"):
        RemoteExecutor(SPEC, {"embed": ["h:1"], "head": []})
    with pytest.raises(ValueError, match="unknown module.*nope"):
        RemoteExecutor(SPEC, {"nope": ["h:1"]})
    ex = RemoteExecutor(SPEC, {"embed": ["h:1"], "head": ["h:2"]})
    assert ex.served == {"shallow"}
    with pytest.raises(ValueError, match="pathway 'deep' needs modules with no replicas: attn"):
        ex.open_session("deep", [SamplingParams()])
    ex.close()
