"""Fixtures for the model tests: an independent float64 NumPy Llama forward (written from the Hugging Face
modelling code's equations, not from tessera_cp), and a checkpoint writer that uses the `safetensors` package."""
import json
import math
import types

import ml_dtypes
import numpy
import pytest

BF16 = ml_dtypes.bfloat16

# A small Llama with GQA (4 query heads over 2 KV heads, head_dim 12): fast on the CPU.
SMALL = {"model_type": "llama", "vocab_size": 61, "hidden_size": 48, "intermediate_size": 80,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "max_position_embeddings": 32, "tie_word_embeddings": False,
         "bos_token_id": 1, "eos_token_id": 2}


def tensor_names(cfg):
    """Hugging Face names and shapes of a Llama checkpoint, written out here by hand."""
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // Hq
    qkv_bias = cfg.get("attention_bias", False) or cfg["model_type"] == "qwen2"
    o_bias = cfg.get("attention_bias", False) and cfg["model_type"] != "qwen2"
    names = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.get("tie_word_embeddings"):
        names["lm_head.weight"] = (V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names[p + "input_layernorm.weight"] = (H,)
        names[p + "post_attention_layernorm.weight"] = (H,)
        for n, rows in (("q", Hq * D), ("k", Hkv * D), ("v", Hkv * D)):
            names[p + f"self_attn.{n}_proj.weight"] = (rows, H)
            if qkv_bias:
                names[p + f"self_attn.{n}_proj.bias"] = (rows,)
        names[p + "self_attn.o_proj.weight"] = (H, Hq * D)
        if o_bias:
            names[p + "self_attn.o_proj.bias"] = (H,)
        for n, shape in (("gate", (F, H)), ("up", (F, H)), ("down", (H, F))):
            names[p + f"mlp.{n}_proj.weight"] = shape
            if cfg.get("mlp_bias"):
                names[p + f"mlp.{n}_proj.bias"] = (shape[0],)
    return names


def draw_weights(cfg, seed=0):
    rng = numpy.random.default_rng(seed)
    out = {}
    for name, shape in tensor_names(cfg).items():
        if name.endswith("norm.weight"):
            w = 1 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif "embed" in name:
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / math.sqrt(shape[-1])
        out[name] = w.astype(numpy.float32)
    return out


def write_checkpoint(folder, cfg, weights, shards=1):
    """config.json and float32 safetensors written with the `safetensors` package (one file or `shards` files
    with an index)."""
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    names = list(weights)
    if shards == 1:
        save_file({n: weights[n] for n in names}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ------------------------------------------------------------------------------------------------ RoPE (HF)
def inv_freq_and_scale(cfg, seq_len):
    """Rotation frequencies and the cos/sin factor, as transformers' rope initialisers compute them."""
    D = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg["rope_theta"]
    inv = 1.0 / base ** (numpy.arange(0, D, 2, dtype=numpy.float64) / D)
    s = cfg.get("rope_scaling") or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    factor = s["factor"]
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "dynamic":
        L = cfg["max_position_embeddings"]
        if seq_len <= L:
            return inv, 1.0
        base = base * ((factor * seq_len / L) - (factor - 1)) ** (D / (D - 2))
        return 1.0 / base ** (numpy.arange(0, D, 2, dtype=numpy.float64) / D), 1.0
    orig = s.get("original_max_position_embeddings", cfg["max_position_embeddings"])
    if kind == "yarn":
        if "original_max_position_embeddings" in s:   # transformers: the ratio of the lengths is the factor
            factor = cfg["max_position_embeddings"] / orig

        def correction_dim(rotations):
            return (D * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))
        low = max(math.floor(correction_dim(s.get("beta_fast", 32))), 0)
        high = min(math.ceil(correction_dim(s.get("beta_slow", 1))), D - 1)
        if low == high:
            high += 0.001
        ramp = numpy.clip((numpy.arange(D // 2) - low) / (high - low), 0, 1)
        extrapolation_factor = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation_factor) + inv * extrapolation_factor
        return inv, s.get("attention_factor") or 0.1 * math.log(factor) + 1.0
    if kind == "llama3":
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        out = numpy.where(wavelen > orig / lo, inv / factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < orig / hi) & ~(wavelen > orig / lo)
        return numpy.where(medium, smoothed, out), 1.0
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------ forward
def forward(weights, cfg, ids, lowp=False):
    """Logits [S, V] in float64 of one sequence (``lowp``: every stored intermediate rounded to bf16, as a plain
    bf16 implementation would keep it)."""
    def r(x):
        return x.astype(BF16).astype(numpy.float64) if lowp else x
    H = cfg["hidden_size"]
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // Hq
    eps = cfg["rms_norm_eps"]
    W = {k: r(numpy.asarray(v, dtype=numpy.float64)) for k, v in weights.items()}
    S = len(ids)
    inv, scale = inv_freq_and_scale(cfg, S)
    angles = numpy.arange(S)[:, None] * inv[None, :]
    cos, sin = numpy.cos(angles) * scale, numpy.sin(angles) * scale

    def norm(x, g):
        return r(x / numpy.sqrt((x * x).mean(-1, keepdims=True) + eps) * g)

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return r(y + W[name + ".bias"] if name + ".bias" in W else y)

    def rope(t):
        a, b = t[..., :D // 2], t[..., D // 2:]
        c, s = cos[:, None], sin[:, None]
        return r(numpy.concatenate([a * c - b * s, b * c + a * s], -1))

    x = W["model.embed_tokens.weight"][numpy.asarray(ids)]
    causal = numpy.tril(numpy.ones((S, S), dtype=bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, W[p + "input_layernorm.weight"])
        q = rope(lin(h, p + "self_attn.q_proj").reshape(S, Hq, D))
        k = rope(lin(h, p + "self_attn.k_proj").reshape(S, Hkv, D))
        v = lin(h, p + "self_attn.v_proj").reshape(S, Hkv, D)
        k, v = numpy.repeat(k, Hq // Hkv, axis=1), numpy.repeat(v, Hq // Hkv, axis=1)
        scores = numpy.einsum("shd,thd->hst", q, k) / math.sqrt(D)
        scores = numpy.where(causal[None], scores, -numpy.inf)
        prob = numpy.exp(scores - scores.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        o = r(numpy.einsum("hst,thd->shd", prob, v)).reshape(S, Hq * D)
        x = r(x + lin(o, p + "self_attn.o_proj"))
        h = norm(x, W[p + "post_attention_layernorm.weight"])
        g, u = lin(h, p + "mlp.gate_proj"), lin(h, p + "mlp.up_proj")
        x = r(x + lin(r(g / (1 + numpy.exp(-g)) * u), p + "mlp.down_proj"))
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return r(norm(x, W["model.norm.weight"]) @ head.T)


def greedy(weights, cfg, prompt, n, lowp=False):
    """n greedy tokens after ``prompt`` and the top-1 minus top-2 logit margin of each step."""
    ids, margins = list(prompt), []
    for _ in range(n):
        logits = forward(weights, cfg, ids, lowp)[-1]
        top = numpy.sort(logits)
        margins.append(top[-1] - top[-2])
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], numpy.asarray(margins)


@pytest.fixture
def ref():
    """The reference: forward, greedy, inv_freq_and_scale, tensor_names, draw_weights, write_checkpoint, SMALL."""
    return types.SimpleNamespace(forward=forward, greedy=greedy, inv_freq_and_scale=inv_freq_and_scale,
                                 tensor_names=tensor_names, draw_weights=draw_weights,
                                 write_checkpoint=write_checkpoint, SMALL=dict(SMALL))
