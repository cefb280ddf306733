"""Applications of the shared module kinds: a vision pathway trained on the digits data set and
a speech pathway trained on words spoken by espeak-ng; and each task alone against through the
shared attention modules of examples/multitask.yaml (text, vision, speech and, with
`--sharing-tasks`, the robotics pathways doorkey and reacher).

Vision: trains the spec's classification pathway through `LocalTrainer` (fused or pipeline
engine) once per seed, then reports test accuracy on the stratified 25 % test split (450
images), the mean over seeds, parameters and training wall time.

Speech: trains the spec's CTC pathway on the spoken-words training split, then reports the
character error rate and word accuracy (greedy and beam decoding) on held-out speakers saying
vocabulary words (split by which part of the speaker is new: voice, variant or both) and on
training speakers saying unseen words.

    ./pants run tools/bench/applications.py -- [--tasks vision speech] [--seeds 0 1 2]
        [--steps 1500] [--engine fused] [--speech-steps 3000] [--speech-seeds 0]
    ./pants run tools/bench/applications.py -- --tasks sharing
        [--sharing-tasks text digits speech doorkey reacher] [--sharing-settings alone shared]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from pathways import spec as spec_lib
from pathways.classify import Classifier
from pathways.datasets import speech as speech_data
from pathways.datasets.digits import digits
from pathways.datasets.robotics import RECIPES, demonstrations
from pathways.executor.local import LocalExecutor
from pathways.robotics.envs import Env
from pathways.robotics.policy import Policy, rollout
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig
from pathways.transcribe import Transcriber, error_rates, speech_pathway
from tools.bench.common import dated_path, print_table, write_json

ROOT = Path(__file__).resolve().parents[2]


def vision(args) -> list[dict]:
    spec = spec_lib.load(args.spec)
    pathway = args.pathway or spec.default_pathway
    data = digits()
    data.check_pathway(spec, pathway)
    rows = []
    for seed in args.seeds:
        ex = LocalExecutor(spec, seed=seed)
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=spec.pathway(pathway).max_seq_len,
            lr=args.lr,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            eval_every=args.steps,
            save_every=args.steps,
            seed=seed,
        )
        with tempfile.TemporaryDirectory(prefix="bench-apps-") as out:
            trainer = LocalTrainer(ex, pathway, cfg, data, out, ByteTokenizer(), engine=args.engine)
            t0 = time.perf_counter()
            history = trainer.run()
            seconds = time.perf_counter() - t0
        clf = Classifier(ex, pathway)
        rows.append(
            {
                "task": "vision (digits)",
                "seed": seed,
                "engine": args.engine,
                "test_accuracy": clf.accuracy(data.test_images, data.test_labels),
                "train_accuracy": clf.accuracy(data.train_images, data.train_labels),
                "final_loss": history[-1]["loss"],
                "params": sum(rt.param_count() for rt in ex.chain(pathway)),
                "train_seconds": seconds,
            }
        )
        print(f"seed {seed}: test accuracy {rows[-1]['test_accuracy']:.4f}", flush=True)
    return rows


def vision_table(args, summary: dict) -> list[dict]:
    rows = vision(args)
    accs = [r["test_accuracy"] for r in rows]
    summary["vision"] = {
        "task": "vision (digits)",
        "seed": "mean",
        "engine": args.engine,
        "test_accuracy": statistics.mean(accs),
        "train_accuracy": statistics.mean(r["train_accuracy"] for r in rows),
        "final_loss": statistics.mean(r["final_loss"] for r in rows),
        "params": rows[0]["params"],
        "train_seconds": statistics.mean(r["train_seconds"] for r in rows),
    }
    print_table(
        [*rows, summary["vision"]],
        [
            ("task", "task", ""),
            ("seed", "seed", ""),
            ("engine", "engine", ""),
            ("test_accuracy", "test acc", ".4f"),
            ("train_accuracy", "train acc", ".4f"),
            ("final_loss", "last loss", ".4f"),
            ("params", "params", "d"),
            ("train_seconds", "train s", ".1f"),
        ],
    )
    return rows


def _speech_groups(data, split: str) -> dict[str, list[int]]:
    """Utterance indices by what is new about the speaker (held-out split) or all of them."""
    u = data.splits[split]
    every = list(range(len(u)))
    if split != "test":
        return {"all": every}
    voice = [speech_data.VOICES[v] in speech_data.HELD_OUT_VOICES for v in u.voice]
    variant = [speech_data.VARIANTS[v] in speech_data.HELD_OUT_VARIANTS for v in u.variant]
    return {
        "all": every,
        "new voice": [i for i in every if voice[i] and not variant[i]],
        "new variant": [i for i in every if variant[i] and not voice[i]],
        "both new": [i for i in every if voice[i] and variant[i]],
    }


def speech(args) -> list[dict]:
    spec = spec_lib.load(args.speech_spec)
    pathway = speech_pathway(spec, args.speech_pathway)
    t0 = time.perf_counter()
    data = speech_data.speech(train_per_word=args.train_per_word)
    print(f"speech data ready in {time.perf_counter() - t0:.1f} s", flush=True)
    data = dataclasses.replace(data, speed_perturb=args.speed_perturb)
    data.check_pathway(spec, pathway)
    rows = []
    for seed in args.speech_seeds:
        ex = LocalExecutor(spec, seed=seed)
        cfg = TrainConfig(
            steps=args.speech_steps,
            batch_size=args.speech_batch_size,
            seq_len=spec.pathway(pathway).max_seq_len,
            lr=args.speech_lr,
            warmup=args.speech_warmup,
            weight_decay=args.weight_decay,
            eval_every=args.speech_steps,
            save_every=args.speech_steps,
            seed=seed,
        )
        with tempfile.TemporaryDirectory(prefix="bench-apps-") as out:
            trainer = LocalTrainer(ex, pathway, cfg, data, out, ByteTokenizer(), engine=args.engine)
            t0 = time.perf_counter()
            history = trainer.run(
                on_step=lambda r: r["step"] % 250
                or print(f"step {r['step']}: loss {r['loss']:.3f}", flush=True)
            )
            seconds = time.perf_counter() - t0
        common = {
            "task": "speech (espeak words)",
            "seed": seed,
            "engine": args.engine,
            "final_loss": history[-1]["loss"],
            "eval_loss": history[-1]["eval_loss"],
            "params": sum(rt.param_count() for rt in ex.chain(pathway)),
            "train_seconds": seconds,
            "train_utterances": len(data.splits["train"]),
        }
        for beam in (0, args.beam):
            tr = Transcriber(ex, pathway, beam=beam)
            for split, what in (("test", "held-out speakers"), ("unseen", "unseen words")):
                u = data.splits[split]
                t1 = time.perf_counter()
                hyps = tr.transcribe_many([u.wave(i) for i in range(len(u))], data.sample_rate)
                decode_s = time.perf_counter() - t1
                refs = data.texts(split)
                for group, idx in _speech_groups(data, split).items():
                    rates = error_rates([hyps[i] for i in idx], [refs[i] for i in idx])
                    rows.append(
                        {
                            **common,
                            "split": what,
                            "speakers": group,
                            "decoding": (  # not a module kind
                                f"beam {beam}" if beam > 1 else "greedy"
                            ),
                            "utterances": len(idx),
                            **rates,
                            "transcribe_seconds": decode_s if group == "all" else None,
                            "examples": [
                                f"{refs[i]} -> {hyps[i]}" for i in idx[:: max(len(idx) // 6, 1)]
                            ],
                        }
                    )
                    print(
                        f"seed {seed} {what} ({group}, {rows[-1]['decoding']}): CER "
                        f"{rates['cer']:.4f}, word accuracy {rates['word_accuracy']:.4f}",
                        flush=True,
                    )
    return rows


TASKS = ("text", "digits", "speech", "doorkey", "reacher")
ROBOTICS = ("doorkey", "reacher")
# Ways for the other tasks to go through the text pathway's attention modules (issues 19, 20):
# alone: each task its own copy; shared: all of them train them, one step of each in turn;
# frozen / adapters: after text alone, the others train only their own modules
# (adapters: plus residual bottlenecks after each shared module); weighted and
# adapters-weighted: all in turn, every task but text moving the shared modules at
# lr x --shared-lr-scale (a task mixing weight), with or without adapters; job: weighted as the
# coordinator's multi-task job trains (`MultiTaskTrainer` over one stage per module, each task
# its own AdamW state of each module, the job's default); job-shared: the same with one AdamW
# state per module for all tasks (the job's optimizers="shared").
SETTINGS = (
    "alone", "shared", "frozen", "adapters", "weighted", "adapters-weighted", "job", "job-shared"
)  # fmt: skip


def _with_adapters(spec, bottleneck: int, tasks=("digits", "speech")):
    """`spec` plus pathways `TASK-adapted` for each of `tasks`: the same modules with an
    adapter of their own after each module the task shares with text. Added modules come last,
    so every other module starts from the same parameters as in `spec` (seed + index)."""
    from pathways.modules.adapter import AdapterConfig

    text = set(spec.pathway("text").modules)
    for task in tasks:
        chain = []
        for m in spec.pathway(task).modules:
            chain.append(m)
            if m in text:
                d = spec.modules[m].output_contract[1]
                chain.append(f"{task}-adapter-{m}")
                spec = spec.with_module(chain[-1], AdapterConfig(d_model=d, bottleneck=bottleneck))
        spec = spec.with_pathway(f"{task}-adapted", chain)
    return spec


def _sharing_tasks(args):
    """Per task of args.sharing_tasks: (data, TrainConfig, metric name, metric of an executor
    and the task's trainer)."""
    from pathways import data as data_lib

    steps = dict(args.sharing_task_steps or ())

    def cfg(task, batch, seq, lr):
        s = steps.get(task, args.sharing_steps)
        return TrainConfig(
            steps=s,
            batch_size=batch,
            seq_len=seq,
            lr=lr,
            warmup=min(100, s // 10),
            weight_decay=args.weight_decay,
            eval_every=s,
            save_every=s,
            eval_batches=16,
            seed=args.sharing_seed,  # the batches (and the text eval windows) it draws
        )

    def text_loss(ex, trainer):
        return trainer.eval_loss()

    def digit_accuracy(ex, trainer):
        return Classifier(ex, trainer.pathway).accuracy(
            vision_data.test_images, vision_data.test_labels
        )

    def speech_cer(ex, trainer):
        u = spoken.splits["test"]
        hyps = Transcriber(ex, trainer.pathway).transcribe_many(
            [u.wave(i) for i in range(len(u))], spoken.sample_rate
        )
        return error_rates(hyps, spoken.texts("test"))["cer"]

    def acting(task):
        # Rollouts of the trained policy on unseen seeds 0..N-1 (tools/bench/robotics.py's test).
        def metric(ex, trainer):
            n = args.robotics_test_episodes or (200 if task == "doorkey" else 100)
            result = rollout(Env(task), Policy(ex, trainer.pathway), range(n))
            return result.success_rate if task == "doorkey" else result.mean_final_distance

        return metric

    tasks = {}
    for task in args.sharing_tasks:
        if task == "text":
            tok = ByteTokenizer()
            text = data_lib.TokenData.build(
                data_lib.read_texts(data_lib.default_corpus_paths(), args.text_bytes), tok
            )
            tasks[task] = (text, cfg(task, 16, 128, 2e-3), "eval loss", text_loss)
        elif task == "digits":
            vision_data = digits()
            tasks[task] = (vision_data, cfg(task, 64, 16, 2e-3), "test accuracy", digit_accuracy)
        elif task == "speech":
            spoken = dataclasses.replace(
                speech_data.speech(train_per_word=args.train_per_word),
                speed_perturb=args.speed_perturb,
            )
            tasks[task] = (spoken, cfg(task, 32, 25, 2e-3), "CER held-out speakers", speech_cer)
        else:  # robotics: behaviour cloning on windows of 16 steps, the library's recipe
            recipe = dict(RECIPES[task])
            if args.robotics_episodes:
                recipe["episodes"] = args.robotics_episodes
                recipe["eval_episodes"] = max(1, args.robotics_episodes // 20)
            metric = "success rate" if task == "doorkey" else "mean final distance (m)"
            tasks[task] = (
                demonstrations(task, **recipe),
                cfg(task, 32, 16, 2e-3),
                metric,
                acting(task),
            )
    return tasks


def _train_in_turn(
    ex, tasks, names, out, trainable=None, pathways=None, lr_scale=None
) -> tuple[dict, float]:
    """Trains tasks `names` on one executor, one step of each in turn (task n through pathway
    `pathways[n]`, default n); returns trainers and seconds."""
    pathways, trainable, lr_scale = pathways or {}, trainable or {}, lr_scale or {}
    trainers = {
        n: LocalTrainer(
            ex,
            pathways.get(n, n),
            tasks[n][1],
            tasks[n][0],
            Path(out) / n,
            ByteTokenizer(),
            trainable=trainable.get(n),
            lr_scale=lr_scale.get(n),
        )
        for n in names
    }
    t0 = time.perf_counter()
    for step in range(1, max(t.cfg.steps for t in trainers.values()) + 1):
        for t in trainers.values():
            t.run(should_stop=lambda t=t, s=step: t.step >= s)
    return trainers, time.perf_counter() - t0


def sharing(args) -> list[dict]:
    """Each task of args.sharing_tasks alone on the multi-task spec's modules vs the others
    through the text pathway's attention modules in the ways of SETTINGS (those in
    args.sharing_settings)."""
    names = tuple(t for t in TASKS if t in args.sharing_tasks)
    if "text" not in names or len(names) < 2:
        raise ValueError(f"--sharing-tasks needs text and at least one other task; got {names}")
    others = names[1:]
    factors = [_per_task(w, others) for w in args.shared_lr_scale]  # checked before training
    spec = _with_adapters(spec_lib.load(args.sharing_spec), args.adapter_bottleneck, others)
    settings = set(args.sharing_settings)
    tasks = _sharing_tasks(args)
    for name in others:
        tasks[name][0].check_pathway(spec, name)
    adapted = {n: f"{n}-adapted" for n in others}
    text_modules = set(spec.pathway("text").modules)
    rows = []

    def params(ex, pathways):
        modules = {m for p in pathways for m in spec.pathway(p).modules}
        return sum(ex.runtimes[m].param_count() for m in modules)

    def record(setting, ex, trainers, seconds):
        for n, t in trainers.items():
            value = tasks[n][3](ex, t)
            rows.append(
                {
                    "task": n,
                    "setting": setting,
                    "pathway": t.pathway,
                    "metric": tasks[n][2],
                    "value": value,
                    "steps": t.cfg.steps,
                    "params": params(ex, [x.pathway for x in trainers.values()]),
                    "train_seconds": seconds,
                }
            )
            print(f"{setting}: {n} {tasks[n][2]} {value:.4f} ({seconds:.0f} s)", flush=True)

    def own(n, pathways):
        return {m for m in spec.pathway(pathways.get(n, n)).modules if m not in text_modules}

    with tempfile.TemporaryDirectory(prefix="bench-sharing-") as out:
        out = Path(out)
        for n in names:
            if "alone" in settings or (n == "text" and settings & {"frozen", "adapters"}):
                ex = LocalExecutor(spec, seed=args.sharing_seed)
                trainers, seconds = _train_in_turn(ex, tasks, [n], out / "alone")
                record("alone", ex, trainers, seconds)
                if n == "text":
                    text_ex, text_trainer = ex, trainers[n]
        if "shared" in settings:
            ex = LocalExecutor(spec, seed=args.sharing_seed)
            record("shared", ex, *_train_in_turn(ex, tasks, names, out / "shared"))
        # frozen / adapters: the text model's attention stays as text training left it; the
        # other tasks (each in a fresh copy of the rest) train only their own modules through it.
        for setting, pathways in (("frozen", {}), ("adapters", adapted)):
            if setting not in settings:
                continue
            ex = LocalExecutor(spec, seed=args.sharing_seed)
            for m in text_modules:
                # A copy: training donates (frees) the arrays of every module of its pathway.
                ex.set_state(m, jax.tree.map(jnp.copy, text_ex.state(m)))
            trainable = {n: own(n, pathways) for n in others}
            trainers, seconds = _train_in_turn(
                ex, tasks, others, out / setting, trainable, pathways
            )
            trainers = {"text": text_trainer, **trainers}  # text: as alone, unchanged
            what = "adapters, frozen" if pathways else "frozen"
            record(f"{what} attention (after text)", ex, trainers, seconds)
        weighted = [("weighted", {}), ("adapters-weighted", adapted)]
        for (setting, pathways), per_task in itertools.product(weighted, factors):
            if setting not in settings:
                continue
            ex = LocalExecutor(spec, seed=args.sharing_seed)
            scale = {
                n: {
                    m: per_task[n]
                    for m in spec.pathway(pathways.get(n, n)).modules
                    if m in text_modules
                }
                for n in others
            }
            trainers, seconds = _train_in_turn(
                ex, tasks, names, out / setting, pathways=pathways, lr_scale=scale
            )
            what = "adapters, " if pathways else ""
            record(f"{what}shared, {_weights_label(per_task)}", ex, trainers, seconds)
        jobs = [("job", "per-task"), ("job-shared", "shared")]
        for (setting, optimizers), per_task in itertools.product(jobs, factors):
            if setting not in settings:
                continue
            ex = LocalExecutor(spec, seed=args.sharing_seed)
            trainers, seconds = _job_in_turn(
                ex, spec, tasks, names, per_task, text_modules, out / setting, optimizers
            )
            record(f"{setting}, {_weights_label(per_task)}", ex, trainers, seconds)
    return rows


def _job_in_turn(
    ex, spec, tasks, names, per_task, text_modules, out, optimizers
) -> tuple[dict, float]:
    """Tasks `names` trained as a multi-task coordinator job with engine "pipeline" trains
    them (`build_multitask`'s stages and trainer, on this benchmark's data and configs): one
    round = one step of each task in turn, every task but text moving the shared modules at lr
    x per_task[task], with `optimizers` states. Returns per task an object with the metrics'
    `pathway` and `eval_loss()`."""
    from types import SimpleNamespace

    from pathways.multitask import MultiTaskTrainer, Task, local_stages

    cfgs = {n: tasks[n][1] for n in names}
    if len({c.steps for c in cfgs.values()}) != 1:
        raise ValueError("the job setting runs rounds of every task: give them equal steps")
    base = cfgs["text"]
    mt_tasks = [
        Task(
            n,
            tasks[n][0],
            cfgs[n].batch_size,
            cfgs[n].seq_len,
            lr_scale=(
                {m: per_task[n] for m in spec.pathway(n).modules if m in text_modules}
                if n in per_task
                else {}
            ),
        )
        for n in names
    ]
    trainer = MultiTaskTrainer(
        spec,
        mt_tasks,
        local_stages(ex, spec, mt_tasks, base, optimizers),
        base,
        out,
        ByteTokenizer(),
        optimizers=optimizers,
    )
    t0 = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - t0
    losses = trainer.eval_losses()
    views = {
        n: SimpleNamespace(pathway=n, cfg=cfgs[n], eval_loss=lambda n=n: losses[n]) for n in names
    }
    return views, seconds


def _scales(raw: str) -> tuple[float, ...]:
    """'0.3' -> (0.3,): every task but text; '0.1:0.7' -> (0.1, 0.7): one factor per task
    but text, in --sharing-tasks' order (TASKS')."""
    try:
        parts = tuple(float(x) for x in raw.split(":"))
    except ValueError:
        parts = ()
    if not parts or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected W or W1:W2:... with factors > 0; got {raw!r}")
    return parts


def _per_task(factors: tuple[float, ...], others: tuple[str, ...]) -> dict[str, float]:
    """The shared modules' lr factor of each task but text: one factor for all, or one each."""
    if len(factors) == 1:
        return dict.fromkeys(others, factors[0])
    if len(factors) != len(others):
        raise ValueError(
            f"--shared-lr-scale {':'.join(map(str, factors))} has {len(factors)} factors for "
            f"{len(others)} tasks ({', '.join(others)}): give one, or one per task"
        )
    return dict(zip(others, factors))


def _weights_label(per_task: dict[str, float]) -> str:
    """'digits and speech at lr x 0.1' or '... at lr x 0.1 (digits), 0.7 (speech)'."""
    names = list(per_task)
    who = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    w = set(per_task.values())
    w = next(iter(w)) if len(w) == 1 else ", ".join(f"{v} ({n})" for n, v in per_task.items())
    return f"{who} at lr x {w}"


def _task_steps(raw: str) -> tuple[str, int]:
    """'doorkey=400' -> ('doorkey', 400)."""
    task, _, n = raw.partition("=")
    if task not in TASKS or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected TASK=STEPS, TASK one of {TASKS}; got {raw!r}")
    return task, int(n)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tasks", nargs="+", choices=["vision", "speech", "sharing"], default=["vision", "speech"]
    )
    ap.add_argument("--spec", default=str(ROOT / "examples/digits.yaml"))
    ap.add_argument("--pathway", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--engine", choices=["fused", "pipeline"], default="fused")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--speech-spec", default=str(ROOT / "examples/speech.yaml"))
    ap.add_argument("--speech-pathway", default=None)
    ap.add_argument("--speech-seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--speech-steps", type=int, default=3000)
    ap.add_argument("--speech-batch-size", type=int, default=32)
    ap.add_argument("--speech-lr", type=float, default=2e-3)
    ap.add_argument("--speech-warmup", type=int, default=100)
    ap.add_argument("--train-per-word", type=int, default=32)
    ap.add_argument("--speed-perturb", type=float, default=0.1)
    ap.add_argument("--beam", type=int, default=8)
    ap.add_argument("--sharing-spec", default=str(ROOT / "examples/multitask.yaml"))
    ap.add_argument("--sharing-steps", type=int, default=1000)
    ap.add_argument(
        "--sharing-tasks",
        nargs="+",
        choices=TASKS,
        default=["text", "digits", "speech"],
        help="tasks of the sharing table (text and at least one other)",
    )
    ap.add_argument(
        "--sharing-task-steps",
        type=_task_steps,
        nargs="+",
        default=[],
        help="TASK=STEPS: a task's own training steps (default --sharing-steps)",
    )
    ap.add_argument(
        "--robotics-episodes", type=int, default=0, help="demonstrations (0: the recipe's 1,000)"
    )
    ap.add_argument(
        "--robotics-test-episodes",
        type=int,
        default=0,
        help="unseen seeds 0..N-1 per robotics task (0: doorkey 200, reacher 100)",
    )
    ap.add_argument(
        "--sharing-settings", nargs="+", choices=SETTINGS, default=["alone", "shared", "frozen"]
    )
    ap.add_argument("--sharing-seed", type=int, default=0, help="initial weights and batches")
    ap.add_argument("--adapter-bottleneck", type=int, default=16)
    ap.add_argument(
        "--shared-lr-scale",
        type=_scales,
        nargs="+",
        default=[(0.1,)],
        help="weighted settings: lr factors of the shared modules for every task but text, one "
        "run each: W (all of them) or one factor per task in --sharing-tasks' order (D:S)",
    )
    ap.add_argument("--text-bytes", type=int, default=2_000_000)
    ap.add_argument("--out", default=None, help="JSON path (default: a dated file in results/)")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    rows, summary = [], {}
    if "vision" in args.tasks:
        rows += vision_table(args, summary)
    if "speech" in args.tasks:
        speech_rows = speech(args)
        print_table(
            speech_rows,
            [
                ("seed", "seed", ""),
                ("split", "split", ""),
                ("speakers", "speakers", ""),
                ("decoding", "decoding", ""),
                ("utterances", "n", "d"),
                ("cer", "CER", ".4f"),
                ("word_accuracy", "word acc", ".4f"),
                ("params", "params", "d"),
                ("train_seconds", "train s", ".1f"),
            ],
        )
        summary["speech"] = {
            k: next(
                r["cer"]
                for r in speech_rows
                if r["split"] == split and r["speakers"] == "all" and r["decoding"] == "greedy"
            )
            for k, split in (
                ("cer_held_out_speakers", "held-out speakers"),
                ("cer_unseen_words", "unseen words"),
            )
        }
        rows += speech_rows
    if "sharing" in args.tasks:
        sharing_rows = sharing(args)
        print_table(
            sharing_rows,
            [
                ("task", "task", ""),
                ("setting", "setting", ""),
                ("metric", "metric", ""),
                ("value", "value", ".4f"),
                ("params", "params", "d"),
                ("train_seconds", "train s", ".1f"),
            ],
        )
        rows += sharing_rows
    out = args.out or dated_path(ROOT / "tools/bench/results", "applications")
    print(f"wrote {write_json(out, 'applications', rows, summary=summary, args=vars(args))}")


if __name__ == "__main__":
    main()
