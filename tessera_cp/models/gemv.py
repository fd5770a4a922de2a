"""The decode step's operations on raw arrays (NumPy or CuPy): a reference written against the array module and,
for CuPy bf16 inputs, the kernels of ``cuda/gemv.cu``, which need no cuBLAS and can therefore be captured in a
CUDA graph.

* ``rows_linear``: ``out = epilogue(prologue(x) @ W.T)`` for a few rows x (one per sequence). W is bf16 [N, K] or
  int8 [N, K] with one float32 scale per output row (``CastedLinear``'s layout). Prologue: nothing, RMSNorm with a
  weight (``norm=``) or SwiGLU of the packed [gate | up] (``swiglu=True``); epilogue: scale, bias, residual.
  Each weight byte is read once per call (16-byte loads). Two kernels: ``gemv_rows`` (one block per few rows
  over all of K: the least latency, for the decode step's small matrices) and ``gemv_mma`` (tensor cores and
  split K, CastedLinear's weight-only kernel, launched by ``nn.casted.gemv_mma``); ``DECODE_KERNEL`` picks one per
  weight type (never per batch size: a sequence's result must not depend on its batch).
* ``rope_append``: RoPE of the new token's q and k at each sequence's position; k and v go into a paged KV cache
  (``PagedKVCache`` layout [num_blocks, Hkv, block_size, D] per layer) at that position; q into ``q_out``;
  ``lens = pos + 1``.
* ``argmax_rows``, ``embed_rows``: greedy token choice and the embedding lookup of the step.

Every function writes into ``out`` when given (static buffers, as a CUDA graph needs) and returns it. Arguments are
checked by the caller (the model builds them); the kernels run when the arrays are CuPy arrays of the supported
dtypes and layouts and ``TESSERA_REFERENCE`` is not "1", the reference otherwise.
"""
import os

import numpy

from .. import backend, dtypes
from ..nn import casted

MAX_ROWS = casted.GEMV_MAX_ROWS   # rows (sequences) a gemv kernel takes at once
ARGMAX_THREADS = 1024
ROPE_THREADS = 128
EMBED_THREADS = 128
GEMV_THREADS = 256            # gemv.cu's THREADS
# gemv_rows: (weight kind, MAXB) -> ROWS of W per block, as listed in gemv.cu's instantiations. int8 with one row
# of x takes 8 (bench/tune_gemv.py, H100, TinyLlama decode step with int8 weights: 1068 us against 1101 with 4),
# bf16 4 (bench/tune_decode.py, H100, the bf16 step's graph back to back: 1137.3 us against 1147.6 with 8 and
# 1198.4 with 16).
_GEMV_ROWS = {("bf16", 1): 4, ("bf16", 4): 8, ("bf16", 16): 4, ("int8", 1): 8, ("int8", 4): 4, ("int8", 16): 2}
# The decode step's kernel per weight kind: "rows" (gemv_rows) or "mma" (gemv_mma). bench/tune_gemv.py (H100,
# TinyLlama, batch 1): bf16 step 1182 us with gemv_rows against 1583 with gemv_mma, int8 1068 against 1387: on
# these small matrices one block per few rows over all of K has the least latency. (With 16 rows of x gemv_mma
# is 2-5x faster, but the choice must not depend on the batch: a sequence's result would then.)
DECODE_KERNEL = {"bf16": "rows", "int8": "rows"}
_NULL = numpy.uint64(0)       # a null pointer argument
_BF16 = dtypes.bf16.storage

_kernels = {}


def _kernel(name):
    from ..cuda import runtime
    import cupy
    key = (name, cupy.cuda.runtime.getDevice())
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = runtime.get_kernel("gemv.cu", name)
    return kernel


def _launch(name, grid, block, args):
    """Every kernel of gemv.cu calls pdl_wait() before it reads what the kernel before wrote: in a decode graph
    each launch overlaps the tail of the kernel before (runtime.pdl_while_capturing; a decode step measured 3%
    faster)."""
    from ..cuda import runtime
    runtime.launch(_kernel(name), grid, block, args, pdl=runtime.pdl_while_capturing())


def _reference_mode():
    return os.environ.get("TESSERA_REFERENCE", "") == "1"


def _aligned(a, elements=8):
    """A 2-D (or 1-D) CuPy array whose rows are contiguous and start on 16-byte boundaries."""
    item = a.dtype.itemsize
    if a.strides[-1] != item or a.data.ptr % 16:
        return False
    return a.ndim == 1 or (a.strides[0] % 16 == 0 and a.strides[0] // item % elements == 0)


def _acc_dtype(dtype):
    return numpy.dtype(numpy.float64) if numpy.dtype(dtype) == numpy.float64 else numpy.dtype(numpy.float32)


def _sigmoid(xp, z):
    e = xp.exp(-xp.abs(z))   # never overflows
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


# ------------------------------------------------------------------------------------------------ rows_linear
def _rows_linear_reference(x, weight, scale, bias, norm, eps, swiglu, residual, out_dtype):
    xp = backend.array_module(x)
    acc = _acc_dtype(x.dtype)
    xe = x.astype(acc, copy=False)
    if swiglu:
        K = xe.shape[1] // 2
        gate, up = xe[:, :K], xe[:, K:]
        xe = gate * _sigmoid(xp, gate) * up
    if norm is not None:
        xe = xe / xp.sqrt(xp.mean(xe * xe, axis=-1, keepdims=True) + acc.type(eps)) * norm.astype(acc)
    y = xe @ weight.astype(acc, copy=False).T
    if scale is not None:
        y = y * scale.astype(acc)
    if bias is not None:
        y = y + bias.astype(acc)
    if residual is not None:
        y = y + residual.astype(acc)
    return y.astype(out_dtype)


def rows_linear(x, weight, *, scale=None, bias=None, norm=None, eps=1e-6, swiglu=False, residual=None, out=None,
                out_dtype=None):
    """``prologue(x) @ weight.T * scale + bias + residual`` for x [B, K] (``swiglu``: [B, 2K] = [gate | up]).

    weight [N, K] (bf16/f32/f64, or int8 with ``scale`` [N] float32); ``norm`` [K]: RMSNorm of x with that weight
    and ``eps`` first; ``residual`` [B, N] (may be ``out`` itself); the result [B, N] in ``out_dtype`` (default
    x's dtype) or written into ``out``.
    """
    xp = backend.array_module(x)
    B, N = x.shape[0], weight.shape[0]
    if out is None:
        out = xp.empty((B, N), dtype=out_dtype or x.dtype)
    kind = "int8" if weight.dtype == numpy.int8 else "bf16"
    if x.dtype != _BF16 or not casted.gemv_mma_supported(x, weight, out, scale, bias, norm, residual, swiglu):
        out[...] = _rows_linear_reference(x, weight, scale, bias, norm, eps, swiglu, residual, out.dtype)
        return out
    if DECODE_KERNEL[kind] == "mma" or (bias is not None and bias.dtype != _BF16):   # gemv_rows takes bf16 bias
        return casted.gemv_mma(x, weight, out, scale=scale, bias=bias, norm=norm, eps=eps, swiglu=swiglu,
                               residual=residual)
    K = weight.shape[1]
    maxb = 1 if B == 1 else (4 if B <= 4 else 16)
    rows = _GEMV_ROWS[(kind, maxb)]
    wt = "signed char" if kind == "int8" else "__nv_bfloat16"
    ot = "float" if out.dtype == numpy.float32 else "__nv_bfloat16"
    pro = 2 if swiglu else (1 if norm is not None else 0)
    i64 = numpy.int64
    _launch(f"gemv_rows<{wt}, {ot}, {pro}, {maxb}, {rows}>", -(-N // rows), GEMV_THREADS,
            (x, i64(x.strides[0] // 2), _NULL if norm is None else norm, numpy.float32(eps), weight,
             _NULL if scale is None else scale, _NULL if bias is None else bias,
             _NULL if residual is None else residual, i64(0 if residual is None else residual.strides[0] // 2),
             out, i64(out.strides[0] // out.dtype.itemsize), numpy.int32(B), numpy.int32(N), numpy.int32(K)))
    return out


# ------------------------------------------------------------------------------------------------ rope_append
def rope_append(qkv, cos, sin, pos, table, k_cache, v_cache, num_heads, num_kv_heads, q_out, lens):
    """RoPE and KV-cache append for one new token per sequence.

    qkv [B, (Hq + 2 Hkv) D] (q heads, k heads, v heads); cos/sin [P, D/2]; pos [B] int32 (the token's position);
    table [B, W] int32 block ids; k_cache/v_cache [num_blocks, Hkv, block_size, D] (block_size a power of two);
    q_out [B, Hq, D]; lens [B] int32 receives pos + 1.
    """
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    Hq, Hkv = num_heads, num_kv_heads
    block_size = k_cache.shape[2]
    kernel_ok = (not _reference_mode() and backend.is_cupy_array(qkv) and qkv.dtype == _BF16
                 and k_cache.dtype == _BF16 and cos.dtype == numpy.float32 and qkv.strides[-1] == 2
                 and q_out.flags.c_contiguous and k_cache.strides == v_cache.strides and k_cache.strides[-1] == 2
                 and table.flags.c_contiguous and cos.flags.c_contiguous and sin.flags.c_contiguous)
    if kernel_ok:
        item, i64 = 2, numpy.int64
        pairs = (Hq + 2 * Hkv) * (D // 2)  # one thread each
        _launch("rope_append", B * -(-pairs // ROPE_THREADS), ROPE_THREADS,
                (qkv, i64(qkv.strides[0] // item), cos, sin, pos, table, i64(table.shape[1]),
                 numpy.int32(block_size.bit_length() - 1), k_cache, v_cache, i64(k_cache.strides[0] // item),
                 i64(k_cache.strides[1] // item), i64(k_cache.strides[2] // item), q_out, lens, numpy.int32(Hq),
                 numpy.int32(Hkv), numpy.int32(D)))
        return q_out
    xp = backend.array_module(qkv)
    half = D // 2
    acc = numpy.promote_types(_acc_dtype(qkv.dtype), cos.dtype)
    p = pos.astype(numpy.int64)
    heads = qkv.reshape(B, Hq + 2 * Hkv, D).astype(acc)
    c, s = cos[p][:, None, :].astype(acc), sin[p][:, None, :].astype(acc)
    x1, x2 = heads[:, :Hq + Hkv, :half], heads[:, :Hq + Hkv, half:]
    rotated = xp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    q_out[...] = rotated[:, :Hq].astype(q_out.dtype)
    blk = table[xp.arange(B), p // block_size]
    off = p % block_size
    k_cache[blk, :, off, :] = rotated[:, Hq:].astype(k_cache.dtype)
    v_cache[blk, :, off, :] = heads[:, Hq + Hkv:].astype(v_cache.dtype)
    lens[...] = (p + 1).astype(lens.dtype)
    return q_out


# ------------------------------------------------------------------------------------------------ argmax, embed
def argmax_rows(logits, out):
    """out[b] = the first index of the largest value of logits[b] (float32 [B, V]); out int32 [B]."""
    if not _reference_mode() and backend.is_cupy_array(logits) and logits.dtype == numpy.float32 and \
            logits.strides[-1] == 4:
        _launch("argmax_rows", logits.shape[0], ARGMAX_THREADS,
                (logits, numpy.int64(logits.strides[0] // 4), numpy.int32(logits.shape[1]), out))
        return out
    xp = backend.array_module(logits)
    out[...] = xp.argmax(logits, axis=-1).astype(out.dtype)
    return out


def embed_rows(table, tokens, out):
    """out[b] = table[tokens[b]]: table [V, H], tokens int32 [B], out [B, H]."""
    H = table.shape[1]
    if not _reference_mode() and backend.is_cupy_array(table) and table.dtype == _BF16 and H % 8 == 0 and \
            table.flags.c_contiguous and table.data.ptr % 16 == 0 and _aligned(out):
        _launch("embed_rows", tokens.shape[0], EMBED_THREADS,
                (table, tokens, out, numpy.int64(out.strides[0] // 2), numpy.int32(H)))
        return out
    out[...] = table[tokens.astype(numpy.int64)]
    return out
