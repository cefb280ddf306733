"""`pathways demo --task robotics`, after training: DoorKey-8x8 episodes on unseen seeds acted
through the gateway (each control step one observation in, one action out, the episode's window
in the module servers' KV caches), the same episodes in this process from the trained checkpoint,
a GIF of the first episode and a summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def act(dep, task, episodes: int, out: Path, trained: Path, final: dict, t_start: float) -> None:
    """Runs and reports the rollouts of `task.pathway` (`demo_tasks.Task`) on seeds
    0..episodes-1 through the deployment's gateway and in this process."""
    from pathways.client import Client
    from pathways.robotics.envs import Env
    from pathways.robotics.policy import Policy, rollout
    from pathways.robotics.render import Recorder, write_gif
    from pathways.transcribe import load_executor

    seeds = range(episodes)
    env = Env(task.dataset, render_mode="rgb_array")
    recorder = Recorder(env)
    print(
        f"\nrobotics: {episodes} {env.info.gym_id} episodes on unseen seeds through the "
        "gateway (one observation in, one action out per step)",
        file=sys.stderr,
    )
    taken_remote, taken_local = [], []
    with Client(dep.gateway) as client:
        policy = client.episode(task.pathway)
        rollout(env, policy, [10**7])  # warm-up: the servers compile each step's shapes once

        def on_step(e, a):
            recorder.on_step(e, a)
            taken_remote.append(a)

        t0 = time.perf_counter()
        remote = rollout(env, policy, seeds, on_step=on_step, on_reset=recorder.on_reset)
        remote_s = time.perf_counter() - t0
    ex = load_executor(trained, task.pathway)
    local_env = Env(task.dataset)
    local = rollout(
        local_env, Policy(ex, task.pathway), seeds, on_step=lambda e, a: taken_local.append(a)
    )
    gif = out / f"{task.dataset}_episode.gif"
    write_gif(gif, recorder.frames)
    metrics = Path(final["out"]) / "metrics.jsonl"
    first = json.loads(metrics.read_text().splitlines()[0])["loss"]
    same = sum(a == b for a, b in zip(taken_remote, taken_local))
    s = remote.summary()
    print("\nsummary", file=sys.stderr)
    print(
        f"  loss           {first:.3f} (step 1) -> {final['loss']:.3f} (step {final['step']}); "
        f"eval {final['eval_loss']:.3f}"
    )
    print(
        f"  {task.dataset:<14} success {remote.success_rate:.1%} of {episodes} unseen episodes "
        f"acted through the gateway (mean return {remote.mean_return:.3f}, "
        f"{remote.mean_steps:.1f} steps); in this process {local.success_rate:.1%}, "
        f"{same} of {len(taken_local)} actions equal"
    )
    print(
        f"  control step   p50 {s['step_ms_p50']:.2f} ms, p99 {s['step_ms_p99']:.2f} ms through "
        f"the gateway, one episode at a time ({remote_s:.1f} s for {episodes} episodes)"
    )
    print(f"  loss plot      {final['loss_png']}")
    print(f"  episode        {gif} ({len(recorder.frames)} frames, seed 0)")
    print(f"  checkpoint     {final['out']}  (total {time.time() - t_start:.0f} s)")
