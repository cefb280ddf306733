"""Stateless inference on a pathway, the same in one process and through the services: an input
(an encoded image, a WAV, a text, a tensor) checked against what the pathway's first module
reads, every module's stateless step with the pathway's attention mask (`Executor.forward`),
and the head's result (class probabilities, a CTC transcript) or the pooled hidden state (an embedding).

The gateway's `Infer` runs this over a `RemoteExecutor`, `pathways classify --checkpoint` over a
`LocalExecutor`. Errors are `InferError`s whose message names the field and the values; their
`status` is the gRPC status name the gateway answers with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np

from pathways.executor.base import Executor
from pathways.spec import PathwaySpec

MAX_BATCH = 256  # inputs per request
HEAD, EMBEDDING = "head", "embedding"  # outputs (the name "embedding" is not the kind's)
OUTPUTS = (HEAD, EMBEDDING)
# What a pathway reads, by the request field that carries it (for choosing a pathway).
READS = {"image": "image", "wav": "audio", "text": "tokens"}


class InferError(ValueError):
    """A request that cannot run: the message names the field and the values."""

    status = "INVALID_ARGUMENT"


class UnknownPathway(InferError):
    status = "NOT_FOUND"


class WrongPathway(InferError):
    """The pathway exists but does not compute what was asked (a text pathway asked to
    classify, an image pathway asked to generate)."""

    status = "FAILED_PRECONDITION"


@dataclasses.dataclass(frozen=True)
class Result:
    """One request's result: exactly one of the fields is set (by `kind`)."""

    pathway: str
    kind: str  # "classification", "transcript", "embedding" or "actions"
    classes: list[list[int]] | None = None  # per input, most likely first
    probabilities: list[list[float]] | None = None  # the same order
    texts: list[str] | None = None
    embedding: np.ndarray | None = None  # (B, d_model) float32
    actions: list | None = None  # per input: an int (discrete) or a float32 vector
    discrete: bool = False  # with actions: whether the head chooses among actions
    values: np.ndarray | None = None  # with actions: the head's outputs (B, A)
    step: int = 0  # in an episode: its steps so far, this one included
    session_id: str = ""  # the episode (empty outside one)
    prompt_tokens: int = 0  # token-id inputs: how many, summed over the batch (usage)


def generation_error(spec: PathwaySpec, pathway: str) -> str | None:
    """Why `pathway` cannot generate text (None when it can): generation needs tokens in and
    next-token logits out."""
    p = spec.pathway(pathway)
    first, last = spec.modules[p.modules[0]], spec.modules[p.modules[-1]]
    reads, outputs = first.input_contract[0], last.output_contract[0]
    if reads == "tokens" and outputs == "logits":
        return None
    return (
        f"pathway {pathway!r} reads {reads} ({p.modules[0]!r}, {first.kind}) and outputs "
        f"{outputs} ({p.modules[-1]!r}, {last.kind}): only a pathway from tokens to next-token "
        "logits generates text; use Infer (`pathways classify` / `transcribe`) for this one"
    )


def choose_pathway(spec: PathwaySpec, served: Collection[str], name: str, field: str) -> str:
    """The pathway a request runs: `name`, or when empty the first served pathway whose first
    module reads what `field` carries (a tensor: the spec's default pathway)."""
    if name:
        if name not in served:
            known = ", ".join(p for p in spec.pathways if p in served)
            raise UnknownPathway(f"unknown pathway {name!r}; served: {known}")
        return name
    if field not in READS:
        default = spec.default_pathway
        if default not in served:
            raise UnknownPathway(f"the default pathway {default!r} is not served; name one")
        return default
    for p in spec.pathways.values():
        if p.name in served and spec.modules[p.modules[0]].input_contract[0] == READS[field]:
            return p.name
    raise UnknownPathway(f"{field}: no served pathway reads {READS[field]} input; name one")


def decode_image(data: bytes, cfg) -> np.ndarray:
    """A PNG or JPEG as (1, H, W, C) float32 in [0, 1] (8-bit values / 255, 16-bit / 65535),
    refused unless its size and channels are the image embedding's `cfg`."""
    import imageio.v3 as iio  # pillow's codecs

    if not data:
        raise InferError("image: empty (expected the bytes of a PNG or JPEG file)")
    data = bytes(data)
    if not data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
        raise InferError(
            f"image: not a readable PNG or JPEG ({len(data)} bytes starting {data[:8]!r})"
        )
    try:
        pixels = np.asarray(iio.imread(data, plugin="pillow"))
    except Exception as e:  # noqa: BLE001 - any decoder failure is the caller's bytes
        raise InferError(f"image: not a readable PNG or JPEG ({len(data)} bytes): {e}") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise InferError(f"image: expected one still image; got an array of shape {pixels.shape}")
    h, w, c = pixels.shape
    if (h, w) != (cfg.image_size, cfg.image_size):
        raise InferError(
            f"image: {w}x{h} pixels, but the pathway reads {cfg.image_size}x{cfg.image_size} "
            "(image_embedding image_size; images are not resized)"
        )
    if c != cfg.channels:
        raise InferError(
            f"image: {c} channel(s), but the pathway reads {cfg.channels} (image_embedding "
            "channels; 1 is grayscale, 3 RGB: convert the image first)"
        )
    if pixels.dtype == np.uint8:
        scale = 255.0
    elif pixels.dtype == np.uint16:
        scale = 65535.0
    else:
        raise InferError(f"image: pixels of type {pixels.dtype}; expected 8 or 16 bits")
    return (pixels.astype(np.float32) / scale)[None]


def decode_wav(data: bytes, cfg) -> np.ndarray:
    """A WAV file (mono; PCM 8/16/32-bit or float 32-bit, `audio.decode_wav`) at the audio
    embedding's sample rate as (1, N) float32 in [-1, 1]; refused with the field and values
    named otherwise (nothing is resampled or mixed down)."""
    from pathways import audio

    if not data:
        raise InferError("wav: empty (expected the bytes of a WAV file)")
    try:
        samples, rate = audio.decode_wav(bytes(data))
    except ValueError as e:  # names the header, channels or sample format
        raise InferError(f"wav: {e}") from None
    if rate != cfg.sample_rate:
        raise InferError(
            f"wav: sample rate {rate} Hz, but the pathway reads {cfg.sample_rate} Hz "
            "(audio_embedding sample_rate; audio is not resampled)"
        )
    return samples[None]


def check_inputs(x: np.ndarray, spec: PathwaySpec, pathway: str, field: str = "tensor"):
    """`x` as the pathway's first module reads it, batch first, else InferError naming `field`,
    the shape or dtype it has and the one the module wants."""
    p = spec.pathway(pathway)
    name = p.modules[0]
    cfg = spec.modules[name]
    reads, size = cfg.input_contract
    where = f"module {name!r} ({cfg.kind})"
    x = np.asarray(x)
    if x.ndim == 0 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise InferError(
            f"{field}: a batch of 1 to {MAX_BATCH} inputs (first axis) is needed; got shape "
            f"{list(x.shape)}"
        )
    if reads == "tokens":
        if x.dtype != np.int32 or x.ndim != 2:
            raise InferError(
                f"{field}: {where} reads int32 tokens of shape (B, T); got {x.dtype} "
                f"{list(x.shape)}"
            )
        if not 1 <= x.shape[1] <= p.max_seq_len:
            raise InferError(
                f"{field}: {x.shape[1]} tokens; pathway {pathway!r} takes 1 to {p.max_seq_len}"
            )
        bad = x[(x < 0) | (x >= size)]
        if bad.size:
            raise InferError(f"{field}: token id {int(bad[0])} outside [0, {size}) ({where})")
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise InferError(f"{field}: {where} reads float32 {reads}; got {x.dtype}")
    x = x.astype(np.float32)
    if reads == "image":
        want = (cfg.image_size, cfg.image_size, cfg.channels)
        if x.shape[1:] != want:
            raise InferError(
                f"{field}: {where} reads images of shape (B, {', '.join(map(str, want))}); "
                f"got {list(x.shape)}"
            )
    elif reads == "audio":
        least = cfg.win_length  # one log-mel frame
        if x.ndim != 2 or not least <= x.shape[1] <= cfg.max_samples:
            raise InferError(
                f"{field}: {where} reads waveforms of shape (B, N) with {least} <= N <= "
                f"{cfg.max_samples} samples ({cfg.max_samples / cfg.sample_rate:.2f} s at "
                f"{cfg.sample_rate} Hz); got {list(x.shape)}"
            )
        if np.isfinite(x).all():  # zero-padded to max_samples, as in training (one program)
            x = np.pad(x, ((0, 0), (0, cfg.max_samples - x.shape[1])))
    elif reads == "observation":
        if x.ndim != 3 or x.shape[2] != size or not 1 <= x.shape[1] <= p.max_seq_len:
            raise InferError(
                f"{field}: {where} reads windows of observations of shape (B, T <= "
                f"{p.max_seq_len}, {size}); got {list(x.shape)} (one observation of an "
                "episode: start_session / session_id)"
            )
    elif reads == "hidden":
        if x.ndim != 3 or x.shape[2] != size or not 1 <= x.shape[1] <= p.max_seq_len:
            raise InferError(
                f"{field}: {where} reads activations of shape (B, T <= {p.max_seq_len}, "
                f"{size}); got {list(x.shape)}"
            )
    if not np.isfinite(x).all():
        raise InferError(f"{field}: has NaN or infinite values")
    return x


def check_observation(x, spec: PathwaySpec, pathway: str, field: str = "tensor") -> np.ndarray:
    """One step's observation of an episode on `pathway` as float32 (obs_dim,) (given as
    (obs_dim,) or (1, obs_dim)), else InferError naming `field`, what it got and what the
    pathway's observation embedding reads."""
    name = spec.pathway(pathway).modules[0]
    cfg = spec.modules[name]
    reads, size = cfg.input_contract
    if reads != "observation":
        raise WrongPathway(
            f"pathway {pathway!r} reads {reads} ({name!r}, {cfg.kind}): only a pathway from "
            "observations to actions runs episodes (session_id / start_session)"
        )
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise InferError(f"{field}: module {name!r} reads float32 observations; got {x.dtype}")
    if x.shape not in ((size,), (1, size)):
        raise InferError(
            f"{field}: one observation of shape ({size},) for pathway {pathway!r} "
            f"({name!r} obs_dim); got {list(x.shape)}"
        )
    x = x.reshape(size).astype(np.float32)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x))[0])
        raise InferError(f"{field}: has NaN or infinite values (first at index {bad})")
    return x


def acting_pathway(spec: PathwaySpec, served: Collection[str], name: str, obs_dim: int) -> str:
    """The pathway an episode runs on: `name`, or when empty the first served pathway that
    reads observations of `obs_dim` values and ends in an action head."""
    if name:
        return choose_pathway(spec, served, name, "tensor")
    for p in spec.pathways.values():
        first, last = spec.modules[p.modules[0]], spec.modules[p.modules[-1]]
        if (
            p.name in served
            and first.input_contract == ("observation", obs_dim)
            and last.output_contract[0] == "actions"
        ):
            return p.name
    raise UnknownPathway(
        f"tensor: no served pathway acts on observations of {obs_dim} values; name one"
    )


def prepare(
    spec: PathwaySpec, served: Collection[str], pathway: str, field: str, value, tokenizer=None
) -> tuple[str, np.ndarray]:
    """(the pathway to run, its checked inputs) for a request carrying `value` in `field`:
    "image" (PNG/JPEG bytes), "wav" (WAV bytes), "text" (a string; needs the tokenizer) or
    "tensor" (an array)."""
    name = choose_pathway(spec, served, pathway, field)
    first_name = spec.pathway(name).modules[0]
    first = spec.modules[first_name]
    reads = first.input_contract[0]
    if field in READS and READS[field] != reads:
        raise WrongPathway(
            f"{field}: pathway {name!r} reads {reads} ({first_name!r}, {first.kind}), "
            f"not {READS[field]}"
        )
    if field == "image":
        x = decode_image(value, first)
    elif field == "wav":
        x = decode_wav(value, first)
    elif field == "text":
        ids = tokenizer.encode(value) if value else []
        if not ids:
            raise InferError("text: empty")
        x = np.asarray([ids], np.int32)
    else:
        x = np.asarray(value)
    return name, check_inputs(x, spec, name, field)


def token_count(inputs: np.ndarray) -> int:
    """Tokens in checked inputs: (B, T) token ids count B x T; other inputs (images, waveforms,
    observations, activations: floating point) count 0."""
    x = np.asarray(inputs)
    return int(x.size) if np.issubdtype(x.dtype, np.integer) else 0


def run(
    executor: Executor, pathway: str, inputs: np.ndarray, output: str = "head", top_k: int = 0
) -> Result:
    """Checked inputs (`check_inputs`) through the pathway: the head's result, or with
    `output="embedding"` the last hidden state before the head, mean-pooled over positions."""
    spec = executor.spec
    if output not in OUTPUTS:
        raise InferError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
    if top_k < 0:
        raise InferError(f"top_k must be >= 0 (0: every class); got {top_k}")
    p = spec.pathway(pathway)
    if output == EMBEDDING:
        if len(p.modules) < 2:
            raise WrongPathway(f"pathway {pathway!r} has no modules before its head")
        hidden = executor.forward(pathway, inputs, head=False)  # (B, T, D)
        return Result(
            pathway,
            "embedding",
            embedding=hidden.mean(axis=1).astype(np.float32),
            prompt_tokens=token_count(inputs),
        )
    head = spec.modules[p.modules[-1]]
    outputs = head.output_contract[0]
    if outputs == "characters":  # a CTC head: greedy decoding of each input's frames
        from pathways.modules.ctc import greedy_decode

        scores = np.asarray(executor.forward(pathway, inputs), np.float64)  # (B, T, symbols)
        texts = [head.decode(greedy_decode(s)) for s in scores]
        return Result(pathway, "transcript", texts=texts)
    if outputs == "actions":  # a policy: the action at each window's last step
        from pathways.modules.action import choose

        out = np.asarray(executor.forward(pathway, inputs))[:, -1]  # (B, A)
        discrete = getattr(head, "space", "discrete") == "discrete"
        return Result(
            pathway,
            "actions",
            actions=[choose(o, discrete) for o in out],
            discrete=discrete,
            values=out,
        )
    if outputs != "classes":
        raise WrongPathway(
            f"pathway {pathway!r} ends in {p.modules[-1]!r} ({head.kind}), which outputs "
            f"{outputs}, not classes: "
            + (
                "use Generate for text, or output embedding"
                if outputs == "logits"
                else "it has no stateless result; ask for output embedding"
            )
        )
    logits = np.asarray(executor.forward(pathway, inputs), np.float64)  # (B, classes)
    z = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (z / z.sum(-1, keepdims=True)).astype(np.float32)
    k = probs.shape[1] if top_k == 0 else min(top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return Result(
        pathway,
        "classification",
        classes=order.astype(int).tolist(),
        probabilities=np.take_along_axis(probs, order, 1).tolist(),
    )
