"""Test helpers: a randomly initialised checkpoint of a spec (no training needed), and the
losses of pipeline steps through module servers and in this process (to compare them)."""

from __future__ import annotations

from pathlib import Path

from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways import tokenizers

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def make_checkpoint(
    directory: str | Path,
    spec_path: str | Path | spec_lib.PathwaySpec = EXAMPLES / "tiny.yaml",
    seed: int = 0,
):
    """Saves every module of the spec (a file, or a loaded spec) with seeded random weights;
    returns the LocalExecutor.

    The checkpoint always gets the byte tokenizer (token-level tests and benchmarks need no other).
    """
    from pathways.executor.local import LocalExecutor

    spec = spec_path if isinstance(spec_path, spec_lib.PathwaySpec) else spec_lib.load(spec_path)
    ex = LocalExecutor(spec, seed=seed)
    ckpt.save_spec(directory, spec, tokenizers.ByteTokenizer())
    for name in spec.modules:
        ckpt.save_module(directory, name, ex.state(name))
    return ex


def remote_losses(spec, pathway: str, addresses: dict[str, str], cfg, batches, tls=None):
    """The losses of pipeline steps (1F1B, 2 micro-batches) of `pathway` through the
    TrainingService of the module servers at `addresses` (module -> address), one per batch."""
    from pathways.pipeline.client import remote_stages
    from pathways.train import PipelineEngine

    stages = remote_stages(spec, pathway, addresses, cfg, tls=tls)
    try:
        engine = PipelineEngine(stages, 2, "1f1b")
        return [engine.step(x, y)["loss"] for x, y in batches]
    finally:
        for st in stages:
            st.close()


def local_losses(checkpoint, pathway: str, cfg, batches, causal: bool = True):
    """The same steps in this process, from the checkpoint's weights."""
    from pathways.executor.local import LocalExecutor
    from pathways.pipeline.runner import run_step
    from pathways.pipeline.stage import LocalStage
    from pathways.train import make_optimizer

    spec, _ = ckpt.load_spec(checkpoint)
    ex = LocalExecutor(spec)
    for m in spec.pathway(pathway).modules:
        ex.set_state(m, ckpt.load_module(checkpoint, m, ex.state(m)))
    stages = [LocalStage(rt, make_optimizer(cfg), causal=causal) for rt in ex.chain(pathway)]
    return [run_step(stages, x, y, 2, "1f1b")["loss"] for x, y in batches]
