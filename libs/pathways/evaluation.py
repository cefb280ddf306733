"""End-to-end evaluation of a pathway: mean eval cross-entropy and perplexity on held-out batches."""

from __future__ import annotations

import math

import numpy as np

from pathways.data import TokenData
from pathways.executor.local import LocalExecutor


def eval_loss(
    executor: LocalExecutor,
    pathway: str,
    data: TokenData,
    *,
    batch_size: int = 8,
    seq_len: int = 64,
    batches: int = 4,
    seed: int = 0,
) -> float:
    """Mean token cross-entropy (nats) of `pathway` over `batches` deterministic eval batches.

    The batches depend only on (data, batch_size, seq_len, seed), so two pathways evaluated with
    the same arguments see exactly the same tokens.
    """
    losses = [
        executor.loss(pathway, *data.batch(i, batch_size, seq_len, seed, split="eval"))
        for i in range(batches)
    ]
    return float(np.mean(losses))


def report(loss: float) -> dict[str, float]:
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 80.0))}
