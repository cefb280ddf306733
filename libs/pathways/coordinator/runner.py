"""Builds the Trainer a job asks for: fused, in-process pipeline, or through module services."""

from __future__ import annotations

from pathways import checkpoint as ckpt
from pathways import data as data_lib
from pathways import spec as spec_lib
from pathways import tokenizers
from pathways.coordinator.jobs import JobRequest
from pathways.executor.local import LocalExecutor
from pathways.train import LocalTrainer, PipelineEngine, TrainConfig, Trainer


def train_config(req: JobRequest) -> TrainConfig:
    return TrainConfig(
        steps=req.steps,
        batch_size=req.batch_size,
        seq_len=req.seq_len,
        lr=req.lr,
        warmup=req.warmup if req.warmup is not None else max(1, req.steps // 15),
        eval_every=req.eval_every,
        save_every=req.save_every,
        seed=req.seed,
    )


def build_trainer(req: JobRequest) -> Trainer:
    spec = spec_lib.load(req.spec)
    pathway = req.pathway or spec.default_pathway
    spec.pathway(pathway)
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
