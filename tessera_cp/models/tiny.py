"""A small Llama-architecture checkpoint with seeded random weights, written in the Hugging Face layout
(config.json + model.safetensors, or shards and their index): what ``make run`` and the tests generate from when
no real model is at hand. The vocabulary is byte-level (ids 0..255 are bytes, 256 is bos, 257 eos; no
tokenizer.json, so ``load_tokenizer`` falls back to bytes).

The LM head is a random "successor" map plus noise: row j is a multiple of the embedding of token perm[j] (perm a
seeded permutation), so the logit of the token that follows the current one stands out by tens of units while the
layers still move the choice around. Greedy continuations computed in bf16 and in float64 then agree token for
token (the margins are far above bf16's rounding), which is what the GPU tests compare.
"""
import json
from pathlib import Path

import numpy

from .. import dtypes
from ..tensor import Tensor
from .llama import LlamaConfig, hf_tensor_shapes, save_checkpoint

__all__ = ["TINY_CONFIG", "tiny_config", "random_weights", "build_tiny_checkpoint", "ensure_tiny_checkpoint",
           "DEFAULT_PATH"]

# head_dim 64 (the paged decode kernel's), GQA 4:2, sizes that are multiples of 16 (the GEMV kernels' chunks).
TINY_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 256,
    "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "bfloat16",
}
DEFAULT_PATH = Path(".cache") / "tiny-llama"
_FORMAT = 1   # bump when the weights' recipe changes, so cached checkpoints are rebuilt


def tiny_config(**overrides):
    """TINY_CONFIG with ``overrides`` (a dict for config.json)."""
    out = dict(TINY_CONFIG)
    out.update(overrides)
    return out


def random_weights(config, seed=0, logit_scale=6.0, successor=2.0):
    """name -> float32 NumPy array for every tensor of ``config`` (a LlamaConfig), drawn from NumPy's generator
    seeded with ``seed``: projections N(0, 1/fan_in), the embedding N(0, 1), norm weights 1 + N(0, 0.1^2), biases
    N(0, 0.02^2); the LM head (when not tied) is logit_scale / sqrt(hidden) * (successor * E[perm] + N(0, 1))."""
    rng = numpy.random.default_rng(seed)
    out = {}
    perm = None
    for name, shape in hf_tensor_shapes(config).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.02 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w = rng.standard_normal(shape)
        elif name == "lm_head.weight":
            perm = rng.permutation(shape[0])
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / numpy.sqrt(shape[1])
        out[name] = w.astype(numpy.float32)
    if perm is not None:   # drawn above in file order; combined once the embedding exists
        lm = successor * out["model.embed_tokens.weight"][perm] + out["lm_head.weight"]
        out["lm_head.weight"] = (lm * (logit_scale / numpy.sqrt(lm.shape[1]))).astype(numpy.float32)
    return out


def build_tiny_checkpoint(path, seed=0, dtype="bf16", max_shard_bytes=None, logit_scale=6.0, successor=2.0,
                          **overrides):
    """Write a random checkpoint of ``tiny_config(**overrides)`` to ``path`` in ``dtype`` (bf16, f16 or f32);
    ``logit_scale`` and ``successor`` shape the LM head (see ``random_weights``; successor=0 gives a plain random,
    much less confident model). Returns the path."""
    config_dict = tiny_config(**overrides)
    config = LlamaConfig.from_dict(config_dict)
    dtype = dtypes.as_dtype(dtype)
    config_dict["torch_dtype"] = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype.name]
    weights = random_weights(config, seed, logit_scale, successor)
    tensors = {name: Tensor(w.astype(dtype.storage), dtype) for name, w in weights.items()}
    save_checkpoint(path, config_dict, tensors, max_shard_bytes)
    with open(Path(path) / "tessera_tiny.json", "w") as f:
        json.dump({"seed": seed, "dtype": dtype.name, "format": _FORMAT, "overrides": overrides,
                   "head": [logit_scale, successor]}, f)
    return Path(path)


def ensure_tiny_checkpoint(path=DEFAULT_PATH, seed=0):
    """The tiny checkpoint at ``path``, built once (rebuilt only when its recipe or seed changed)."""
    path = Path(path)
    stamp = path / "tessera_tiny.json"
    if stamp.is_file():
        with open(stamp) as f:
            info = json.load(f)
        if info == {"seed": seed, "dtype": "bf16", "format": _FORMAT, "overrides": {}, "head": [6.0, 2.0]}:
            return path
    return build_tiny_checkpoint(path, seed)
