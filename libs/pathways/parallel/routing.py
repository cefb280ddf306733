"""DiPaCo's router as a checkpoint keeps it: a small frozen pathway, k-means centroids, the paths.

A DiPaCo job (`dipaco_job.py`) fits it on its training documents and saves it in `router/` of
its checkpoint; the gateway and `pathways generate` load it from there, so a prompt at inference
goes to the path its documents went to in training (the same features, the same centroids).

    router/spec.yaml, tokenizer   the frozen pathway's spec (only its modules) and tokenizer
    router/modules/<name>/        its weights
    router/router.json            {family, pathway, prefix, paths, centroids}
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways.parallel import dipaco

ROUTER_DIR = "router"
ROUTER_FILE = "router.json"


class Features:
    """Mean-pooled last hidden states of a frozen pathway over a text's first `prefix` tokens."""

    def __init__(self, executor, pathway: str, prefix: int):
        limit = executor.spec.pathway(pathway).max_seq_len
        if not isinstance(prefix, int) or not 1 <= prefix <= limit:
            raise ValueError(
                f"router_prefix must be in [1, {limit}] (router pathway {pathway!r}'s "
                f"max_seq_len); got {prefix!r}"
            )
        self.executor, self.pathway, self.prefix = executor, pathway, prefix

    def of_documents(self, docs: np.ndarray) -> np.ndarray:
        """(N, L) token documents -> (N, D) features of their first `prefix` tokens."""
        return dipaco.features(self.executor, self.pathway, docs, self.prefix)

    def of_ids(self, ids: list[int]) -> np.ndarray:
        """One prompt's features, (1, D). A prompt shorter than `prefix` is padded to it and
        pooled over its own positions: under a causal mask the padding changes none of them, and
        one shape means one compiled program for every prompt."""
        ids = list(ids)[: self.prefix]
        if not ids:
            raise ValueError("a prompt of no tokens has nothing to route on")
        if not self.executor.spec.pathway(self.pathway).causal:
            return self.of_documents(np.asarray([ids], np.int32))
        x = np.zeros((1, self.prefix), np.int32)
        x[0, : len(ids)] = ids
        h = self.executor.forward(self.pathway, x, head=False)  # (1, prefix, D)
        return np.asarray(h)[:, : len(ids)].mean(axis=1).astype(np.float32)


@dataclasses.dataclass
class PathRouter:
    """Routes a text to one path of a DiPaCo checkpoint. `family`: the pathway the paths were
    made from (a request naming it, or naming none, is routed)."""

    features: Features
    kmeans: dipaco.Router  # the centroids, one per path
    family: str

    @property
    def paths(self) -> list[str]:
        return self.kmeans.paths

    def route(self, docs: np.ndarray) -> np.ndarray:
        """Each (N, L) document's path index (nearest centroid)."""
        return self.kmeans.route(self.features.of_documents(docs))

    def path_of(self, tokenizer, text: str) -> str:
        """The path that serves `text`; an empty text is routed as end-of-text, the token
        generation starts it from (`generate.stream`)."""
        ids = tokenizer.encode(text) or [tokenizer.eos_id if tokenizer.eos_id >= 0 else 0]
        return self.paths[int(self.kmeans.route(self.features.of_ids(ids))[0])]

    def save(self, checkpoint: str | Path, tokenizer) -> None:
        """Writes `router/` of a checkpoint: the frozen pathway alone (its modules and spec),
        the tokenizer, and the centroids."""
        ex, pathway = self.features.executor, self.features.pathway
        modules = list(ex.spec.pathway(pathway).modules)
        full = ex.spec.to_dict()
        alone = {
            **{k: v for k, v in full.items() if k not in ("modules", "pathways", "placement")},
            "modules": {m: full["modules"][m] for m in modules},
            "pathways": {pathway: full["pathways"][pathway]},
        }
        d = Path(checkpoint) / ROUTER_DIR
        ckpt.save_spec(d, spec_lib.from_dict(alone, source=str(d)), tokenizer)
        for m in modules:
            ckpt.save_module(d, m, ex.state(m))
        meta = {
            "family": self.family,
            "pathway": pathway,
            "prefix": self.features.prefix,
            **self.kmeans.to_dict(),
        }
        tmp = d / f".{ROUTER_FILE}.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(d / ROUTER_FILE)  # last: a router.json means the rest is there


def load(checkpoint: str | Path | None, spec=None) -> PathRouter | None:
    """The router of a DiPaCo checkpoint, None if it has none. With the checkpoint's `spec`, its
    paths are checked against the spec's pathways."""
    if not checkpoint:
        return None
    d = Path(checkpoint) / ROUTER_DIR
    if not (d / ROUTER_FILE).exists():
        return None
    from pathways.executor.local import LocalExecutor

    meta = json.loads((d / ROUTER_FILE).read_text())
    rspec, _ = ckpt.load_spec(d)
    ex = LocalExecutor(rspec.only(meta["pathway"]), checkpoint=d)
    router = PathRouter(
        Features(ex, meta["pathway"], meta["prefix"]), dipaco.Router.from_dict(meta), meta["family"]
    )
    if spec is not None:
        unknown = [p for p in router.paths if p not in spec.pathways]
        if unknown:
            raise ValueError(
                f"{d / ROUTER_FILE} routes to path(s) {', '.join(unknown)}, which the "
                f"checkpoint's spec does not have"
            )
    return router
