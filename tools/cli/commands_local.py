"""Local commands: inspect a spec, train a pathway in-process, generate from a checkpoint, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pathways import checkpoint as ckpt
from pathways import data as data_lib
from pathways import generate as gen
from pathways import spec as spec_lib
from pathways import tokenizers
from pathways.sampling import SamplingParams

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Flags of `train --parallel diloco` and `--parallel dipaco` (None when not given).
DILOCO_FLAGS = (
    "workers",
    "inner_steps",
    "inner_optimizer",
    "outer_lr",
    "outer_momentum",
    "compress",
    "round_deadline",
)
# Flags of `train --parallel dipaco` only.
DIPACO_FLAGS = ("grid", "router_checkpoint", "router_pathway", "doc_len", "router_prefix")


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a spec's modules, parameter counts and pathways")
    p.add_argument("spec")
    p.set_defaults(func=cmd_inspect)
    train_args(sub.add_parser("train", help="train a pathway locally (one process)"))
    generate_args(
        sub.add_parser("generate", help="generate text from a checkpoint (or a running gateway)")
    )


def train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--spec", required=True)
    p.add_argument("--pathway", help="pathway to train (default: the spec's first)")
    p.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="text files or folders (default: this Python's standard library)",
    )
    p.add_argument("--max-data-mb", type=float, default=8.0, help="read at most this much text")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps/15)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint directory (resumed if it holds a run)")
    p.add_argument(
        "--engine",
        choices=["fused", "pipeline", "services"],
        default=None,
        help="fused: one program (default locally); pipeline: per-module stages in "
        "one process; services: through the module services (default --remote "
        "with a running deployment)",
    )
    p.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument(
        "--remote",
        action="store_true",
        help="submit to the coordinator of a running deployment and follow it",
    )
    p.add_argument("--broker", help="coordinator broker URL for --remote")
    d = p.add_argument_group(
        "parallel training with little communication (DiLoCo, DiPaCo; a coordinator job, like "
        "--remote)"
    )
    d.add_argument(
        "--parallel",
        choices=["none", "diloco", "dipaco"],
        default="none",
        help="diloco: K workers each take --inner-steps steps on their own data shard, then an "
        "outer Nesterov step per module on their averaged parameter deltas; dipaco: the paths "
        "of --grid, one worker each on the documents routed to it, each module's outer step "
        "averaging only the paths that use it",
    )
    d.add_argument("--workers", type=int, default=None, help="DiLoCo workers K (default 4)")
    d.add_argument(
        "--inner-steps", type=int, default=None, help="inner steps H per round (default 50)"
    )
    d.add_argument("--inner-optimizer", choices=["adamw", "sgd"], default=None)
    d.add_argument("--outer-lr", type=float, default=None, help="default 0.7")
    d.add_argument("--outer-momentum", type=float, default=None, help="Nesterov; default 0.9")
    d.add_argument(
        "--compress",
        choices=["none", "bfloat16", "int8"],
        default=None,
        help="pseudo-gradients sent as float32 (none), bfloat16, or int8 with a scale per 64",
    )
    d.add_argument(
        "--round-deadline",
        type=float,
        default=None,
        help="seconds after which a round closes with the workers that reported (a lost or "
        "late worker's shard is trained again next round); default: wait for all",
    )
    d.add_argument(
        "--grid",
        default=None,
        metavar="MODULE=N,...",
        help="dipaco: N choices of each named module of the pathway (attn-0=2,attn-1=2: 4 "
        "paths, the other modules shared by all)",
    )
    d.add_argument(
        "--router-checkpoint",
        default=None,
        help="dipaco: a trained run whose pathway's features route documents and prompts "
        "(default: the pathway at its initial parameters)",
    )
    d.add_argument("--router-pathway", default=None, help="dipaco: the router's pathway")
    d.add_argument(
        "--doc-len", type=int, default=None, help="dipaco: tokens per routed document (512)"
    )
    d.add_argument(
        "--router-prefix",
        type=int,
        default=None,
        help="dipaco: first tokens of a document or prompt the router reads (64)",
    )
    p.set_defaults(func=cmd_train)
    return p


def generate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--checkpoint", help="run locally from this checkpoint")
    p.add_argument("--gateway", metavar="HOST:PORT", help="stream from a gateway (`pathways up`)")
    p.add_argument("--timeout", type=float, default=300.0, help="gateway deadline in seconds")
    p.add_argument(
        "--weights",
        choices=["float32", "bfloat16", "int8"],
        default="float32",
        help="local: how the weights are stored while decoding (bfloat16: half the bytes, "
        "int8: about a quarter)",
    )
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    return p


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pathway", help="pathway to run (default: the spec's first)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )


def cmd_inspect(args) -> int:
    import jax
    from flax import nnx

    from pathways import modules as mod

    spec = spec_lib.load(args.spec)
    print(f"spec {args.spec}: contract OK")
    print(f"{'module':<16} {'kind':<10} {'d_model':>7} {'params':>12}  details")
    for name, cfg in spec.modules.items():
        shapes = nnx.eval_shape(lambda c=cfg: mod.build(c))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(shapes)))
        d = getattr(cfg, "d_model", "-")
        extra = mod.registry.of(cfg).details(cfg)
        print(f"{name:<16} {cfg.kind:<10} {d:>7} {n:>12,}  {extra}")
    for p in spec.pathways.values():
        print(f"pathway {p.name}: {' -> '.join(p.modules)} (max_seq_len {p.max_seq_len})")
    return 0


def load_tokenizer_for(spec, texts_fn):
    """The spec's tokenizer; a BPE one with no file yet is trained on the corpus."""
    if spec.tokenizer.get("kind") == "bpe":
        path = spec.tokenizer.get("path")
        if path and Path(path).exists():
            return tokenizers.BpeTokenizer.load(path)
        vocab = next(
            c.input_contract[1] for c in spec.modules.values() if c.input_contract[0] == "tokens"
        )
        print(f"training a BPE tokenizer with {vocab} entries on the corpus...", file=sys.stderr)
        return tokenizers.BpeTokenizer.train(texts_fn(), vocab)
    return tokenizers.ByteTokenizer()


def cmd_train(args) -> int:
    from tqdm import tqdm

    from pathways.executor.local import LocalExecutor
    from pathways.train import LocalTrainer, TrainConfig

    def given(names):
        return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]

    parallel = getattr(args, "parallel", "none")
    if parallel in ("diloco", "dipaco"):
        if args.engine:
            raise ValueError(
                f"--engine does not apply to --parallel {parallel} (workers train fused)"
            )
        if parallel == "diloco" and given(DIPACO_FLAGS):
            raise ValueError(f"{', '.join(given(DIPACO_FLAGS))} only apply with --parallel dipaco")
        if parallel == "dipaco" and args.workers is not None:
            raise ValueError(
                "--workers does not apply to --parallel dipaco: each path of --grid "
                "has its worker"
            )
        from tools.cli.commands_jobs import submit_parallel_and_follow

        return submit_parallel_and_follow(args)
    if given(DILOCO_FLAGS + DIPACO_FLAGS):
        raise ValueError(
            f"{', '.join(given(DILOCO_FLAGS + DIPACO_FLAGS))} only apply with --parallel "
            f"diloco or dipaco"
        )
    if args.remote:
        from tools.cli.commands_jobs import submit_and_follow

        return submit_and_follow(args)
    if args.engine == "services":
        raise ValueError(
            "--engine services trains through a deployment's module services: " "add --remote"
        )
    out = Path(args.out)
    spec = spec_lib.load(args.spec)
    pathway = args.pathway or spec.default_pathway
    spec.pathway(pathway)
    paths = args.data if args.data else data_lib.default_corpus_paths()
    texts = data_lib.read_texts(paths, int(args.max_data_mb * 1e6))
    if (out / "spec.yaml").exists():
        _, tok = ckpt.load_spec(out)
    else:
        tok = load_tokenizer_for(spec, lambda: texts)
    # A pathway starts with the module that reads tokens (the spec checks it).
    emb_vocab = spec.modules[spec.pathway(pathway).modules[0]].input_contract[1]
    if tok.vocab_size > emb_vocab:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} entries but the embedding's vocab_size "
            f"is {emb_vocab}"
        )
    data = data_lib.TokenData.build(texts, tok)
    cfg = TrainConfig.with_warmup(
        args.steps,
        args.warmup,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
    )
    trainer = LocalTrainer(
        LocalExecutor(spec, seed=args.seed),
        pathway,
        cfg,
        data,
        out,
        tok,
        engine=args.engine or "fused",
        n_micro=args.micro_batches,
        schedule=args.schedule,
    )
    if trainer.try_resume():
        print(f"resuming {out} at step {trainer.step}", file=sys.stderr)
    print(
        f"training pathway {pathway!r} on {len(data.train):,} tokens "
        f"(unigram baseline {data.unigram_loss():.3f} nats)",
        file=sys.stderr,
    )
    first_eval = trainer.eval_loss()
    bar = tqdm(total=cfg.steps, initial=trainer.step, unit="step", dynamic_ncols=True)

    def on_step(rec):
        bar.update(1)
        post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
        if "eval_loss" in rec:
            post["eval"] = f"{rec['eval_loss']:.3f}"
        bar.set_postfix(post)

    history = trainer.run(on_step=on_step)
    bar.close()
    last_eval = next(
        (r["eval_loss"] for r in reversed(history) if "eval_loss" in r), trainer.eval_loss()
    )
    print(f"eval loss {first_eval:.3f} -> {last_eval:.3f}; checkpoint {out}")
    return 0


def cmd_generate(args) -> int:
    from pathways.executor.local import LocalExecutor

    if getattr(args, "gateway", None):
        from tools.cli.commands_serve import generate_via_gateway

        return generate_via_gateway(args)
    if not args.checkpoint:
        raise ValueError("give --checkpoint DIR (local) or --gateway HOST:PORT")
    from pathways.parallel import routing
    from tools.cli.commands_serve import show_route

    spec, tok = ckpt.load_spec(args.checkpoint)
    ex = LocalExecutor(spec, weights=args.weights, checkpoint=args.checkpoint)
    pathway = args.pathway or spec.default_pathway
    router = routing.load(args.checkpoint, spec)  # a DiPaCo checkpoint: the path of the prompt
    if router is not None and args.pathway in (None, "", router.family):
        pathway = router.path_of(tok, args.prompt)
        show_route(pathway)
    missing = [m for m in spec.pathway(pathway).modules if not ckpt.has_module(args.checkpoint, m)]
    if missing:
        raise ValueError(
            f"checkpoint {args.checkpoint} has no weights for module(s) "
            f"{', '.join(missing)} of pathway {pathway!r}"
        )
    params = sampling_from_args(args)
    echoed = False  # the prompt is echoed with the first text: a refused prompt prints one line
    for ev in gen.stream(ex, pathway, [args.prompt], tok, params):
        if not echoed:
            sys.stdout.write(args.prompt)
            echoed = True
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    sys.stdout.write(("" if echoed else args.prompt) + "\n")
    return 0


def build_args(command: str, argv: list[str]):
    """The arguments of `pathways COMMAND ARGV...` for another command that runs this one
    (`demo` trains and generates); command is "train" or "generate"."""
    adders = {"train": train_args, "generate": generate_args}
    return adders[command](argparse.ArgumentParser(prog=f"pathways {command}")).parse_args(argv)
