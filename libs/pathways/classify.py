"""Classifying with a pathway in this process: images (or any input its first module reads) ->
class probabilities through every module's stateless step, with the pathway's attention mask."""

from __future__ import annotations

import functools

import jax
import numpy as np

from pathways.executor.local import LocalExecutor
from pathways.runtime import composite_forward


class Classifier:
    """A pathway that ends in a classification head, as one jitted program over its modules'
    current parameters (read on every call, so it follows training)."""

    def __init__(self, executor: LocalExecutor, pathway: str, batch_size: int = 256):
        p = executor.spec.pathway(pathway)
        self.chain = executor.chain(pathway)
        kind, self.n_classes = self.chain[-1].cfg.output_contract
        if kind != "classes":
            raise ValueError(
                f"pathway {pathway!r} ends in {self.chain[-1].name!r} "
                f"({self.chain[-1].kind}), which outputs {kind}, not classes"
            )
        self.batch_size = batch_size
        forward = functools.partial(composite_forward, self.chain, causal=p.causal)
        self._probs = jax.jit(lambda states, x: jax.nn.softmax(forward(states, x), axis=-1))

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """(N, classes) float32, computed in batches of `batch_size` (the last one padded, so
        one compiled program serves every call)."""
        states = [rt.state for rt in self.chain]
        out = []
        for i in range(0, len(inputs), self.batch_size):
            chunk = np.asarray(inputs[i : i + self.batch_size])
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self._probs(states, chunk))[: self.batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0, self.n_classes), np.float32)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """The most likely class of each input, (N,) int32."""
        return self.probabilities(inputs).argmax(-1).astype(np.int32)

    def accuracy(self, inputs: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(inputs) == np.asarray(labels)).mean())
