"""Acting through the services: a navigation and a manipulation pathway sharing one attention
module (two replicas), every module its own server process, a gateway process. An episode through
the gateway (one observation in, one action out, the window in the servers' KV caches) takes the
in-process policy's actions; bad observations get INVALID_ARGUMENT naming the field; behaviour
cloning as coordinator jobs (a real broker and worker) gives the same losses in process and
through the servers; a replica killed mid-episode changes no action (last: it leaves one)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import codec
from pathways import spec as spec_lib
from pathways.client import Client
from pathways.coordinator import worker
from pathways.coordinator.app import make_app
from pathways.coordinator.broker import EmbeddedBroker
from pathways.coordinator.client import JobClient
from pathways.coordinator.jobs import JobRequest
from pathways.deploy import launcher
from pathways.robotics.policy import Policy, rollout
from pathways.serving import testing
from pathways.v1 import gateway_pb2, gateway_pb2_grpc, module_pb2, module_pb2_grpc
from tests.coordinator_test import final_losses
from tools.cli.main import main

pytestmark = pytest.mark.slow
K = 6  # the window: episodes below run past it, so later steps re-prefill the last K
SERVER_TTL_S = 3  # the module servers forget sessions idle this long (a step replays them)
SPEC = {
    "modules": {
        "grid": {
            "kind": "observation_embedding",
            "observation": "grid",
            "obs_dim": 1083,
            "grid_rows": 19,
            "grid_columns": 19,
            "frame": "agent",
            "view": 7,
            "cell_dim": 5,
            "conv_channels": 3,
            "conv_layers": 1,
            "d_model": 12,
            "max_seq_len": K,
        },
        "arm": {
            "kind": "observation_embedding",
            "observation": "vector",
            "obs_dim": 10,
            "hidden": 13,
            "scale": [1, 1, 1, 1, 5, 5, 0.1, 0.1, 20, 20],
            "d_model": 12,
            "max_seq_len": K,
            "init_std": 0.3,
        },
        "attn": {"kind": "attention", "d_model": 12, "n_layers": 1, "n_heads": 3, "max_seq_len": K},
        "moves": {
            "kind": "action",
            "d_model": 12,
            "space": "discrete",
            "actions": 7,
            "init_std": 0.5,  # untrained, yet choices far apart: no near-ties to flip
        },
        "torques": {
            "kind": "action",
            "d_model": 12,
            "space": "continuous",
            "actions": 2,
            "squash": "tanh",
            "hidden": 13,
            "init_std": 0.3,
        },
    },
    "pathways": {"fourrooms": ["grid", "attn", "moves"], "reacher": ["arm", "attn", "torques"]},
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    spec = spec_lib.from_dict(SPEC)
    ex = testing.make_checkpoint(path, spec)
    fleet = launcher.Fleet(
        str(path),
        list(spec.modules),
        replicas={"attn": 2},
        module_args=["--training", "--session-ttl-s", str(SERVER_TTL_S)],
    )
    with fleet:
        with grpc.insecure_channel(fleet.gateway.address) as ch:
            yield fleet, gateway_pb2_grpc.GatewayServiceStub(ch), ex, path


def _actions(env: str, policy, seed: int):
    taken = []
    result = rollout(env, policy, [seed], on_step=lambda e, a: taken.append(a))
    return result.episodes[0], taken


@pytest.mark.parametrize("env, seed", [("fourrooms", 3), ("reacher", 5)])
def test_an_episode_through_the_gateway_takes_the_in_process_actions(deployment, env, seed):
    fleet, _, ex, _ = deployment
    want, want_actions = _actions(env, Policy(ex, env), seed)
    with Client(fleet.gateway.address) as c:
        got, got_actions = _actions(env, c.episode(env), seed)
    assert got.steps == want.steps > K  # past the window: re-prefilled steps too
    if env == "fourrooms":
        assert got_actions == want_actions
        assert len(set(want_actions)) > 1  # not one answer for every step
    else:
        np.testing.assert_allclose(np.stack(got_actions), np.stack(want_actions), atol=1e-5)
    assert got.ret == pytest.approx(want.ret, abs=1e-4)


def test_cli_rollout_through_the_gateway_prints_the_in_process_episodes(deployment, capsys):
    fleet, _, _, path = deployment
    outs = []
    for where in (["--gateway", fleet.gateway.address], ["--checkpoint", str(path)]):
        argv = ["rollout", *where, "--env", "reacher", "--episodes", "2", "--seed", "11"]
        assert main(argv) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("seed 11: ") and out[-1].startswith("success rate")
        outs.append([*out[:-1], out[-1].split("  step p50")[0]])  # latency differs
    assert outs[0] == outs[1]
    assert main(["rollout", "--gateway", fleet.gateway.address, "--env", "doorkey"]) == 2
    err = capsys.readouterr().err
    assert "no served pathway acts on observations of 192 values" in err, err


def _infer(stub, **fields):
    if isinstance(fields.get("tensor"), np.ndarray):
        fields["tensor"] = codec.encode(fields["tensor"])
    return stub.Infer(gateway_pb2.InferRequest(**fields), timeout=60)


OBS = np.linspace(-1, 1, 10, dtype=np.float32)
NAN = OBS.copy()
NAN[3] = np.nan
BAD = [
    # (request fields, status, the message contains)
    ({"tensor": OBS[:9]}, "NOT_FOUND", "no served pathway acts on observations of 9 values"),
    ({"tensor": OBS[:9], "pathway": "reacher"}, "INVALID_ARGUMENT", "tensor: one observation"),
    ({"tensor": np.zeros((2, 10), np.float32)}, "INVALID_ARGUMENT", "got [2, 10]"),
    ({"tensor": OBS.astype(np.int32)}, "INVALID_ARGUMENT", "tensor: module 'arm' reads float32"),
    ({"tensor": NAN}, "INVALID_ARGUMENT", "tensor: has NaN or infinite values (first at index 3)"),
    ({"wav": b"RIFF"}, "INVALID_ARGUMENT", "wav: an episode's step takes its observation"),
]


@pytest.mark.parametrize("fields,code,says", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_observations_get_a_status_naming_the_field(deployment, fields, code, says):
    _, stub, _, _ = deployment
    with pytest.raises(grpc.RpcError) as e:
        _infer(stub, start_session=True, **fields)
    assert e.value.code().name == code, e.value.details()
    assert says in e.value.details(), e.value.details()


def test_episodes_refuse_bad_steps_and_go_on_and_end(deployment):
    fleet, stub, ex, _ = deployment
    first = _infer(stub, start_session=True, tensor=OBS)
    key = first.session_id
    assert first.pathway == "reacher" and key.startswith("ep-")
    policy = Policy(ex, "reacher")
    a = first.actions.items[0]
    assert not a.discrete and a.step == 1
    np.testing.assert_allclose(a.values, policy.act(OBS), atol=1e-5)
    for fields, says in (
        ({"tensor": NAN}, "tensor: has NaN"),
        ({"tensor": OBS[None, :, None]}, "tensor: one observation of shape (10,)"),
        ({"tensor": OBS, "pathway": "fourrooms"}, "runs on pathway 'reacher', not 'fourrooms'"),
        ({"tensor": OBS, "start_session": True}, "not both"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            _infer(stub, session_id=key, **fields)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.value.details()
    r = _infer(stub, session_id=key, tensor=-OBS, end_session=True)  # the refused steps: none
    assert r.actions.items[0].step == 2
    np.testing.assert_allclose(r.actions.items[0].values, policy.act(-OBS), atol=1e-5)
    with pytest.raises(grpc.RpcError) as e:
        _infer(stub, session_id=key, tensor=OBS)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown episode" in e.value.details()
    # Without a session: a window of observations gives the action at its last step.
    window = np.stack([OBS, -OBS, OBS * 0.5])[None]
    r = _infer(stub, pathway="reacher", tensor=window)
    np.testing.assert_allclose(
        r.actions.items[0].values, ex.forward("reacher", window)[0, -1], atol=1e-5
    )


def test_behaviour_cloning_jobs_give_the_same_losses_in_process_and_through_the_servers(
    deployment, tmp_path
):
    """Coordinator (Celery) jobs on the Reacher demonstrations (continuous targets, NaN on the
    padding steps of windows past an episode's end; they were once cast to int32 on the way to
    the servers): the job through the module servers' TrainingService gives the in-process
    pipeline job's losses, and they go down. The only training in this file: the servers'
    training copies start from the checkpoint, as the in-process job does (same seed)."""
    fleet, _, _, path = deployment
    spec, _ = ckpt.load_spec(path)
    common = dict(
        spec=str(path / "spec.yaml"),
        pathway="reacher",
        dataset="reacher",
        steps=8,
        batch_size=8,
        seq_len=K,
        lr=1e-2,
        warmup=1,
        eval_every=4,
        save_every=4,
        micro_batches=2,
    )
    servers = {m: fleet.endpoints[m][0] for m in spec.pathway("reacher").modules}
    losses = {}
    with EmbeddedBroker(workdir=tmp_path / "broker") as broker:
        proc = worker.spawn(broker.url)
        try:
            client = JobClient(make_app(broker.url))
            for engine, modules in (("pipeline", {}), ("services", servers)):
                out = tmp_path / engine
                job = client.submit(
                    JobRequest(out=str(out), engine=engine, modules=modules, **common)
                )
                st = client.follow(job, timeout=300)
                assert st["state"] == "SUCCESS", st
                losses[engine] = final_losses(out)
        finally:
            worker.stop(proc)
    local, remote = losses["pipeline"], losses["services"]
    assert sorted(remote) == list(range(1, 9))
    assert [remote[s] for s in sorted(remote)] == pytest.approx(
        [local[s] for s in sorted(local)], rel=1e-5
    )
    assert np.mean([remote[7], remote[8]]) < 0.8 * remote[1], remote


def test_an_episode_idle_past_the_servers_session_ttl_is_replayed_and_goes_on(deployment):
    """The module servers expire the episode's sessions while the gateway keeps the episode;
    the next step finds them gone (NOT_FOUND) and replays the calls since the last full
    window on each module: the actions stay the in-process ones."""
    fleet, _, ex, _ = deployment
    seen, actions = [], []
    rollout("reacher", _Feed(Policy(ex, "reacher"), seen, actions), [31])
    servers = [p for ps in fleet.servers.values() for p in ps]
    before = {p.address: _sessions(p.address) for p in servers}
    got = []
    with Client(fleet.gateway.address) as c:
        episode = c.episode("reacher")
        for i, obs in enumerate(seen[:20]):
            if i == K + 2:
                assert sum(_sessions(p.address) for p in servers) == sum(before.values()) + 3
                time.sleep(SERVER_TTL_S + 1.5)  # the servers' reapers run every TTL / 4
                assert {p.address: _sessions(p.address) for p in servers} == before
            got.append(episode.act(obs))
        episode.close()
    np.testing.assert_allclose(np.stack(got), np.stack(actions[:20]), atol=1e-5)


def _sessions(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        d = module_pb2_grpc.ModuleServiceStub(ch).Describe(module_pb2.DescribeRequest(), timeout=10)
    return d.sessions


def test_a_replica_killed_mid_episode_changes_no_action(deployment):
    """Last in the file: it kills one of the two attention replicas. The episode's session
    moves to the other by replaying its calls since its last full window."""
    fleet, _, ex, _ = deployment
    _, actions = _actions("reacher", Policy(ex, "reacher"), 21)
    observations = []
    rollout("reacher", _Feed(Policy(ex, "reacher"), observations), [21])
    replicas = fleet.servers["attn"]
    before = {p.address: _sessions(p.address) for p in replicas}
    got = []
    with Client(fleet.gateway.address) as c:
        episode = c.episode("reacher")
        for i, obs in enumerate(observations):
            if i == K + 3:  # the window has been re-prefilled a few times
                holder = next(p for p in replicas if _sessions(p.address) > before[p.address])
                holder.kill()
            got.append(episode.act(obs))
        episode.close()
    survivor = next(p for p in replicas if p is not holder)
    assert _sessions(survivor.address) == before[survivor.address]  # moved there, then closed
    np.testing.assert_allclose(np.stack(got), np.stack(actions), atol=1e-5)


class _Feed:
    """A policy that records the observations it is shown (and the actions it takes)."""

    def __init__(self, policy, seen: list, taken: list | None = None):
        self.policy, self.seen, self.taken = policy, seen, taken

    def reset(self):
        self.policy.reset()

    def act(self, obs):
        self.seen.append(obs)
        a = self.policy.act(obs)
        if self.taken is not None:
            self.taken.append(a)
        return a
