"""The Llama family (Llama 1/2/3, TinyLlama, Mistral-style GQA, Qwen2-style attention bias) as Hugging Face lays it
out: a ``config.json`` and ``*.safetensors`` weights (one file, or shards with ``model.safetensors.index.json``).

Read top to bottom: ``LlamaConfig`` (the config.json fields), ``rope_tables`` (RoPE with Hugging Face's
``rope_scaling``: linear, dynamic, yarn, llama3), ``FusedTransformerLayer`` (pre-norm attention and SwiGLU MLP: a
prefill/full-sequence ``forward`` built from the ops, and a one-token ``decode`` over a paged KV cache built from
the fused kernels of ``cuda/gemv.cu``), ``LlamaForCausalLM`` (embedding, layers, final norm, LM head, tied or not),
and the loader (``from_pretrained``): tensors are read with safetensors (never pickle), straight to the device and
cast to the model dtype; a missing or mis-shaped tensor is an error naming it. ``quantize="int8"`` turns every
projection of the layers into a weight-only int8 ``CastedLinear`` (one scale per output channel).

Generation (prefill, decode with the paged cache, sampling, CUDA graphs) is in ``generate.py``.
"""
import dataclasses
import importlib
import json
import math
import warnings
from pathlib import Path

import numpy

from .. import backend, dtypes
from ..autograd import no_grad
from ..errors import DTypeError, ShapeError, TesseraError
from ..nn import init
from ..functions.matmul import linear_rows
from ..nn.activation import _swiglu_forward, swiglu_activation
from ..nn.attention import attention
from ..nn.casted import WEIGHT_ONLY_MAX_M, CastedLinear
from ..nn.kv_cache import _decode as _paged_decode
from ..nn.layers import Linear
from ..nn.module import Module, ModuleList, Parameter
from ..nn.norm import _as_tensor, rms_norm
from ..nn.norm import _forward as _rms_norm_forward
from ..nn.rope import _positions, _rotate, apply_rope, rope_cache
from ..nn.serialization import load_safetensors, read_header, save_safetensors
from ..tensor import Tensor, cat, empty, ones
from . import gemv

__all__ = ["LlamaConfig", "rope_tables", "FusedTransformerLayer", "LlamaForCausalLM", "hf_tensor_shapes",
           "save_checkpoint"]

# Keys per split of the decode attention (one tile of the paged kernel): small, so that a single sequence still
# spreads over many blocks, and fixed by the capacity alone, so that batching never changes a result.
DECODE_SPLIT_KEYS = 64


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass
class LlamaConfig:
    """The fields of a Hugging Face Llama-family ``config.json`` that the model uses."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None
    head_dim: int = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # biases on q, k, v
    o_proj_bias: bool = False             # and on o (Llama's attention_bias; Qwen2 has none there)
    mlp_bias: bool = False
    bos_token_id: int = 1
    eos_token_id: object = 2              # an id or a list of ids
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ShapeError(f"LlamaConfig: hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}; give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
                raise TesseraError(f"LlamaConfig: {name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ShapeError(f"LlamaConfig: num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ShapeError(f"LlamaConfig: head_dim must be even (RoPE rotates halves), got {self.head_dim}")

    @classmethod
    def from_dict(cls, d):
        """From a config.json dict; Qwen2 (model_type "qwen2") has q/k/v biases and no o bias."""
        d = dict(d)
        model_type = d.get("model_type", "llama")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise TesseraError(f"LlamaConfig: hidden_act {d['hidden_act']!r} is not supported (SwiGLU needs silu)")
        if d.get("rope_parameters"):   # transformers 5 keeps rope_theta and the scaling together
            params = dict(d["rope_parameters"])
            theta = params.pop("rope_theta", 10000.0)
            if d.get("rope_theta") is None:
                d["rope_theta"] = theta
            if params.get("rope_type", params.get("type", "default")) != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = params
        if d.get("sliding_window") and d.get("use_sliding_window", True) and model_type != "llama":
            warnings.warn(f"LlamaConfig: sliding_window={d['sliding_window']} is not applied (full causal "
                          "attention); sequences longer than the window differ from the reference model",
                          RuntimeWarning, stacklevel=2)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if model_type == "qwen2":
            kwargs.setdefault("attention_bias", True)
            kwargs["o_proj_bias"] = False
        elif "attention_bias" in d:
            kwargs["o_proj_bias"] = bool(d["attention_bias"])
        if d.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["architectures"] = ["LlamaForCausalLM"] if self.model_type == "llama" else None
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        if self.model_type == "qwen2":
            del d["attention_bias"]
        del d["o_proj_bias"]
        return {k: v for k, v in d.items() if v is not None}

    @property
    def stop_token_ids(self):
        ids = self.eos_token_id
        return [] if ids is None else ([int(ids)] if isinstance(ids, (int, numpy.integer)) else [int(i) for i in ids])


# ------------------------------------------------------------------------------------------------ RoPE
def _rope_scaling_args(config, length):
    """rope_frequencies keyword arguments for config.rope_scaling, for sequences of up to ``length`` positions."""
    s = config.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind in (None, "default"):
        return {}
    factor = float(s.get("factor", 1.0))
    if kind == "linear":
        return {"scaling_type": "linear", "factor": factor}
    if kind == "dynamic":
        # Dynamic NTK (Hugging Face's "dynamic"): beyond the trained length L the base grows as
        # base * (factor * n / L - (factor - 1)) ^ (D / (D - 2)) for sequences of n positions.
        trained = config.max_position_embeddings
        if length <= trained:
            return {}
        return {"scaling_type": "ntk", "factor": factor * length / trained - (factor - 1)}
    original = s.get("original_max_position_embeddings") or config.max_position_embeddings
    if kind == "yarn":
        if s.get("original_max_position_embeddings"):
            # As transformers does (DeepSeek-V3 style configs): the factor is the ratio of the two lengths.
            factor = config.max_position_embeddings / original
        if s.get("truncate", True) is False:
            raise TesseraError("rope_scaling yarn with truncate=false is not supported")
        attention = s.get("attention_factor")
        if attention is None and s.get("mscale") and s.get("mscale_all_dim"):
            def mscale(m):
                return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
            attention = mscale(s["mscale"]) / mscale(s["mscale_all_dim"])
        out = {"scaling_type": "yarn", "factor": factor, "original_max_position": int(original),
               "beta_fast": float(s.get("beta_fast") or 32.0), "beta_slow": float(s.get("beta_slow") or 1.0)}
        if attention is not None:
            out["attention_factor"] = float(attention)
        return out
    if kind == "llama3":
        return {"scaling_type": "llama3", "factor": factor, "original_max_position": int(original),
                "low_freq_factor": float(s.get("low_freq_factor", 1.0)),
                "high_freq_factor": float(s.get("high_freq_factor", 4.0))}
    raise TesseraError(f"rope_scaling type {kind!r} is not supported (default, linear, dynamic, yarn, llama3)")


def rope_tables(config, length, dtype=None, device=None):
    """(cos, sin) [length, head_dim / 2] for the config's RoPE (f32, or f64 for an f64 model). "dynamic" scaling
    is set by ``length`` (the longest sequence the tables serve), as Hugging Face does for a sequence that long."""
    table_dtype = dtypes.f64 if dtype is dtypes.f64 else dtypes.f32
    return rope_cache(int(length), config.head_dim, float(config.rope_theta), table_dtype, device,
                      **_rope_scaling_args(config, int(length)))


# ------------------------------------------------------------------------------------------------ the layer
def _weight_of(linear):
    """(weight array [N, K], scale array or None, bias array or None) of a Linear or CastedLinear."""
    if isinstance(linear, CastedLinear):
        return linear.weight.data, linear.weight_scale.data, None if linear.bias is None else linear.bias.data
    return linear.weight.data, None, None if linear.bias is None else linear.bias.data


def _dense_weight(linear, dtype):
    """A projection's weight as a [N, K] array of ``dtype`` (int8 weights dequantized by their channel scales)."""
    if isinstance(linear, CastedLinear):
        xp = backend.array_module(linear.weight.data)
        return (linear.weight.data.astype(xp.float32) * linear.weight_scale.data[:, None]).astype(dtype)
    return linear.weight.data


def _linear_into(x, linear, out=None, accumulate=False):
    """out (+)= x @ W.T (+ bias) on 2-D arrays: one GEMM, the residual added by it when ``accumulate``."""
    out = linear_rows(x, _dense_weight(linear, x.dtype), out=out, accumulate=accumulate)
    if linear.bias is not None:
        out += linear.bias.data.astype(out.dtype, copy=False)
    return out


_attention_ops = importlib.import_module("tessera_cp.nn.attention")  # the module (nn.attention is the function)


def _attend_causal(q, k, v, scale):
    """Causal attention output [B, Hq, S, D] of raw arrays [B, H, S, D] (any strides): the kernel when it takes
    them, else the reference."""
    attn = _attention_ops
    if attn._kernel_ready(q, k, v, None, None, False):
        return attn._forward_kernel(q, k, v, None, None, scale, True)[0]
    return attn._forward_reference(q, k, v, None, None, scale, True, None)[0]


def _project(x, linear):
    """x [..., K] through a Linear or an int8 CastedLinear. Many rows on the GPU (prefill) take the int8 weights
    dequantized to x's dtype and one cuBLAS GEMM (still weight-only: the activations are never quantized)."""
    if isinstance(linear, CastedLinear):
        rows = x.numel() // x.shape[-1]
        if rows > WEIGHT_ONLY_MAX_M and x.device == "cuda" and not backend.reference_forced():
            out = x @ Tensor(_dense_weight(linear, x.dtype.storage), x.dtype).T
            return out if linear.bias is None else out + linear.bias.astype(x.dtype)
        return linear(x)
    return linear(x)


class FusedTransformerLayer(Module):
    """A pre-norm decoder layer: ``x + o(attn(rope(qkv(rms_norm(x)))))``, then ``x + down(swiglu(gate_up(
    rms_norm(x))))``, with the q/k/v projections held as one [(Hq + 2 Hkv) D, dim] weight and gate/up as one
    [2 hidden, dim] weight (Hugging Face's [out, in] layout; bf16 ``Linear`` or int8 ``CastedLinear``).

    ``forward(x, cos, sin)`` runs a whole causal sequence (prefill: cuBLAS GEMMs, the flash-attention kernel) and
    returns (x, k, v) with the rotated keys and values for a cache. ``decode(state, k_cache, v_cache)`` runs one
    token per sequence against a paged KV cache in six launches, none of them cuBLAS (so a CUDA graph can hold
    them): RMSNorm + QKV GEMV; RoPE + cache append; paged decode attention (and its split merge); out-projection
    GEMV + residual; RMSNorm + gate/up GEMV; SwiGLU + down GEMV + residual.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, *, num_kv_heads=None, head_dim=None, hidden_dim=None,
                 eps=1e-6, qkv_bias=False, o_bias=False, mlp_bias=False, dtype=None, device=None, generator=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = dim // num_heads if head_dim is None else head_dim
        hidden_dim = int(dim * mlp_ratio) if hidden_dim is None else hidden_dim
        if min(dim, num_heads, num_kv_heads, head_dim, hidden_dim) < 1 or num_heads % num_kv_heads or head_dim % 2:
            raise ShapeError(f"FusedTransformerLayer: dim={dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads}, "
                             f"head_dim={head_dim} (even), hidden_dim={hidden_dim} must be positive, with num_heads "
                             f"a multiple of num_kv_heads")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.hidden_dim, self.eps = hidden_dim, float(eps)
        dtype = dtypes.bf16 if dtype is None else dtypes.as_dtype(dtype)
        kw = dict(dtype=dtype, device=device, generator=generator)
        self.attn_norm = Parameter(ones(dim, dtype=dtype, device=device))
        self.qkv = Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias, **kw)
        self.o_proj = Linear(num_heads * head_dim, dim, bias=o_bias, **kw)
        self.mlp_norm = Parameter(ones(dim, dtype=dtype, device=device))
        self.gate_up = Linear(dim, 2 * hidden_dim, bias=mlp_bias, **kw)
        self.down = Linear(hidden_dim, dim, bias=mlp_bias, **kw)

    def quantize_int8(self):
        """Replace the four projections by weight-only int8 CastedLinear layers (per-output-channel scales)."""
        dtype = self.attn_norm.dtype
        if dtype not in (dtypes.bf16, dtypes.f16, dtypes.f32):
            raise DTypeError(f"int8 weights need a bf16, f16 or f32 model, this one is {dtype.name}")
        for name in ("qkv", "o_proj", "gate_up", "down"):
            linear = getattr(self, name)
            if isinstance(linear, Linear):
                setattr(self, name, CastedLinear.from_float(linear, activation_dtype=dtype, mode="weight_only"))
        return self

    @property
    def quantized(self):
        return isinstance(self.qkv, CastedLinear)

    def forward(self, x, cos, sin, position_ids=None):
        """x [B, S, dim] (one causal sequence per row) -> (x, k, v), k and v [B, S, Hkv, D] after RoPE."""
        B, S, _ = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = _project(rms_norm(x, self.attn_norm, self.eps), self.qkv)
        q = qkv[..., :Hq * D].reshape(B, S, Hq, D)
        k = qkv[..., Hq * D:(Hq + Hkv) * D].reshape(B, S, Hkv, D)
        v = qkv[..., (Hq + Hkv) * D:].reshape(B, S, Hkv, D)
        q, k = apply_rope(q, k, cos, sin, position_ids)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + _project(o.transpose(1, 2).reshape(B, S, Hq * D), self.o_proj)
        h = swiglu_activation(_project(rms_norm(x, self.mlp_norm, self.eps), self.gate_up))
        return x + _project(h, self.down), k, v

    def prefill(self, x, cos, sin, pos):
        """``forward`` for inference on raw arrays: x [B, S, dim] (contiguous) is updated in place and the rotated
        (k, v) [B, S, Hkv, D] returned. The same kernels without the Tensor and tape layers, RoPE in place on the
        QKV product, and the two residual adds done by the o/down GEMMs: a prefill makes about ten launches a
        layer, and through the Tensor layer their host time exceeded the GPU's (issue 9)."""
        B, S, dim = x.shape
        Hq, Hkv, D, F = self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_dim
        x2 = x.reshape(B * S, dim)
        qkv = _linear_into(_rms_norm_forward(x2, self.attn_norm.data, self.eps), self.qkv)
        heads = qkv.reshape(B, S, Hq + 2 * Hkv, D)
        q, k, v = heads[:, :, :Hq], heads[:, :, Hq:Hq + Hkv], heads[:, :, Hq + Hkv:]
        _rotate([q, k], cos, sin, pos, "BSHD", 1.0, inplace=True)
        o = _attend_causal(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                           1.0 / math.sqrt(D))
        _linear_into(o.transpose(0, 2, 1, 3).reshape(B * S, Hq * D), self.o_proj, out=x2, accumulate=True)
        gate_up = _linear_into(_rms_norm_forward(x2, self.mlp_norm.data, self.eps), self.gate_up)
        _linear_into(_swiglu_forward(gate_up[:, :F], gate_up[:, F:], 1.0), self.down, out=x2, accumulate=True)
        return k, v

    def decode(self, s, k_cache, v_cache):
        """One token per sequence, on the raw arrays of a decode state ``s`` (see ``LlamaForCausalLM.decode_step``):
        s.x [B, dim] is updated in place; k_cache/v_cache: this layer's paged pools [blocks, Hkv, block, D]."""
        w, scale, bias = _weight_of(self.qkv)
        gemv.rows_linear(s.x, w, scale=scale, bias=bias, norm=self.attn_norm.data, eps=self.eps, out=s.qkv)
        gemv.rope_append(s.qkv, s.cos, s.sin, s.pos, s.table, k_cache, v_cache, self.num_heads, self.num_kv_heads,
                         s.q, s.lens)
        o = _paged_decode(s.q, k_cache, v_cache, s.table, s.lens, self.head_dim, 1.0 / math.sqrt(self.head_dim),
                          k_cache.shape[2], s.max_len, s.num_splits)
        w, scale, bias = _weight_of(self.o_proj)
        gemv.rows_linear(o.reshape(o.shape[0], -1), w, scale=scale, bias=bias, residual=s.x, out=s.x)
        w, scale, bias = _weight_of(self.gate_up)
        gemv.rows_linear(s.x, w, scale=scale, bias=bias, norm=self.mlp_norm.data, eps=self.eps, out=s.h)
        w, scale, bias = _weight_of(self.down)
        gemv.rows_linear(s.h, w, scale=scale, bias=bias, swiglu=True, residual=s.x, out=s.x)

    def extra_repr(self):
        return (f"{self.dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"hidden={self.hidden_dim}" + (", int8" if self.quantized else ""))


# ------------------------------------------------------------------------------------------------ the model
class DecodeState:
    """The arrays one decode step reads and writes, allocated once per batch size (a CUDA graph replays them):
    tokens [B] int32 (the step's input; greedy steps write the next token here), pos [B] int32 (its position),
    lens [B], table [B, W] (block tables), cos/sin tables, and the activations x, qkv, q, h, logits."""

    def __init__(self, model, batch, table_width, cos, sin, max_len):
        c = model.config
        xp = backend.xp_for(model.device)
        storage = model.dtype.storage
        i32 = numpy.int32
        self.batch = batch
        self.tokens, self.pos, self.lens = (xp.zeros(batch, dtype=i32) for _ in range(3))
        self.table = xp.zeros((batch, table_width), dtype=i32)
        self.cos, self.sin = cos, sin
        self.x = xp.zeros((batch, c.hidden_size), dtype=storage)
        self.qkv = xp.zeros((batch, (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim), dtype=storage)
        self.q = xp.zeros((batch, c.num_attention_heads, c.head_dim), dtype=storage)
        self.h = xp.zeros((batch, 2 * c.intermediate_size), dtype=storage)
        logits_dtype = numpy.float64 if model.dtype is dtypes.f64 else numpy.float32
        self.logits = xp.zeros((batch, c.vocab_size), dtype=logits_dtype)
        # The split of the keys is fixed by the capacity alone (never by B or the lengths).
        self.num_splits = max(2, -(-max_len // DECODE_SPLIT_KEYS))
        self.max_len = self.num_splits * DECODE_SPLIT_KEYS


class LlamaForCausalLM(Module):
    """Embedding, ``num_hidden_layers`` FusedTransformerLayers, final RMSNorm and the LM head (tied to the embedding
    when ``config.tie_word_embeddings``). Weights are ``dtype`` (bf16 by default on the GPU, f32 on the CPU)."""

    def __init__(self, config, dtype=None, device=None, generator=None):
        super().__init__()
        self.config = config
        device = backend.check_device(device)
        if dtype is None:
            dtype = dtypes.bf16 if device == "cuda" else dtypes.f32
        self.dtype, self.device = dtypes.as_dtype(dtype), device
        if not self.dtype.is_floating or self.dtype.is_fp8:
            raise DTypeError(f"LlamaForCausalLM: dtype must be bf16, f16, f32 or f64, got {self.dtype.name}")
        c = config
        self.embed_tokens = Parameter(empty(c.vocab_size, c.hidden_size, dtype=self.dtype, device=device))
        init.normal_(self.embed_tokens, std=0.02, generator=generator)
        self.layers = ModuleList([
            FusedTransformerLayer(c.hidden_size, c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                  head_dim=c.head_dim, hidden_dim=c.intermediate_size, eps=c.rms_norm_eps,
                                  qkv_bias=c.attention_bias, o_bias=c.o_proj_bias, mlp_bias=c.mlp_bias,
                                  dtype=self.dtype, device=device, generator=generator)
            for _ in range(c.num_hidden_layers)])
        self.norm = Parameter(ones(c.hidden_size, dtype=self.dtype, device=device))
        if c.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = Parameter(empty(c.vocab_size, c.hidden_size, dtype=self.dtype, device=device))
            init.normal_(self.lm_head, std=0.02, generator=generator)
        self.eval()

    # ---------------------------------------------------------------------------------------- full sequences
    def _check_ids(self, ids):
        ids = numpy.asarray(backend.to_device(ids.data, "cpu") if isinstance(ids, Tensor) else ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
            raise ShapeError(f"input_ids must be a non-empty [B, S] array of ints, got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ShapeError(f"input_ids must lie in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return ids.astype(numpy.int64)

    def hidden_states(self, input_ids, cos=None, sin=None, kv_sink=None):
        """The final hidden states (before the last norm) of causal sequences input_ids [B, S] (all of length S);
        ``kv_sink(layer, k, v)`` receives each layer's rotated keys and values [B, S, Hkv, D]."""
        ids = self._check_ids(input_ids)
        S = ids.shape[1]
        if cos is None:
            cos, sin = rope_tables(self.config, S, self.dtype, self.device)
        with no_grad():
            x = Tensor(self.embed_tokens.data[backend.to_device(ids, self.device)], self.dtype)
            if self.device == "cuda" and not backend.reference_forced():   # raw arrays: see prefill()
                cos, sin = _as_tensor(cos, "cos").data, _as_tensor(sin, "sin").data
                pos = _positions(None, ids.shape[0], S, cos.shape[0], self.device, "hidden_states")
                for i, layer in enumerate(self.layers):
                    k, v = layer.prefill(x.data, cos, sin, pos)
                    if kv_sink is not None:
                        kv_sink(i, Tensor(k, self.dtype), Tensor(v, self.dtype))
                return x
            for i, layer in enumerate(self.layers):
                x, k, v = layer(x, cos, sin)
                if kv_sink is not None:
                    kv_sink(i, k, v)
        return x

    def forward(self, input_ids):
        """Logits [B, S, vocab] (f32; f64 for an f64 model) of causal sequences input_ids [B, S]."""
        x = self.hidden_states(input_ids)
        with no_grad():
            h = rms_norm(x, self.norm, self.config.rms_norm_eps)
            logits = h @ self.lm_head.T
        return logits.astype(dtypes.f64 if self.dtype is dtypes.f64 else dtypes.f32)

    def last_logits(self, x):
        """Logits [B, vocab] (f32, f64 for f64 models) of the last position of hidden states x [B, S, H], through
        the fused final-norm + LM-head kernel (the decode step's)."""
        xp = backend.xp_for(self.device)
        last = xp.ascontiguousarray(x.data[:, -1])
        out = xp.empty((last.shape[0], self.config.vocab_size),
                       dtype=numpy.float64 if self.dtype is dtypes.f64 else numpy.float32)
        return gemv.rows_linear(last, self.lm_head.data, norm=self.norm.data, eps=self.config.rms_norm_eps, out=out)

    # ---------------------------------------------------------------------------------------- decoding
    def decode_state(self, batch, table_width, cos, sin, max_len):
        return DecodeState(self, batch, table_width, cos, sin, max_len)

    def decode_step(self, s, cache, greedy):
        """One token per sequence: s.tokens at positions s.pos -> s.logits (and s.tokens = argmax when greedy);
        the new keys and values go into ``cache`` (a PagedKVCache); s.pos advances. Raw-array kernels only on the
        GPU, so the step can be captured in a CUDA graph."""
        gemv.embed_rows(self.embed_tokens.data, s.tokens, s.x)
        for i, layer in enumerate(self.layers):
            layer.decode(s, cache.key_cache(i).data, cache.value_cache(i).data)
        gemv.rows_linear(s.x, self.lm_head.data, norm=self.norm.data, eps=self.config.rms_norm_eps, out=s.logits)
        if greedy:
            gemv.argmax_rows(s.logits, s.tokens)
        xp = backend.array_module(s.pos)
        xp.add(s.pos, 1, out=s.pos)

    # ---------------------------------------------------------------------------------------- weights
    def quantize_int8(self):
        """Weight-only int8 for every projection of every layer (embedding, norms and LM head stay as they are)."""
        for layer in self.layers:
            layer.quantize_int8()
        return self

    def hf_state(self):
        """The weights under their Hugging Face names (q/k/v and gate/up split back out), as Tensors."""
        c = self.config
        Hq, Hkv, D, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
        out = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            if layer.quantized:
                raise TesseraError("hf_state: the model is quantized; save it before quantize_int8()")
            p = f"model.layers.{i}."
            qkv, gu = layer.qkv.weight, layer.gate_up.weight
            bounds = {"q": (0, Hq * D), "k": (Hq * D, (Hq + Hkv) * D), "v": ((Hq + Hkv) * D, (Hq + 2 * Hkv) * D)}
            for name, (a, b) in bounds.items():
                out[p + f"self_attn.{name}_proj.weight"] = qkv[a:b]
                if layer.qkv.bias is not None:
                    out[p + f"self_attn.{name}_proj.bias"] = layer.qkv.bias[a:b]
            out[p + "self_attn.o_proj.weight"] = layer.o_proj.weight
            if layer.o_proj.bias is not None:
                out[p + "self_attn.o_proj.bias"] = layer.o_proj.bias
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gu[:F], gu[F:]
            out[p + "mlp.down_proj.weight"] = layer.down.weight
            if layer.gate_up.bias is not None:
                out[p + "mlp.gate_proj.bias"], out[p + "mlp.up_proj.bias"] = layer.gate_up.bias[:F], \
                    layer.gate_up.bias[F:]
                out[p + "mlp.down_proj.bias"] = layer.down.bias
            out[p + "input_layernorm.weight"] = layer.attn_norm
            out[p + "post_attention_layernorm.weight"] = layer.mlp_norm
        return out

    def save_pretrained(self, path, max_shard_bytes=None):
        """config.json and model.safetensors (or shards and their index) in the Hugging Face layout."""
        save_checkpoint(path, self.config.to_dict(), {k: v.detach() for k, v in self.hf_state().items()},
                        max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, quantize=None):
        """Load a Hugging Face Llama-family folder (config.json + safetensors). Every tensor is checked against
        the config before anything is read; tensors go to the device, then are cast to ``dtype``."""
        if quantize not in (None, "int8"):
            raise TesseraError(f"from_pretrained: quantize must be None or 'int8', got {quantize!r}")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise TesseraError(f"{path}: no config.json (expected a Hugging Face model folder)")
        config = LlamaConfig.from_json(path / "config.json")
        where = _tensor_index(path)
        expected = hf_tensor_shapes(config)
        missing = [n for n in expected if n not in where]
        wrong = [f"{n}: {tuple(where[n][1]['shape'])}, expected {expected[n]}" for n in expected
                 if n in where and tuple(where[n][1]["shape"]) != expected[n]]
        if missing or wrong:
            parts = ([f"missing tensors {missing}"] if missing else []) + \
                    ([f"mis-shaped tensors [{'; '.join(wrong)}]"] if wrong else [])
            raise TesseraError(f"{path}: " + " and ".join(parts))
        model = cls(config, dtype=dtype, device=device)
        model._load(where, expected)
        if quantize == "int8":
            model.quantize_int8()
        return model

    def _load(self, where, expected):
        by_file = {}
        for name in expected:
            by_file.setdefault(where[name][0], []).append(name)
        c = self.config
        pending = {}   # layer -> {hf name: tensor}: q/k/v and gate/up are joined once all their parts are read
        for file, names in by_file.items():
            for name, t in load_safetensors(file, device=self.device, names=set(names)).items():
                t = t.astype(self.dtype)
                if name == "model.embed_tokens.weight":
                    self.embed_tokens.data = t.data
                elif name == "model.norm.weight":
                    self.norm.data = t.data
                elif name == "lm_head.weight":
                    self.lm_head.data = t.data
                else:
                    i, rest = name[len("model.layers."):].split(".", 1)
                    pending.setdefault(int(i), {})[rest] = t
                    self._place(int(i), pending[int(i)])
        if c.tie_word_embeddings:
            self.lm_head = self.embed_tokens

    def _place(self, i, parts):
        """Move the parts of layer i that are complete into its parameters (and out of ``parts``)."""
        layer = self.layers[i]
        simple = {"input_layernorm.weight": (layer, "attn_norm"), "post_attention_layernorm.weight":
                  (layer, "mlp_norm"), "self_attn.o_proj.weight": (layer.o_proj, "weight"),
                  "self_attn.o_proj.bias": (layer.o_proj, "bias"), "mlp.down_proj.weight": (layer.down, "weight"),
                  "mlp.down_proj.bias": (layer.down, "bias")}
        for name in [n for n in parts if n in simple]:
            owner, attr = simple[name]
            getattr(owner, attr).data = parts.pop(name).data
        groups = {("qkv", "weight"): [f"self_attn.{n}_proj.weight" for n in "qkv"],
                  ("qkv", "bias"): [f"self_attn.{n}_proj.bias" for n in "qkv"],
                  ("gate_up", "weight"): ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                  ("gate_up", "bias"): ["mlp.gate_proj.bias", "mlp.up_proj.bias"]}
        for (module, attr), names in groups.items():
            if all(n in parts for n in names):
                getattr(getattr(layer, module), attr).data = cat([parts.pop(n) for n in names], dim=0).data


# ------------------------------------------------------------------------------------------------ files
def hf_tensor_shapes(config):
    """Every tensor a checkpoint of ``config`` must hold: Hugging Face name -> shape."""
    c = config
    H, D, F, V = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    Hq, Hkv = c.num_attention_heads, c.num_key_value_heads
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        rows = {"q": Hq * D, "k": Hkv * D, "v": Hkv * D}
        for n, r in rows.items():
            out[p + f"self_attn.{n}_proj.weight"] = (r, H)
            if c.attention_bias:
                out[p + f"self_attn.{n}_proj.bias"] = (r,)
        out[p + "self_attn.o_proj.weight"] = (H, Hq * D)
        if c.o_proj_bias:
            out[p + "self_attn.o_proj.bias"] = (H,)
        out[p + "mlp.gate_proj.weight"] = (F, H)
        out[p + "mlp.up_proj.weight"] = (F, H)
        out[p + "mlp.down_proj.weight"] = (H, F)
        if c.mlp_bias:
            out[p + "mlp.gate_proj.bias"], out[p + "mlp.up_proj.bias"], out[p + "mlp.down_proj.bias"] = \
                (F,), (F,), (H,)
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "post_attention_layernorm.weight"] = (H,)
    return out


def _tensor_index(path):
    """name -> (file, header entry) over the folder's safetensors: the shards of model.safetensors.index.json,
    else model.safetensors, else every *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise TesseraError(f"{index}: lists shard {f.name}, which is not in {path}")
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TesseraError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not read)")
    where = {}
    for f in files:
        header, _ = read_header(f)
        for name, entry in header.items():
            if name != "__metadata__":
                where[name] = (f, entry)
    return where


def save_checkpoint(path, config_dict, tensors, max_shard_bytes=None):
    """Write config.json and the tensors (name -> Tensor) as model.safetensors, or as shards of at most
    ``max_shard_bytes`` with a model.safetensors.index.json, as Hugging Face does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(config_dict, f, indent=2)
    names = list(tensors)
    if not max_shard_bytes:
        save_safetensors({n: tensors[n] for n in names}, path / "model.safetensors", metadata={"format": "pt"})
        return
    shards, current, size = [], [], 0
    for n in names:
        nbytes = tensors[n].size_bytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors({n: tensors[n] for n in shard}, path / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(tensors[n].size_bytes for n in names)
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
