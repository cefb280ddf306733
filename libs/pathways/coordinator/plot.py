"""Loss-curve PNG from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: str | Path, png: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, evals = [], [], []
    for line in Path(metrics).read_text().splitlines():
        rec = json.loads(line)
        steps.append(rec["step"])
        losses.append(rec["loss"])
        if "eval_loss" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=1, alpha=0.8, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", lw=1.5, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
