"""Scaled dot-product attention: ``attention`` (= ``flash_attention``), GQA/MQA, ALiBi, dropout, chunked attention.

``attention(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None)`` with q ``[B, Hq, Sq, D]`` and k, v
``[B, Hkv, Sk, D]`` (``Hq`` a multiple of ``Hkv``: grouped-query attention, ``Hkv = 1`` multi-query; query head h
reads KV head ``h // (Hq // Hkv)``, nothing is expanded or copied) computes ``softmax(scale * q k^T + bias) v``:

* ``is_causal``: query i sees keys ``j <= i + Sk - Sq`` (aligned to the bottom-right, what decoding against a KV
  cache needs); with ``Sq > Sk`` the first ``Sq - Sk`` rows see nothing;
* ``mask``: boolean (True = attend, as PyTorch's SDPA) or additive float, broadcastable to ``[B, Hq, Sq, Sk]``;
* ``alibi_slopes`` (``[Hq]`` or ``[B, Hq]``): bias ``-slope * |i + Sk - Sq - j|``, computed in the kernel;
* a row that sees no key at all gives zeros (never NaN) and a log-sum-exp of +inf;
* ``dropout_p``: dropout on the normalised probabilities (the softmax normaliser is that of the undropped ones, as
  in FlashAttention), kept ones scaled by 1 / (1 - p). The mask comes from a counter-based RNG, Philox4x32-10 keyed
  by ``dropout_seed`` (an int, a ``tessera_cp.Generator`` to draw one from, or None: the default generator) with
  ``dropout_offset`` (0 <= offset < 2^32) and the element's (batch, head, query, key) in the counter, so the same
  seed and offset give the same mask on every backend, forward and backward (``dropout_keep_mask`` says the exact
  rule). Each element takes 16 random bits, so p is rounded to a multiple of 2^-16 (the scale uses the rounded p:
  the expectation is exact); a p under 2^-17 rounds to no dropout.

The reference (array-module generic: NumPy on the CPU, CuPy on the GPU) computes in f32 for half inputs (f64 for
f64) and is the oracle for the kernels. The CUDA path (``cuda/attention.cu``, ``cuda/attention_bwd.cu``) runs for
CuPy bf16/f16 inputs with head dim 32, 64, 96, 128 or 256 (backward: up to 128; dropout: 64 and 128) and equal q/k
and v head dims, unless ``TESSERA_REFERENCE=1``; short queries against long keys (decode) pack the query heads of a
KV group into one tile and split the keys across blocks (flash-decoding), merged by log-sum-exp. The backward
recomputes the probabilities from the saved log-sum-exp (nothing S x S is kept) and the dropout mask from the
seed, and is deterministic (no atomics). On compute capability 9.0 the forward of D 64 / 128 without mask, ALiBi or
dropout runs ``cuda/attention_sm90.cu`` instead (wgmma, TMA, warp-specialized; ``TESSERA_ATTN_SM90=0`` turns it
off) when the call has at least as many 128-row blocks as the GPU has SMs; its LSE feeds the same backward.

Host time: a call that records no graph (no input requires grad, or grad mode off) without mask, ALiBi or dropout
(the inference and decode case) takes a short path: its launch (kernel, grid, argument block, scratch buffers) is
built once per shape, strides, dtype, scale, causality, device and stream, after the full argument checks ran once
for that combination; later calls only read the shapes, allocate the output and launch through the driver.
"""
import ctypes
import math
import os
import threading

import numpy

from .. import backend, dtypes
from ..autograd import Function, is_grad_enabled
from ..cuda import runtime
from ..errors import DeviceError, DTypeError, ShapeError, TesseraError
from ..precision import accumulate_storage
from ..tensor import Generator, Tensor, cat, randint, tensor, where
from .position import alibi_slopes as slope_table

__all__ = ["attention", "flash_attention", "grouped_query_attention", "multi_query_attention", "chunked_attention",
           "alibi_slopes", "dropout_keep_mask", "philox4x32"]

_KERNEL_TYPES = {numpy.dtype(numpy.float16): "__half", dtypes.bf16.storage: "__nv_bfloat16"}
# Tile shapes per head dim, as the kernels' template arguments: forward (warps, 16-row tiles per warp MT, keys per
# tile BN, blocks per SM the registers are sized for, K/V pipeline stages; a block owns 16 * MT * warps query rows),
# the same for decode (packed query groups, split keys) and for masked/ALiBi attention, dQ (warps, MT, BN), dK/dV
# (warps: a block owns 16 * warps keys, queries per tile BMQ). The instantiations attention.cu / attention_bwd.cu
# list must include the 64 and 128 ones; the sweep in bench/bench_attention.py (TESSERA_ATTN_SWEEP=1) compares
# alternatives.
_FWD_TILES = {32: (4, 1, 64, 2, 2), 64: (4, 2, 64, 2, 2), 96: (8, 1, 64, 1, 2), 128: (4, 2, 32, 2, 2),
              256: (8, 1, 32, 1, 2)}
_DECODE_TILES = {32: (4, 1, 64, 2, 2), 64: (4, 1, 64, 2, 2), 96: (4, 1, 64, 2, 2), 128: (4, 1, 64, 2, 2),
                 256: (8, 1, 32, 1, 2)}
# With a mask or ALiBi (the kernel's EXTRA code): MT = 2 would spill there.
_MASKED_TILES = {32: (4, 1, 64, 2, 2), 64: (4, 1, 64, 2, 2), 96: (4, 1, 64, 2, 2), 128: (4, 1, 64, 2, 2),
                 256: (8, 1, 32, 1, 2)}
_DQ_TILES = {32: (4, 1, 64), 64: (4, 2, 32), 96: (8, 1, 32), 128: (4, 2, 32)}
_DKDV_TILES = {32: (8, 32), 64: (4, 64), 96: (8, 32), 128: (4, 32)}
# With dropout (the kernels' EXTRA and DROP code, Philox in the inner loop): the largest tiles that compile without
# spills (nvcc --resource-usage, sm_90a), forward as _FWD_TILES, dQ as _DQ_TILES, dK/dV as _DKDV_TILES.
_DROP_TILES = {64: (4, 1, 64, 2, 2), 128: (4, 1, 64, 2, 2)}
_DROP_DQ_TILES = {64: (4, 1, 64), 128: (4, 1, 32)}
_DROP_DKDV_TILES = {64: (4, 32), 128: (4, 16)}
_TARGET_BLOCKS_PER_SM = 2  # split-KV aims at this many blocks per multiprocessor when a launch is too small


# ------------------------------------------------------------------------------------------------ ALiBi helpers
def alibi_slopes(num_heads, device=None):
    """ALiBi slopes for ``num_heads`` heads as the f32 tensor [num_heads] that ``attention(alibi_slopes=...)`` takes
    (the paper's values: ``nn.position.alibi_slopes``)."""
    return tensor(slope_table(num_heads).astype(numpy.float32), device=device)


# ------------------------------------------------------------------------------------------------ Philox dropout
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def philox4x32(counter, key, rounds=10):
    """Philox4x32 (Salmon et al. 2011) on arrays: ``counter`` is four arrays (or ints) of 32-bit words, ``key``
    two; returns four uint64 arrays holding the 32-bit outputs. Works on NumPy and CuPy arrays alike."""
    c0, c1, c2, c3 = counter
    xp = backend.array_module(*[c for c in counter if hasattr(c, "dtype")])
    c0, c1, c2, c3 = (xp.asarray(c, dtype=xp.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = (int(x) & _U32 for x in key)
    for _ in range(rounds):
        p0 = c0 * _PHILOX_M[0]  # 32 x 32 -> 64-bit products: the high and low words are the mulhilo pair
        p1 = c2 * _PHILOX_M[1]
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _U32, (p0 >> 32) ^ c3 ^ k1, p0 & _U32
        k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
    return c0, c1, c2, c3


def _drop_threshold(p):
    """Dropout's keep threshold on 16 random bits: round(p * 2^16), at most 2^16 - 1 (0: no dropout)."""
    return min(int(p * 65536.0 + 0.5), 65535)


def _drop_scale(threshold):
    """1 / (1 - p) for the rounded p = threshold / 2^16."""
    return 65536.0 / (65536 - threshold)


def dropout_keep_mask(shape, p, seed, offset=0, xp=numpy):
    """The boolean keep-mask attention's dropout uses for probabilities of ``shape`` ([B, Hq, Sq, Sk]).

    Element (b, h, i, j) takes 16 bits of Philox4x32-10 with key (seed low 32 bits, seed high 32 bits) and counter
    (4 (j // 16) + (j % 8) // 2,  8 (i // 16) + i % 8,  b Hq + h,  offset): of output word 2 ((i // 8) % 2) +
    (j // 8) % 2, the low half for even j and the high half for odd j. It is kept when those bits are
    >= round(p 2^16). (One Philox call thus covers rows i, i + 8 and keys j, j + 1, j + 8, j + 9: the elements one
    thread of the kernels' mma.sync tiles holds.)
    """
    B, H, Sq, Sk = (int(n) for n in shape)
    u64, seed, offset = xp.uint64, int(seed), int(offset)
    i, j = xp.arange(Sq, dtype=u64), xp.arange(Sk, dtype=u64)
    pair = (i >> 4) * 8 + (i & 7)             # counter word 1 of query row i
    quad = (j >> 4) * 4 + ((j & 7) >> 1)      # counter word 0 of key j
    n_pair, n_quad = ((Sq - 1) // 16 + 1) * 8, ((Sk - 1) // 16 + 1) * 4
    words = philox4x32((xp.arange(n_quad, dtype=u64)[None, None, :], xp.arange(n_pair, dtype=u64)[None, :, None],
                        xp.arange(B * H, dtype=u64)[:, None, None], offset & _U32), (seed & _U32, (seed >> 32) & _U32))
    words = xp.stack([xp.broadcast_to(w, (B * H, n_pair, n_quad)) for w in words], axis=-1)
    which = (((i >> 3) & 1) * 2)[:, None] + ((j >> 3) & 1)[None, :]
    bits = words[:, pair.astype(xp.intp)[:, None], quad.astype(xp.intp)[None, :], which.astype(xp.intp)]
    bits = (bits >> ((j & 1) * 16)[None, None, :]) & 0xFFFF
    return (bits >= _drop_threshold(p)).reshape(B, H, Sq, Sk)


# ------------------------------------------------------------------------------------------------ the reference
def _scores(q, k, mask, slopes, scale, causal, acc):
    """scale * q k^T + bias, masked entries -inf: [B, Hq, Sq, Sk] in ``acc`` (a query group shares its KV head)."""
    xp = backend.array_module(q, k)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    qg = q.astype(acc).reshape(B, Hkv, Hq // Hkv, Sq, D)
    s = xp.matmul(qg, xp.swapaxes(k.astype(acc), -1, -2)[:, :, None]) * acc.type(scale)
    s = s.reshape(B, Hq, Sq, Sk)
    if slopes is not None:
        dist = xp.abs(xp.arange(Sq)[:, None] + (Sk - Sq) - xp.arange(Sk)[None, :]).astype(acc)
        s = s - slopes.astype(acc).reshape(-1, Hq, 1, 1) * dist
    if mask is not None:
        s = xp.where(mask, s, -xp.inf) if mask.dtype == numpy.bool_ else s + mask.astype(acc)
    if causal:
        seen = xp.arange(Sk)[None, :] <= xp.arange(Sq)[:, None] + (Sk - Sq)
        s = xp.where(seen, s, -xp.inf)
    return s


def _forward_reference(q, k, v, mask, slopes, scale, causal, keep_scale):
    """(out in q's dtype, lse in the accumulation dtype); keep_scale: None, or the dropout mask times 1/(1-p)."""
    xp = backend.array_module(q, k, v)
    acc = accumulate_storage(q.dtype)
    s = _scores(q, k, mask, slopes, scale, causal, acc)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)          # a row that sees nothing: any finite shift
    p = xp.exp(s - m)
    total = p.sum(axis=-1, keepdims=True)
    seen = total > 0
    total = xp.where(seen, total, 1)
    p = p / total
    lse = xp.where(seen, xp.log(total) + m, xp.inf)[..., 0]
    if keep_scale is not None:
        p = p * keep_scale
    B, Hq, Sq, Sk = s.shape
    Hkv = k.shape[1]
    out = xp.matmul(p.reshape(B, Hkv, Hq // Hkv, Sq, Sk), v.astype(acc)[:, :, None])
    return out.reshape(B, Hq, Sq, v.shape[-1]).astype(q.dtype), lse


def _backward_reference(grad, q, k, v, mask, slopes, lse, scale, causal, keep_scale, need):
    """Gradients (dq, dk, dv, dmask, dslopes) from the recomputed probabilities; ``need`` says which of mask and
    slopes want theirs."""
    xp = backend.array_module(q, k, v, grad)
    acc = lse.dtype
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = _scores(q, k, mask, slopes, scale, causal, acc)
    p = xp.exp(s - lse[..., None])                # lse = +inf (row sees nothing): p = 0
    g = grad.astype(acc).reshape(B, Hkv, G, Sq, -1)
    dp = xp.matmul(g, xp.swapaxes(v.astype(acc), -1, -2)[:, :, None]).reshape(B, Hq, Sq, Sk)
    pd = p
    if keep_scale is not None:                    # out = (p * keep / (1 - p_drop)) v
        pd, dp = p * keep_scale, dp * keep_scale
    dv = xp.matmul(xp.swapaxes(pd.reshape(B, Hkv, G, Sq, Sk), -1, -2), g).sum(axis=2)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))   # d loss / d (scaled score + bias)
    ds5 = ds.reshape(B, Hkv, G, Sq, Sk)
    dq = xp.matmul(ds5, k.astype(acc)[:, :, None]).reshape(B, Hq, Sq, D) * acc.type(scale)
    dk = xp.matmul(xp.swapaxes(ds5, -1, -2), q.astype(acc).reshape(B, Hkv, G, Sq, D)).sum(axis=2) * acc.type(scale)
    dmask = ds.astype(mask.dtype) if need[0] else None
    dslopes = None
    if need[1]:
        dist = xp.abs(xp.arange(Sq)[:, None] + (Sk - Sq) - xp.arange(Sk)[None, :]).astype(acc)
        dslopes = -(ds * dist).sum(axis=(2, 3))   # [B, Hq]
        dslopes = (dslopes.sum(axis=0) if slopes.ndim == 1 else dslopes).astype(slopes.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dmask, dslopes


# ------------------------------------------------------------------------------------------------ the CUDA path
def _kernel_ready(q, k, v, mask, slopes, dropout):
    """Whether the kernels take these arrays; ``dropout``: whether dropout is on (threshold > 0)."""
    if os.environ.get("TESSERA_REFERENCE", "") == "1":
        return False
    arrays = [a for a in (q, k, v, mask, slopes) if a is not None]
    if not all(backend.is_cupy_array(a) for a in arrays):
        return False
    return (q.dtype in _KERNEL_TYPES and k.dtype == q.dtype and v.dtype == q.dtype and q.shape[-1] in _FWD_TILES
            and v.shape[-1] == q.shape[-1] and (not dropout or q.shape[-1] in _DROP_TILES))


def _drop_args(drop):
    """The kernels' trailing dropout arguments (Philox key words, offset, threshold, 1 / (1 - p)) for ``drop`` =
    (seed, offset, threshold) or None."""
    u32 = numpy.uint32
    if drop is None:
        return (u32(0), u32(0), u32(0), u32(0), numpy.float32(1.0))
    seed, offset, threshold = drop
    return (u32(seed & _U32), u32((seed >> 32) & _U32), u32(offset), u32(threshold),
            numpy.float32(_drop_scale(threshold)))


def _rows_ready(x):
    """x itself when its rows suit the kernels (unit stride along D, other strides multiples of 16 bytes,
    16-byte aligned), else a contiguous copy. Returns (array, element strides of dims 0..2)."""
    item = x.dtype.itemsize
    s0, s1, s2, s3 = x.strides
    if s3 != item or min(s0, s1, s2) < 0 or (s0 | s1 | s2 | x.data.ptr) & 15:
        xp = backend.array_module(x)
        x = xp.ascontiguousarray(x)
        s0, s1, s2, _ = x.strides
    i64 = numpy.int64
    return x, (i64(s0 // item), i64(s1 // item), i64(s2 // item))


_per_device = {}  # device id -> (multiprocessor count, f32 and uint8 placeholders for absent kernel arguments,
#                   the arguments of no mask, an int32 placeholder)


def _device_info(xp):
    dev = xp.cuda.runtime.getDevice()
    info = _per_device.get(dev)
    if info is None:
        sms = runtime.device_attribute(runtime.SM_COUNT, dev)
        with xp.cuda.Device(dev):
            dummy_f, dummy_b = xp.zeros(1, dtype=xp.float32), xp.zeros(1, dtype=xp.uint8)
            dummy_i = xp.zeros(1, dtype=xp.int32)
        i64, i32 = numpy.int64, numpy.int32
        no_mask = ((dummy_f, dummy_b, dummy_f), (i64(0),) * 4, (i32(0),), 0, 0)  # _mask_args(None, None)
        info = _per_device[dev] = (sms, dummy_f, dummy_b, no_mask, dummy_i)
    return info


def _mask_args(mask, slopes, xp):
    """Kernel arguments for the mask and ALiBi: (mask_f, mask_b, slopes, 4 mask strides, slopes_sb, kind, alibi)."""
    _, dummy_f, dummy_b, no_mask, _ = _device_info(xp)
    if mask is None and slopes is None:
        return no_mask
    kind, mask_f, mask_b, strides = 0, dummy_f, dummy_b, (0, 0, 0, 0)
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if m.dtype == numpy.bool_:
            kind, mask_b = 2, m.view(xp.uint8)
            m = mask_b
        else:
            kind, mask_f = 1, m.astype(xp.float32, copy=False)
            m = mask_f
        strides = tuple(0 if m.shape[d] == 1 else m.strides[d] // m.dtype.itemsize for d in range(4))
    slopes_arr, slopes_sb, alibi = dummy_f, 0, 0
    if slopes is not None:
        slopes_arr = xp.ascontiguousarray(slopes.astype(xp.float32, copy=False))
        alibi = 1
        slopes_sb = slopes_arr.shape[-1] if slopes_arr.ndim == 2 and slopes_arr.shape[0] > 1 else 0
    i64, i32 = numpy.int64, numpy.int32
    return (mask_f, mask_b, slopes_arr), tuple(i64(s) for s in strides), (i32(slopes_sb),), kind, alibi


_kernels = {}  # (source, name, device id) -> kernel: a dict lookup per launch instead of the runtime's bookkeeping


def _kernel(source, name):
    import cupy
    key = (source, name, cupy.cuda.runtime.getDevice())
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = runtime.get_kernel(source, name)
    return kernel


_launched = {}  # kernel -> (the dynamic shared memory its first launch opted in to, its CuPy Function)


def _launch(kernel, grid, block, args, shared_mem=0):
    """runtime.launch without what it repeats on every call (argument checks, the shared-memory opt-in, a driver
    call, CuPy's RawKernel wrapper): a kernel's first launch, and every launch under TESSERA_SYNC, go through
    runtime.launch. Decode is bound by this host time (tens of microseconds against a kernel of about fifty).
    A kernel object serves one device (see _kernel), so its Function is fixed. grid and block are tuples."""
    seen = _launched.get(kernel)
    if seen is None or seen[0] != shared_mem or os.environ.get("TESSERA_SYNC"):
        runtime.launch(kernel, grid, block, args, shared_mem=shared_mem)
        _launched[kernel] = (shared_mem, getattr(kernel, "kernel", kernel))
    else:
        seen[1](grid, block, args, shared_mem=shared_mem)


def _alloc(xp, shape, dtype):
    """Kernel outputs (tests replace this with a NaN-filled allocation to catch elements no kernel wrote); the
    ndarray constructor itself, a little less host time than empty()."""
    return xp.ndarray(shape, dtype=dtype)


_scratch = {}  # (device, stream) -> (f32 partial outputs, f32 partial LSEs, int32 merge tickets, all zero)


def _partials(xp, n_out, n_lse, n_tickets):
    """Buffers for split-KV partials (at least n_out and n_lse floats) and n_tickets zeroed merge counters, kept
    per device and stream: work queued on one stream runs in order, so a launch cannot overwrite partials an
    earlier one still merges, and each launch leaves the counters at zero for the next."""
    key = (xp.cuda.runtime.getDevice(), xp.cuda.get_current_stream().ptr)
    bufs = _scratch.get(key)
    if bufs is None or bufs[0].size < n_out or bufs[1].size < n_lse or bufs[2].size < n_tickets:
        old = (0, 0, 0) if bufs is None else tuple(b.size for b in bufs)
        bufs = _scratch[key] = (xp.empty(max(n_out, old[0]), dtype=xp.float32),
                                xp.empty(max(n_lse, old[1]), dtype=xp.float32),
                                xp.zeros(max(n_tickets, old[2]), dtype=xp.int32))
    return bufs


def _scalar_args(values):
    """Kernel scalars as CuPy's own argument objects (cupy.cuda.function.CInt32 / CInt64 hold the bits), built
    once per plan: CuPy then skips converting each NumPy scalar at every launch (about half a microsecond each,
    thirty a launch). Arrays and anything else pass through; without those classes, the scalars themselves."""
    try:
        from cupy.cuda.function import CInt32, CInt64
        out = []
        for x in values:
            if isinstance(x, numpy.generic) and x.dtype.itemsize == 4:
                out.append(CInt32(int(x.view(numpy.int32))))
            elif isinstance(x, numpy.generic) and x.dtype.itemsize == 8:
                out.append(CInt64(int(x.view(numpy.int64))))
            else:
                out.append(x)
        return tuple(out)
    except Exception:  # noqa: BLE001 - pragma: no cover - another CuPy: its own conversion at each launch
        return tuple(values)


_plans = {}  # unmasked forward: (shapes, strides, dtype, scale, causal, device, stream) -> _forward_plan(...)


def _forward_kernel(q, k, v, mask, slopes, scale, causal, drop=None):
    """(out, lse) from the CUDA kernels; ``drop``: None or dropout's (seed, offset, threshold). Without mask, ALiBi
    or dropout the launch is planned once per shape, strides, scale, device and stream, then only outputs are
    allocated."""
    xp = backend.array_module(q)
    if mask is None and slopes is None and drop is None and _use_sm90(q, scale):
        return _forward_sm90(q, k, v, scale, causal)
    if mask is not None or slopes is not None or drop is not None or (q.data.ptr | k.data.ptr | v.data.ptr) & 15:
        return _run_forward(_forward_plan(q, k, v, mask, slopes, scale, causal, drop), q, k, v, xp)
    key = (q.shape, k.shape, v.shape, q.strides, k.strides, v.strides, q.dtype, scale, causal,
           xp.cuda.runtime.getDevice(), xp.cuda.get_current_stream().ptr)
    plan = _plans.get(key)
    if plan is None:
        plan = _forward_plan(q, k, v, None, None, scale, causal)
        if plan[-1]:  # inputs that needed no copy
            if len(_plans) > 1024:
                _plans.clear()
            _plans[key] = plan
    return _run_forward(plan, q, k, v, xp)


def _run_forward(plan, q, k, v, xp):
    kernel, grid, block, smem, tail, o_shape, lse_shape, inputs = plan[:8]
    if inputs is not None:  # the plan's own (contiguous) copies
        q, k, v = inputs
    o = _alloc(xp, o_shape, q.dtype)
    lse = _alloc(xp, lse_shape, xp.float32)
    _launch(kernel, grid, block, (q, k, v, o, lse) + tail, shared_mem=smem)
    return o, lse


def _forward_plan(q, k, v, mask, slopes, scale, causal, drop=None):
    """Everything a forward launch needs but the outputs: (kernel, grid, block, shared memory, arguments after
    q, k, v, o, lse (as CuPy argument objects), output shapes, contiguous copies of q, k, v or None, whether the
    plan may be kept, the same arguments as arrays and NumPy scalars)."""
    xp = backend.array_module(q)
    i32, f32 = numpy.int32, numpy.float32
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    ctype = _KERNEL_TYPES[q.dtype]
    # Short queries of a KV group (decode) share one tile when that reads each K/V byte fewer times.
    fwd, dec = _FWD_TILES[D], _DECODE_TILES[D]
    # (Dropout's Philox counter takes rows i and i + 8 of one head from one tile: no packing there.)
    pack = drop is None and G > 1 and -(-G * Sq // (16 * dec[0] * dec[1])) < G * -(-Sq // (16 * fwd[0] * fwd[1]))
    pointers, m_st, slope_sb, kind, alibi = _mask_args(mask, slopes, xp)
    extra = "true" if (kind or alibi or drop is not None) else "false"
    if drop is not None:
        warps, mt, bn, minb, stages = _DROP_TILES[D]
    else:
        warps, mt, bn, minb, stages = dec if pack else (_MASKED_TILES[D] if kind or alibi else fwd)
    bm = 16 * mt * warps
    q2, q_st = _rows_ready(q)
    k2, k_st = _rows_ready(k)
    v2, v_st = _rows_ready(v)
    copied = q2 is not q or k2 is not k or v2 is not v
    rows = G * Sq if pack else Sq
    m_blocks, heads = -(-rows // bm), (Hkv if pack else Hq)
    tiles = -(-Sk // bn)
    n_splits, per_split = 1, tiles
    blocks = m_blocks * heads * B
    sms, dummy_f = _device_info(xp)[:2]
    target = max(_TARGET_BLOCKS_PER_SM, minb) * sms
    if blocks < target and tiles > 1:   # too few blocks to fill the GPU: split the keys (flash-decoding)
        per_split = max(1, -(-tiles // min(tiles, -(-target // blocks), 65535)))
        n_splits = -(-tiles // per_split)
    if n_splits > 1:  # partials, and a merge ticket per row block (the last split to finish merges)
        o_part, lse_part, tickets = _partials(xp, n_splits * B * Hq * Sq * D, n_splits * B * Hq * Sq,
                                              heads * B * m_blocks)
    else:
        o_part = lse_part = dummy_f
        tickets = _device_info(xp)[4]
    dropout = "" if drop is None else ", true"
    kernel = _kernel("attention.cu",
                     f"attn_fwd<{ctype}, {D}, {warps}, {mt}, {bn}, {minb}, {stages}, {extra}{dropout}>")
    smem = (bm + 2 * stages * bn) * (D + 8) * q.dtype.itemsize
    raw = (o_part, lse_part, tickets, *pointers, i32(Hq), i32(Hkv), i32(Sq), i32(Sk), *q_st, *k_st, *v_st, *m_st,
           *slope_sb, f32(scale), i32(bool(causal)), i32(kind), i32(alibi), i32(pack), i32(n_splits),
           i32(per_split), *_drop_args(drop))
    # grid: (heads and batch, row blocks, key splits); the kernel walks row blocks longest-first.
    return (kernel, (heads * B, m_blocks, n_splits), (32 * warps,), smem, _scalar_args(raw), (B, Hq, Sq, D),
            (B, Hq, Sq), (q2, k2, v2) if copied else None, not copied, raw)


# The Hopper forward (cuda/attention_sm90.cu): wgmma and TMA, 128 query rows a work item, 384 threads; compute
# capability 9.0, head dims 64 and 128, no mask, ALiBi or dropout, and enough row blocks to fill the GPU (decode
# shapes keep attn_fwd's packed, split-KV launch). TESSERA_ATTN_SM90=0 turns it off (A/B comparisons).
_SM90_DIMS = (64, 128)
_SM90_ROWS = 128     # BM = BN of the kernel
_SM90_THREADS = 384
_SM90_BLOCKS_PER_SM = 1  # the persistent grid (bench/tune_attention_sm90.py sets a large value: a block an item)


def _sm90_smem(D):
    """The dynamic shared memory attn_fwd_sm90 needs (its Tiles<D>): Q, O, 2 stages of K and V (64-column boxes of
    128-byte rows), 10 barriers, 1024 bytes to align the base."""
    box = _SM90_ROWS * 128
    return (D // 64) * box * (2 + 2 * 2) + 8 * 10 + 1024


def _use_sm90(q, scale):
    """Whether attn_fwd_sm90 takes this unmasked, undropped forward (q a CuPy bf16/f16 array)."""
    if q.shape[-1] not in _SM90_DIMS or not scale > 0 or os.environ.get("TESSERA_ATTN_SM90", "1") == "0":
        return False
    xp = backend.array_module(q)
    if runtime.compute_capability(xp.cuda.runtime.getDevice()) != 90:
        return False
    B, Hq, Sq, _ = q.shape
    return B * Hq * -(-Sq // _SM90_ROWS) >= _device_info(xp)[0]


def _forward_sm90(q, k, v, scale, causal):
    """(out, lse) from attn_fwd_sm90. TMA reads q, k, v through 4-D tensor maps (rows past the end come in as
    zeros) and writes out through one (rows past Sq are not written)."""
    from ..cuda import tma
    xp = backend.array_module(q)
    q, k, v = _rows_ready(q)[0], _rows_ready(k)[0], _rows_ready(v)[0]
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    o = _alloc(xp, (B, Hq, Sq, D), q.dtype)
    lse = _alloc(xp, (B, Hq, Sq), xp.float32)
    maps = [tma.tensor_map_param(x, (1, 1, rows, 64), swizzle=128)
            for x, rows in ((q, _SM90_ROWS), (k, _SM90_ROWS), (v, _SM90_ROWS), (o, _SM90_ROWS // 2))]
    kernel = _kernel("attention_sm90.cu",
                     f"attn_fwd_sm90<{_KERNEL_TYPES[q.dtype]}, {D}, {'true' if causal else 'false'}>")
    # Persistent: one block a multiprocessor walks its share of the work items (row blocks of every head, dealt in
    # snake order so causal shares even out), and the loads of one item overlap the end of the last (B4 H32 S4096
    # D128 causal / non-causal: 535.6 / 578.9 TFLOP/s against 509.0 / 556.4 with a block an item, same run).
    items = -(-Sq // _SM90_ROWS) * Hq * B
    _launch(kernel, (min(items, _device_info(xp)[0] * _SM90_BLOCKS_PER_SM),), (_SM90_THREADS,),
            (*maps, lse, *(numpy.int32(n) for n in (B, Hq, Hkv, Sq, Sk)), numpy.float32(scale)),
            shared_mem=_sm90_smem(D))
    return o, lse


_bwd_plans = runtime.LaunchPlans()  # unmasked backward: (shapes, strides, dtype, scale, causal, device) -> plan


def _backward_kernel(grad, q, k, v, out, lse, mask, slopes, scale, causal, drop=None):
    xp = backend.array_module(q)
    dout = xp.ascontiguousarray(grad.astype(q.dtype, copy=False))
    out = xp.ascontiguousarray(out)
    lse = xp.ascontiguousarray(lse.astype(xp.float32, copy=False))
    q, q_st = _rows_ready(q)
    k, k_st = _rows_ready(k)
    v, v_st = _rows_ready(v)
    if mask is None and slopes is None and drop is None:
        key = (q.shape, k.shape, q.strides, k.strides, v.strides, q.dtype, scale, causal,
               xp.cuda.runtime.getDevice())
        plan = _bwd_plans.get(key, lambda: _backward_plan(q, k, q_st, k_st, v_st, None, None, scale, causal))
    else:
        plan = _backward_plan(q, k, q_st, k_st, v_st, mask, slopes, scale, causal, drop)
    (dot, dot_grid, dot_tail), (dq_kernel, dq_grid, dq_block, dq_smem), (kv_kernel, kv_grid, kv_block, kv_smem), \
        tail, n_rows = plan
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    # Per row: (LSE * log2 e, Dr = rowsum(dO * O)), one float2.
    stats = _alloc(xp, (n_rows, 2), xp.float32)
    _launch(dot, dot_grid, (256,), (dout, out, lse, stats) + dot_tail)
    dq = _alloc(xp, (B, Hq, Sq, D), q.dtype)
    _launch(dq_kernel, dq_grid, dq_block, (q, k, v, dout, stats, dq) + tail, shared_mem=dq_smem)
    dk = _alloc(xp, (B, Hkv, Sk, D), q.dtype)
    dv = _alloc(xp, (B, Hkv, Sk, D), q.dtype)
    _launch(kv_kernel, kv_grid, kv_block, (q, k, v, dout, stats, dk, dv) + tail, shared_mem=kv_smem)
    return dq, dk, dv


def _backward_plan(q, k, q_st, k_st, v_st, mask, slopes, scale, causal, drop=None):
    """The three backward launches but their arrays: ((dot kernel, grid, arguments after the arrays), (dq kernel,
    grid, block, shared memory), (dK/dV kernel, grid, block, shared memory), the shared trailing arguments, rows)."""
    xp = backend.array_module(q)
    i32, f32 = numpy.int32, numpy.float32
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    ctype = _KERNEL_TYPES[q.dtype]
    item = q.dtype.itemsize
    pointers, m_st, slope_sb, kind, alibi = _mask_args(mask, slopes, xp)
    extra = "true" if (kind or alibi or drop is not None) else "false"
    dropout = "" if drop is None else ", true"
    tail = pointers + _scalar_args((i32(Hq), i32(Hkv), i32(Sq), i32(Sk), *q_st, *k_st, *v_st, *m_st, *slope_sb,
                                    f32(scale), i32(bool(causal)), i32(kind), i32(alibi), *_drop_args(drop)))
    n_rows = B * Hq * Sq
    rows_per_block = 8 * (32 // (D // 8))  # D / 8 lanes a row, 256 threads a block
    dot = (_kernel("attention_bwd.cu", f"attn_bwd_dot<{ctype}, {D}>"), (-(-n_rows // rows_per_block),),
           _scalar_args((numpy.int64(n_rows),)))
    warps, mt, bn = (_DQ_TILES if drop is None else _DROP_DQ_TILES)[D]
    bm = 16 * mt * warps
    dq = (_kernel("attention_bwd.cu", f"attn_bwd_dq<{ctype}, {D}, {warps}, {mt}, {bn}, {extra}{dropout}>"),
          (Hq * B, -(-Sq // bm)), (32 * warps,), (2 * bm + 4 * bn) * (D + 8) * item)
    warps, bmq = (_DKDV_TILES if drop is None else _DROP_DKDV_TILES)[D]
    bnk = 16 * warps
    kv = (_kernel("attention_bwd.cu", f"attn_bwd_dkdv<{ctype}, {D}, {warps}, {bmq}, {extra}{dropout}>"),
          (Hkv * B, -(-Sk // bnk)), (32 * warps,), (2 * bnk + 4 * bmq) * (D + 8) * item + 2 * bmq * 8)
    return dot, dq, kv, tail, n_rows


# ------------------------------------------------------------------------------------------------ the Function
class _Attention(Function):
    """Inputs q, k, v, mask (or None), slopes (or None); saves q, k, v, the output and the log-sum-exp.
    ``drop_threshold``: dropout's keep threshold on 16 bits (0: no dropout), keyed by ``seed`` and ``offset``."""

    def forward(self, q, k, v, mask, slopes, scale, causal, drop_threshold, seed, offset):
        self.scale, self.causal = scale, causal
        self.drop = (seed, offset, drop_threshold) if drop_threshold else None
        self.used_kernel = _kernel_ready(q, k, v, mask, slopes, self.drop is not None)
        if self.used_kernel:
            out, lse = _forward_kernel(q, k, v, mask, slopes, scale, causal, self.drop)
        else:
            out, lse = _forward_reference(q, k, v, mask, slopes, scale, causal, self._keep_scale(q, k))
        self.save(q, k, v, mask, slopes, out, lse)
        return out

    def _keep_scale(self, q, k):
        if self.drop is None:
            return None
        xp = backend.array_module(q)
        seed, offset, threshold = self.drop
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        keep = dropout_keep_mask(shape, threshold / 65536.0, seed, offset, xp)
        return keep.astype(accumulate_storage(q.dtype)) * _drop_scale(threshold)

    def backward(self, grad):
        q, k, v, mask, slopes, out, lse = self.saved
        need = (mask is not None and self.inputs[3] is not None, slopes is not None and self.inputs[4] is not None)
        if self.used_kernel and not any(need) and q.shape[-1] in _DQ_TILES:
            dq, dk, dv = _backward_kernel(grad, q, k, v, out, lse, mask, slopes, self.scale, self.causal, self.drop)
            return dq, dk, dv, None, None
        if lse.dtype != accumulate_storage(q.dtype):
            lse = lse.astype(accumulate_storage(q.dtype))
        return _backward_reference(grad, q, k, v, mask, slopes, lse, self.scale, self.causal,
                                   self._keep_scale(q, k), need)


# ------------------------------------------------------------------------------------------------ public API
def _as_tensor(x, what, device=None):
    if x is None or isinstance(x, Tensor):
        return x
    try:
        return tensor(x, device=device)
    except Exception as e:  # noqa: BLE001 - re-raised as ours, naming the argument
        raise TesseraError(f"attention: {what} must be a Tensor or array-like, got {type(x).__name__}") from e


def _check(q, k, v, mask, slopes, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ShapeError(f"attention: {name} must be [B, H, S, D], got shape {t.shape}")
        if not t.dtype.is_floating or t.dtype.is_fp8:
            raise DTypeError(f"attention: {name} must be f16, bf16, f32 or f64, got {t.dtype.name}")
    if not (q.dtype is k.dtype is v.dtype):
        raise DTypeError(f"attention: q, k, v must share a dtype, got {q.dtype.name}, {k.dtype.name}, {v.dtype.name}")
    devices = {t.device for t in (q, k, v, mask, slopes) if t is not None}
    if len(devices) > 1:
        raise DeviceError(f"attention: inputs on different devices {sorted(devices)}")
    (B, Hq, Sq, D), (Bk, Hkv, Sk, Dk), (Bv, Hv, Sv, _) = q.shape, k.shape, v.shape
    if Bk != B or Bv != B:
        raise ShapeError(f"attention: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Dk != D:
        raise ShapeError(f"attention: q and k head dims differ: {D} and {Dk}")
    if Hv != Hkv or Sv != Sk:
        raise ShapeError(f"attention: k {k.shape} and v {v.shape} must agree in heads and length")
    if Hq % Hkv:
        raise ShapeError(f"attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if min(Sq, Sk, D, Hq, B) == 0:
        raise ShapeError(f"attention: empty inputs q {q.shape}, k {k.shape}")
    if mask is not None:
        if mask.dtype is not dtypes.bool_ and not (mask.dtype.is_floating and not mask.dtype.is_fp8):
            raise DTypeError(f"attention: mask must be bool or floating, got {mask.dtype.name}")
        full = (B, Hq, Sq, Sk)
        if mask.ndim > 4 or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
            raise ShapeError(f"attention: mask of shape {mask.shape} does not broadcast to [B, Hq, Sq, Sk] = {full}")
    if slopes is not None:
        if slopes.shape not in ((Hq,), (1, Hq), (B, Hq)):
            raise ShapeError(f"attention: alibi_slopes must be [Hq] or [B, Hq] = [{B}, {Hq}], got {slopes.shape}")
        if not slopes.dtype.is_floating or slopes.dtype.is_fp8:
            raise DTypeError(f"attention: alibi_slopes must be floating, got {slopes.dtype.name}")
    if not 0.0 <= dropout_p < 1.0:
        raise TesseraError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise TesseraError(f"attention: scale must be a finite number, got {scale}")


def attention(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, *, alibi_slopes=None,
              dropout_seed=None, dropout_offset=0):
    """softmax(scale * q k^T + bias) v over q [B, Hq, Sq, D], k and v [B, Hkv, Sk, D] (module docstring).

    ``scale`` defaults to 1/sqrt(D). ``dropout_seed`` fixes the dropout mask: an int (64 bits are used), a
    ``tessera_cp.Generator`` to draw one from, or None to draw one from tessera_cp's default generator
    (``tessera_cp.manual_seed`` makes that reproducible). ``dropout_offset`` (0 <= offset < 2^32) selects another
    mask for the same seed (e.g. one per layer or step).
    """
    if mask is None and alibi_slopes is None and not dropout_p and isinstance(q, Tensor) and isinstance(k, Tensor) \
            and isinstance(v, Tensor):
        out = _short_path(q, k, v, is_causal, scale)
        if out is not None:
            return out
    q = _as_tensor(q, "q")
    k, v = _as_tensor(k, "k", q.device), _as_tensor(v, "v", q.device)
    mask, slopes = _as_tensor(mask, "mask", q.device), _as_tensor(alibi_slopes, "alibi_slopes", q.device)
    dropout_p = float(dropout_p)
    _check(q, k, v, mask, slopes, dropout_p, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed, offset, threshold = 0, 0, _drop_threshold(dropout_p) if dropout_p > 0 else 0
    if threshold:
        if dropout_seed is None or isinstance(dropout_seed, Generator):
            words = randint(0, 2 ** 31, size=(2,), device="cpu", generator=dropout_seed).data
            dropout_seed = (int(words[0]) << 31) | int(words[1])
        seed = int(dropout_seed) & (2 ** 64 - 1)
        offset = int(dropout_offset)
        if not 0 <= offset < 2 ** 32:
            raise TesseraError(f"attention: dropout_offset must be in [0, 2^32), got {dropout_offset}")
    return _Attention.apply(q, k, v, mask, slopes, scale=scale, causal=bool(is_causal), drop_threshold=threshold,
                            seed=seed, offset=offset)


# ------------------------------------------------------------------------------------------------ the short path
# Decode calls are host-bound: the kernel reads its K/V in tens of microseconds, which the general path (argument
# conversion and checks, the tape, planning, CuPy's argument marshalling) used to exceed. The short path keeps,
# per (shapes, strides, dtypes, array types, scale, causality, device, stream), a ready launch: the argument checks
# ran once for that combination when it was made, the kernel's argument block is built (ctypes values behind the
# void* array cuLaunchKernel takes; a call fills in the five pointers), the log-sum-exp goes to a scratch buffer
# (nothing reads it without a tape), and for small outputs the next call's output is allocated after this call's
# launch, while the kernel runs.
_short = {}        # key -> _ShortPlan, or None where the kernels do not take these inputs
_SHORT_MAX = 256   # plans kept (the dict is emptied beyond)
_SPARE_BYTES = 1 << 18  # outputs up to this size are allocated one call ahead
_cupy_handles = []  # cupy.cuda.runtime.getDevice, cupy.cuda.get_current_stream, cupy.cuda.driver.launchKernel, cupy
# The devices this thread launched on through CuPy, which makes the device's context current in the thread (the
# driver's launch needs it; a thread's first launch on a device goes through CuPy).
_thread = threading.local()


class _Launcher:
    """One kernel's launch through the driver with an argument block built once: ``n_ptrs`` leading pointer
    arguments filled in per call, then ``tail`` (CuPy arrays as their pointers, NumPy scalars as their C type)."""

    _CTYPES = {"int32": ctypes.c_int32, "uint32": ctypes.c_uint32, "int64": ctypes.c_int64,
               "float32": ctypes.c_float}

    def __init__(self, kernel, grid, block, smem, n_ptrs, tail):
        values = [ctypes.c_uint64(0) for _ in range(n_ptrs)]
        for a in tail:
            if isinstance(a, numpy.generic):
                values.append(self._CTYPES[a.dtype.name](a.item()))
            else:  # a device array: its pointer (the array is kept alive below)
                values.append(ctypes.c_uint64(a.data.ptr))
        self.params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(x) for x in values])
        self.address = ctypes.addressof(self.params)
        self.slots, self.keep = values[:n_ptrs], (values, tail)
        self.function = getattr(kernel, "kernel", kernel).ptr
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        self.config = (*grid, *block, int(smem))

    def __call__(self, pointers, stream, launch_kernel):
        for slot, pointer in zip(self.slots, pointers):
            slot.value = pointer
        launch_kernel(self.function, *self.config, stream, self.address, 0)


class _ShortPlan:
    __slots__ = ("kernel", "grid", "block", "smem", "tail", "o_shape", "o_dtype", "lse", "lse_ptr", "launcher",
                 "launched", "spare", "spare_alloc", "lock")

    def __init__(self, plan, lse, o_dtype):
        self.kernel, self.grid, self.block, self.smem, self.tail, self.o_shape = plan[:6]
        self.o_dtype, self.lse, self.lse_ptr, self.launched = o_dtype, lse, lse.data.ptr, False
        self.launcher = _Launcher(self.kernel, self.grid, self.block, self.smem, 5, plan[9])
        self.spare = self.spare_alloc = None
        self.lock = threading.Lock()


_lse_bufs = {}  # (device, stream) -> f32 scratch for log-sum-exps nobody reads


def _lse_scratch(xp, n):
    key = (xp.cuda.runtime.getDevice(), xp.cuda.get_current_stream().ptr)
    buf = _lse_bufs.get(key)
    if buf is None or buf.size < n:
        buf = _lse_bufs[key] = xp.empty(max(n, 0 if buf is None else buf.size), dtype=xp.float32)
    return buf


def _short_path(q, k, v, causal, scale):
    """attention(q, k, v, is_causal=causal, scale=scale) when no graph is recorded and the kernels take the
    inputs, else None (the general path then runs)."""
    if (q.requires_grad or k.requires_grad or v.requires_grad) and is_grad_enabled():
        return None
    qd, kd, vd = q.data, k.data, v.data
    if not backend.is_cupy_array(qd):
        return None
    if not _cupy_handles:
        import cupy
        _cupy_handles.extend((cupy.cuda.runtime.getDevice, cupy.cuda.get_current_stream,
                              cupy.cuda.driver.launchKernel, cupy))
    get_device, current_stream, launch_kernel, cupy = _cupy_handles
    stream, device = current_stream().ptr, get_device()
    key = (qd.shape, kd.shape, vd.shape, qd.strides, kd.strides, vd.strides, qd.dtype, kd.dtype, vd.dtype, type(kd),
           type(vd), scale, causal, device, stream)
    plan = _short.get(key, _short)
    if plan is _short:
        plan = _short_plan(q, k, v, scale, causal, key, cupy)
    if plan is None:
        return None
    qp, kp, vp = qd.data.ptr, kd.data.ptr, vd.data.ptr
    if (qp | kp | vp) & 15 or os.environ.get("TESSERA_REFERENCE", "") == "1":
        return None
    with plan.lock:  # the argument block and the spare output are shared by the threads on this stream
        o = plan.spare
        if o is None or plan.spare_alloc is not _alloc:
            o = _alloc(cupy, plan.o_shape, plan.o_dtype)
        plan.spare = None
        if plan.launched and device in getattr(_thread, "devices", ()) and not os.environ.get("TESSERA_SYNC"):
            try:
                plan.launcher((qp, kp, vp, o.data.ptr, plan.lse_ptr), stream, launch_kernel)
            except Exception as e:  # noqa: BLE001 - a driver error, named
                raise TesseraError(f"attention kernel launch failed (grid {plan.grid}, block {plan.block}): "
                                   f"{e}") from e
        else:  # the first launch (shared-memory opt-in, the thread's context) and TESSERA_SYNC go through CuPy
            _launch(plan.kernel, plan.grid, plan.block, (qd, kd, vd, o, plan.lse) + plan.tail, shared_mem=plan.smem)
            plan.launched = True
            _thread.devices = getattr(_thread, "devices", frozenset()) | {device}
        if o.nbytes <= _SPARE_BYTES:
            plan.spare, plan.spare_alloc = _alloc(cupy, plan.o_shape, plan.o_dtype), _alloc
    return Tensor(o)


def _short_plan(q, k, v, scale, causal, key, cupy):
    """The _ShortPlan for these inputs (kept under ``key``), or None; raises what the general path would."""
    _check(q, k, v, None, None, 0.0, scale)
    qd, kd, vd = q.data, k.data, v.data
    if os.environ.get("TESSERA_REFERENCE", "") == "1" or (qd.data.ptr | kd.data.ptr | vd.data.ptr) & 15:
        return None  # nothing kept: either may differ at the next call
    plan = None
    D = qd.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if _kernel_ready(qd, kd, vd, None, None, False) and not _use_sm90(qd, scale):
        fplan = _forward_plan(qd, kd, vd, None, None, scale, bool(causal))
        if fplan[8]:  # no contiguous copies needed
            B, Hq, Sq, _ = qd.shape
            plan = _ShortPlan(fplan, _lse_scratch(cupy, B * Hq * Sq), qd.dtype)
    if len(_short) >= _SHORT_MAX:
        _short.clear()
    _short[key] = plan
    return plan


flash_attention = attention  # the seeds' ops.flash_attention


def grouped_query_attention(q, k, v, is_causal=True, mask=None, scale=None, **kwargs):
    """Attention of q [B, Hq, S, D] over k, v [B, Hkv, S, D] (Hq a multiple of Hkv): each KV head serves its group
    of Hq / Hkv query heads in the kernel (no K/V copies); dK and dV sum over the group."""
    return attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, **kwargs)


def multi_query_attention(q, k, v, is_causal=True, mask=None, scale=None, **kwargs):
    """Attention of every query head over one shared KV head: k, v are [B, S, D] (or [B, 1, S, D])."""
    k, v = _as_tensor(k, "k"), _as_tensor(v, "v")
    if k.ndim == 3:
        k = k.unsqueeze(1)
    if v.ndim == 3:
        v = v.unsqueeze(1)
    if k.ndim != 4 or k.shape[1] != 1:
        raise ShapeError(f"multi_query_attention: k must be [B, S, D] or [B, 1, S, D], got {k.shape}")
    return attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, **kwargs)


def chunked_attention(q, k, v, chunk_size=512, is_causal=False, scale=None):
    """Attention computed over chunk_size x chunk_size blocks with an online softmax (running max and sum, the
    partial results rescaled whenever the max grows), built from differentiable Tensor ops: memory per step is
    O(chunk_size^2) on any backend. Same conventions as ``attention`` (GQA, bottom-right causal)."""
    q, k, v = _as_tensor(q, "q"), _as_tensor(k, "k"), _as_tensor(v, "v")
    _check(q, k, v, None, None, 0.0, scale)
    if not isinstance(chunk_size, (int, numpy.integer)) or chunk_size < 1:
        raise ShapeError(f"chunked_attention: chunk_size must be a positive int, got {chunk_size!r}")
    dtype = q.dtype
    work = dtypes.f64 if dtype is dtypes.f64 else dtypes.f32
    q, k, v = q.astype(work), k.astype(work), v.astype(work)
    xp = backend.array_module(q.data)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G, diag = Hq // Hkv, Sk - Sq
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qg, kg, vg = q.reshape(B, Hkv, G, Sq, D), k.unsqueeze(2), v.unsqueeze(2)
    pieces = []
    for i0 in range(0, Sq, chunk_size):
        i1 = min(i0 + chunk_size, Sq)
        qc = qg[:, :, :, i0:i1]
        running = base = total = acc = None   # running max (raw), its finite shift, sum of exp, sum of exp * v
        for j0 in range(0, Sk, chunk_size):
            j1 = min(j0 + chunk_size, Sk)
            if is_causal and j0 > i1 - 1 + diag:
                break  # this and later key chunks are hidden from every row of the chunk
            s = (qc @ kg[:, :, :, j0:j1].transpose(-2, -1)) * scale
            if is_causal:
                hidden = xp.arange(j0, j1)[None, :] > xp.arange(i0, i1)[:, None] + diag
                if bool(hidden.any()):
                    s = s.masked_fill(Tensor(hidden), float("-inf"))
            # The shift is a constant of the graph: the result does not depend on it, so neither does its gradient.
            block_max = s.data.max(axis=-1, keepdims=True)
            running = block_max if running is None else xp.maximum(running, block_max)
            new_base = xp.where(xp.isfinite(running), running, 0).astype(s.data.dtype)
            p = (s - Tensor(new_base)).exp()
            pv = p @ vg[:, :, :, j0:j1]
            if acc is None:
                total, acc = p.sum(dim=-1, keepdim=True), pv
            else:
                rescale = Tensor(xp.exp(base - new_base))
                total, acc = total * rescale + p.sum(dim=-1, keepdim=True), acc * rescale + pv
            base = new_base
        if acc is None:  # causal rows that see no key
            out = tensor(xp.zeros((B, Hkv, G, i1 - i0, v.shape[-1]), dtype=work.storage), dtype=work)
        else:
            out = acc / where(total > 0, total, 1.0)
        pieces.append(out)
    out = pieces[0] if len(pieces) == 1 else cat(pieces, dim=3)
    return out.reshape(B, Hq, Sq, v.shape[-1]).astype(dtype)
