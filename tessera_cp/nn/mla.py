"""Multi-latent attention (MLA) in the DeepSeek-V2 form, its decode op over cached latents, and the cache-size report.

Per token t with hidden state x (H query heads, Hkv key/value heads, head sizes dn (no RoPE), dr (RoPE), dv):

* queries: ``q = W_q x`` or, with ``q_latent_dim``, ``q = W_qb rms_norm(W_qa x)``; per head q = [q_nope | q_pe];
* keys and values come from one compressed latent ``c = rms_norm(W_kva x)[:latent_dim]`` shared by all heads:
  ``[k_nope_h | v_h] = W_kvb[h] c``, plus one decoupled RoPE key ``k_pe = rope(W_kva x [latent_dim:])`` that every
  head shares; ``k_h = [k_nope_h | k_pe]``, ``q_h = [q_nope_h | rope(q_pe_h)]``, scale 1/sqrt(dn + dr);
* the cache holds only ``[c | k_pe]`` per token (latent_dim + rope_dim values, for every head together).

Prefill rebuilds K and V from the latents and runs ``attention`` (the flash kernel on the GPU; head dims it lacks
are zero-padded to one it has, which changes no score). Decode (one new token) uses the weight-absorbed form: with
``W_uk[h]`` and ``W_uv[h]`` the key and value halves of ``W_kvb``, ``q_nope_h . (W_uk[h] c) = (W_uk[h]^T q_nope_h) . c``
and ``sum_t p_t W_uv[h] c_t = W_uv[h] sum_t p_t c_t``, so attention runs over the cached rows directly (multi-query
attention with head size latent_dim + rope_dim whose values are the latent) and K, V are never rebuilt; the
kernel is ``cuda/paged_attention.cu`` over paged or contiguous latents. Prefill is differentiable; decode is not.

Parameter names follow Hugging Face's DeepSeek-V2 (``q_proj`` or ``q_a_proj``/``q_a_layernorm``/``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``). RoPE is the half-split form of
``nn/rope.py``; DeepSeek's released checkpoints rotate interleaved pairs, so their q_pe/k_pe rows must be
de-interleaved (a fixed permutation of the RoPE columns of q_b_proj and kv_a_proj_with_mqa) to load them here.
"""
import math

import numpy

from .. import backend, dtypes
from ..autograd import no_grad
from ..errors import DeviceError, DTypeError, ShapeError, TesseraError
from ..tensor import Tensor, cat, tensor, zeros
from .attention import _FWD_TILES as _FLASH_TILES, attention
from .kv_cache import PagedKVCache, _as_tensor, _check_scale, _decode, _int_array
from .layers import Linear
from .module import Module
from .norm import RMSNorm
from .rope import apply_rope, rope_cache

__all__ = ["MultiLatentAttention", "LatentCache", "mla_decode_attention", "mla_cache_report"]


# ------------------------------------------------------------------------------------------------ decode op
def mla_decode_attention(q, latents, seq_lens=None, block_tables=None, *, value_dim, scale, num_splits=None):
    """Attention of one absorbed query per sequence over cached latent rows (the MLA decode step's core).

    q [B, H, latent_dim + rope_dim] (``[W_uk^T q_nope | q_pe]``); ``latents`` either paged, [num_blocks, block_size,
    latent_dim + rope_dim] with ``block_tables`` [B, max_blocks], or contiguous [B, S, latent_dim + rope_dim]
    (block_tables None). Scores use every column; the values are the first ``value_dim`` columns (the latent).
    seq_lens [B] (contiguous default: all S). Returns [B, H, value_dim] in q's dtype. ``scale`` is MLA's
    1/sqrt(dn + dr), not 1/sqrt of this head size, so it is required.
    """
    q = _as_tensor(q, "mla_decode_attention(q)")
    c = _as_tensor(latents, "mla_decode_attention(latents)", q.device)
    for name, t in (("q", q), ("latents", c)):
        if not t.dtype.is_floating or t.dtype.is_fp8:
            raise DTypeError(f"mla_decode_attention: {name} must be f16, bf16, f32 or f64, got {t.dtype.name}")
    if q.dtype is not c.dtype or q.device != c.device:
        raise DTypeError(f"mla_decode_attention: q is {q.dtype.name} on {q.device}, latents {c.dtype.name} on "
                         f"{c.device}")
    if q.ndim != 3 or c.ndim != 3 or c.shape[-1] != q.shape[-1] or 0 in q.shape or 0 in c.shape:
        raise ShapeError(f"mla_decode_attention: q must be [B, H, D] and latents [N, S, D] with the same D, got "
                         f"{q.shape} and {c.shape}")
    B, H, dk = q.shape
    value_dim = int(value_dim)
    if not 0 < value_dim <= dk:
        raise ShapeError(f"mla_decode_attention: value_dim must lie in (0, {dk}], got {value_dim}")
    scale = _check_scale(scale, dk)
    if block_tables is None:
        if c.shape[0] != B:
            raise ShapeError(f"mla_decode_attention: contiguous latents must be [B={B}, S, {dk}], got {c.shape}")
        S = c.shape[1]
        lens, host = _int_array(numpy.full(B, S) if seq_lens is None else seq_lens, "mla_decode_attention(seq_lens)",
                                q.device, 1)
        if host.shape[0] != B or host.min() < 0 or host.max() > S:
            raise ShapeError(f"mla_decode_attention: seq_lens must be [B={B}] values in [0, {S}]")
        out = _decode(q.data, c.data[:, None], None, None, lens, value_dim, scale, None, int(host.max()), num_splits)
        return Tensor(out, q.dtype)
    if seq_lens is None:
        raise ShapeError("mla_decode_attention: paged latents need seq_lens")
    table, table_host = _int_array(block_tables, "mla_decode_attention(block_tables)", q.device, 2)
    lens, host = _int_array(seq_lens, "mla_decode_attention(seq_lens)", q.device, 1)
    nb, bs = c.shape[:2]
    if table_host.shape[0] != B or host.shape[0] != B or host.min() < 0 or host.max() > table_host.shape[1] * bs:
        raise ShapeError(f"mla_decode_attention: block_tables {table_host.shape} and seq_lens {host.shape} must have "
                         f"B={B} rows and lengths within max_blocks x block_size = {table_host.shape[1] * bs}")
    used = numpy.arange(table_host.shape[1])[None, :] * bs < host[:, None]
    if (used & ((table_host < 0) | (table_host >= nb))).any():
        raise ShapeError(f"mla_decode_attention: block_tables point outside the pool of {nb} blocks")
    out = _decode(q.data, c.data[:, None], None, table, lens, value_dim, scale, bs, int(host.max()), num_splits)
    return Tensor(out, q.dtype)


# ------------------------------------------------------------------------------------------------ cache report
def mla_cache_report(model_dim=4096, num_q_heads=32, latent_dim=512, rope_dim=64, head_dim=None, v_head_dim=None,
                     num_kv_heads=None, dtype=None, claimed_reduction=0.93):
    """Bytes per token and layer of the MLA cache against multi-head attention with the same heads and head size
    (K and V of every head), and against GQA when ``num_kv_heads`` is given; checks ``claimed_reduction`` (the
    seed's "93% cache reduction") by computing it. Returns a dict; its "text" says it in words."""
    dtype = dtypes.bf16 if dtype is None else dtypes.as_dtype(dtype)
    head_dim = model_dim // num_q_heads if head_dim is None else int(head_dim)
    v_head_dim = head_dim if v_head_dim is None else int(v_head_dim)
    item = dtype.itemsize
    mla_values = latent_dim + rope_dim
    mha_values = num_q_heads * (head_dim + v_head_dim)
    reduction = 1.0 - mla_values / mha_values
    report = {"mla_values_per_token": mla_values, "mla_bytes_per_token": mla_values * item,
              "mha_values_per_token": mha_values, "mha_bytes_per_token": mha_values * item,
              "reduction_vs_mha": reduction, "reduction_without_rope_key": 1.0 - latent_dim / mha_values,
              "claimed_reduction": claimed_reduction,
              "claim_holds": claimed_reduction is not None and round(reduction, 2) == round(claimed_reduction, 2)}
    text = (f"MLA caches latent {latent_dim} + RoPE key {rope_dim} = {mla_values} values per token and layer "
            f"({mla_values * item} bytes in {dtype.name}); multi-head attention with {num_q_heads} heads of K "
            f"{head_dim} and V {v_head_dim} caches {mha_values} ({mha_values * item} bytes). Reduction "
            f"1 - {mla_values}/{mha_values} = {reduction:.2%} (without the RoPE key it would be "
            f"{report['reduction_without_rope_key']:.2%}).")
    if num_kv_heads is not None:
        gqa_values = num_kv_heads * (head_dim + v_head_dim)
        report.update(gqa_values_per_token=gqa_values, gqa_bytes_per_token=gqa_values * item,
                      reduction_vs_gqa=1.0 - mla_values / gqa_values)
        text += (f" Against GQA with {num_kv_heads} KV heads ({gqa_values} values): "
                 f"{report['reduction_vs_gqa']:.2%}.")
    if claimed_reduction is not None:
        verdict = "holds to the rounding" if report["claim_holds"] else "does not hold"
        text += f" The claim of {claimed_reduction:.0%} {verdict}: the true figure is {reduction:.2%}."
    report["text"] = text
    return report


# ------------------------------------------------------------------------------------------------ the caches
class LatentCache:
    """A contiguous MLA cache: rows [B, S, latent_dim + rope_dim] (latent then RoPE key) for a batch of sequences
    of one length. Appending makes a new, longer cache (a copy: use PagedKVCache for long generations)."""

    def __init__(self, rows, latent_dim, rope_dim):
        rows = rows if isinstance(rows, Tensor) else tensor(rows)
        if rows.ndim != 3 or rows.shape[-1] != latent_dim + rope_dim:
            raise ShapeError(f"LatentCache: rows must be [B, S, {latent_dim + rope_dim}], got {rows.shape}")
        self.rows, self.latent_dim, self.rope_dim = rows.detach(), int(latent_dim), int(rope_dim)

    @property
    def length(self):
        return self.rows.shape[1]

    @property
    def latent(self):
        return Tensor(self.rows.data[..., :self.latent_dim], self.rows.dtype)

    @property
    def rope_key(self):
        return Tensor(self.rows.data[..., self.latent_dim:], self.rows.dtype)

    @property
    def bytes_per_token(self):
        return (self.latent_dim + self.rope_dim) * self.rows.dtype.itemsize

    def appended(self, new_rows):
        xp = backend.array_module(self.rows.data)
        data = xp.concatenate([self.rows.data, new_rows.data.astype(self.rows.data.dtype, copy=False)], axis=1)
        return LatentCache(Tensor(data, self.rows.dtype), self.latent_dim, self.rope_dim)

    def __repr__(self):
        return (f"LatentCache(batch {self.rows.shape[0]}, length {self.length}, latent {self.latent_dim} + rope "
                f"{self.rope_dim}, {self.rows.dtype.name})")


# ------------------------------------------------------------------------------------------------ the module
def _positive(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
        raise ShapeError(f"MultiLatentAttention: {what} must be a positive int, got {value!r}")
    return int(value)


class MultiLatentAttention(Module):
    """DeepSeek-V2 multi-latent attention (see the module docstring).

    ``forward(hidden_states [B, S, model_dim], kv_cache=None, *, seq_ids=None, slots=None, layer=0,
    position_ids=None) -> (output [B, S, model_dim], cache)``:

    * ``kv_cache=None``: causal attention over the S tokens; returns a new ``LatentCache``;
    * a ``LatentCache`` of length L: the tokens sit at positions L..L+S-1; returns the longer cache;
    * a ``PagedKVCache`` built with ``latent_dim`` and ``rope_dim``: ``seq_ids`` (B ids) name the sequences; the
      new tokens are reserved (unless ``slots`` from the caller's own ``reserve`` are given, as a multi-layer model
      does) and written to ``layer``; returns the same cache.

    S = 1 with a cache is a decode step (weight-absorbed, over the latents); otherwise K and V are rebuilt and the
    flash kernel runs. ``position_ids`` [B, S] override the positions the cache implies.
    """

    def __init__(self, model_dim=4096, latent_dim=512, num_q_heads=32, num_kv_heads=None, *, head_dim=None,
                 rope_dim=64, v_head_dim=None, q_latent_dim=None, rope_base=10000.0, max_position=4096, eps=1e-6,
                 dtype=None, device=None, generator=None):
        super().__init__()
        self.model_dim = _positive(model_dim, "model_dim")
        self.latent_dim = _positive(latent_dim, "latent_dim")
        self.num_q_heads = _positive(num_q_heads, "num_q_heads")
        self.num_kv_heads = self.num_q_heads if num_kv_heads is None else _positive(num_kv_heads, "num_kv_heads")
        if self.num_q_heads % self.num_kv_heads:
            raise ShapeError(f"MultiLatentAttention: num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim is None and model_dim % num_q_heads:
            raise ShapeError(f"MultiLatentAttention: model_dim ({model_dim}) is not a multiple of num_q_heads "
                             f"({num_q_heads}); give head_dim")
        self.head_dim = model_dim // num_q_heads if head_dim is None else _positive(head_dim, "head_dim")
        self.v_head_dim = self.head_dim if v_head_dim is None else _positive(v_head_dim, "v_head_dim")
        if isinstance(rope_dim, bool) or not isinstance(rope_dim, (int, numpy.integer)) or rope_dim < 0 or rope_dim % 2:
            raise ShapeError(f"MultiLatentAttention: rope_dim must be an even int >= 0, got {rope_dim!r}")
        self.rope_dim = int(rope_dim)
        self.q_latent_dim = None if q_latent_dim is None else _positive(q_latent_dim, "q_latent_dim")
        self.rope_base, self.max_position = float(rope_base), _positive(max_position, "max_position")
        self.scale = 1.0 / math.sqrt(self.head_dim + self.rope_dim)
        H, Hkv, dn, dr, dv, C = (self.num_q_heads, self.num_kv_heads, self.head_dim, self.rope_dim, self.v_head_dim,
                                 self.latent_dim)
        kw = dict(bias=False, dtype=dtype, device=device, generator=generator)
        if self.q_latent_dim is None:
            self.q_proj = Linear(model_dim, H * (dn + dr), **kw)
        else:
            self.q_a_proj = Linear(model_dim, self.q_latent_dim, **kw)
            self.q_a_layernorm = RMSNorm(self.q_latent_dim, eps, dtype=dtype, device=device)
            self.q_b_proj = Linear(self.q_latent_dim, H * (dn + dr), **kw)
        self.kv_a_proj_with_mqa = Linear(model_dim, C + dr, **kw)
        self.kv_a_layernorm = RMSNorm(C, eps, dtype=dtype, device=device)
        self.kv_b_proj = Linear(C, Hkv * (dn + dv), **kw)
        self.o_proj = Linear(H * dv, model_dim, **kw)

    def extra_repr(self):
        return (f"model_dim={self.model_dim}, latent_dim={self.latent_dim}, heads={self.num_q_heads}/"
                f"{self.num_kv_heads}, head_dim={self.head_dim}, rope_dim={self.rope_dim}, "
                f"v_head_dim={self.v_head_dim}, q_latent_dim={self.q_latent_dim}")

    def cache_report(self, dtype=None):
        """``mla_cache_report`` for this module's sizes (dtype: the weights' by default)."""
        return mla_cache_report(self.model_dim, self.num_q_heads, self.latent_dim, self.rope_dim, self.head_dim,
                                self.v_head_dim, dtype=dtype or self.o_proj.weight.dtype)

    # ------------------------------------------------------------- pieces
    def _project(self, x, positions):
        """q_nope [B, S, H, dn], rotated q_pe [B, S, H, dr], normalised latent [B, S, C], rotated k_pe [B, S, 1, dr]."""
        B, S, _ = x.shape
        H, dn, dr, C = self.num_q_heads, self.head_dim, self.rope_dim, self.latent_dim
        q = self.q_proj(x) if self.q_latent_dim is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.reshape(B, S, H, dn + dr).split([dn, dr], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([C, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = k_pe.reshape(B, S, 1, dr)
        if dr:
            top = int(positions.max()) + 1 if positions.size else 1
            length = max(self.max_position, 1 << (top - 1).bit_length())
            table_dtype = dtypes.f64 if x.dtype is dtypes.f64 else dtypes.f32   # f32 tables feed the kernel
            cos, sin = rope_cache(length, dr, self.rope_base, dtype=table_dtype, device=x.device)
            q_pe, k_pe = apply_rope(q_pe, k_pe, cos, sin, positions)
        return q_nope, q_pe, latent, k_pe

    def _flash_width(self, t):
        """The head size to zero-pad q/k and v to so that the flash kernel runs (None: no padding)."""
        dqk, dv = self.head_dim + self.rope_dim, self.v_head_dim
        if t.device != "cuda" or t.dtype not in (dtypes.bf16, dtypes.f16) or \
                backend.reference_forced():
            return None
        widths = sorted(_FLASH_TILES)
        if dqk == dv and dqk in widths:
            return None
        fits = [w for w in widths if w >= max(dqk, dv)]
        return fits[0] if fits else None

    def _attend_rebuilt(self, q_nope, q_pe, latent_all, k_pe_all):
        """Prefill: K, V rebuilt from the latents [B, T, C] and RoPE keys [B, T, 1, dr]; causal attention of the S
        queries (the last S of the T positions). Returns [B, S, H * dv]."""
        B, S, H, _ = q_nope.shape
        T = latent_all.shape[1]
        Hkv, dn, dr, dv = self.num_kv_heads, self.head_dim, self.rope_dim, self.v_head_dim
        k_nope, v = self.kv_b_proj(latent_all).reshape(B, T, Hkv, dn + dv).split([dn, dv], dim=-1)
        k = cat([k_nope, k_pe_all.expand(B, T, Hkv, dr)], dim=-1) if dr else k_nope
        q = cat([q_nope, q_pe], dim=-1) if dr else q_nope
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, heads, S or T, D]
        width = self._flash_width(q)
        if width is not None:
            def pad(t, n):
                extra = zeros(*t.shape[:-1], n - t.shape[-1], dtype=t.dtype, device=t.device)
                return cat([t, extra], dim=-1) if n > t.shape[-1] else t
            q, k, v = pad(q, width), pad(k, width), pad(v, width)
        out = attention(q, k, v, is_causal=True, scale=self.scale)
        if width is not None and width > dv:
            out = out[..., :dv]
        return out.transpose(1, 2).reshape(B, S, H * dv)

    def _absorbed_query(self, q_nope, q_pe, dtype):
        """[W_uk[h]^T q_nope_h | q_pe_h] for one token per sequence: [B, H, C + dr] (raw array in ``dtype``)."""
        xp = backend.array_module(q_nope.data)
        B = q_nope.shape[0]
        H, Hkv, dn, dv, C, dr = (self.num_q_heads, self.num_kv_heads, self.head_dim, self.v_head_dim,
                                 self.latent_dim, self.rope_dim)
        work = numpy.float64 if dtype is dtypes.f64 else numpy.float32
        w = self.kv_b_proj.weight.data.reshape(Hkv, dn + dv, C)
        q_lat = xp.matmul(q_nope.data.reshape(B, Hkv, H // Hkv, dn).astype(work), w[:, :dn].astype(work))
        parts = [q_lat.reshape(B, H, C)] + ([q_pe.data.reshape(B, H, dr).astype(work)] if dr else [])
        return xp.concatenate(parts, axis=-1).astype(dtype.storage)

    def _absorbed_output(self, o_latent):
        """W_uv[h] o_h for the attended latents o [B, H, C]: [B, 1, H * dv] in the weights' dtype."""
        xp = backend.array_module(o_latent)
        B = o_latent.shape[0]
        H, Hkv, dn, dv, C = self.num_q_heads, self.num_kv_heads, self.head_dim, self.v_head_dim, self.latent_dim
        weight = self.kv_b_proj.weight
        work = numpy.float64 if weight.dtype is dtypes.f64 else numpy.float32
        w_uv = weight.data.reshape(Hkv, dn + dv, C)[:, dn:].astype(work)             # [Hkv, dv, C]
        o = xp.matmul(o_latent.astype(work).reshape(B, Hkv, H // Hkv, C), xp.swapaxes(w_uv, -1, -2))
        return Tensor(o.reshape(B, 1, H * dv).astype(weight.dtype.storage), weight.dtype)

    # ------------------------------------------------------------- forward
    def forward(self, hidden_states, kv_cache=None, *, seq_ids=None, slots=None, layer=0, position_ids=None):
        x = hidden_states if isinstance(hidden_states, Tensor) else tensor(hidden_states)
        if x.ndim != 3 or x.shape[-1] != self.model_dim or 0 in x.shape:
            raise ShapeError(f"MultiLatentAttention: hidden_states must be [B, S, {self.model_dim}], got {x.shape}")
        B, S, _ = x.shape
        C, dr = self.latent_dim, self.rope_dim
        if kv_cache is None or isinstance(kv_cache, LatentCache):
            past = numpy.zeros(B, dtype=numpy.int64)
            if kv_cache is not None:
                if kv_cache.rows.shape[0] != B or (kv_cache.latent_dim, kv_cache.rope_dim) != (C, dr):
                    raise ShapeError(f"MultiLatentAttention: {kv_cache} does not fit batch {B}, latent {C}, rope {dr}")
                if kv_cache.rows.device != x.device:
                    raise DeviceError(f"MultiLatentAttention: cache on {kv_cache.rows.device}, input on {x.device}")
                past += kv_cache.length
        elif isinstance(kv_cache, PagedKVCache):
            if kv_cache.kind != "mla" or (kv_cache.latent_dim, kv_cache.rope_dim) != (C, dr):
                raise ShapeError(f"MultiLatentAttention: the paged cache must be built with latent_dim={C} and "
                                 f"rope_dim={dr}, got {kv_cache}")
            if kv_cache.device != x.device:
                raise DeviceError(f"MultiLatentAttention: cache on {kv_cache.device}, input on {x.device}")
            if seq_ids is None or len(seq_ids) != B:
                raise TesseraError(f"MultiLatentAttention: a paged cache needs seq_ids, one per batch row ({B})")
            seq_ids = list(seq_ids)
            if slots is None:
                slots = kv_cache.reserve(seq_ids, S)
            elif len(slots) != B * S:
                raise ShapeError(f"MultiLatentAttention: slots must hold B * S = {B * S} entries, got {len(slots)}")
            past = numpy.asarray([kv_cache.length(s) - S for s in seq_ids], dtype=numpy.int64)
            if past.min() < 0:
                raise TesseraError("MultiLatentAttention: the sequences hold fewer tokens than the slots given")
        else:
            raise TesseraError(f"MultiLatentAttention: kv_cache must be None, a LatentCache or a PagedKVCache, got "
                               f"{type(kv_cache).__name__}")
        if position_ids is None:
            positions = past[:, None] + numpy.arange(S)[None, :]
        else:
            positions = position_ids.data if isinstance(position_ids, Tensor) else position_ids
            positions = numpy.asarray(backend.to_device(positions, "cpu")).reshape(-1, S)

        decode = kv_cache is not None and S == 1
        if decode:
            with no_grad():
                return self._decode_step(x, kv_cache, positions, seq_ids, slots, layer)
        q_nope, q_pe, latent, k_pe = self._project(x, positions)
        new_rows = Tensor(backend.array_module(latent.data).concatenate(
            [latent.data, k_pe.data.reshape(B, S, dr).astype(latent.data.dtype, copy=False)], axis=-1), latent.dtype)
        if kv_cache is None:
            out = self._attend_rebuilt(q_nope, q_pe, latent, k_pe)
            cache = LatentCache(new_rows, C, dr)
        elif isinstance(kv_cache, LatentCache):
            old = kv_cache.rows.astype(latent.dtype)
            latent_all = cat([Tensor(old.data[..., :C], latent.dtype), latent], dim=1)
            k_pe_all = cat([Tensor(old.data[..., C:].reshape(B, -1, 1, dr), k_pe.dtype), k_pe], dim=1)
            out = self._attend_rebuilt(q_nope, q_pe, latent_all, k_pe_all)
            cache = kv_cache.appended(new_rows)
        else:
            kv_cache.write(slots, latent.data.reshape(B * S, C),
                           k_pe.data.reshape(B * S, dr) if dr else None, layer=layer)
            outs = []
            for b, sid in enumerate(seq_ids):   # each sequence has its own past: one attention call each
                past_latent, past_rope = (t.data[:int(past[b])] for t in kv_cache.gather(sid, layer))
                latent_all = cat([Tensor(past_latent, kv_cache.dtype).astype(latent.dtype), latent[b:b + 1, :, :]
                                  .reshape(S, C)], dim=0).unsqueeze(0)
                k_pe_all = cat([Tensor(past_rope.reshape(-1, 1, dr), kv_cache.dtype).astype(k_pe.dtype),
                                k_pe[b:b + 1].reshape(S, 1, dr)], dim=0).unsqueeze(0)
                outs.append(self._attend_rebuilt(q_nope[b:b + 1], q_pe[b:b + 1], latent_all, k_pe_all))
            out = outs[0] if B == 1 else cat(outs, dim=0)
            cache = kv_cache
        return self.o_proj(out), cache

    def _decode_step(self, x, kv_cache, positions, seq_ids, slots, layer):
        B = x.shape[0]
        C, dr = self.latent_dim, self.rope_dim
        q_nope, q_pe, latent, k_pe = self._project(x, positions)
        rows = backend.array_module(latent.data).concatenate(
            [latent.data, k_pe.data.reshape(B, 1, dr).astype(latent.data.dtype, copy=False)], axis=-1)
        if isinstance(kv_cache, LatentCache):
            cache = kv_cache.appended(Tensor(rows, latent.dtype))
            q_abs = self._absorbed_query(q_nope, q_pe, cache.rows.dtype)
            o_latent = mla_decode_attention(Tensor(q_abs, cache.rows.dtype), cache.rows, value_dim=C,
                                            scale=self.scale).data
        else:
            kv_cache.write(slots, latent.data.reshape(B, C), k_pe.data.reshape(B, dr) if dr else None, layer=layer)
            cache = kv_cache
            q_abs = self._absorbed_query(q_nope, q_pe, kv_cache.dtype)
            o_latent = kv_cache.attend(Tensor(q_abs, kv_cache.dtype), seq_ids, layer, scale=self.scale,
                                       value_dim=C).data
        return self.o_proj(self._absorbed_output(o_latent)), cache
