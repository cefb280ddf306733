"""Builds the Trainer a job asks for: fused, in-process pipeline, or through module services."""

from __future__ import annotations

import dataclasses

from pathways import checkpoint as ckpt
from pathways import data as data_lib
from pathways import spec as spec_lib
from pathways import tokenizers
from pathways.coordinator.jobs import JobRequest
from pathways.executor.local import LocalExecutor
from pathways.train import LocalTrainer, PipelineEngine, TrainConfig, Trainer


def train_config(req: JobRequest) -> TrainConfig:
    """The job's training settings: every `TrainConfig` field the request has, by name (a field
    added to both needs no code here); a request without `warmup` warms up for `train.default_warmup(steps)`.
    """
    names = [f.name for f in dataclasses.fields(TrainConfig) if hasattr(req, f.name)]
    given = {name: getattr(req, name) for name in names}
    return TrainConfig.with_warmup(given.pop("steps"), given.pop("warmup", None), **given)


def library_dataset(name: str):
    """A data set of `pathways.datasets` by its job name (JobRequest.dataset), with its default
    split (the speech set is generated with espeak-ng on first use and cached; a robotics
    task's demonstrations by its expert, likewise)."""
    if name == "digits":
        from pathways.datasets.digits import digits

        return digits()
    if name == "speech":
        from pathways.datasets.speech import speech

        return speech()
    from pathways.datasets import robotics

    if name in robotics.RECIPES:  # expert demonstrations of a task (behaviour cloning)
        return robotics.demonstrations(name, **robotics.RECIPES[name])
    raise ValueError(f"unknown data set {name!r}")


def build_trainer(req: JobRequest) -> Trainer:
    spec = spec_lib.load(req.spec)
    pathway = req.pathway or spec.default_pathway
    spec.pathway(pathway)
    if req.dataset:
        data = library_dataset(req.dataset)
        data.check_pathway(spec, pathway)  # names modules and sizes that do not fit
        tok = tokenizers.ByteTokenizer()  # kept with the checkpoint; the data is not text
    else:
        texts = data_lib.read_texts(
            list(req.data) or data_lib.default_corpus_paths(), int(req.max_data_mb * 1e6)
        )
        if (req.out_path / "spec.yaml").exists():
            _, tok = ckpt.load_spec(req.out_path)
        elif spec.tokenizer.get("kind") == "bpe":
            vocab = spec.modules[spec.pathway(pathway).modules[0]].input_contract[1]
            tok = tokenizers.BpeTokenizer.train(texts, vocab)
        else:
            tok = tokenizers.ByteTokenizer()
        data = data_lib.TokenData.build(texts, tok)
    cfg = train_config(req)
    if req.engine == "services":
        from pathways.pipeline.client import remote_stages

        stages = remote_stages(spec, pathway, req.modules, cfg)
        engine = PipelineEngine(stages, req.micro_batches, req.schedule)
        return Trainer(engine, spec, pathway, tok, cfg, data, req.out_path)
    ex = LocalExecutor(spec, seed=req.seed)
    return LocalTrainer(
        ex,
        pathway,
        cfg,
        data,
        req.out_path,
        tok,
        engine=req.engine,
        n_micro=req.micro_batches,
        schedule=req.schedule,
    )
