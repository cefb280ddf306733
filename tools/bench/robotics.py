"""Robotics pathways (issue 20): behaviour cloning of the library's experts, then acting in the
simulators in this process.

For each task of examples/robotics.yaml: expert demonstrations (training seeds from 1,000,000,
`pathways.datasets.robotics`), `LocalTrainer` (fused or pipeline engine), then rollouts of the
trained policy (`pathways.robotics.policy`: control steps on the KV cache, windows of the last
16 steps) on unseen seeds 0..N-1, beside the expert and a uniformly random policy on the same
seeds. Reports DoorKey-8x8 and FourRooms success rates, Reacher's mean final fingertip-to-target
distance, and the in-process control latency per step (p50/p99, after one warm-up episode).

    ./pants run tools/bench/robotics.py -- [--tasks doorkey fourrooms reacher] [--engine fused]
        [--keep runs/robotics]   # keep each task's checkpoint (pathways rollout --checkpoint)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pathways import spec as spec_lib
from pathways.datasets.robotics import demonstrations
from pathways.executor.local import LocalExecutor
from pathways.robotics.envs import Env
from pathways.robotics.policy import ExpertPolicy, Policy, RandomPolicy, rollout
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig
from tools.bench.common import dated_path, print_table, write_json

ROOT = Path(__file__).resolve().parents[2]
# Per task: demonstration episodes, DART noise, training steps, learning rate, test episodes.
TASKS = {
    "doorkey": {"episodes": 1000, "noise": 0.1, "steps": 400, "lr": 2e-3, "test": 200},
    "reacher": {"episodes": 1000, "noise": 0.3, "steps": 4000, "lr": 3e-3, "test": 100},
    "fourrooms": {"episodes": 1000, "noise": 0.1, "steps": 500, "lr": 2e-3, "test": 200},
}


def run_task(args, spec, task: str) -> dict:
    t = TASKS[task]
    steps = args.steps or t["steps"]
    t0 = time.perf_counter()
    data = demonstrations(task, episodes=t["episodes"], eval_episodes=50, noise=t["noise"])
    data_seconds = time.perf_counter() - t0
    data.check_pathway(spec, task)
    k = spec.pathway(task).max_seq_len
    ex = LocalExecutor(spec, seed=args.seed)
    cfg = TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        seq_len=k,
        lr=t["lr"],
        warmup=min(20, steps - 1),
        weight_decay=0.01,
        eval_every=max(steps // 4, 1),
        save_every=steps,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="bench-robotics-") as tmp:
        out = Path(args.keep) / task if args.keep else Path(tmp)
        trainer = LocalTrainer(ex, task, cfg, data, out, ByteTokenizer(), engine=args.engine)
        t0 = time.perf_counter()
        history = trainer.run(
            on_step=lambda r: "eval_loss" in r
            and print(f"{task} step {r['step']}: eval loss {r['eval_loss']:.5f}", flush=True)
        )
        train_seconds = time.perf_counter() - t0
    env = Env(task)
    seeds = range(args.test_episodes or t["test"])
    policy = Policy(ex, task)
    rollout(env, policy, [10**7])  # warm-up: compiles the decode and re-prefill programs
    learned = rollout(env, policy, seeds)
    expert = rollout(env, ExpertPolicy(env), seeds)
    rand = rollout(env, RandomPolicy(env, seed=args.seed), seeds)
    row = {
        "task": task,
        "env": env.info.gym_id,
        "test_episodes": len(learned.episodes),
        "success_rate": learned.success_rate,
        "expert_success_rate": expert.success_rate,
        "random_success_rate": rand.success_rate,
        "mean_return": learned.mean_return,
        "expert_mean_return": expert.mean_return,
        "random_mean_return": rand.mean_return,
        "mean_steps": learned.mean_steps,
        "expert_mean_steps": expert.mean_steps,
        "step_ms_p50": learned.latency_ms(50),
        "step_ms_p99": learned.latency_ms(99),
        "window": k,
        "demo_episodes": data.episodes(),
        "demo_steps": data.steps(),
        "data_seconds": data_seconds,
        "train_steps": steps,
        "final_eval_loss": history[-1].get("eval_loss"),
        "params": sum(rt.param_count() for rt in ex.chain(task)),
        "train_seconds": train_seconds,
    }
    if task == "reacher":
        row["mean_final_distance"] = learned.mean_final_distance
        row["expert_mean_final_distance"] = expert.mean_final_distance
        row["random_mean_final_distance"] = rand.mean_final_distance
    print({k: v for k, v in row.items() if not isinstance(v, float) or v == v}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--spec", default=str(ROOT / "examples/robotics.yaml"))
    ap.add_argument("--engine", choices=["fused", "pipeline"], default="fused")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: each task's own)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--test-episodes", type=int, default=0, help="0: each task's own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="write each task's checkpoint to KEEP/TASK")
    ap.add_argument("--out", default=None, help="JSON path (default: a dated file in results/)")
    args = ap.parse_args()
    spec = spec_lib.load(args.spec)
    out = args.out or dated_path(ROOT / "tools/bench/results", "robotics")
    rows = []
    for task in args.tasks:
        rows.append(run_task(args, spec, task))
        write_json(out, "robotics", rows, args=vars(args))  # what is done so far, kept
    print_table(
        rows,
        [
            ("task", "task", ""),
            ("test_episodes", "episodes", "d"),
            ("success_rate", "success", ".3f"),
            ("expert_success_rate", "expert", ".3f"),
            ("random_success_rate", "random", ".3f"),
            ("mean_final_distance", "final dist m", ".4f"),
            ("expert_mean_final_distance", "expert dist", ".2e"),
            ("random_mean_final_distance", "random dist", ".4f"),
            ("step_ms_p50", "p50 ms", ".2f"),
            ("step_ms_p99", "p99 ms", ".2f"),
            ("params", "params", "d"),
            ("train_seconds", "train s", ".0f"),
        ],
    )
    summary = {}
    for r in rows:
        summary[r["task"]] = {
            k: r[k]
            for k in ("success_rate", "mean_final_distance", "step_ms_p50", "step_ms_p99")
            if k in r
        }
    print(f"wrote {write_json(out, 'robotics', rows, summary=summary, args=vars(args))}")


if __name__ == "__main__":
    main()
