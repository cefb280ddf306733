"""Applications of the shared module kinds: a vision pathway trained on the digits data set and
a speech pathway trained on words spoken by espeak-ng.

Vision: trains the spec's classification pathway through `LocalTrainer` (fused or pipeline
engine) once per seed, then reports test accuracy on the stratified 25 % test split (450
images), the mean over seeds, parameters and training wall time.

Speech: trains the spec's CTC pathway on the spoken-words training split, then reports the
character error rate and word accuracy (greedy and beam decoding) on held-out speakers saying
vocabulary words (split by which part of the speaker is new: voice, variant or both) and on
training speakers saying unseen words.

    ./pants run tools/bench/applications.py -- [--tasks vision speech] [--seeds 0 1 2]
        [--steps 1500] [--engine fused] [--speech-steps 3000] [--speech-seeds 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from pathways import spec as spec_lib
from pathways.classify import Classifier
from pathways.datasets import speech as speech_data
from pathways.datasets.digits import digits
from pathways.executor.local import LocalExecutor
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
                            "decoding": f"beam {beam}" if beam > 1 else "greedy",
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


TASKS = ("text", "digits", "speech")


def _sharing_tasks(args):
    """Per task: (data, TrainConfig, metric name, metric of an executor)."""
    from pathways import data as data_lib

    tok = ByteTokenizer()
    text = data_lib.TokenData.build(
        data_lib.read_texts(data_lib.default_corpus_paths(), args.text_bytes), tok
    )
    vision_data = digits()
    spoken = dataclasses.replace(
        speech_data.speech(train_per_word=args.train_per_word), speed_perturb=args.speed_perturb
    )

    def cfg(steps, batch, seq, lr):
        return TrainConfig(
            steps=steps,
            batch_size=batch,
            seq_len=seq,
            lr=lr,
            warmup=min(100, steps // 10),
            weight_decay=args.weight_decay,
            eval_every=steps,
            save_every=steps,
            eval_batches=16,
        )

    def text_loss(ex, trainer):
        return trainer.eval_loss()

    def digit_accuracy(ex, trainer):
        return Classifier(ex, "digits").accuracy(vision_data.test_images, vision_data.test_labels)

    def speech_cer(ex, trainer):
        u = spoken.splits["test"]
        hyps = Transcriber(ex, "speech").transcribe_many(
            [u.wave(i) for i in range(len(u))], spoken.sample_rate
        )
        return error_rates(hyps, spoken.texts("test"))["cer"]

    s = args.sharing_steps
    return {
        "text": (text, cfg(s, 16, 128, 2e-3), "eval loss", text_loss),
        "digits": (vision_data, cfg(s, 64, 16, 2e-3), "test accuracy", digit_accuracy),
        "speech": (spoken, cfg(s, 32, 25, 2e-3), "CER held-out speakers", speech_cer),
    }


def _train_in_turn(ex, tasks, names, out, trainable=None) -> tuple[dict, float]:
    """Trains `names` on one executor, one step of each in turn; returns trainers and seconds."""
    trainers = {
        n: LocalTrainer(
            ex,
            n,
            tasks[n][1],
            tasks[n][0],
            Path(out) / n,
            ByteTokenizer(),
            trainable=None if trainable is None else trainable[n],
        )
        for n in names
    }
    t0 = time.perf_counter()
    for step in range(1, max(t.cfg.steps for t in trainers.values()) + 1):
        for t in trainers.values():
            t.run(should_stop=lambda t=t, s=step: t.step >= s)
    return trainers, time.perf_counter() - t0


def sharing(args) -> list[dict]:
    """Each task alone on the multi-task spec's modules vs all three through the shared
    attention modules, and vision and speech trained on frozen attention after text."""
    spec = spec_lib.load(args.sharing_spec)
    tasks = _sharing_tasks(args)
    for name in ("digits", "speech"):
        tasks[name][0].check_pathway(spec, name)
    rows = []

    def params(ex, names):
        modules = {m for n in names for m in spec.pathway(n).modules}
        return sum(ex.runtimes[m].param_count() for m in modules)

    def record(setting, ex, trainers, seconds, names):
        for n in names:
            value = tasks[n][3](ex, trainers[n])
            rows.append(
                {
                    "task": n,
                    "setting": setting,
                    "metric": tasks[n][2],
                    "value": value,
                    "steps": trainers[n].cfg.steps,
                    "params": params(ex, names),
                    "train_seconds": seconds,
                }
            )
            print(f"{setting}: {n} {tasks[n][2]} {value:.4f} ({seconds:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-sharing-") as out:
        alone = {}
        for n in TASKS:
            ex = LocalExecutor(spec, seed=0)
            trainers, seconds = _train_in_turn(ex, tasks, [n], Path(out) / "alone")
            record("alone", ex, trainers, seconds, [n])
            alone[n] = (ex, trainers)
        ex = LocalExecutor(spec, seed=0)
        trainers, seconds = _train_in_turn(ex, tasks, TASKS, Path(out) / "shared")
        record("shared", ex, trainers, seconds, TASKS)
        # Frozen: the text model's attention modules stay as text training left them; vision
        # and speech train only their own embedding and head through them.
        ex, text_trainers = alone["text"]
        own = {
            n: {m for m in spec.pathway(n).modules if m not in spec.pathway("text").modules}
            for n in ("digits", "speech")
        }
        trainers, seconds = _train_in_turn(
            ex, tasks, ["digits", "speech"], Path(out) / "frozen", trainable=own
        )
        trainers["text"] = text_trainers["text"]
        record("frozen attention (after text)", ex, trainers, seconds, TASKS)
    return rows


def main() -> None:
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
    ap.add_argument("--text-bytes", type=int, default=2_000_000)
    ap.add_argument("--out", default=None, help="JSON path (default: a dated file in results/)")
    args = ap.parse_args()
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
