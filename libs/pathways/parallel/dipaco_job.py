"""A DiPaCo job: the DiLoCo job's rounds (`diloco_job.py`) with one path per worker.

The request names a grid of module choices of a pathway (`grid`: {"attn-0": 2, "attn-1": 2} is
4 paths); the job's spec is `dipaco.grid` of it, saved as the run's spec.yaml, so every path is
an ordinary pathway of the checkpoint, and its workers are the paths. Every copy of a chosen
module starts from the base module's initial parameters. Before round 0 the coordinator routes
the training documents (`doc_len` tokens each) to paths: k-means on the features of a small
frozen pathway (`router_checkpoint`'s trained pathway, like the paper's pretrained router; none:
the base pathway at its initial parameters, as `tools/bench/path_parallel.py` does), balanced so
that every path gets as many documents. The router goes to router/ (`routing.py`: the gateway
routes prompts with it), the assignment to dipaco/assignment.npz. Path k trains on its
documents; a module's outer step averages only the paths that use it. The eval loss is each eval
sequence's through the one path it routes to (the inference cost of one dense model).

Layout: as a DiLoCo job's, with dipaco/round-<r>/ for diloco/round-<r>/ and worker k = path k.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np

from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways.config import positive_int
from pathways.parallel import dipaco, routing
from pathways.parallel.diloco_job import (
    Context,
    DiLoCoRequest,
    DiLoCoRun,
    load_arrays,
    save_arrays,
)

ASSIGNMENT = "assignment.npz"


@dataclasses.dataclass(frozen=True)
class DiPaCoRequest(DiLoCoRequest):
    """A DiPaCo training job: a DiLoCo request whose workers are the paths of `grid`."""

    task: ClassVar[str] = "pathways.dipaco"
    worker_task: ClassVar[str] = "pathways.dipaco.worker"
    parallel: ClassVar[str] = "dipaco"
    title: ClassVar[str] = "DiPaCo"

    workers: int = 0  # the grid's number of paths (0: that many; any other number is refused)
    # module of the pathway -> its number of choices; the paths are every combination
    grid: dict[str, int] = dataclasses.field(default_factory=dict)
    # a trained run whose pathway gives the router's features (its tokenizer is the job's);
    # empty: the job's pathway at its initial parameters
    router_checkpoint: str = ""
    router_pathway: str | None = None  # default: the router checkpoint's (or the job's) first
    doc_len: int = 512  # tokens per routed training document
    router_prefix: int = 64  # a document's (or prompt's) first tokens the router reads

    def __post_init__(self):
        grid = self.grid
        if not isinstance(grid, dict) or not grid:
            raise ValueError(
                f"grid must map at least one module to its number of choices, e.g. "
                f"{{'attn-0': 2, 'attn-1': 2}}; got {grid!r}"
            )
        for name, n in grid.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"grid[{name!r}] must be an integer >= 1, got {n!r}")
        paths = math.prod(grid.values())
        if self.workers not in (0, paths):
            raise ValueError(
                f"workers ({self.workers!r}) must be the grid's number of paths ({paths}), or 0: "
                f"each path has its worker"
            )
        object.__setattr__(self, "workers", paths)
        object.__setattr__(self, "grid", dict(grid))
        positive_int("doc_len", self.doc_len)
        positive_int("router_prefix", self.router_prefix)
        if self.router_prefix > self.doc_len:
            raise ValueError(
                f"router_prefix ({self.router_prefix}) must be <= doc_len ({self.doc_len})"
            )
        super().__post_init__()

    def build_context(self) -> DiPaCoContext:
        return DiPaCoContext(self)

    def build_run(self) -> DiPaCoRun:
        return DiPaCoRun(self)


def assignment_path(out: str | Path) -> Path:
    return Path(out) / "dipaco" / ASSIGNMENT


class DiPaCoContext(Context):
    """Worker k trains path k on the documents routed to it; `features` is the frozen router
    pathway's."""

    def _tokenizer(self, texts_fn):
        if self.req.router_checkpoint:  # the router reads the same token ids as the paths
            return ckpt.load_spec(self.req.router_checkpoint)[1]
        return super()._tokenizer(texts_fn)

    def _model(self):
        from pathways.executor.local import LocalExecutor

        req = self.req
        spec = spec_lib.from_dict(
            dipaco.grid(self.base.to_dict(), self.pathway, req.grid),
            source=f"{req.spec} with grid {req.grid}",
        )
        _fits(self.tokenizer, self.base, self.pathway, "the job's")
        initial = LocalExecutor(self.base, seed=req.seed)
        origin = {f"{m}.{i}": m for m, n in req.grid.items() for i in range(n)}
        executor = LocalExecutor(
            spec, {m: initial.state(origin.get(m, m)) for m in spec.modules}, seed=req.seed
        )
        if req.router_checkpoint:
            rspec, _ = ckpt.load_spec(req.router_checkpoint)
            rpathway = req.router_pathway or rspec.default_pathway
            modules = rspec.pathway(rpathway).modules
            missing = [m for m in modules if not ckpt.has_module(req.router_checkpoint, m)]
            if missing:
                raise ValueError(
                    f"router_checkpoint {req.router_checkpoint} has no weights for module(s) "
                    f"{', '.join(missing)} of pathway {rpathway!r}"
                )
            frozen = LocalExecutor(rspec.only(rpathway), checkpoint=req.router_checkpoint)
        else:
            rpathway = req.router_pathway or self.pathway
            frozen, rspec = initial, self.base
        rspec.pathway(rpathway)
        _fits(self.tokenizer, rspec, rpathway, "the router's")
        self.features = routing.Features(frozen, rpathway, req.router_prefix)
        self._assignment: np.ndarray | None = None
        return spec, executor, list(spec.pathways)

    def documents(self) -> np.ndarray:
        return dipaco.documents(self.data.train, self.req.doc_len)

    def fit_router(self) -> tuple[routing.PathRouter, np.ndarray]:
        """k-means over the training documents' features; (the router, each document's path
        index, balanced)."""
        docs = self.documents()
        if len(docs) < len(self.pathways):
            raise ValueError(
                f"{len(docs)} documents of doc_len {self.req.doc_len} tokens cannot be routed "
                f"to {len(self.pathways)} paths: give more data or a shorter doc_len"
            )
        feats = self.features.of_documents(docs)
        kmeans = dipaco.Router.fit(feats, self.pathways, seed=self.req.seed)
        router = routing.PathRouter(self.features, kmeans, self.pathway)
        return router, kmeans.assign_balanced(feats)

    def tokens(self, k: int) -> np.ndarray:
        """Path k's training tokens: its documents, one after another."""
        if self._assignment is None:
            self._assignment = load_arrays(assignment_path(self.req.out))[0]
        docs = self.documents()
        if len(self._assignment) != len(docs):
            raise ValueError(
                f"{assignment_path(self.req.out)} routes {len(self._assignment)} documents, the "
                f"job's data makes {len(docs)}: the data changed since the run started"
            )
        return docs[self._assignment == k].reshape(-1)


def _fits(tokenizer, spec, pathway: str, whose: str) -> None:
    vocab = spec.modules[spec.pathway(pathway).modules[0]].input_contract[1]
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} entries but {whose} pathway {pathway!r} "
            f"reads {vocab}"
        )


class DiPaCoRun(DiLoCoRun):
    """A DiLoCo run whose workers are paths: the router fitted before round 0, each module
    averaged over its paths, eval through the routed path."""

    ctx: DiPaCoContext

    def _begin(self) -> None:
        router, assignment = self.ctx.fit_router()
        save_arrays(assignment_path(self.out), [assignment])
        router.save(self.out, self.ctx.tokenizer)
        self.ctx._assignment = assignment

    def _same_on_resume(self) -> tuple[str, ...]:
        return (
            "inner_steps",
            "grid",
            "doc_len",
            "router_prefix",
            "router_checkpoint",
            "router_pathway",
        )

    def _averaged_record(self, averaged: dict[str, list[int]]) -> dict:
        paths = self.ctx.pathways
        return {"averaged": {n: [paths[k] for k in ks] for n, ks in averaged.items()}}

    def router(self) -> routing.PathRouter:
        """The run's router as saved (the centroids of router/router.json, this process's
        frozen pathway)."""
        meta = json.loads((self.out / routing.ROUTER_DIR / routing.ROUTER_FILE).read_text())
        return routing.PathRouter(self.ctx.features, dipaco.Router.from_dict(meta), meta["family"])

    def eval_loss(self, params: dict | None = None) -> float:
        """The eval batches' mean loss, each sequence through the path it routes to."""
        params = params or self.params()
        ex, req, router = self.ctx.executor, self.req, self.router()
        for n, p in params.items():
            ex.set_state(n, p)
        total, rows = 0.0, 0
        for i in range(req.eval_batches):
            x, y = self.ctx.data.batch(i, req.batch_size, req.seq_len, req.seed, split="eval")
            s, per_path = dipaco.routed_loss(ex, router.paths, router.route(x), x, y)
            total, rows = total + s, rows + int(per_path.sum())
        return total / rows
