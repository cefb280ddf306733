"""`pathways rollout`: episodes of a trained robotics pathway in its simulator, in this process
(--checkpoint) or through a gateway's episodes (--gateway; default: the local deployment's),
printing each episode and the success rate, return and control-step latency; `--render` writes a
GIF of the first episode."""

from __future__ import annotations

import sys

WARM_UP_SEED = 10**7  # far from the seeds tests and benchmarks use


def register(sub) -> None:
    p = sub.add_parser(
        "rollout",
        help="run episodes of a robotics pathway (observations -> actions) in its simulator, "
        "through a gateway (default: `pathways up`'s) or in this process from --checkpoint",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--checkpoint", help="run in this process from this checkpoint")
    where.add_argument(
        "--gateway",
        help="HOST:PORT of a gateway: every step is one observation in and one action out, the "
        "episode held on its module servers (default: the local deployment's)",
    )
    p.add_argument("--render", metavar="OUT.gif", help="write a GIF of the first episode")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per step (gateway)")
    p.add_argument("--env", required=True, help="doorkey, fourrooms or reacher (or a gym id)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to run (default 10)")
    p.add_argument("--seed", type=int, default=0, help="first episode seed (then seed+1, ...)")
    p.add_argument(
        "--pathway", default="", help="pathway to act with (default: the one matching --env)"
    )
    p.add_argument(
        "--window",
        type=int,
        default=0,
        help="time steps the policy sees (default: the pathway's max_seq_len)",
    )
    p.set_defaults(func=cmd_rollout)


def choose_pathway(spec, env_info, name: str) -> str:
    """`name`, or the pathway named like the task, or the only pathway that reads its
    observations and outputs its actions; ValueError naming what is there otherwise."""
    fits = [
        p.name
        for p in spec.pathways.values()
        if spec.modules[p.modules[0]].input_contract == ("observation", env_info.obs_dim)
        and spec.modules[p.modules[-1]].output_contract == ("actions", env_info.action_size)
        and getattr(spec.modules[p.modules[-1]], "space", None) == env_info.actions
    ]
    if name:
        spec.pathway(name)  # SpecError (a ValueError) names the known ones
        if name not in fits:
            raise ValueError(
                f"pathway {name!r} does not read {env_info.name} observations "
                f"({env_info.obs_dim} floats) and output its {env_info.action_size} "
                f"{env_info.actions} actions"
            )
        return name
    if env_info.name in fits:
        return env_info.name
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(
            f"no pathway of the checkpoint reads {env_info.name} observations "
            f"({env_info.obs_dim} floats) and outputs its {env_info.action_size} "
            f"{env_info.actions} actions; pathways: {', '.join(spec.pathways)}"
        )
    raise ValueError(f"pathways {', '.join(fits)} all fit {env_info.name}: name one (--pathway)")


def cmd_rollout(args) -> int:
    from pathways.robotics.envs import Env, info
    from pathways.robotics.policy import rollout
    from pathways.robotics.render import Recorder, write_gif

    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1; got {args.episodes}")
    if args.window < 0:
        raise ValueError(f"--window must be >= 1 (0: the pathway's max_seq_len); got {args.window}")
    if args.render and not args.render.lower().endswith(".gif"):
        raise ValueError(f"--render writes a GIF: name a .gif file; got {args.render!r}")
    env_info = info(args.env)
    if args.checkpoint:
        (name, policy, where), done = _in_process(args, env_info), lambda: None
    else:
        name, policy, where = _via_gateway(args, env_info)
        done = policy.client.close
    env = Env(env_info.name, render_mode="rgb_array" if args.render else None)
    recorder = Recorder(env) if args.render else None  # a missing GL library: said now
    print(
        f"pathway {name!r} on {env_info.gym_id}, {where} (one warm-up episode first, not "
        "counted)",
        file=sys.stderr,
    )
    try:
        # An untimed warm-up episode compiles the decode and re-prefill programs, so the
        # latency printed is the control loop's, not the compiler's.
        rollout(env, policy, [WARM_UP_SEED])
        result = rollout(
            env,
            policy,
            range(args.seed, args.seed + args.episodes),
            on_step=recorder.on_step if recorder else None,
            on_reset=recorder.on_reset if recorder else None,
        )
    finally:
        policy.close()
        done()
    for e in result.episodes:
        dist = (
            ""
            if e.final_distance != e.final_distance
            else f"  final distance {e.final_distance:.4f}"
        )
        print(
            f"seed {e.seed}: {'success' if e.success else 'failure'}  return {e.ret:.3f}  "
            f"steps {e.steps}{dist}"
        )
    s = result.summary()
    line = (
        f"success rate {s['success_rate']:.3f}  mean return {s['mean_return']:.3f}  "
        f"mean steps {s['mean_steps']:.1f}"
    )
    if "mean_final_distance" in s:
        line += f"  mean final distance {s['mean_final_distance']:.4f}"
    print(line + f"  step p50 {s['step_ms_p50']:.2f} ms  p99 {s['step_ms_p99']:.2f} ms")
    if recorder:
        write_gif(args.render, recorder.frames)
        print(
            f"wrote {args.render} ({len(recorder.frames)} frames, seed {args.seed})",
            file=sys.stderr,
        )
    return 0


def _in_process(args, env_info):
    from pathways import checkpoint as ckpt
    from pathways.executor.local import LocalExecutor
    from pathways.robotics.policy import Policy

    spec, _ = ckpt.load_spec(args.checkpoint)
    name = choose_pathway(spec, env_info, args.pathway)
    missing = [m for m in spec.pathway(name).modules if not ckpt.has_module(args.checkpoint, m)]
    if missing:
        raise ValueError(
            f"checkpoint {args.checkpoint} has no weights for module(s) {', '.join(missing)} "
            f"of pathway {name!r}"
        )
    ex = LocalExecutor(spec.only(name), checkpoint=args.checkpoint)
    policy = Policy(ex, name, window=args.window or None)
    return name, policy, f"in this process, window {policy.k}"


def _via_gateway(args, env_info):
    from pathways.client import Client, GatewayError

    if args.window:
        raise ValueError(
            "--window is for --checkpoint: a gateway's episodes see their pathway's max_seq_len"
        )
    c = Client(args.gateway, timeout=args.timeout)
    try:
        served = [p.name for p in c.pathways()]
    except GatewayError as e:
        c.close()
        raise ValueError(f"gateway {c.address}: {e.code.name}: {e.details}") from None
    if args.pathway and args.pathway not in served:
        c.close()
        raise ValueError(
            f"gateway {c.address} serves no pathway {args.pathway!r}; it serves "
            f"{', '.join(served)}"
        )
    # The pathway named like the task, else the gateway's choice by the observation's size.
    name = args.pathway or (env_info.name if env_info.name in served else "")
    return (
        name or "(the gateway's choice)",
        _GatewayPolicy(c, name, env_info),
        (f"through the gateway at {c.address}"),
    )


class _GatewayPolicy:
    """A gateway episode as a rollout's policy, refusing a pathway whose actions are not the
    task's; gRPC errors become one line naming the gateway."""

    def __init__(self, client, pathway: str, env_info):
        self.client, self.env_info = client, env_info
        self.episode = client.episode(pathway)

    def _call(self, f, *a):
        from pathways.client import GatewayError

        try:
            return f(*a)
        except GatewayError as e:
            raise ValueError(f"gateway {self.client.address}: {e.code.name}: {e.details}") from None

    def reset(self) -> None:
        self._call(self.episode.reset)

    def act(self, obs):
        import numpy as np

        a = self._call(self.episode.step, obs)
        e = self.env_info
        if a.discrete != (e.actions == "discrete") or len(a.values) != e.action_size:
            got = f"{len(a.values)} {'discrete' if a.discrete else 'continuous'}"
            raise ValueError(
                f"pathway {self.episode.pathway!r} outputs {got} actions; {e.name} takes "
                f"{e.action_size} {e.actions} ones (--pathway)"
            )
        return int(a.choice) if a.discrete else np.asarray(a.values, np.float32)

    def close(self) -> None:  # the episode (rollout closes its policy); the client stays
        self._call(self.episode.close)
