"""Batched generation over any executor: prefill, then decode steps until every row is done."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from pathways import infer
from pathways.executor.base import Executor
from pathways.sampling import SamplingParams
from pathways.stops import StopMatcher
from pathways.tokenizers import StreamDecoder, Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row; `text` is the printable piece it completes (may be "")."""

    row: int
    token_id: int
    text: str
    finished: str | None = None  # "stop", "eos" or "length" on the row's last event


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str


def stream(
    executor: Executor,
    pathway: str,
    prompts: list[str],
    tokenizer: Tokenizer,
    params: SamplingParams | list[SamplingParams],
) -> Iterator[TokenEvent]:
    """Yields tokens as they are generated, for a batch of text prompts."""
    why = infer.generation_error(executor.spec, pathway)
    if why:  # an image or audio pathway: nothing to sample tokens from
        raise ValueError(why)
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling settings for {len(prompts)} prompts")
    ids = [tokenizer.encode(p) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            # An empty prompt starts from end-of-text, as a document boundary would.
            ids[i] = [tokenizer.eos_id if tokenizer.eos_id >= 0 else 0]
    limit = executor.spec.pathway(pathway).max_seq_len
    for i, (p, sp) in enumerate(zip(ids, params)):
        if len(p) + sp.max_new_tokens > limit:
            raise ValueError(
                f"max sequence length exceeded: prompt {i} has {len(p)} tokens + "
                f"max_new_tokens {sp.max_new_tokens} > {limit} for pathway {pathway!r}"
            )
    # Rows decode in lockstep: a finished row keeps taking cache positions until the batch's
    # longest row is done. Refuse up front what would otherwise fail halfway through the stream.
    steps = max(sp.max_new_tokens for sp in params) - 1
    for i, p in enumerate(ids):
        if len(p) + steps > limit:
            raise ValueError(
                f"max sequence length exceeded: prompt {i} has {len(p)} tokens + "
                f"{steps} lockstep decode steps (the batch's largest max_new_tokens "
                f"is {steps + 1}) > {limit} for pathway {pathway!r}; generate it in "
                f"a separate batch"
            )
    session = executor.open_session(pathway, params)
    try:
        yield from _drive(executor, session, ids, tokenizer, params)
    finally:
        executor.close_session(session)


def _drive(executor, session, ids, tokenizer, params) -> Iterator[TokenEvent]:
    b = len(ids)
    decoders = [StreamDecoder(tokenizer) for _ in range(b)]
    stops = [StopMatcher(p.stop) for p in params]  # each new character read once
    texts = [""] * b
    shown = [0] * b  # characters of texts[i] already yielded
    done = [p.max_new_tokens == 0 for p in params]
    for i in range(b):
        if done[i]:
            yield TokenEvent(i, -1, "", finished="length")
    if all(done):
        return
    result = executor.prefill(session, ids)
    produced = 1
    while True:
        for i in range(b):
            if done[i]:
                continue
            tok = int(result.tokens[i])
            reason = None
            if tok == tokenizer.eos_id:
                new = decoders[i].flush()
                reason = "eos"
            else:
                new = decoders[i].push(tok)
            texts[i] += new
            hit = stops[i].feed(new)
            if hit is not None:
                texts[i] = texts[i][:hit]  # drop the stop sequence and anything after it
                reason = "stop"
            elif reason is None and produced >= params[i].max_new_tokens:
                texts[i] += decoders[i].flush()
                reason = "length"
            # A tail that may be the start of a stop sequence is held back until it is decided,
            # so what was yielded never has to be taken back.
            end = len(texts[i]) if reason else len(texts[i]) - stops[i].held
            piece, shown[i] = texts[i][shown[i] : end], max(shown[i], end)
            done[i] = reason is not None
            yield TokenEvent(i, tok, piece, finished=reason)
        if all(done):
            return
        result = executor.decode(session, result.tokens)
        produced += 1


def generate(
    executor: Executor,
    pathway: str,
    prompts: list[str],
    tokenizer: Tokenizer,
    params: SamplingParams | list[SamplingParams],
) -> list[Completion]:
    """Runs `stream` to the end and collects one completion per prompt."""
    b = len(prompts)
    texts, toks, reasons = [""] * b, [[] for _ in range(b)], ["length"] * b
    for ev in stream(executor, pathway, prompts, tokenizer, params):
        texts[ev.row] += ev.text
        if ev.token_id >= 0:
            toks[ev.row].append(ev.token_id)
        if ev.finished:
            reasons[ev.row] = ev.finished
    return [Completion(t, k, r) for t, k, r in zip(texts, toks, reasons)]


def greedy_ids(executor: Executor, pathway: str, prompt_ids: list[int], n: int) -> np.ndarray:
    """Token ids of a greedy continuation (no tokenizer): the reference for parity tests."""
    session = executor.open_session(pathway, [SamplingParams(max_new_tokens=n)])
    try:
        out = [int(executor.prefill(session, [prompt_ids]).tokens[0])]
        while len(out) < n:
            out.append(int(executor.decode(session, np.array(out[-1:])).tokens[0]))
        return np.array(out, np.int32)
    finally:
        executor.close_session(session)
