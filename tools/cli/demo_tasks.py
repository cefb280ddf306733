"""`pathways demo --task vision|speech|robotics`: the text demo's shape for a non-text pathway.

Starts a local deployment of the task's example spec (every module its own server, a gateway, a
broker and a coordinator worker), trains the pathway through the module services as a coordinator
job on the library's data set, then sends held-out examples through the gateway's Infer (the
request path `pathways classify` / `transcribe` take), prints a summary with the metric and
writes a plot; a robotics pathway acts in its simulator instead (`demo_robotics`).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path

import numpy as np

from tools.cli.commands_local import EXAMPLES


@dataclasses.dataclass(frozen=True)
class Task:
    spec: str  # under examples/
    pathway: str
    dataset: str  # JobRequest.dataset
    batch_size: int
    lr: float
    module_args: tuple[str, ...] = ()  # extra module server flags
    steps: int = 500  # the default of --steps: what gives a meaningful result on 2 cores
    expect: str = ""  # printed at start: what this many steps reaches, and what more would


# Speech: the default that spells words in minutes, measured on the 2-vCPU VM (2026-12-05, load
# 1-4): 1,000 steps through the services in 91 s gave CER 30.1 %, words 16 %; in process the
# same recipe reached 19.7 % / 38 % at 1,500 steps and 17.2 % / 46 % at 2,000.
SPEECH_BATCH, SPEECH_LR, SPEECH_STEPS = 32, 3e-3, 1500
SPEECH_EXPECT = (
    "1,500 steps of 32 utterances take about 2.5 minutes on 2 idle cores (10 steps/s here; "
    "slower on a loaded machine); expect a character error rate near 20 % on held-out speakers, "
    "about 4 words in 10 spelled right and the rest close ('across' -> 'acrass'). More steps "
    "spell more words (--steps 3000); BENCHMARKS.md 'Applications: speech' reaches 4.7 % with "
    "examples/speech.yaml's larger pathway in 3,000 steps (30 minutes)."
)

TASKS = {
    "vision": Task("digits.yaml", "digits", "digits", 32, 3e-3),
    # Module servers count a waveform's log-mel frames against max_call_tokens (16 one-second
    # utterances: 1,568 positions), so the defaults take the evaluation batches.
    "speech": Task(
        "multitask.yaml",
        "speech",
        "speech",
        SPEECH_BATCH,
        SPEECH_LR,
        steps=SPEECH_STEPS,
        expect=SPEECH_EXPECT,
    ),
    # Behaviour cloning of the DoorKey-8x8 expert; then episodes acted through the gateway.
    "robotics": Task("robotics.yaml", "doorkey", "doorkey", 32, 2e-3),
}


def initial_checkpoint(directory: Path, task: Task) -> None:
    """Randomly initialised weights of the task's pathway (made once)."""
    from pathways import checkpoint as ckpt
    from pathways import spec as spec_lib
    from pathways import tokenizers
    from pathways.executor.local import LocalExecutor

    if (directory / "spec.yaml").exists():
        return
    spec = spec_lib.load(EXAMPLES / task.spec)
    ex = LocalExecutor(spec, seed=0)
    ckpt.save_spec(directory, spec, tokenizers.ByteTokenizer())
    for name in spec.pathway(task.pathway).modules:
        ckpt.save_module(directory, name, ex.state(name))


def run(args, follow) -> int:
    """The demo for args.task; `follow(client, job, steps, tqdm)` shows the job's progress (the
    text demo's, passed in: commands_demo imports this module)."""
    from tqdm import tqdm

    from pathways.coordinator.app import make_app
    from pathways.coordinator.client import JobClient
    from pathways.coordinator.jobs import JobRequest
    from pathways.deploy.local import LocalDeployment

    task = TASKS[args.task]
    if task.expect:
        print(f"{args.task}: {task.expect}", file=sys.stderr)
    if args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if args.micro_batches <= 0 or task.batch_size % args.micro_batches:
        raise ValueError(
            f"--micro-batches must divide the batch of {task.batch_size}, "
            f"got {args.micro_batches}"
        )
    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0 (0: the whole test split), got {args.examples}")
    data = _data(task)  # before any process starts: the speech set may need generating
    out = Path(args.out).absolute() / args.task
    out.mkdir(parents=True, exist_ok=True)
    trained = out / "checkpoint"
    serve_from = trained if (trained / "train" / "meta.json").exists() else out / "init"
    initial_checkpoint(out / "init", task)
    log_dir = out / "logs"

    def on_signal(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    t_start = time.time()
    dep = LocalDeployment(
        serve_from,
        log_dir=log_dir,
        module_args=list(task.module_args),
        secure_dir=None if args.insecure else out,
        # The job reads the example spec: inside the PEX (~/.pex/...) when run as users do.
        job_roots=[EXAMPLES],
    )
    print(
        f"starting a local deployment: {len(dep.modules)} module servers "
        f"({', '.join(dep.modules)}), a gateway, a broker and a coordinator worker "
        f"(logs: {log_dir})",
        file=sys.stderr,
    )
    job = client = None
    try:
        dep.start()
        client = JobClient(make_app(dep.broker.url))
        req = JobRequest(
            spec=str(EXAMPLES / task.spec),
            out=str(trained),
            pathway=task.pathway,
            dataset=task.dataset,
            steps=args.steps,
            batch_size=task.batch_size,
            seq_len=_max_seq_len(task),  # not used by these data sets; must fit the pathway
            lr=task.lr,
            eval_every=max(1, args.steps // 10),
            save_every=max(1, args.steps // 4),
            engine="services",
            schedule=args.schedule,
            micro_batches=args.micro_batches,
            modules={m: a for m, a in dep.train_modules.items() if m in dep.modules},
        )
        job = client.submit(req)
        print(
            f"training job {job}: pathway {task.pathway!r} on {task.dataset} through the module "
            f"services, {args.schedule} over {args.micro_batches} micro-batches",
            file=sys.stderr,
        )
        final = follow(client, job, req.steps, tqdm)
        if final["state"] != "SUCCESS":
            raise ValueError(f"training job {final['state'].lower()}: {final.get('error', '')}")
        # The servers trained copies of their weights: serve what they learnt (Publish, the
        # admin step that changes served weights).
        published = dep.publish(trained)
        print(
            f"\npublished the trained checkpoint to {len(published)} module servers",
            file=sys.stderr,
        )
        if args.task == "robotics":  # acting in the simulator, not Infer on a test split
            from tools.cli import demo_robotics

            demo_robotics.act(dep, task, args.examples or 20, out, trained, final, t_start)
            return 0
        print(f"\n{args.task}: sending test examples through the gateway's Infer", file=sys.stderr)
        t0 = time.perf_counter()
        results = _infer(dep, task, data, args.examples)
        infer_s = time.perf_counter() - t0
        plot = out / f"{task.dataset}_predictions.png"
        _plot(task, data, results, plot)
        local = _in_process(task, data, trained, len(results))
        _summary(task, data, results, local, final, plot, infer_s, time.time() - t_start)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the job and every process...", file=sys.stderr)
        if job is not None and client is not None:
            try:
                client.cancel(job)
                client.follow(job, timeout=60)
            except Exception as e:  # noqa: BLE001 - shutting down regardless
                print(f"(job did not stop cleanly: {e})", file=sys.stderr)
        return 130
    finally:
        dep.stop()


def _max_seq_len(task: Task) -> int:
    from pathways import spec as spec_lib

    return spec_lib.load(EXAMPLES / task.spec).pathway(task.pathway).max_seq_len


def _data(task: Task):
    from pathways.coordinator.runner import library_dataset

    return library_dataset(task.dataset)


def _infer(dep, task: Task, data, n: int) -> list:
    """Predictions for the first `n` test examples through the gateway: digits as PNG files
    (what `pathways classify` sends), utterances as WAV files (`pathways transcribe`)."""
    import imageio.v3 as iio

    from pathways import audio
    from pathways.v1 import gateway_pb2, gateway_pb2_grpc
    from tools.cli import connect

    gw = connect.gateway(dep.gateway)
    out = []
    with gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for i in range(min(n or 1 << 30, _test_size(task, data))):
            if task.dataset == "digits":
                pixels = (data.test_images[i, ..., 0] * 255).round().astype(np.uint8)
                field = {"image": iio.imwrite("<bytes>", pixels, extension=".png")}
            else:
                wave = data.waves(np.array([i]), "test")[0]
                field = {"wav": audio.encode_wav(wave, data.sample_rate)}
            r = stub.Infer(
                gateway_pb2.InferRequest(pathway=task.pathway, top_k=1, **field),
                timeout=60,
                metadata=gw.metadata,
            )
            if r.WhichOneof("result") == "classification":
                item = r.classification.items[0]
                out.append((int(item.classes[0]), float(item.probabilities[0])))
            else:
                out.append(r.transcript.texts[0])
    return out


def _test_size(task: Task, data) -> int:
    return len(data.test_labels) if task.dataset == "digits" else len(data.texts("test"))


def _truth(task: Task, data, n: int) -> list:
    if task.dataset == "digits":
        return [int(y) for y in data.test_labels[:n]]
    return data.texts("test")[:n]


def _in_process(task: Task, data, checkpoint: Path, n: int) -> list:
    """The same test examples through the trained checkpoint in this process (the summary
    compares: a difference would mean the servers do not serve what was trained)."""
    if task.dataset == "digits":
        from pathways.classify import Classifier
        from pathways.transcribe import load_executor

        ex = load_executor(checkpoint, task.pathway)
        return Classifier(ex, task.pathway).predict(data.test_images[:n]).tolist()
    from pathways.transcribe import Transcriber

    waves = data.waves(np.arange(n), "test")
    return Transcriber(str(checkpoint), task.pathway).transcribe_many(list(waves), data.sample_rate)


def _summary(task, data, results, local, final, plot, infer_s, seconds) -> None:
    import json

    truth = _truth(task, data, len(results))
    metrics = Path(final["out"]) / "metrics.jsonl"
    first = json.loads(metrics.read_text().splitlines()[0])["loss"]
    print("\nsummary", file=sys.stderr)
    print(
        f"  loss           {first:.3f} (step 1) -> {final['loss']:.3f} (step {final['step']}); "
        f"eval {final['eval_loss']:.3f}"
    )
    if task.dataset == "digits":
        right = sum(p == t for (p, _), t in zip(results, truth))
        same = sum(p == q for (p, _), q in zip(results, local))
        print(
            f"  accuracy       {right / len(results):.2%} of {len(results)} test digits, "
            f"classified through the gateway (PNG files); in this process "
            f"{np.mean(np.asarray(local) == truth):.2%}, {same} of {len(results)} answers equal"
        )
    else:
        from pathways.transcribe import error_rates

        rates = error_rates(results, truth)  # as tools/bench/applications.py reports them
        cer, words = rates["cer"], rates["word_accuracy"]
        same = sum(p == q for p, q in zip(results, local))
        print(
            f"  speech         CER {cer:.2%}, words right {words:.2%} of {len(results)} "
            f"held-out utterances, transcribed through the gateway (WAV files); "
            f"{same} of {len(results)} transcripts equal in this process"
        )
    print(
        f"  serving        {infer_s / len(results) * 1e3:.1f} ms per request (mean, one at a time)"
    )
    print(f"  loss plot      {final['loss_png']}")
    print(f"  predictions    {plot}")
    print(f"  checkpoint     {final['out']}  (total {seconds:.0f} s)")


def _plot(task: Task, data, results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = _truth(task, data, len(results))
    if task.dataset == "digits":
        n = min(len(results), 32)
        fig, axes = plt.subplots(4, 8, figsize=(8, 4.6))
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i >= n:
                continue
            (p, prob), t = results[i], truth[i]
            ax.imshow(data.test_images[i, ..., 0], cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"{p} ({prob:.0%})", fontsize=8, color="black" if p == t else "red")
        fig.suptitle("digits through the gateway: prediction (probability); red = wrong")
    else:
        n = min(len(results), 20)
        fig, ax = plt.subplots(figsize=(7, 0.3 * n + 1))
        ax.axis("off")
        # Spread over the split (it is ordered by word): different words, not one word's speakers.
        for row, i in enumerate(np.linspace(0, len(results) - 1, n).astype(int)):
            ok = results[i] == truth[i]
            color = "black" if ok else "red"
            ax.text(0, 1 - row / n, f"{truth[i]!r} -> {results[i]!r}", color=color)
        fig.suptitle("held-out speakers through the gateway: word -> transcript")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
