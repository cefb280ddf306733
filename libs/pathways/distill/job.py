"""A blockwise distillation job: record the teacher, train every student module, assemble, evaluate.

Each step is a function of the (JSON-serialisable) `DistillRequest` alone, so the steps can run in
one process (`run_local`) or as separate coordinator tasks on any workers: module tasks share
nothing but the activation store and write their module into the student checkpoint directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pathways import checkpoint as ckpt
from pathways import data as data_lib
from pathways import evaluation
from pathways import spec as spec_lib
from pathways.distill import store as store_lib
from pathways.distill.request import DistillRequest
from pathways.distill.students import train_module
from pathways.executor.local import LocalExecutor
from pathways.modules import registry


def load_checkpoint(directory: str | Path):
    """(spec, tokenizer, LocalExecutor with every saved module's parameters)."""
    spec, tok = ckpt.load_spec(directory)
    return spec, tok, LocalExecutor(spec, checkpoint=directory)


def student_spec(req: DistillRequest) -> spec_lib.PathwaySpec:
    if isinstance(req.student_spec, dict):
        return spec_lib.from_dict(req.student_spec, source="student spec")
    return spec_lib.load(req.student_spec)


def plan(req: DistillRequest) -> list[dict[str, Any]]:
    """One entry per position: teacher module, student module, kind. Checks the two line up."""
    t_spec, _ = ckpt.load_spec(req.teacher)
    s_spec = student_spec(req)
    tp = t_spec.pathway(req.teacher_pathway or t_spec.default_pathway).modules
    sp = s_spec.pathway(req.student_pathway or s_spec.default_pathway).modules
    if len(tp) != len(sp):
        raise ValueError(
            f"the student pathway has {len(sp)} modules ({', '.join(sp)}) but the "
            f"teacher's has {len(tp)} ({', '.join(tp)}): blockwise distillation "
            f"maps module i onto module i"
        )
    out = []
    for i, (t, s) in enumerate(zip(tp, sp)):
        tc, sc = t_spec.modules[t], s_spec.modules[s]
        if tc.kind != sc.kind or tc.output_contract != sc.output_contract:
            raise ValueError(
                f"position {i}: student {s!r} ({sc.kind}, out {sc.output_contract}) "
                f"does not match teacher {t!r} ({tc.kind}, out {tc.output_contract})"
            )
        out.append({"position": i, "teacher": t, "student": s, "kind": sc.kind})
    return out


def load_data(req: DistillRequest, tokenizer) -> data_lib.TokenData:
    texts = data_lib.read_texts(
        list(req.data) or data_lib.default_corpus_paths(), int(req.max_data_mb * 1e6)
    )
    return data_lib.TokenData.build(texts, tokenizer)


def ensure_store(req: DistillRequest) -> dict[str, Any]:
    """Records the teacher's boundaries into req.store unless a complete store is there."""
    t0 = time.time()
    path = Path(req.store)
    if (path / store_lib.INDEX).exists():
        return {"store": str(path), "recorded": False, "seconds": 0.0}
    t_spec, tok, ex = load_checkpoint(req.teacher)
    pathway = req.teacher_pathway or t_spec.default_pathway
    store_lib.record(
        ex,
        pathway,
        load_data(req, tok),
        path,
        rows=req.rows,
        seq_len=req.seq_len,
        batch_size=req.batch_size,
        shard_rows=req.shard_rows,
        seed=req.seed,
        provenance={
            "teacher": str(req.teacher),
            "data": list(req.data),
            "max_data_mb": req.max_data_mb,
        },
    )
    return {"store": str(path), "recorded": True, "seconds": time.time() - t0}


def train_position(req: DistillRequest, position: int) -> dict[str, Any]:
    """Trains the student module at `position` and saves it into the student checkpoint."""
    started = time.time()
    entry = plan(req)[position]
    s_spec = student_spec(req)
    store = store_lib.ActivationStore(req.store)
    head = None
    if registry.get(entry["kind"]).is_head and not store.has_logits:
        t_spec, _, ex = load_checkpoint(req.teacher)
        rt = ex.runtimes[entry["teacher"]]
        head = (rt.graphdef, rt.state)
    state, summary = train_module(
        store, position, s_spec.modules[entry["student"]], req.distill_config(), teacher_head=head
    )
    ckpt.save_module(req.out, entry["student"], state)
    return {**entry, **summary, "started": started, "ended": time.time()}


def train_baseline(req: DistillRequest) -> dict[str, Any]:
    """Trains the student's shape end to end on the same data for baseline_steps (fused)."""
    from pathways.train import LocalTrainer, TrainConfig

    started = time.time()
    out = req.baseline_dir
    if ckpt.read_meta(out) is None:
        _, tok = ckpt.load_spec(req.teacher)
        s_spec = student_spec(req)
        pathway = req.student_pathway or s_spec.default_pathway
        cfg = TrainConfig.with_warmup(
            req.baseline_steps,
            req.warmup,
            fit=True,
            batch_size=req.batch_size,
            seq_len=req.seq_len,
            lr=req.lr,
            eval_every=req.baseline_steps,
            eval_batches=req.eval_batches,
            save_every=req.baseline_steps,
            seed=req.seed,
        )
        LocalTrainer(
            LocalExecutor(s_spec, seed=req.seed), pathway, cfg, load_data(req, tok), out, tok
        ).run()
    return {
        "baseline": str(out),
        "steps": req.baseline_steps,
        "started": started,
        "ended": time.time(),
    }


def assemble_and_evaluate(req: DistillRequest, results: list[dict] | None = None) -> dict:
    """Writes the student's spec next to its trained modules, then evaluates student, teacher and
    (if there is one) the baseline end to end on the same eval batches."""
    t_spec, tok, teacher = load_checkpoint(req.teacher)
    s_spec = student_spec(req)
    missing = [e["student"] for e in plan(req) if not ckpt.has_module(req.out, e["student"])]
    if missing:
        raise RuntimeError(f"student modules {', '.join(missing)} were not trained into {req.out}")
    ckpt.save_spec(req.out, s_spec, tok)
    _, _, student = load_checkpoint(req.out)
    data = load_data(req, tok)
    kw = dict(
        batch_size=req.batch_size, seq_len=req.seq_len, batches=req.eval_batches, seed=req.seed
    )
    sp = req.student_pathway or s_spec.default_pathway
    out: dict[str, Any] = {
        "out": req.out,
        "student": evaluation.report(evaluation.eval_loss(student, sp, data, **kw)),
        "teacher": evaluation.report(
            evaluation.eval_loss(teacher, req.teacher_pathway or t_spec.default_pathway, data, **kw)
        ),
        "params": {
            "student": _params(student, sp),
            "teacher": _params(teacher, req.teacher_pathway or t_spec.default_pathway),
        },
        "modules": [r for r in results or [] if "position" in r],
    }
    if ckpt.read_meta(req.baseline_dir) is not None:
        _, _, base = load_checkpoint(req.baseline_dir)
        out["baseline"] = evaluation.report(evaluation.eval_loss(base, sp, data, **kw))
    out["gap_to_teacher"] = out["student"]["eval_loss"] - out["teacher"]["eval_loss"]
    return out


def _params(ex: LocalExecutor, pathway: str) -> int:
    return sum(rt.param_count() for rt in ex.chain(pathway))


def run_local(req: DistillRequest) -> dict:
    """The whole job in this process, one module after another (the coordinator runs the module
    trainings as parallel tasks instead)."""
    ensure_store(req)
    results = [train_position(req, e["position"]) for e in plan(req)]
    if req.baseline_steps:
        results.append(train_baseline(req))
    return assemble_and_evaluate(req, results)
