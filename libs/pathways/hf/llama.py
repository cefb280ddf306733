"""Llama (`LlamaForCausalLM`): config and tensor names <-> Pathways module configs and parameters.

HF Llama uses nn.Linear weights stored (out, in): they are transposed into nnx.Linear kernels
(in, out). Its q/k projections are already in the half-split RoPE layout (`rotate_half`) that
`layers.rope` uses, and `repeat_kv` groups query heads the way `layers.attend` does.
"""

from __future__ import annotations

import numpy as np

from pathways.hf.files import ConfigReader, HfFormatError, Tensors
from pathways.modules import AttentionConfig, DecodingConfig, EmbeddingConfig

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
# Precomputed rotary tables some older files carry; they are recomputed, not parameters.
IGNORED = (".rotary_emb.inv_freq",)


def _rope_theta(cr: ConfigReader) -> float:
    """rope_theta, from the top level (transformers 4) or `rope_parameters` (transformers 5)."""
    scaling = cr.data.get("rope_scaling")
    if scaling not in (None, {}) and not (
        isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"
    ):
        raise HfFormatError(
            f"{cr.path}: field 'rope_scaling' = {scaling!r} is not supported (only plain RoPE)"
        )
    params = cr.data.get("rope_parameters")
    if params is None:
        return cr.get("rope_theta", float, 10000.0, positive=True)
    if not isinstance(params, dict):
        raise HfFormatError(f"{cr.path}: field 'rope_parameters' must be an object, got {params!r}")
    if params.get("rope_type", "default") != "default":
        raise HfFormatError(
            f"{cr.path}: field 'rope_parameters.rope_type' = "
            f"{params['rope_type']!r} is not supported (only 'default')"
        )
    inner = ConfigReader(params, f"{cr.path} (rope_parameters)")
    return inner.get("rope_theta", float, cr.get("rope_theta", float, 10000.0), positive=True)


def configs(cr: ConfigReader) -> tuple[EmbeddingConfig, AttentionConfig, DecodingConfig, bool]:
    """Module configs (one attention module with every layer) and whether the head is tied."""
    d, vocab = cr.get("hidden_size", int, positive=True), cr.get("vocab_size", int, positive=True)
    n_heads = cr.get("num_attention_heads", int, positive=True)
    n_kv = cr.get("num_key_value_heads", int, n_heads, positive=True)
    if d % n_heads:
        raise HfFormatError(
            f"{cr.path}: field 'num_attention_heads' ({n_heads}) must divide "
            f"'hidden_size' ({d})"
        )
    if n_heads % n_kv:
        raise HfFormatError(
            f"{cr.path}: field 'num_key_value_heads' ({n_kv}) must divide "
            f"'num_attention_heads' ({n_heads})"
        )
    head_dim = cr.get("head_dim", int, d // n_heads, positive=True)
    if head_dim != d // n_heads:
        raise HfFormatError(
            f"{cr.path}: field 'head_dim' = {head_dim} is not supported "
            f"(must equal hidden_size / num_attention_heads = {d // n_heads})"
        )
    act = cr.get("hidden_act", str, "silu")
    if act != "silu":
        raise HfFormatError(f"{cr.path}: field 'hidden_act' must be 'silu', got {act!r}")
    attn_bias, mlp_bias = cr.get("attention_bias", bool, False), cr.get("mlp_bias", bool, False)
    if attn_bias != mlp_bias:
        raise HfFormatError(
            f"{cr.path}: fields 'attention_bias' ({attn_bias}) and 'mlp_bias' "
            f"({mlp_bias}) must be equal (one bias option per module)"
        )
    max_len = cr.get("max_position_embeddings", int, positive=True)
    eps = cr.get("rms_norm_eps", float, 1e-6, positive=True)
    emb = EmbeddingConfig(vocab_size=vocab, d_model=d, max_seq_len=max_len, positions="none")
    attn = AttentionConfig(
        d_model=d,
        n_layers=cr.get("num_hidden_layers", int, positive=True),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        max_seq_len=max_len,
        d_ff=cr.get("intermediate_size", int, positive=True),
        norm="rmsnorm",
        norm_eps=eps,
        mlp="swiglu",
        positions="rope",
        rope_theta=_rope_theta(cr),
        bias=attn_bias,
    )
    dec = DecodingConfig(d_model=d, vocab_size=vocab, norm="rmsnorm", norm_eps=eps, bias=False)
    return emb, attn, dec, cr.get("tie_word_embeddings", bool, False)


_LINEARS = (
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
)
_MLP = (("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))


def _linear(t: Tensors, name: str, d_in: int, d_out: int, bias: bool) -> dict:
    p = {"kernel": np.ascontiguousarray(t.get(name + ".weight", (d_out, d_in)).T)}
    if bias:
        p["bias"] = t.get(name + ".bias", (d_out,))
    return p


def _shapes(attn: AttentionConfig) -> dict[str, tuple[int, int]]:
    d, kv, f = attn.d_model, attn.kv_heads * attn.head_dim, attn.ff_dim
    return {
        "q": (d, d),
        "k": (d, kv),
        "v": (d, kv),
        "o": (d, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }


def read(t: Tensors, emb: EmbeddingConfig, attn: AttentionConfig, dec: DecodingConfig, tied: bool):
    """Returns (embedding params, [per-layer block params], decoding params) as nested dicts."""
    d, v, shapes = attn.d_model, emb.vocab_size, _shapes(attn)
    embed = t.get("model.embed_tokens.weight", (v, d))
    layers = []
    for i in range(attn.n_layers):
        h = f"model.layers.{i}."
        layer = {
            "norm1": {"scale": t.get(h + "input_layernorm.weight", (d,))},
            "norm2": {"scale": t.get(h + "post_attention_layernorm.weight", (d,))},
            "mlp": {},
        }
        for key, hf in _LINEARS:
            layer[key] = _linear(t, h + hf, *shapes[key], attn.bias)
        for key, hf in _MLP:
            layer["mlp"][key] = _linear(t, h + hf, *shapes[key], attn.bias)
        layers.append(layer)
    head = embed if tied else t.get("lm_head.weight", (v, d))
    if tied and "lm_head.weight" in t:
        t.get("lm_head.weight", (v, d))  # a redundant copy: HF ties it to embed_tokens
    dec_p = {
        "norm": {"scale": t.get("model.norm.weight", (d,))},
        "head": {"kernel": np.ascontiguousarray(head.T)},
    }
    return {"tokens": {"embedding": embed}}, layers, dec_p


def write(emb_p, layers, dec_p, tied: bool) -> dict[str, np.ndarray]:
    """The inverse of `read`."""
    out = {
        "model.embed_tokens.weight": emb_p["tokens"]["embedding"],
        "model.norm.weight": dec_p["norm"]["scale"],
    }
    for i, layer in enumerate(layers):
        h = f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = layer["norm1"]["scale"]
        out[h + "post_attention_layernorm.weight"] = layer["norm2"]["scale"]
        for key, hf in _LINEARS + _MLP:
            p = layer["mlp"][key] if key in ("gate", "up", "down") else layer[key]
            out[h + hf + ".weight"] = p["kernel"].T
            if "bias" in p:
                out[h + hf + ".bias"] = p["bias"]
    if not tied:
        out["lm_head.weight"] = dec_p["head"]["kernel"].T
    return out


def hf_config(
    emb: EmbeddingConfig, attn: AttentionConfig, n_layers: int, tied: bool, base: dict
) -> dict:
    """config.json: `base` (the imported one, or {}) with the structural fields set."""
    out = {
        **base,
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "vocab_size": emb.vocab_size,
        "hidden_size": attn.d_model,
        "intermediate_size": attn.ff_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.kv_heads,
        "head_dim": attn.head_dim,
        "rms_norm_eps": attn.norm_eps,
        "hidden_act": "silu",
        "attention_bias": attn.bias,
        "mlp_bias": attn.bias,
        "tie_word_embeddings": tied,
        # An import may cap max_seq_len to bound the KV cache; the model's own limit stays.
        "max_position_embeddings": base.get("max_position_embeddings", attn.max_seq_len),
    }
    if isinstance(base.get("rope_parameters"), dict):  # transformers 5 keeps rope_theta there
        out["rope_parameters"] = {**base["rope_parameters"], "rope_theta": attn.rope_theta}
    else:
        out["rope_theta"] = attn.rope_theta
    return out


def matches(emb: EmbeddingConfig, attn: AttentionConfig, dec: DecodingConfig) -> str | None:
    """Why these module configs are not Llama (None when they are)."""
    want = {
        "embedding positions": (emb.positions, "none"),
        "attention norm": (attn.norm, "rmsnorm"),
        "attention mlp": (attn.mlp, "swiglu"),
        "attention positions": (attn.positions, "rope"),
        "decoding norm": (dec.norm, "rmsnorm"),
        "decoding bias": (dec.bias, False),
        "norm_eps": (dec.norm_eps, attn.norm_eps),
    }
    bad = [f"{k} is {v!r} (Llama needs {w!r})" for k, (v, w) in want.items() if v != w]
    return "; ".join(bad) or None
