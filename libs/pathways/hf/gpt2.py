"""GPT-2 (`GPT2LMHeadModel`): config and tensor names <-> Pathways module configs and parameters.

HF GPT-2 uses Conv1D layers whose weights are stored (in, out), the layout of an nnx.Linear kernel,
so nothing is transposed; the fused `c_attn` (D, 3D) is split into q, k, v along its output axis.
"""

from __future__ import annotations

import numpy as np

from pathways.hf.files import ConfigReader, HfFormatError, Tensors
from pathways.modules import AttentionConfig, DecodingConfig, EmbeddingConfig

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
# Both spell the tanh approximation jax.nn.gelu(approximate=True) computes.
_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Causal-mask buffers that older GPT-2 files carry; they are not parameters.
IGNORED = (".attn.bias", ".attn.masked_bias")


def configs(cr: ConfigReader) -> tuple[EmbeddingConfig, AttentionConfig, DecodingConfig, bool]:
    """Module configs (one attention module with every layer) and whether the head is tied."""
    d, vocab = cr.get("n_embd", int, positive=True), cr.get("vocab_size", int, positive=True)
    n_pos = cr.get("n_positions", int, positive=True)
    act = cr.get("activation_function", str, "gelu_new")
    if act not in _GELUS:
        raise HfFormatError(
            f"{cr.path}: field 'activation_function' must be one of "
            f"{', '.join(_GELUS)}, got {act!r}"
        )
    for name, unsupported in (
        ("scale_attn_by_inverse_layer_idx", True),
        ("scale_attn_weights", False),
    ):
        if cr.get(name, bool, not unsupported) == unsupported:
            raise HfFormatError(f"{cr.path}: field {name!r} = {unsupported} is not supported")
    eps = cr.get("layer_norm_epsilon", float, 1e-5, positive=True)
    n_heads = cr.get("n_head", int, positive=True)
    if d % n_heads:
        raise HfFormatError(f"{cr.path}: field 'n_head' ({n_heads}) must divide 'n_embd' ({d})")
    emb = EmbeddingConfig(vocab_size=vocab, d_model=d, max_seq_len=n_pos, positions="learned")
    attn = AttentionConfig(
        d_model=d,
        n_layers=cr.get("n_layer", int, positive=True),
        n_heads=n_heads,
        max_seq_len=n_pos,
        d_ff=cr.get("n_inner", int, None, positive=True),
        norm="layernorm",
        norm_eps=eps,
        mlp="gelu",
        positions="none",
        bias=True,
    )
    dec = DecodingConfig(d_model=d, vocab_size=vocab, norm="layernorm", norm_eps=eps, bias=False)
    return emb, attn, dec, cr.get("tie_word_embeddings", bool, True)


def _prefix(t: Tensors) -> str:
    return "transformer." if "transformer.wte.weight" in t else ""


def read(t: Tensors, emb: EmbeddingConfig, attn: AttentionConfig, dec: DecodingConfig, tied: bool):
    """Returns (embedding params, [per-layer block params], decoding params) as nested dicts."""
    p, d, f, v = _prefix(t), attn.d_model, attn.ff_dim, emb.vocab_size
    wte = t.get(f"{p}wte.weight", (v, d))
    emb_p = {
        "tokens": {"embedding": wte},
        "positions": {"embedding": t.get(f"{p}wpe.weight", (emb.max_seq_len, d))},
    }
    layers = []
    for i in range(attn.n_layers):
        h = f"{p}h.{i}."
        qkv_w = t.get(h + "attn.c_attn.weight", (d, 3 * d))
        qkv_b = t.get(h + "attn.c_attn.bias", (3 * d,))
        layer = {
            "norm1": {
                "scale": t.get(h + "ln_1.weight", (d,)),
                "bias": t.get(h + "ln_1.bias", (d,)),
            },
            "o": {
                "kernel": t.get(h + "attn.c_proj.weight", (d, d)),
                "bias": t.get(h + "attn.c_proj.bias", (d,)),
            },
            "norm2": {
                "scale": t.get(h + "ln_2.weight", (d,)),
                "bias": t.get(h + "ln_2.bias", (d,)),
            },
            "mlp": {
                "fc": {
                    "kernel": t.get(h + "mlp.c_fc.weight", (d, f)),
                    "bias": t.get(h + "mlp.c_fc.bias", (f,)),
                },
                "down": {
                    "kernel": t.get(h + "mlp.c_proj.weight", (f, d)),
                    "bias": t.get(h + "mlp.c_proj.bias", (d,)),
                },
            },
        }
        for j, name in enumerate("qkv"):
            layer[name] = {
                "kernel": qkv_w[:, j * d : (j + 1) * d],
                "bias": qkv_b[j * d : (j + 1) * d],
            }
        layers.append(layer)
    head = wte if tied else t.get("lm_head.weight", (v, d))
    if tied and "lm_head.weight" in t:
        t.get("lm_head.weight", (v, d))  # a redundant copy: HF ties it to wte when loading
    dec_p = {
        "norm": {"scale": t.get(f"{p}ln_f.weight", (d,)), "bias": t.get(f"{p}ln_f.bias", (d,))},
        "head": {"kernel": np.ascontiguousarray(head.T)},
    }
    return emb_p, layers, dec_p


def write(emb_p, layers, dec_p, tied: bool) -> dict[str, np.ndarray]:
    """The inverse of `read`: HF tensor names (GPT2LMHeadModel's `transformer.` prefix)."""
    p = "transformer."
    out = {
        f"{p}wte.weight": emb_p["tokens"]["embedding"],
        f"{p}wpe.weight": emb_p["positions"]["embedding"],
        f"{p}ln_f.weight": dec_p["norm"]["scale"],
        f"{p}ln_f.bias": dec_p["norm"]["bias"],
    }
    for i, layer in enumerate(layers):
        h = f"{p}h.{i}."
        out[h + "attn.c_attn.weight"] = np.concatenate([layer[n]["kernel"] for n in "qkv"], axis=1)
        out[h + "attn.c_attn.bias"] = np.concatenate([layer[n]["bias"] for n in "qkv"])
        out[h + "attn.c_proj.weight"], out[h + "attn.c_proj.bias"] = (
            layer["o"]["kernel"],
            layer["o"]["bias"],
        )
        for ln, key in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[h + f"{ln}.weight"], out[h + f"{ln}.bias"] = layer[key]["scale"], layer[key]["bias"]
        for hf, key in (("c_fc", "fc"), ("c_proj", "down")):
            out[h + f"mlp.{hf}.weight"] = layer["mlp"][key]["kernel"]
            out[h + f"mlp.{hf}.bias"] = layer["mlp"][key]["bias"]
    if not tied:
        out["lm_head.weight"] = dec_p["head"]["kernel"].T
    return out


def hf_config(
    emb: EmbeddingConfig, attn: AttentionConfig, n_layers: int, tied: bool, base: dict
) -> dict:
    """config.json: `base` (the imported one, or {}) with the structural fields set."""
    return {
        **base,
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "vocab_size": emb.vocab_size,
        "n_positions": emb.max_seq_len,
        "n_embd": attn.d_model,
        "n_layer": n_layers,
        "n_head": attn.n_heads,
        "n_inner": attn.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": attn.norm_eps,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "tie_word_embeddings": tied,
    }


def matches(emb: EmbeddingConfig, attn: AttentionConfig, dec: DecodingConfig) -> str | None:
    """Why these module configs are not GPT-2 (None when they are)."""
    want = {
        "embedding positions": (emb.positions, "learned"),
        "attention norm": (attn.norm, "layernorm"),
        "attention mlp": (attn.mlp, "gelu"),
        "attention positions": (attn.positions, "none"),
        "attention bias": (attn.bias, True),
        "attention n_kv_heads": (attn.kv_heads, attn.n_heads),
        "decoding norm": (dec.norm, "layernorm"),
        "decoding bias": (dec.bias, False),
        "norm_eps": (dec.norm_eps, attn.norm_eps),
    }
    bad = [f"{k} is {v!r} (GPT-2 needs {w!r})" for k, (v, w) in want.items() if v != w]
    return "; ".join(bad) or None
