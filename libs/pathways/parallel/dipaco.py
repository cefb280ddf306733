"""DiPaCo (Douillard et al. 2024, arXiv 2403.10616): paths through shared modules, trained apart.

A DiPaCo spec is an ordinary pathway spec whose pathways are the *paths*: a grid of module choices
(`grid`: e.g. 2 lower x 2 upper attention modules = 4 paths, all sharing the embedding and the
head), so every path is served like any pathway. Documents are routed to paths (`Router`: k-means
on features of a small frozen pathway, balanced so that each path gets an equal share, as in the
paper); each path's worker trains its path on its documents for H inner steps (its own inner
optimizer), then every module takes an outer step (DiLoCo's, per module: `diloco.OuterOptimizer`)
on the mean pseudo-gradient of **only the paths that use it**. At inference a prompt is routed
the same way and one path serves it: the cost of one dense model of a path's size.

`simulate` runs the workers one after another in this process (the arithmetic of a job; tests and
`tools/bench/path_parallel.py`).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np

from pathways.executor.local import LocalExecutor
from pathways.parallel import diloco
from pathways.train import TrainConfig


# ---- paths ------------------------------------------------------------------------------------
def grid(spec: dict[str, Any], pathway: str, choices: dict[str, int]) -> dict[str, Any]:
    """A spec (as a dict) whose pathways are the paths of a grid: each module of `pathway` named
    in `choices` becomes that many copies ("<name>.0", "<name>.1", ...), and there is one
    pathway per combination, "<pathway>.<i>.<j>..." in the order of `choices`. Modules not in
    `choices` are shared by every path. Other pathways of the spec are dropped."""
    chain = spec["pathways"][pathway]
    chain = chain["modules"] if isinstance(chain, dict) else chain
    for name, n in choices.items():
        if name not in chain:
            raise ValueError(f"choices name {name!r}, which pathway {pathway!r} does not have")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"choices[{name!r}] must be an integer >= 1, got {n!r}")
    modules = {}
    for name in chain:
        if name in choices:
            for i in range(choices[name]):
                modules[f"{name}.{i}"] = copy.deepcopy(spec["modules"][name])
        else:
            modules[name] = copy.deepcopy(spec["modules"][name])
    pathways = {}
    for combo in itertools.product(*(range(n) for n in choices.values())):
        pick = dict(zip(choices, combo))
        path = [f"{m}.{pick[m]}" if m in pick else m for m in chain]
        pathways[".".join([pathway, *map(str, combo)])] = path
    out = {k: v for k, v in spec.items() if k not in ("modules", "pathways", "placement")}
    return {**out, "modules": modules, "pathways": pathways}


def users(spec, paths: list[str]) -> dict[str, list[str]]:
    """Module -> the paths (among `paths`) that use it."""
    out: dict[str, list[str]] = {}
    for p in paths:
        for m in spec.pathway(p).modules:
            out.setdefault(m, []).append(p)
    return out


# ---- routing ----------------------------------------------------------------------------------
def documents(tokens: np.ndarray, doc_len: int) -> np.ndarray:
    """A token stream cut into documents of doc_len tokens: (N, doc_len) int32."""
    n = len(tokens) // doc_len
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens make no document of {doc_len}")
    return np.asarray(tokens[: n * doc_len], np.int32).reshape(n, doc_len)


def features(executor, pathway: str, docs: np.ndarray, prefix: int, batch: int = 64) -> np.ndarray:
    """Mean-pooled last hidden states (before the head) of each document's first `prefix`
    tokens through a frozen pathway: what the router clusters, and all it sees of a prompt."""
    out = []
    for i in range(0, len(docs), batch):
        h = executor.forward(pathway, docs[i : i + batch, :prefix], head=False)
        out.append(np.asarray(h).mean(axis=1))
    return np.concatenate(out).astype(np.float32)


class Router:
    """k-means centroids over document features; a document goes to its nearest centroid's path.

    `fit(balanced=True)` assigns the training documents so that every path gets the same number
    (greedy by distance margin, as the paper balances its shards); `route` (inference, and any
    document not in the fit) picks the nearest centroid."""

    def __init__(self, centroids: np.ndarray, paths: list[str]):
        if len(centroids) != len(paths):
            raise ValueError(f"{len(centroids)} centroids for {len(paths)} paths")
        self.centroids, self.paths = np.asarray(centroids, np.float32), list(paths)

    @classmethod
    def fit(cls, feats: np.ndarray, paths: list[str], seed: int = 0, iters: int = 25):
        k = len(paths)
        if len(feats) < k:
            raise ValueError(f"{len(feats)} documents cannot fit {k} paths")
        rng = np.random.default_rng(seed)
        # k-means++ initialisation, then Lloyd iterations.
        centroids = [feats[rng.integers(len(feats))]]
        for _ in range(1, k):
            d = np.min(((feats[:, None] - np.array(centroids)[None]) ** 2).sum(-1), axis=1)
            centroids.append(feats[rng.choice(len(feats), p=d / d.sum())])
        c = np.array(centroids)
        for _ in range(iters):
            assign = _nearest(feats, c)
            for j in range(k):
                if np.any(assign == j):
                    c[j] = feats[assign == j].mean(axis=0)
        return cls(c, paths)

    def route(self, feats: np.ndarray) -> np.ndarray:
        return _nearest(feats, self.centroids)

    def assign_balanced(self, feats: np.ndarray) -> np.ndarray:
        """Each document's path with equal shares (the first len % k paths get one more):
        documents most sure of their nearest path choose first."""
        k, n = len(self.paths), len(feats)
        d = ((feats[:, None] - self.centroids[None]) ** 2).sum(-1)  # (N, k)
        capacity = np.full(k, n // k) + (np.arange(k) < n % k)
        order = np.argsort(np.sort(d, axis=1)[:, 1] - d.min(axis=1))[::-1]  # largest margin first
        out = np.full(n, -1)
        for i in order:
            for j in np.argsort(d[i]):
                if capacity[j]:
                    out[i], capacity[j] = j, capacity[j] - 1
                    break
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"paths": self.paths, "centroids": self.centroids.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Router:
        return cls(np.asarray(d["centroids"], np.float32), d["paths"])


def routed_loss(executor, paths: list[str], where: np.ndarray, inputs, targets):
    """Each row through the one path it is routed to (`where`: a path index per row): (the sum
    of the rows' mean token losses, rows per path)."""
    total, rows = 0.0, np.zeros(len(paths), int)
    for j, p in enumerate(paths):
        pick = where == j
        if pick.any():
            total += executor.loss(p, inputs[pick], targets[pick]) * int(pick.sum())
            rows[j] = int(pick.sum())
    return total, rows


def _nearest(feats, centroids) -> np.ndarray:
    return np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), axis=1)


# ---- training ---------------------------------------------------------------------------------
def simulate(
    executor: LocalExecutor,
    paths: list[str],
    train: TrainConfig,
    cfg: diloco.DiLoCoConfig,
    path_tokens: dict[str, np.ndarray],
    rounds: int,
) -> list[dict]:
    """`rounds` DiPaCo rounds, path workers one after another: each path takes H inner steps on
    batches of its own tokens (`path_tokens`: the concatenation of its documents), then each
    module an outer step on the mean pseudo-gradient of the paths that use it. Returns one record
    per round (each path's inner losses, and which paths each module averaged)."""
    tx = diloco.inner_optimizer(cfg.inner, train)
    workers = {p: diloco.InnerWorker(executor, p, tx) for p in paths}
    outer = diloco.OuterOptimizer(cfg)
    used_by = users(executor.spec, paths)
    params = {m: executor.state(m) for m in used_by}
    outer_state = {m: outer.init(p) for m, p in params.items()}
    inner_state = {p: w.init_opt() for p, w in workers.items()}
    history = []
    for r in range(rounds):
        grads: dict[str, list] = {m: [] for m in params}
        losses = {}
        for i, p in enumerate(paths):
            w = workers[p]
            first = r * cfg.inner_steps
            batches = (
                diloco.shard_batch(
                    path_tokens[p], i, first + h, train.batch_size, train.seq_len, train.seed
                )
                for h in range(cfg.inner_steps)
            )
            start = {m: params[m] for m in w.names}
            local, inner_state[p], losses[p] = w.train(start, inner_state[p], batches)
            for m in w.names:
                pg = diloco.pseudo_gradient(params[m], local[m])
                grads[m].append(diloco.decode(diloco.encode(pg, cfg.compress), cfg.compress, pg))
        for m in params:
            params[m], outer_state[m] = outer.step(params[m], outer_state[m], grads[m])
        history.append({"round": r + 1, "losses": losses, "averaged": used_by})
    for m, p in params.items():
        executor.set_state(m, p)
    return history
