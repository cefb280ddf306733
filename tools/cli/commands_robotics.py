"""`pathways rollout`: episodes of a trained robotics pathway in its simulator, in this process
(--checkpoint), printing each episode and the success rate, return and control-step latency."""

from __future__ import annotations

import sys

WARM_UP_SEED = 10**7  # far from the seeds tests and benchmarks use


def register(sub) -> None:
    p = sub.add_parser(
        "rollout",
        help="run episodes of a robotics pathway (observations -> actions) in its simulator, "
        "in this process from --checkpoint",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint holding the pathway")
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
    from pathways import checkpoint as ckpt
    from pathways.executor.local import LocalExecutor
    from pathways.robotics.envs import Env, info
    from pathways.robotics.policy import Policy, rollout

    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1; got {args.episodes}")
    if args.window < 0:
        raise ValueError(f"--window must be >= 1 (0: the pathway's max_seq_len); got {args.window}")
    env_info = info(args.env)
    spec, _ = ckpt.load_spec(args.checkpoint)
    name = choose_pathway(spec, env_info, args.pathway)
    missing = [m for m in spec.pathway(name).modules if not ckpt.has_module(args.checkpoint, m)]
    if missing:
        raise ValueError(
            f"checkpoint {args.checkpoint} has no weights for module(s) {', '.join(missing)} "
            f"of pathway {name!r}"
        )
    ex = LocalExecutor(spec)
    for m in spec.pathway(name).modules:
        ex.set_state(m, ckpt.load_module(args.checkpoint, m, ex.state(m)))
    policy = Policy(ex, name, window=args.window or None)
    env = Env(env_info.name)
    print(
        f"pathway {name!r} on {env_info.gym_id}, window {policy.k} (one warm-up episode first, "
        "not counted)",
        file=sys.stderr,
    )
    # An untimed warm-up episode compiles the decode and re-prefill programs, so the latency
    # printed is the control loop's, not the compiler's.
    rollout(env, policy, [WARM_UP_SEED])
    result = rollout(env, policy, range(args.seed, args.seed + args.episodes))
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
    return 0
