"""Casted layers: weights stored in int8 / fp8 with float32 scales, computed in bf16 (or f16 / f32).

* ``CastedLinear`` (int8 weights, one scale per output channel) has two GPU paths (``cuda/int8_gemm.cu``, and
  ``cuda/gemv.cu``'s ``gemv_mma`` for weight-only):
  W8A8 (``mode="w8a8"``): each token (row) of x is quantized to int8 with its own absmax scale (one kernel,
  ``quant.quantize_rows_int8``), then an int8 x int8 GEMM on the int8 tensor cores (``mma.sync`` m16n8k32; a
  ``dp4a`` kernel is the fallback below sm_80, or asked for with ``gemm="dp4a"``) accumulates exactly in int32
  and its epilogue writes ``((float)acc * x_scale[m]) * w_scale[n] + bias[n]`` in the activation dtype.
  Weight-only (``mode="weight_only"``): bf16/f16 x times the int8 weights converted in the kernel (tensor-core
  mma, K split across blocks for small matrices, reduced deterministically), each weight byte read once; meant
  for decode (M <= 16 rows per launch; more rows take more launches). ``mode="auto"`` (the default) takes
  weight-only for at most ``WEIGHT_ONLY_MAX_M`` rows and W8A8 above. The reference runs the same arithmetic on
  NumPy (or CuPy with ``TESSERA_REFERENCE=1``): W8A8 bit for bit (quantization, int32 sums, epilogue order),
  weight-only up to the order of the float32 sums. The backward gives x (straight-through the activation
  quantization) and the bias their gradients; the weights are frozen buffers.
* ``int8_matmul(a, b)`` is the raw GEMM: a @ b.T in exact int32 (what the tests compare bit for bit). On Hopper
  (sm_90) with the CUTLASS headers both it and W8A8 take ``gemm="sm90"`` (``cuda/gemm_sm90.cu``: CUTLASS's TMA
  warp-specialized wgmma GEMM writing int32 sums, then one epilogue kernel with the same rule).
* ``fp8_matmul(a, b, a_scale, b_scale)``: e4m3 x e4m3 GEMM with f32 accumulation and float32 scales (per tensor,
  row or column), on Hopper through ``gemm_sm90.cu`` (``fast_accum=True``: without CUTLASS's f32 promotion).
* ``CastedEmbedding``: rows stored in fp8 e4m3 / e5m2, int8 (absmax scale per row, or one per table) or bf16;
  the forward is one gather-and-dequantize kernel: out = T((decode(q) * scale) * scale_factor).
* ``CastedSparseEmbedding``: each row cut into blocks of ``block_size``; only kept blocks are stored (block CSR:
  row pointers, block columns, block data in the storage dtype, one scale per block); the gather kernel rebuilds
  dense rows (zeros elsewhere), times optional per-lookup weights.
* ``swiglu_quantized``: SwiGLU with int8 weights and fp8 e4m3 activations between the GEMMs.
Indices outside [0, rows) raise ``IndexOutOfRangeError`` (checked on the host by the reference, by an error flag
the kernels set; the kernels write zeros there and never read out of bounds).
"""
import math

import numpy

from .. import backend, dtypes, fp8, quant
from ..autograd import Function
from ..errors import DTypeError, IndexOutOfRangeError, ShapeError, TesseraError
from ..functions.math import stable_sigmoid
from ..tensor import Tensor, empty, randn
from . import init
from .module import Buffer, Module, Parameter

K_ALIGN = 16              # the int8 GEMMs read rows in 16-byte chunks: K is padded (with zeros) to a multiple
WEIGHT_ONLY_MAX_M = 16    # mode="auto": up to this many rows take the weight-only kernel (one mma row tile)
MMA_TILE, DP4A_TILE, GEMM_THREADS = 128, 64, 256   # w8a8_gemm_mma / w8a8_gemm_dp4a block tiles (square)
# gemv_mma (cuda/gemv.cu), the few-row product of the weight-only path (the decode step may take it too):
GEMV_MAX_ROWS = 16                                 # rows of x per launch (the mma's M)
GEMV_THREADS, GEMV_BLOCK_ROWS, GEMV_PAD = 256, 128, 8
GEMV_TILE_FLOATS = GEMV_MAX_ROWS * GEMV_BLOCK_ROWS + GEMV_MAX_ROWS   # workspace per (row group, K split)
GEMV_ITER_K = {1: 256, 2: 128}                     # by weight itemsize: k per main-loop iteration = split unit
GEMV_SPLIT_MAX = (2048, 1024, 1024)                # by prologue (none, RMSNorm, SwiGLU): longest K slice staged
GEMV_BLOCKS_PER_SM = 1.5                           # split K until the grid has about this many blocks per SM
# gemv_mma's variants: its template arguments after the prologue, (PIPE, XPH, EPI, LEAN) (gemv.cu says what each
# changes). Each computes the same bits as "base", so the choice may depend on the rows of x without changing a
# row's result. bench/tune_gemv_mma.py checks and times them; a variant other than "base" that a policy below
# names must also be listed in gemv.cu's tessera-instantiate lines (tests/nn/test_casted.py checks).
GEMV_VARIANTS = {"base": (0, 1, 0, 0), "lean": (0, 1, 0, 1), "pipe": (1, 1, 0, 0), "epi": (0, 1, 1, 0),
                 "x4": (0, 4, 0, 0), "pipe_lean": (1, 1, 0, 1), "ple": (1, 1, 1, 1), "ple_x2": (1, 2, 1, 1),
                 "ple_x4": (1, 4, 1, 1), "ple_x8": (1, 8, 1, 1), "le_x4": (0, 4, 1, 1),
                 "ple_mc2": (1, 1, 1, 1, 2)}
# A fifth value MC > 1: gemv_mma_mc, x read once for a cluster of MC blocks and multicast to them (plain x, sm_90).
# plain x: (most rows of x, variant), the first entry that holds B. bench/tune_gemv_mma.py (H100, 2026-11-25, cold
# int8 weights, us at M = 1 / 8 / 16, two runs): 8192^2 base 30.4-30.7 / 32.8-33.4 / 38.2-38.6, ple_x4 28.2-28.4 /
# 30.6-30.7 / 33.0-33.5, ple_mc2 28.3-28.8 / 28.6-28.9 / 30.0-30.1; 28672 x 8192 ple_x4 89.8-91.3 / 91.3 / 96.3-99.5,
# ple_mc2 92.1-93.1 / 91.5 / 92.2. (Clusters of 4: 34.5 us at 8192^2, M=1; x phases with the multicast: slower.)
GEMV_VARIANT_BY_ROWS = ((4, "ple_x4"), (16, "ple_mc2"))
GEMV_VARIANT_NO_CLUSTERS = "ple_x4"                # in place of a cluster variant before sm_90
GATHER_THREADS = 128                               # embedding gathers (cuda/quant.cu)
MAX_GRID_Y = 65535
LINEAR_MODES = ("auto", "w8a8", "weight_only")
GEMMS = ("auto", "mma", "dp4a", "sm90")
# gemm_sm90.cu (CUTLASS wgmma GEMMs, sm_90 only): the TMA boxes CuTe derives for each config's tile with the
# cluster 2x1, over a rank-3 (L=1, rows, K) view with the 128-byte swizzle: A 128 rows, B tile_n / 2 rows (the
# multicast halves), both 128 bytes of K. Params live in a global buffer the setup kernel fills.
SM90_TILE_N = {"s8": 256, "e4m3_bf16": 128, "e4m3_f32": 128, "e4m3_bf16_fast": 256, "e4m3_f32_fast": 256,
               "e4m3_bf16_fast_pp": 128}
SM90_BOX_A_ROWS, SM90_BOX_K = 128, 128
SM90_PARAMS_BYTES, SM90_INFO_INTS = 2048, 6
EPILOGUE_THREADS = 256
STORAGE_DTYPES = (dtypes.fp8_e4m3, dtypes.fp8_e5m2, dtypes.int8, dtypes.bf16)
COMPUTE_DTYPES = (dtypes.bf16, dtypes.f16, dtypes.f32)

_CUDA_TYPE = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float16): "__half",
              dtypes.bf16.storage: "__nv_bfloat16", numpy.dtype(numpy.int32): "int"}
_STORAGE_TAG = {dtypes.fp8_e4m3: "E4M3", dtypes.fp8_e5m2: "E5M2", dtypes.int8: "I8", dtypes.bf16: "BF16"}
_INDEX_TYPE = {numpy.dtype(numpy.int64): "long long", numpy.dtype(numpy.int32): "int"}


def _use_kernel(*arrays):
    present = [a for a in arrays if a is not None]
    return (bool(present) and all(backend.is_cupy_array(a) for a in present)
            and not backend.reference_forced())


def _runtime():
    from ..cuda import runtime
    return runtime


_dummies = {}


def _dummy_f32(xp):
    """A one-element float32 buffer for pointer arguments a kernel does not read (no bias, no weights); one per
    device, kept, so launches allocate nothing (and can be captured in a CUDA graph)."""
    key = xp.cuda.Device().id if hasattr(xp, "cuda") else -1
    if key not in _dummies:
        _dummies[key] = xp.zeros((1,), dtype=numpy.float32)
    return _dummies[key]


def _round_up(n, m):
    return -(-n // m) * m


def _pad_k(a):
    """a [R, K] int8 or float as a C-contiguous, 16-byte-aligned array with K padded by zeros to K_ALIGN."""
    xp = backend.array_module(a)
    rows, k = a.shape
    kp = _round_up(k, K_ALIGN)
    if kp == k and a.flags.c_contiguous and quant._ptr(a) % 16 == 0:
        return a
    out = xp.zeros((rows, kp), dtype=a.dtype)
    out[:, :k] = a
    return out


def _decode(q, storage):
    """float32 values of stored elements (exact)."""
    if storage.is_fp8:
        return fp8.decode(q, storage, dtypes.f32)
    return q.astype(numpy.float32)


def _check_storage(storage_dtype, what="storage_dtype"):
    d = dtypes.as_dtype(storage_dtype)
    if d not in STORAGE_DTYPES:
        raise DTypeError(f"{what} must be one of {[s.name for s in STORAGE_DTYPES]}, got {d.name}")
    return d


def _check_compute(compute_dtype, what="compute_dtype"):
    d = dtypes.as_dtype(compute_dtype)
    if d not in COMPUTE_DTYPES:
        raise DTypeError(f"{what} must be one of {[c.name for c in COMPUTE_DTYPES]}, got {d.name}")
    return d


def _quantize_table(w32, storage, granularity):
    """(q, scale [R] or [1]) of a float32 table [R, C]: absmax scales per row or per table; bf16 keeps scale 1."""
    xp = backend.array_module(w32)
    if granularity not in ("row", "tensor"):
        raise TesseraError(f"granularity must be 'row' or 'tensor', got {granularity!r}")
    if storage is dtypes.bf16:
        rows = w32.shape[0] if granularity == "row" else 1
        return w32.astype(dtypes.bf16.storage), xp.ones((rows,), dtype=numpy.float32)
    q, s = quant.quantize(w32, storage, granularity=granularity)
    return q, s.reshape(-1)


# ------------------------------------------------------------------------------------------------------------
# The raw int8 GEMM: a @ b.T in int32
# ------------------------------------------------------------------------------------------------------------

def _int8_matmul_reference(a, b):
    """a [M, K] @ b [N, K].T in int32. Every partial sum is an integer of magnitude below K * 2^14 < 2^53, so the
    float64 product is exact; the int64 -> int32 cast wraps modulo 2^32 as the kernels' int32 sums do."""
    xp = backend.array_module(a, b)
    acc = xp.matmul(a.astype(numpy.float64), b.astype(numpy.float64).T)
    return acc.astype(numpy.int64).astype(numpy.int32)


_cutlass_found = []


def sm90_supported(array):
    """True on an sm_90 GPU (Hopper: wgmma) with the CUTLASS headers installed (pip nvidia-cutlass)."""
    xp = backend.array_module(array)
    if not hasattr(xp, "cuda"):
        return False
    if _runtime().compute_capability() // 10 != 9:
        return False
    if not _cutlass_found:
        from ..cuda import nvrtc_cache
        _cutlass_found.append(nvrtc_cache.find_cutlass_include() is not None)
    return _cutlass_found[0]


def _default_gemm(array):
    """'sm90' on Hopper with the CUTLASS headers, 'mma' on other GPUs with int8 tensor cores (sm_80 and later),
    else 'dp4a'."""
    xp = backend.array_module(array)
    if not hasattr(xp, "cuda"):
        return "mma"
    if sm90_supported(array):
        return "sm90"
    return "mma" if _runtime().compute_capability() >= 80 else "dp4a"


_sm90_plans = {}   # (config, M, N, K, SMs, device) -> (grid, block, shared bytes), read back once per shape


def _sm90_gemm(config, a, b, m, n, d, a_scale=None, b_scale=None):
    """d [M, N] = a [M, Kp] @ b [N, Kp].T by gemm_sm90_<config> (gemm_sm90.cu). a, b: int8 or fp8 bits (uint8),
    C-contiguous, 16-byte aligned, Kp a multiple of 16 (``_pad_k``). a_scale / b_scale (one-element float32
    arrays, read on the device) give alpha = a_scale * b_scale to the fused-alpha configs."""
    runtime = _runtime()
    from ..cuda import tma
    xp = backend.array_module(a)
    if not sm90_supported(a):
        raise TesseraError("gemm='sm90' needs an sm_90 GPU and the CUTLASS headers (pip install nvidia-cutlass)")
    if m == 0 or n == 0:
        return d
    k = a.shape[1]
    setup = runtime.get_cute_kernel("gemm_sm90.cu", f"gemm_sm90_{config}_setup")
    kernel = runtime.get_cute_kernel("gemm_sm90.cu", f"gemm_sm90_{config}")
    # TMA moves bytes: CUTLASS encodes int8 and fp8 alike as UINT8.
    ta = tma.encode_tiled(a.view(numpy.uint8).reshape(1, m, k), (1, SM90_BOX_A_ROWS, SM90_BOX_K), swizzle=128)
    tb = tma.encode_tiled(b.view(numpy.uint8).reshape(1, n, k), (1, SM90_TILE_N[config] // 2, SM90_BOX_K),
                          swizzle=128)
    sms = runtime.device_attribute(runtime.SM_COUNT)
    params = xp.empty((SM90_PARAMS_BYTES,), dtype=numpy.uint8)
    info = xp.empty((SM90_INFO_INTS,), dtype=numpy.int32)
    null = numpy.uint64(0)
    runtime.launch(setup, 1, 32, (ta.param, tb.param, a, b, d, numpy.int32(m), numpy.int32(n), numpy.int32(k),
                                  numpy.int32(sms), null if a_scale is None else a_scale,
                                  null if b_scale is None else b_scale, params, info))
    key = (config, m, n, k, sms, xp.cuda.Device().id)
    plan = _sm90_plans.get(key)
    if plan is None:  # one host sync per shape: the persistent grid CUTLASS's tile scheduler wants
        g = [int(v) for v in info.get()]
        if g[5] > SM90_PARAMS_BYTES:
            raise TesseraError(f"gemm_sm90_{config}: Params take {g[5]} bytes, the buffer {SM90_PARAMS_BYTES}")
        plan = _sm90_plans[key] = ((g[0], g[1], g[2]), g[3], g[4])
    runtime.launch(kernel, plan[0], plan[1], (params,), shared_mem=plan[2])
    return d


def _scale_epilogue(acc, out, row_scale, col_scale, bias=None):
    """out = OutT(((float)acc * row_scale[m]) * col_scale[n] + bias[n]) (sm90_scale_epilogue); a one-element
    scale array applies to every row / column."""
    runtime = _runtime()
    xp = backend.array_module(acc)
    m, n = acc.shape
    if m == 0 or n == 0:
        return out
    name = f"sm90_scale_epilogue<{_CUDA_TYPE[numpy.dtype(acc.dtype)]}, {_CUDA_TYPE[numpy.dtype(out.dtype)]}>"
    kernel = runtime.get_cute_kernel("gemm_sm90.cu", name)
    groups = m * -(-n // 4)
    runtime.launch(kernel, -(-groups // EPILOGUE_THREADS), EPILOGUE_THREADS,
                   (acc, out, row_scale, numpy.int32(row_scale.size > 1), col_scale, numpy.int32(col_scale.size > 1),
                    _dummy_f32(xp) if bias is None else bias, numpy.int32(bias is not None), numpy.int32(m),
                    numpy.int32(n)))
    return out


def _w8a8_gemm_cuda(a, b, m, n, gemm, out, x_scale=None, w_scale=None, bias=None):
    """Launch w8a8_gemm_<gemm><OutT> on K-padded a [M, Kp] and b [N, Kp] into out [M, N] (int32: the raw sums)."""
    runtime = _runtime()
    xp = backend.array_module(a)
    if m == 0 or n == 0:
        return out
    if gemm == "sm90":  # int32 sums by the CUTLASS GEMM, then the same epilogue rule in a second kernel
        if out.dtype == numpy.int32:
            return _sm90_gemm("s8", a, b, m, n, out)
        acc = _sm90_gemm("s8", a, b, m, n, xp.empty((m, n), dtype=numpy.int32))
        return _scale_epilogue(acc, out, x_scale, w_scale, bias)
    kernel = runtime.get_kernel("int8_gemm.cu", f"w8a8_gemm_{gemm}<{_CUDA_TYPE[numpy.dtype(out.dtype)]}>")
    xs, ws, bs = (_dummy_f32(xp) if v is None else v for v in (x_scale, w_scale, bias))
    tail = (numpy.int32(bias is not None), numpy.int32(m), numpy.int32(n), numpy.int32(a.shape[1]),
            numpy.int32(a.shape[1]), numpy.int32(b.shape[1]), numpy.int32(out.shape[1]))
    if gemm == "mma":  # a 1-D grid of output tiles (the kernel rasterizes them in groups)
        runtime.launch(kernel, (-(-m // MMA_TILE) * -(-n // MMA_TILE),), (GEMM_THREADS,), (a, b, out, xs, ws, bs) + tail)
        return out
    rows = MAX_GRID_Y * DP4A_TILE  # dp4a: grid.y counts row tiles; launch again past that many rows
    for start in range(0, m, rows):
        count = min(rows, m - start)
        runtime.launch(kernel, (-(-n // DP4A_TILE), -(-count // DP4A_TILE)), (GEMM_THREADS,),
                       (a[start:], b, out[start:], xs if x_scale is None else xs[start:], ws, bs, tail[0],
                        numpy.int32(count)) + tail[2:])
    return out


def int8_matmul(a, b, gemm="auto", out=None):
    """a @ b.T with exact int32 sums (wrapping modulo 2^32 past 2^31): a [M, K] int8, b [N, K] int8 -> [M, N].

    Tensors or arrays. On CuPy the CUTLASS wgmma kernel (``gemm="sm90"``, the default on Hopper with the CUTLASS
    headers), the mma.sync kernel (``gemm="mma"``) or the dp4a fallback (``gemm="dp4a"``) runs; ``out`` (an int32
    [M, N] C-contiguous array) lets tests hand in a poisoned buffer."""
    a_arr, _, as_tensor = quant._unwrap(a, "a")
    b_arr, _, _ = quant._unwrap(b, "b")
    for name, arr in (("a", a_arr), ("b", b_arr)):
        if arr.dtype != numpy.int8 or arr.ndim != 2:
            raise DTypeError(f"int8_matmul: {name} must be a 2-D int8 array, got {arr.dtype} of shape {arr.shape}")
    if a_arr.shape[1] != b_arr.shape[1]:
        raise ShapeError(f"int8_matmul: a is [M, K] = {a_arr.shape} and b is [N, K] = {b_arr.shape}; K differs")
    if gemm not in GEMMS:
        raise TesseraError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    m, n = a_arr.shape[0], b_arr.shape[0]
    if _use_kernel(a_arr, b_arr):
        xp = backend.array_module(a_arr)
        if out is None:
            out = xp.empty((m, n), dtype=numpy.int32)
        elif out.dtype != numpy.int32 or out.shape != (m, n) or not out.flags.c_contiguous:
            raise ShapeError(f"int8_matmul: out must be a C-contiguous int32 array of shape {(m, n)}")
        gemm = _default_gemm(a_arr) if gemm == "auto" else gemm
        result = _w8a8_gemm_cuda(_pad_k(a_arr), _pad_k(b_arr), m, n, gemm, out)
    else:
        result = _int8_matmul_reference(a_arr, b_arr)
    return quant._wrap(result, dtypes.int32, as_tensor)


FP8_OUT_DTYPES = (dtypes.bf16, dtypes.f16, dtypes.f32)


def _fp8_scale(scale, size, xp, what):
    """None -> None; else a float32 array of 1 or ``size`` elements on xp."""
    if scale is None:
        return None
    arr, _, _ = quant._unwrap(scale, what) if hasattr(scale, "shape") else (numpy.float32(scale), None, False)
    arr = xp.asarray(arr, dtype=numpy.float32).reshape(-1)
    if arr.size not in (1, size):
        raise ShapeError(f"fp8_matmul: {what} must hold 1 or {size} float32 values, got {arr.size}")
    return xp.ascontiguousarray(arr)


def _fp8_matmul_reference(a, b, a_scale, b_scale, out_dtype):
    """The decoded operands' product in float64, scaled in float64, rounded to float32, then the cast."""
    xp = backend.array_module(a, b)
    acc = xp.matmul(fp8.decode(a, dtypes.fp8_e4m3, dtypes.f32).astype(numpy.float64),
                    fp8.decode(b, dtypes.fp8_e4m3, dtypes.f32).astype(numpy.float64).T)
    if a_scale is not None:
        acc = acc * a_scale.astype(numpy.float64)[:, None] if a_scale.size > 1 else acc * float(a_scale[0])
    if b_scale is not None:
        acc = acc * b_scale.astype(numpy.float64)[None, :] if b_scale.size > 1 else acc * float(b_scale[0])
    return acc.astype(numpy.float32).astype(out_dtype.storage)


def fp8_matmul(a, b, a_scale=None, b_scale=None, out_dtype=dtypes.bf16, out=None, fast_accum=False):
    """(a @ b.T) * a_scale * b_scale for fp8 e4m3 operands: a [M, K] and b [N, K] hold e4m3 bits (uint8), the
    scales are float32 (None: 1; one value: per tensor; M values for a: per row; N values for b: per column), the
    result [M, N] in ``out_dtype`` (bf16, f16 or f32). Tensors or arrays.

    On Hopper with the CUTLASS headers: a wgmma GEMM accumulating in f32 (CUTLASS promotes the tensor cores'
    partial sums into f32 registers every 4 k-blocks); per-tensor scales and a bf16 / f32 result are fused into
    its epilogue as alpha = a_scale * b_scale, other cases write f32 sums that sm90_scale_epilogue scales
    (((float)acc * a_scale[m]) * b_scale[n]). ``fast_accum=True`` (torch._scaled_mm's use_fast_accum) skips the
    promotion: the tensor cores accumulate all of K themselves, with fewer bits kept at each addition; faster.
    Elsewhere: the float64 reference of the decoded operands (``fast_accum`` changes nothing there)."""
    a_arr, _, as_tensor = quant._unwrap(a, "a")
    b_arr, _, _ = quant._unwrap(b, "b")
    for name, arr in (("a", a_arr), ("b", b_arr)):
        if arr.dtype != numpy.uint8 or arr.ndim != 2:
            raise DTypeError(f"fp8_matmul: {name} must be a 2-D uint8 array of e4m3 bits, got {arr.dtype} of "
                             f"shape {arr.shape}")
    if a_arr.shape[1] != b_arr.shape[1]:
        raise ShapeError(f"fp8_matmul: a is [M, K] = {a_arr.shape} and b is [N, K] = {b_arr.shape}; K differs")
    out_dtype = dtypes.as_dtype(out_dtype)
    if out_dtype not in FP8_OUT_DTYPES:
        raise DTypeError(f"fp8_matmul: out_dtype must be one of {[d.name for d in FP8_OUT_DTYPES]}, "
                         f"got {out_dtype.name}")
    m, n = a_arr.shape[0], b_arr.shape[0]
    xp = backend.array_module(a_arr, b_arr)
    sa, sb = _fp8_scale(a_scale, m, xp, "a_scale"), _fp8_scale(b_scale, n, xp, "b_scale")
    if _use_kernel(a_arr, b_arr) and sm90_supported(a_arr):
        if out is None:
            out = xp.empty((m, n), dtype=out_dtype.storage)
        elif out.dtype != out_dtype.storage or out.shape != (m, n) or not out.flags.c_contiguous:
            raise ShapeError(f"fp8_matmul: out must be a C-contiguous {out_dtype.name} array of shape {(m, n)}")
        ap, bp = _pad_k(a_arr), _pad_k(b_arr)
        per_tensor = (sa is None or sa.size == 1) and (sb is None or sb.size == 1)
        fast = "_fast" if fast_accum else ""
        one = _dummy_one(xp)
        if per_tensor and out_dtype is not dtypes.f16:
            # bf16 with fast accumulation: the ping-pong schedule (gemm_sm90.cu: same bits, faster at 8192^3)
            config = ("e4m3_bf16" if out_dtype is dtypes.bf16 else "e4m3_f32") + fast
            config += "_pp" if config == "e4m3_bf16_fast" else ""
            result = _sm90_gemm(config, ap, bp, m, n, out, one if sa is None else sa, one if sb is None else sb)
        else:
            acc = _sm90_gemm("e4m3_f32" + fast, ap, bp, m, n, xp.empty((m, n), dtype=numpy.float32))
            result = _scale_epilogue(acc, out, one if sa is None else sa, one if sb is None else sb)
    else:
        result = _fp8_matmul_reference(a_arr, b_arr, sa, sb, out_dtype)
    return quant._wrap(result, out_dtype, as_tensor)


_ones = {}


def _dummy_one(xp):
    """A kept one-element float32 1.0 per device (the scale of an unscaled side)."""
    key = xp.cuda.Device().id
    if key not in _ones:
        _ones[key] = xp.ones((1,), dtype=numpy.float32)
    return _ones[key]


# ------------------------------------------------------------------------------------------------------------
# CastedLinear: the two forward paths and the autograd function
# ------------------------------------------------------------------------------------------------------------

def _epilogue_reference(acc, x_scale, w_scale, bias, out_storage):
    """((float)acc * x_scale[m]) * w_scale[n] + bias[n] in float32, in the kernels' order, then the cast."""
    v = (acc.astype(numpy.float32) * x_scale[:, None]) * w_scale[None, :]
    if bias is not None:
        v = v + bias
    return v.astype(out_storage, copy=False)


def w8a8_linear(x2, weight, w_scale, bias=None, out_storage=None, gemm="auto", weight_padded=None, out=None):
    """The W8A8 forward on arrays: x2 [M, K] float, weight [N, K] int8, w_scale [N] float32, bias [N] (float32
    or None) -> [M, N] in ``out_storage`` (default: x2's dtype). Per-token int8 quantization of x2, int32 GEMM,
    fused epilogue. ``weight_padded`` is weight already padded by ``_pad_k`` (kept by the module); ``out``
    (C-contiguous [M, N]) lets tests hand the kernel a poisoned buffer."""
    out_storage = numpy.dtype(x2.dtype if out_storage is None else out_storage)
    m, n = x2.shape[0], weight.shape[0]
    if _use_kernel(x2, weight) and out_storage in _CUDA_TYPE and out_storage != numpy.int32:
        xp = backend.array_module(x2)
        q, xs = quant.quantize_rows_int8(x2, pad_to=K_ALIGN)
        wp = _pad_k(weight) if weight_padded is None else weight_padded
        out = xp.empty((m, n), dtype=out_storage) if out is None else out
        gemm = _default_gemm(x2) if gemm == "auto" else gemm
        return _w8a8_gemm_cuda(q, wp, m, n, gemm, out, xs, w_scale, bias)
    q, xs = quant.quantize_rows_int8(x2)
    return _epilogue_reference(_int8_matmul_reference(q, weight), xs, w_scale, bias, out_storage)


_gemv_workspaces = {}     # (device, stream) -> (partial sums float32, counters int32), grown on demand
_gemv_retired = []        # outgrown workspaces: a captured CUDA graph may still point at them


def gemv_plan(n, k, weight_itemsize, prologue, sms, blocks_per_sm=None):
    """(KS, S) of gemv_mma for W [n, k]: K is cut into S slices of KS (a multiple of the iteration's k) so that
    the grid of ceil(n / 128) x S blocks has about ``blocks_per_sm`` blocks per SM. A function of the shape, the
    weight type and the prologue only, never of the number of rows (a row's result must not depend on it)."""
    unit = GEMV_ITER_K[weight_itemsize]
    units = -(-k // unit)
    groups = -(-n // GEMV_BLOCK_ROWS)
    want = math.ceil((blocks_per_sm or GEMV_BLOCKS_PER_SM) * sms / groups)
    splits = max(-(-k // GEMV_SPLIT_MAX[prologue]), min(units, want))
    ks = unit * -(-units // splits)
    return ks, -(-k // ks)


def gemv_shared_bytes(x_itemsize, rows, ks, prologue):
    """Dynamic shared memory of gemv_mma: the staged x slice ([parts][rows][ks + pad] of x's type; hi and lo parts
    with a prologue), then for RMSNorm one float per 8-element chunk."""
    parts = 1 if prologue == 0 else 2
    return parts * x_itemsize * rows * (ks + GEMV_PAD) + (4 * rows * (ks // 8) if prologue == 1 else 0)


def _gemv_workspace(xp, floats, groups):
    key = (xp.cuda.Device().id, xp.cuda.get_current_stream().ptr)   # launches on one stream never overlap
    ws = _gemv_workspaces.get(key)
    if ws is None or ws[0].size < floats or ws[1].size < groups:
        if ws is not None:
            _gemv_retired.append(ws)
            floats, groups = max(floats, 2 * ws[0].size), max(groups, 2 * ws[1].size)
        ws = (xp.empty((floats,), dtype=numpy.float32), xp.zeros((groups,), dtype=numpy.int32))
        _gemv_workspaces[key] = ws
    return ws


def _aligned_rows(a, elements=8):
    """A 1-D or 2-D CuPy array whose rows are contiguous and start on 16-byte boundaries."""
    item = a.dtype.itemsize
    if a.strides[-1] != item or a.data.ptr % 16:
        return False
    return a.ndim == 1 or (a.strides[0] % 16 == 0 and a.strides[0] // item % elements == 0)


_GEMV_X = {dtypes.bf16.storage: "__nv_bfloat16", numpy.dtype(numpy.float16): "__half"}


def gemv_mma_supported(x, weight, out, scale=None, bias=None, norm=None, residual=None, swiglu=False):
    """Whether ``gemv_mma`` takes these CuPy arrays: x bf16 [B <= 16, K] (f16 too with int8 weights and no
    prologue), weight bf16 or int8 [N, K] C-contiguous (int8 with float32 ``scale`` [N]; K % 16 == 0 for int8,
    K % 8 == 0 for bf16), x rows, ``norm`` and the weight 16-byte aligned, bias float32 or bf16, residual bf16."""
    if not (backend.is_cupy_array(x) and backend.is_cupy_array(weight)) or backend.reference_forced():
        return False
    xdt, wdt = numpy.dtype(x.dtype), numpy.dtype(weight.dtype)
    if xdt not in _GEMV_X or x.ndim != 2 or not 1 <= x.shape[0] <= GEMV_MAX_ROWS or weight.ndim != 2:
        return False
    if wdt == numpy.int8:
        if scale is None or scale.dtype != numpy.float32 or not scale.flags.c_contiguous:
            return False
    elif wdt != dtypes.bf16.storage or xdt != wdt:
        return False
    if xdt == numpy.float16 and (norm is not None or swiglu or residual is not None or out.dtype != xdt):
        return False
    k = weight.shape[1]
    if not weight.flags.c_contiguous or weight.data.ptr % 16 or k % (16 // wdt.itemsize) or k == 0:
        return False
    if not _aligned_rows(x) or (norm is not None and (norm.dtype != xdt or not _aligned_rows(norm))):
        return False
    if bias is not None and (bias.dtype not in (numpy.float32, dtypes.bf16.storage) or not bias.flags.c_contiguous):
        return False
    if residual is not None and (residual.dtype != dtypes.bf16.storage or residual.strides[-1] != 2):
        return False
    return out.dtype in (xdt, numpy.dtype(numpy.float32)) and out.strides[-1] == out.dtype.itemsize


def _gemv_kernel(name):
    """The gemv.cu kernel ``name`` (a seam for bench/tune_gemv.py)."""
    from ..cuda import runtime
    return runtime.get_kernel("gemv.cu", name)


def gemv_variant(rows, prologue=0, clusters=True):
    """The gemv_mma variant (a GEMV_VARIANTS key) for ``rows`` rows of x: ``GEMV_VARIANT_BY_ROWS``'s on plain x
    (what the tuning run measured; ``clusters``: the GPU has thread-block clusters), the base with a prologue."""
    if prologue == 0:
        for most, name in GEMV_VARIANT_BY_ROWS:
            if rows <= most:
                return name if clusters or _gemv_cluster(name) == 1 else GEMV_VARIANT_NO_CLUSTERS
    return "base"


def gemv_kernel_name(wt, xt, ot, prologue, variant="base"):
    """The gemv.cu instantiation of gemv_mma for these CUDA type names, prologue and variant ("base" keeps the
    template's defaults, so its name is the one listed since before the variants)."""
    values = () if variant == "base" else GEMV_VARIANTS[variant]
    kernel = "gemv_mma_mc" if _gemv_cluster(variant) > 1 else "gemv_mma"
    return f"{kernel}<{wt}, {xt}, {ot}, {prologue}{''.join(f', {v}' for v in values)}>"


def _gemv_cluster(variant):
    """Blocks per cluster of a gemv_mma variant (1: no clusters)."""
    values = GEMV_VARIANTS[variant]
    return values[4] if len(values) > 4 else 1


def gemv_mma(x, weight, out, scale=None, bias=None, norm=None, eps=1e-6, swiglu=False, residual=None,
             splits=None, variant=None):
    """out[b] = epilogue(prologue(x[b]) @ weight.T) for the rows of x, through gemv.cu's gemv_mma, on arrays that
    ``gemv_mma_supported`` accepted: prologue RMSNorm with weight ``norm`` (and ``eps``) or SwiGLU of x = [gate | up]
    ([B, 2K]); epilogue * scale[n] + bias[n] + residual[b, n] (residual may be ``out``). ``splits`` = (KS, S)
    overrides the K split and ``variant`` (a GEMV_VARIANTS key) the kernel variant (tuning only). No allocation
    once the workspace has grown, so it can be captured."""
    from ..cuda import runtime
    xp = backend.array_module(x)
    B, (N, K) = x.shape[0], weight.shape
    if N == 0:
        return out
    pro = 2 if swiglu else (1 if norm is not None else 0)
    ks, S = splits or gemv_plan(N, K, weight.dtype.itemsize, pro, runtime.device_attribute(runtime.SM_COUNT))
    groups = -(-N // GEMV_BLOCK_ROWS)
    part, counters = _gemv_workspace(xp, groups * S * GEMV_TILE_FLOATS if S > 1 else 1, groups)
    xt = _GEMV_X[numpy.dtype(x.dtype)]
    wt = "signed char" if weight.dtype == numpy.int8 else "__nv_bfloat16"
    ot = "float" if out.dtype == numpy.float32 else xt
    variant = variant or gemv_variant(B, pro, runtime.compute_capability() >= 90)
    kernel = _gemv_kernel(gemv_kernel_name(wt, xt, ot, pro, variant))
    mc = _gemv_cluster(variant)
    null, i32, i64 = numpy.uint64(0), numpy.int32, numpy.int64
    bias_kind = 0 if bias is None else (1 if bias.dtype == numpy.float32 else 2)
    runtime.launch(kernel, (mc * -(-groups // mc), S), GEMV_THREADS,
                   (x, i64(x.strides[0] // x.dtype.itemsize), null if norm is None else norm, numpy.float32(eps),
                    weight, i64(K), null if scale is None else scale, null if bias is None else bias, i32(bias_kind),
                    null if residual is None else residual, i64(0 if residual is None else residual.strides[0] // 2),
                    out, i64(out.strides[0] // out.dtype.itemsize), i32(B), i32(N), i32(K), i32(ks), part, counters),
                   shared_mem=gemv_shared_bytes(x.dtype.itemsize, B, ks, pro))
    return out


def weight_only_linear(x2, weight, w_scale, bias=None, weight_padded=None, out=None):
    """The weight-only forward on arrays: x2 [M, K] float, weight [N, K] int8, w_scale [N] float32, bias [N]
    float32 or None -> [M, N] in x2's dtype: (x2 @ weight.T) * w_scale + bias with float32 sums. ``out`` as in
    ``w8a8_linear``."""
    xp = backend.array_module(x2)
    n = weight.shape[0]
    storage = numpy.dtype(x2.dtype)
    if _use_kernel(x2, weight) and storage in (numpy.dtype(numpy.float16), dtypes.bf16.storage):
        xpad = _pad_k(x2)
        wp = _pad_k(weight) if weight_padded is None else weight_padded
        out = xp.empty((x2.shape[0], n), dtype=storage) if out is None else out
        if x2.shape[0] == 0 or not gemv_mma_supported(xpad[:GEMV_MAX_ROWS], wp, out, scale=w_scale, bias=bias):
            out[...] = _weight_only_reference(x2, weight, w_scale, bias, storage)
            return out
        for start in range(0, x2.shape[0], GEMV_MAX_ROWS):   # more rows: one launch per 16 (each reads W again)
            rows = slice(start, start + GEMV_MAX_ROWS)
            gemv_mma(xpad[rows], wp, out[rows], scale=w_scale, bias=bias)
        return out
    return _weight_only_reference(x2, weight, w_scale, bias, storage)


def _weight_only_reference(x2, weight, w_scale, bias, storage):
    xp = backend.array_module(x2)
    acc = xp.matmul(x2.astype(numpy.float32), weight.astype(numpy.float32).T)
    v = acc * w_scale[None, :]
    if bias is not None:
        v = v + bias
    return v.astype(storage, copy=False)


def _choose_mode(mode, rows):
    if mode == "auto":
        return "weight_only" if rows <= WEIGHT_ONLY_MAX_M else "w8a8"
    return mode


class CastedLinearFunction(Function):
    """y = x @ (weight * w_scale[:, None]).T + bias through one of the int8 paths; gradients for x and bias."""

    def forward(self, x, bias, weight=None, w_scale=None, mode="auto", gemm="auto", weight_padded=None):
        in_features = weight.shape[1]
        x2 = x.reshape(-1, in_features)
        b32 = None if bias is None else bias.astype(numpy.float32, copy=False)
        if _choose_mode(mode, x2.shape[0]) == "weight_only":
            y = weight_only_linear(x2, weight, w_scale, b32, weight_padded)
        else:
            y = w8a8_linear(x2, weight, w_scale, b32, x.dtype, gemm, weight_padded)
        self.save(weight, w_scale)
        self.x_shape, self.x_storage = x.shape, x.dtype
        self.bias_storage = None if bias is None else bias.dtype
        return y.reshape(x.shape[:-1] + (weight.shape[0],))

    def backward(self, g):
        weight, w_scale = self.saved
        g2 = g.reshape(-1, weight.shape[0]).astype(numpy.float32)
        dx = db = None
        if self.inputs[0] is not None:
            # d/dx of x @ (W * s).T is g @ (W * s): the scale goes on g's columns, W is used as float32 as is.
            # Straight-through for the W8A8 activation quantization: rounding counts as the identity.
            dx = ((g2 * w_scale[None, :]) @ weight.astype(numpy.float32)).astype(self.x_storage)
            dx = dx.reshape(self.x_shape)
        if self.bias_storage is not None and self.inputs[1] is not None:
            db = g2.sum(axis=0).astype(self.bias_storage)
        return dx, db


def _check_linear_mode(mode, gemm):
    if mode not in LINEAR_MODES:
        raise TesseraError(f"mode must be one of {LINEAR_MODES}, got {mode!r}")
    if gemm not in GEMMS:
        raise TesseraError(f"gemm must be one of {GEMMS}, got {gemm!r}")


def casted_linear(x, weight, weight_scale, bias=None, mode="auto", gemm="auto", weight_padded=None):
    """x [..., K] (a float Tensor: bf16, f16 or f32) times int8 ``weight`` [N, K] with per-output-channel float32
    ``weight_scale`` [N], plus ``bias`` [N]; the result is in x's dtype. Differentiable in x and bias."""
    if not isinstance(x, Tensor) or x.dtype not in COMPUTE_DTYPES:
        raise DTypeError(f"casted_linear: x must be a bf16, f16 or f32 Tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    w = weight.data if isinstance(weight, Tensor) else weight
    s = weight_scale.data if isinstance(weight_scale, Tensor) else weight_scale
    if w.dtype != numpy.int8 or w.ndim != 2:
        raise DTypeError(f"casted_linear: weight must be a 2-D int8 array [out, in], got {w.dtype} {w.shape}")
    if x.ndim == 0 or x.shape[-1] != w.shape[1]:
        raise ShapeError(f"casted_linear: x has shape {x.shape}, the weight [out, in] = {w.shape} expects "
                         f"{w.shape[1]} features in the last dim")
    if s.shape != (w.shape[0],):
        raise ShapeError(f"casted_linear: weight_scale must have shape ({w.shape[0]},), got {s.shape}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (w.shape[0],)):
        raise ShapeError(f"casted_linear: bias must be a Tensor of shape ({w.shape[0]},), got "
                         f"{getattr(bias, 'shape', type(bias).__name__)}")
    if bias is not None and bias.dtype is not x.dtype:
        bias = bias.astype(x.dtype)
    if backend.device_of(w) != x.device or backend.device_of(s) != x.device:
        raise TesseraError(f"casted_linear: x is on {x.device}, the weight on {backend.device_of(w)}")
    _check_linear_mode(mode, gemm)
    return CastedLinearFunction.apply(x, bias, weight=w, w_scale=s.astype(numpy.float32, copy=False), mode=mode,
                                      gemm=gemm, weight_padded=weight_padded)


class CastedLinear(Module):
    """A linear layer with int8 weights [out_features, in_features] and one float32 scale per output channel.

    ``weight_dtype`` must be int8; ``activation_dtype`` (bf16, f16 or f32) is what inputs are cast to and outputs
    come in; ``accumulate_dtype`` must be f32 (the int8 GEMM sums exactly in int32; the weight-only path in f32).
    ``mode``: "auto", "w8a8" or "weight_only" (see the module docstring); ``gemm``: "auto", "mma" or "dp4a".
    The weights are buffers (frozen); the bias is a Parameter.
    """

    def __init__(self, in_features, out_features, bias=True, weight_dtype=dtypes.int8,
                 activation_dtype=dtypes.bf16, accumulate_dtype=dtypes.f32, mode="auto", gemm="auto", device=None,
                 generator=None):
        super().__init__()
        if dtypes.as_dtype(weight_dtype) is not dtypes.int8:
            raise DTypeError(f"CastedLinear supports weight_dtype=int8 only, got {dtypes.as_dtype(weight_dtype).name}")
        if dtypes.as_dtype(accumulate_dtype) is not dtypes.f32:
            raise DTypeError(f"CastedLinear accumulates in f32 (int32 in the int8 GEMM), got accumulate_dtype="
                             f"{dtypes.as_dtype(accumulate_dtype).name}")
        if in_features < 1 or out_features < 1:
            raise ShapeError(f"CastedLinear needs positive sizes, got in={in_features}, out={out_features}")
        w = empty(out_features, in_features, dtype=dtypes.f32, device=device)
        init.kaiming_uniform_(w, generator=generator)
        b = None
        if bias:
            b = empty(out_features, dtype=dtypes.f32, device=device)
            bound = 1 / math.sqrt(in_features)
            init.uniform_(b, -bound, bound, generator)
        self._configure(w.data, b, activation_dtype, mode, gemm)

    def _configure(self, w32, bias, activation_dtype, mode, gemm):
        """Quantize a float32 weight [out, in] to int8 with one absmax scale per output channel; keep the bias."""
        _check_linear_mode(mode, gemm)
        self.out_features, self.in_features = (int(n) for n in w32.shape)
        self.activation_dtype = _check_compute(activation_dtype, "activation_dtype")
        self.accumulate_dtype = dtypes.f32
        self.mode, self.gemm = mode, gemm
        q, s = quant.quantize(w32, dtypes.int8, granularity="channel", axis=0)
        self.weight = Buffer(Tensor(q, dtypes.int8))
        self.weight_scale = Buffer(Tensor(s.reshape(-1), dtypes.f32))
        self._padded = (None, None)
        self.bias = None
        if bias is not None:
            b = bias if isinstance(bias, Tensor) else Tensor(bias)
            if b.shape != (self.out_features,):
                raise ShapeError(f"CastedLinear: bias must have shape ({self.out_features},), got {b.shape}")
            self.bias = Parameter(b.detach().astype(self.activation_dtype))

    @classmethod
    def from_float(cls, linear, bias=None, activation_dtype=dtypes.bf16, mode="auto", gemm="auto"):
        """A CastedLinear from an ``nn.Linear`` (or a float weight [out, in] Tensor/array and an optional bias)."""
        from .layers import Linear
        if isinstance(linear, Linear):
            weight, bias = linear.weight, linear.bias
        else:
            weight = linear
        w = weight.data if isinstance(weight, Tensor) else weight
        if getattr(w, "ndim", 0) != 2 or 0 in w.shape:
            raise ShapeError(f"from_float expects a weight of shape [out, in], got {getattr(w, 'shape', None)}")
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer._configure(quant._as_f32(w, "weight"), bias, activation_dtype, mode, gemm)
        return layer

    def _weight_padded(self):
        """The weight padded for the kernels (the same array when in_features is a multiple of 16), kept."""
        w = self.weight.data
        if not backend.is_cupy_array(w):
            return None
        source, padded = self._padded
        if source is not w:
            padded = _pad_k(w)
            self._padded = (w, padded)
        return padded

    def forward(self, x):
        if not isinstance(x, Tensor) or not x.dtype.is_floating or x.dtype.is_fp8:
            raise DTypeError(f"CastedLinear expects a float Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        x = x.astype(self.activation_dtype)
        return casted_linear(x, self.weight, self.weight_scale, self.bias, self.mode, self.gemm,
                             self._weight_padded())

    def dequantized_weight(self):
        """The float32 weight [out, in] this layer multiplies by: weight * weight_scale[:, None]."""
        w, s = self.weight.data, self.weight_scale.data.astype(numpy.float32)
        return Tensor(w.astype(numpy.float32) * s[:, None], dtypes.f32)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, weight_dtype=int8, "
                f"activation_dtype={self.activation_dtype.name}, mode={self.mode!r}")


# ------------------------------------------------------------------------------------------------------------
# Embedding gathers
# ------------------------------------------------------------------------------------------------------------

def _check_indices(indices, what):
    if not isinstance(indices, Tensor) or indices.dtype.kind != "int":
        raise DTypeError(f"{what}: indices must be an integer Tensor, got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)}")
    idx = indices.data.reshape(-1)
    if numpy.dtype(idx.dtype) not in _INDEX_TYPE:
        idx = idx.astype(numpy.int64)
    return idx


def _raise_out_of_range(idx, rows, what):
    bad = (idx < 0) | (idx >= rows)
    value = int(idx[bad][0]) if bool(bad.any()) else "?"
    raise IndexOutOfRangeError(f"{what}: index {value} is out of range for a table of {rows} rows "
                               f"(indices must be in [0, {rows}))")


def _host_check(idx, rows, what):
    if idx.size and bool(((idx < 0) | (idx >= rows)).any()):
        _raise_out_of_range(idx, rows, what)


def _vector_ok(dim, *arrays):
    """Whether the gathers may move 8 elements per access: rows of a multiple of 8 and 32-byte-aligned bases."""
    return dim % 8 == 0 and all(quant._ptr(a) % 32 == 0 for a in arrays)


def embedding_gather(idx, table, scale, storage, compute, scale_factor=1.0, check=True, out=None):
    """out [n, D] = compute((decode(table[idx]) * scale[row]) * scale_factor) for flat int32/int64 indices
    (arrays). ``scale`` has one entry per row or a single one. ``check=False`` skips the host read of the error
    flag (one synchronisation) on the GPU: bad indices then give zero rows silently."""
    xp = backend.array_module(table)
    rows, dim = table.shape
    factor = numpy.float32(scale_factor)
    if _use_kernel(idx, table, scale):
        runtime = _runtime()
        n = idx.shape[0]
        if out is None:
            out = xp.empty((n, dim), dtype=compute.storage)
        error = xp.zeros((1,), dtype=numpy.int32)
        if n and dim:
            name = (f"embedding_gather<{_STORAGE_TAG[storage]}, {_CUDA_TYPE[compute.storage]}, "
                    f"{_INDEX_TYPE[numpy.dtype(idx.dtype)]}>")
            kernel = runtime.get_kernel("quant.cu", name)
            runtime.launch(kernel, (n,), (GATHER_THREADS,),
                           (table, idx, scale, numpy.int64(0 if scale.shape[0] == 1 else 1), factor, out,
                            numpy.int32(dim), numpy.int64(rows), numpy.int32(_vector_ok(dim, table, out)), error))
            if check and int(error[0]):
                _raise_out_of_range(idx, rows, "CastedEmbedding")
        return out
    _host_check(idx, rows, "CastedEmbedding")
    values = _decode(xp.take(table, idx, axis=0), storage)
    s = scale[idx] if scale.shape[0] != 1 else xp.broadcast_to(scale, idx.shape)
    return ((values * s[:, None]) * factor).astype(compute.storage, copy=False)


class CastedEmbedding(Module):
    """An embedding table stored in ``storage_dtype`` (fp8 e4m3 / e5m2, int8 or bf16) and read in
    ``compute_dtype`` (bf16, f16 or f32): out = (decode(q[row]) * scale[row]) * scale_factor.

    ``scale`` is chosen from the float weights: absmax / qmax per row (``granularity="row"``) or for the whole
    table ("tensor"); 1 for bf16. ``scale_factor`` multiplies every looked-up row (an embedding multiplier, e.g.
    sqrt(D)); a fresh layer's float weights are N(0, 1), so its outputs are N(0, scale_factor^2) up to rounding.
    """

    def __init__(self, vocab_size, embedding_dim, storage_dtype=dtypes.fp8_e4m3, compute_dtype=dtypes.bf16,
                 scale_factor=1.0, granularity="row", device=None, generator=None):
        super().__init__()
        if vocab_size < 1 or embedding_dim < 1:
            raise ShapeError(f"CastedEmbedding needs positive sizes, got {vocab_size} x {embedding_dim}")
        w = randn(vocab_size, embedding_dim, dtype=dtypes.f32, device=device, generator=generator)
        self._setup(w.data, storage_dtype, compute_dtype, scale_factor, granularity)

    def _setup(self, w32, storage_dtype, compute_dtype, scale_factor, granularity):
        self.storage_dtype = _check_storage(storage_dtype)
        self.compute_dtype = _check_compute(compute_dtype)
        self.scale_factor = float(scale_factor)
        if not math.isfinite(self.scale_factor):
            raise TesseraError(f"scale_factor must be finite, got {scale_factor}")
        self.num_embeddings, self.embedding_dim = w32.shape
        q, s = _quantize_table(w32, self.storage_dtype, granularity)
        self.weight = Buffer(Tensor(q, self.storage_dtype))
        self.weight_scale = Buffer(Tensor(s, dtypes.f32))

    @classmethod
    def from_float(cls, weight, storage_dtype=dtypes.fp8_e4m3, compute_dtype=dtypes.bf16, scale_factor=1.0,
                   granularity="row"):
        """A CastedEmbedding holding a float weight [vocab, dim] (Tensor or array), scales chosen from it."""
        w = weight.data if isinstance(weight, Tensor) else weight
        if getattr(w, "ndim", 0) != 2:
            raise ShapeError(f"from_float expects a weight of shape [vocab, dim], got {getattr(w, 'shape', None)}")
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer._setup(quant._as_f32(w, "weight"), storage_dtype, compute_dtype, scale_factor, granularity)
        return layer

    def forward(self, indices, check_indices=True):
        idx = _check_indices(indices, "CastedEmbedding")
        table = self.weight.data
        if backend.device_of(idx) != backend.device_of(table):
            raise TesseraError(f"CastedEmbedding: indices on {backend.device_of(idx)}, the table on "
                               f"{backend.device_of(table)}")
        # The tensor's dtype names the format: a table cast by Module.to(dtype) is read as what it became.
        storage = self.weight.dtype if self.weight.dtype in STORAGE_DTYPES else _check_storage(self.weight.dtype)
        scale = self.weight_scale.data.astype(numpy.float32, copy=False)
        out = embedding_gather(idx, table, scale, storage, self.compute_dtype, self.scale_factor, check_indices)
        return Tensor(out.reshape(tuple(indices.shape) + (self.embedding_dim,)), self.compute_dtype)

    def dequantized_weight(self):
        """The float32 table [vocab, dim] the lookups read (scale_factor included)."""
        s = self.weight_scale.data.astype(numpy.float32)
        values = _decode(self.weight.data, self.weight.dtype)
        return Tensor((values * (s[:, None] if s.shape[0] != 1 else s)) * numpy.float32(self.scale_factor),
                      dtypes.f32)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, storage_dtype={self.storage_dtype.name}, "
                f"compute_dtype={self.compute_dtype.name}, scale_factor={self.scale_factor}")


# ------------------------------------------------------------------------------------------------------------
# CastedSparseEmbedding: block CSR
# ------------------------------------------------------------------------------------------------------------

def sparse_embedding_gather(idx, row_ptr, block_cols, block_data, block_scales, dim, storage, compute,
                            weights=None, check=True, out=None):
    """out [n, dim]: rows idx of the block-CSR table rebuilt densely (zeros outside stored blocks), each stored
    element compute((decode(q) * block_scale) * weight[i]) (weight 1 without ``weights``)."""
    xp = backend.array_module(row_ptr)
    rows = row_ptr.shape[0] - 1
    block_size = block_data.shape[1]
    n = idx.shape[0]
    if _use_kernel(idx, row_ptr, block_cols, block_data, block_scales, weights):
        runtime = _runtime()
        if out is None:
            out = xp.empty((n, dim), dtype=compute.storage)
        error = xp.zeros((1,), dtype=numpy.int32)
        if n and dim:
            name = (f"sparse_embedding_gather<{_STORAGE_TAG[storage]}, {_CUDA_TYPE[compute.storage]}, "
                    f"{_INDEX_TYPE[numpy.dtype(idx.dtype)]}>")
            kernel = runtime.get_kernel("quant.cu", name)
            w = _dummy_f32(xp) if weights is None else weights
            runtime.launch(kernel, (n,), (GATHER_THREADS,),
                           (row_ptr, block_cols, block_data, block_scales, idx, w, numpy.int32(weights is not None),
                            out, numpy.int32(dim), numpy.int32(block_size), numpy.int64(rows), error))
            if check and int(error[0]):
                _raise_out_of_range(idx, rows, "CastedSparseEmbedding")
        return out
    _host_check(idx, rows, "CastedSparseEmbedding")
    starts, counts = row_ptr[idx], row_ptr[idx + 1] - row_ptr[idx]
    ends = xp.cumsum(counts)
    total = int(ends[-1]) if n else 0
    dense = xp.zeros((n, dim // block_size, block_size), dtype=numpy.float32)
    if total:
        # Expand each lookup's block range [start, start + count) without a Python loop.
        j = xp.arange(total, dtype=numpy.int64)
        lookup = xp.searchsorted(ends, j, side="right")
        block = starts[lookup] + (j - (ends - counts)[lookup])
        values = _decode(block_data[block], storage) * block_scales[block][:, None]
        if weights is not None:
            values = values * weights[lookup][:, None]
        dense[lookup, block_cols[block]] = values
    return dense.reshape(n, dim).astype(compute.storage, copy=False)


def _block_mask(norms, keep):
    """A boolean mask of the ``keep`` largest block norms (ties: the earlier block first on NumPy)."""
    xp = backend.array_module(norms)
    flat = norms.reshape(-1)
    mask = xp.zeros(flat.shape, dtype=bool)
    if keep:
        order = xp.argsort(-flat, kind="stable") if xp is numpy else xp.argsort(-flat)
        mask[order[:keep]] = True
    return mask.reshape(norms.shape)


class CastedSparseEmbedding(Module):
    """An embedding table whose rows are cut into blocks of ``block_size`` elements, only the kept blocks stored
    (block CSR: ``row_ptr`` [V + 1] int64, ``block_cols`` [nnz] int32, ``block_data`` [nnz, block_size] in
    ``storage_dtype``, ``block_scales`` [nnz] float32, absmax per block; 1 for bf16).

    The fresh layer draws N(0, 1) weights and keeps the fraction 1 - ``sparsity`` of blocks with the largest L2
    norm; ``from_dense`` builds one from a dense matrix the same way or from a given block mask [V, D / block].
    ``forward(indices, weights=None)`` gives dense rows in ``compute_dtype``, scaled by per-lookup weights.
    """

    def __init__(self, num_embeddings, embedding_dim, sparsity=0.9, storage_dtype=dtypes.fp8_e4m3,
                 compute_dtype=dtypes.bf16, block_size=16, device=None, generator=None):
        super().__init__()
        w = randn(num_embeddings, embedding_dim, dtype=dtypes.f32, device=device, generator=generator)
        self._build(w.data, sparsity, None, storage_dtype, compute_dtype, block_size)

    @classmethod
    def from_dense(cls, weight, sparsity=None, mask=None, storage_dtype=dtypes.fp8_e4m3, compute_dtype=dtypes.bf16,
                   block_size=16):
        """From a float matrix [V, D]: keep the blocks of ``mask`` ([V, D / block_size] bool), or the fraction
        1 - ``sparsity`` of blocks with the largest L2 norm (exactly one of the two)."""
        if (sparsity is None) == (mask is None):
            raise TesseraError("from_dense needs exactly one of sparsity= and mask=")
        w = weight.data if isinstance(weight, Tensor) else weight
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer._build(quant._as_f32(w, "weight"), sparsity, mask, storage_dtype, compute_dtype, block_size)
        return layer

    def _build(self, w32, sparsity, mask, storage_dtype, compute_dtype, block_size):
        xp = backend.array_module(w32)
        if w32.ndim != 2 or w32.shape[0] < 1 or w32.shape[1] < 1:
            raise ShapeError(f"CastedSparseEmbedding needs a [V, D] table with V, D >= 1, got {w32.shape}")
        rows, dim = w32.shape
        block_size = int(block_size)
        if block_size < 1 or dim % block_size:
            raise ShapeError(f"embedding_dim {dim} must be a positive multiple of block_size {block_size}")
        self.storage_dtype = _check_storage(storage_dtype)
        self.compute_dtype = _check_compute(compute_dtype)
        self.num_embeddings, self.embedding_dim, self.block_size = rows, dim, block_size
        blocks = w32.reshape(rows, dim // block_size, block_size)
        if mask is None:
            sparsity = float(sparsity)
            if not 0.0 <= sparsity <= 1.0:
                raise TesseraError(f"sparsity must be in [0, 1], got {sparsity}")
            norms = xp.sqrt((blocks.astype(numpy.float64) ** 2).sum(axis=2))
            mask = _block_mask(norms, int(round((1.0 - sparsity) * norms.size)))
        else:
            mask = mask.data if isinstance(mask, Tensor) else xp.asarray(mask)
            if mask.shape != (rows, dim // block_size) or mask.dtype != numpy.bool_:
                raise ShapeError(f"mask must be a bool array of shape {(rows, dim // block_size)}, got "
                                 f"{mask.dtype} {mask.shape}")
        self.sparsity = 1.0 - float(mask.sum()) / mask.size
        r, c = xp.nonzero(mask)  # row-major: the blocks of each row together, in column order
        row_ptr = xp.zeros((rows + 1,), dtype=numpy.int64)
        row_ptr[1:] = xp.cumsum(mask.sum(axis=1))
        q, s = _quantize_table(blocks[r, c], self.storage_dtype, "row")
        self.row_ptr = Buffer(Tensor(row_ptr, dtypes.int64))
        self.block_cols = Buffer(Tensor(c.astype(numpy.int32), dtypes.int32))
        self.block_data = Buffer(Tensor(q, self.storage_dtype))
        self.block_scales = Buffer(Tensor(s, dtypes.f32))

    @property
    def nnz_blocks(self):
        return int(self.block_cols.shape[0])

    def forward(self, indices, weights=None, check_indices=True):
        idx = _check_indices(indices, "CastedSparseEmbedding")
        w = None
        if weights is not None:
            if not isinstance(weights, Tensor) or weights.shape != tuple(indices.shape):
                raise ShapeError(f"weights must be a Tensor of the indices' shape {tuple(indices.shape)}, got "
                                 f"{getattr(weights, 'shape', type(weights).__name__)}")
            w = weights.data.reshape(-1).astype(numpy.float32, copy=False)
        if backend.device_of(idx) != backend.device_of(self.row_ptr.data):
            raise TesseraError(f"CastedSparseEmbedding: indices on {backend.device_of(idx)}, the table on "
                               f"{self.row_ptr.device}")
        out = sparse_embedding_gather(idx, self.row_ptr.data, self.block_cols.data, self.block_data.data,
                                      self.block_scales.data.astype(numpy.float32, copy=False), self.embedding_dim,
                                      self.block_data.dtype, self.compute_dtype, w, check_indices)
        return Tensor(out.reshape(tuple(indices.shape) + (self.embedding_dim,)), self.compute_dtype)

    def to_dense(self):
        """The float32 table [V, D] the lookups read (zeros outside the stored blocks)."""
        xp = backend.array_module(self.row_ptr.data)
        rows, nnz = self.num_embeddings, self.nnz_blocks
        # The row of stored block b is the number of row starts at or before it.
        owner = xp.searchsorted(self.row_ptr.data[1:], xp.arange(nnz, dtype=numpy.int64), side="right")
        dense = xp.zeros((rows, self.embedding_dim // self.block_size, self.block_size), dtype=numpy.float32)
        values = _decode(self.block_data.data, self.block_data.dtype)
        dense[owner, self.block_cols.data] = values * self.block_scales.data.astype(numpy.float32)[:, None]
        return Tensor(dense.reshape(rows, self.embedding_dim), dtypes.f32)

    def memory_bytes(self):
        """Bytes held by the sparse format against a dense table of the compute dtype and of the storage dtype
        (with one float32 scale per row), and the ratios."""
        sparse = sum(b.size_bytes for b in (self.row_ptr, self.block_cols, self.block_data, self.block_scales))
        dense_compute = self.num_embeddings * self.embedding_dim * self.compute_dtype.itemsize
        dense_storage = self.num_embeddings * (self.embedding_dim * self.storage_dtype.itemsize + 4)
        return {"sparse": sparse, "dense_compute": dense_compute, "dense_storage": dense_storage,
                "ratio_vs_compute": sparse / dense_compute, "ratio_vs_storage": sparse / dense_storage}

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, block_size={self.block_size}, "
                f"sparsity={self.sparsity:.3f}, storage_dtype={self.storage_dtype.name}, "
                f"compute_dtype={self.compute_dtype.name}")


# ------------------------------------------------------------------------------------------------------------
# Quantized SwiGLU
# ------------------------------------------------------------------------------------------------------------

def quantize_swiglu_weights(w_gate, w_up, w_down):
    """int8 weights and per-output-channel scales for ``swiglu_quantized`` from float weights in the seed's
    [in, out] layout: w_gate, w_up [D, D_ff], w_down [D_ff, D]. Returns (q_gate, q_up, q_down, scales) with
    scales {"gate_weight": [D_ff], "up_weight": [D_ff], "down_weight": [D]} (float32, in kind: Tensors or arrays)."""
    out, scales = [], {}
    for name, w in (("gate_weight", w_gate), ("up_weight", w_up), ("down_weight", w_down)):
        q, s = quant.quantize(w, dtypes.int8, granularity="channel", axis=1)
        out.append(q)
        scales[name] = s.reshape(-1) if not isinstance(s, Tensor) else Tensor(s.data.reshape(-1), dtypes.f32)
    return out[0], out[1], out[2], scales


def _fp8_tokens(h):
    """(e4m3 bits, scale [M, 1]) of a float32 [M, N] with one absmax / 448 scale per row (token)."""
    q, s = quant.quantize(h, dtypes.fp8_e4m3, granularity="row")
    return q, s


def _scale_array(xp, value, what):
    if value is None:
        return None
    v = value.data if isinstance(value, Tensor) else value
    v = xp.asarray(v, dtype=numpy.float32)
    if v.ndim > 1:
        raise ShapeError(f"scales[{what!r}] must be a number or a 1-D per-channel array, got shape {v.shape}")
    return v


def swiglu_quantized(x, W_gate, W_up, W_down, scales, out_dtype=None):
    """SwiGLU ``(silu(x @ Wg) * (x @ Wu)) @ Wd`` with int8 weights and fp8 e4m3 activations, as the seed's
    ``@quantized(weights=int8, activations=fp8)``:

        xq = e4m3(x / s_in)                         s_in = scales["input"], else absmax / 448 per token
        gate = ((decode(xq) @ Wg) * s_in) * s_gw    up likewise with Wu, s_uw (float32 sums of exact products)
        h = silu(gate) * up                         float32
        hq = e4m3(h / s_h)                          s_h = scales["hidden"], else absmax / 448 per token
        out = ((decode(hq) @ Wd) * s_h) * s_dw

    x: [..., D] float Tensor (or an fp8_e4m3 Tensor already quantized with scales["input"]); W_gate, W_up: int8
    [D, D_ff]; W_down: int8 [D_ff, D] (the seed's [in, out] layout); scales: "gate_weight", "up_weight",
    "down_weight" (numbers or per-output-channel arrays, see ``quantize_swiglu_weights``), optional "input",
    "hidden" (numbers), and "output" when ``out_dtype`` is fp8_e4m3. The result is in ``out_dtype`` (default:
    x's dtype, bf16 for an fp8 x). Casts are saturating. Inference only (no gradient).
    """
    if not isinstance(x, Tensor):
        raise DTypeError(f"swiglu_quantized: x must be a Tensor, got {type(x).__name__}")
    weights = {}
    for name, w in (("W_gate", W_gate), ("W_up", W_up), ("W_down", W_down)):
        arr = w.data if isinstance(w, Tensor) else w
        if getattr(arr, "dtype", None) != numpy.int8 or arr.ndim != 2:
            raise DTypeError(f"swiglu_quantized: {name} must be a 2-D int8 weight, got "
                             f"{getattr(arr, 'dtype', type(w).__name__)}")
        if backend.device_of(arr) != x.device:
            raise TesseraError(f"swiglu_quantized: {name} is on {backend.device_of(arr)}, x on {x.device}")
        weights[name] = arr
    d = x.shape[-1] if x.ndim else 0
    d_ff = weights["W_gate"].shape[1]
    if (weights["W_gate"].shape != (d, d_ff) or weights["W_up"].shape != (d, d_ff)
            or weights["W_down"].shape != (d_ff, d)):
        raise ShapeError(f"swiglu_quantized: with x [..., {d}] the weights must be W_gate, W_up [{d}, D_ff] and "
                         f"W_down [D_ff, {d}]; got {weights['W_gate'].shape}, {weights['W_up'].shape}, "
                         f"{weights['W_down'].shape}")
    missing = [k for k in ("gate_weight", "up_weight", "down_weight") if k not in scales]
    if missing:
        raise TesseraError(f"swiglu_quantized: scales lacks {missing}")
    xp = backend.array_module(x.data)
    s_gw = _scale_array(xp, scales["gate_weight"], "gate_weight")
    s_uw = _scale_array(xp, scales["up_weight"], "up_weight")
    s_dw = _scale_array(xp, scales["down_weight"], "down_weight")
    for name, s, n in (("gate_weight", s_gw, d_ff), ("up_weight", s_uw, d_ff), ("down_weight", s_dw, d)):
        if s.ndim == 1 and s.shape[0] != n:
            raise ShapeError(f"swiglu_quantized: scales[{name!r}] has {s.shape[0]} entries, expected {n}")
    s_in = _scale_array(xp, scales.get("input"), "input")
    s_h = _scale_array(xp, scales.get("hidden"), "hidden")

    lead = x.shape[:-1]
    if x.dtype is dtypes.fp8_e4m3:
        if s_in is None:
            raise TesseraError("swiglu_quantized: an fp8 x needs scales['input'] (its dequantization scale)")
        xq = x.data.reshape(-1, d)
        default_out = dtypes.bf16
    elif x.dtype in COMPUTE_DTYPES or x.dtype is dtypes.f64:
        x32 = x.data.reshape(-1, d).astype(numpy.float32)
        if s_in is None:
            xq, s_in = _fp8_tokens(x32)
        else:
            xq, _ = quant.quantize(x32, dtypes.fp8_e4m3, scale=s_in)
        default_out = x.dtype
    else:
        raise DTypeError(f"swiglu_quantized: x must be a float or fp8_e4m3 Tensor, got {x.dtype.name}")
    xd = fp8.decode(xq, dtypes.fp8_e4m3, dtypes.f32)
    gate = (xd @ weights["W_gate"].astype(numpy.float32)) * s_in * s_gw
    up = (xd @ weights["W_up"].astype(numpy.float32)) * s_in * s_uw
    h = (gate * stable_sigmoid(xp, gate)) * up
    if s_h is None:
        hq, s_h = _fp8_tokens(h)
    else:
        hq, _ = quant.quantize(h, dtypes.fp8_e4m3, scale=s_h)
    out = (fp8.decode(hq, dtypes.fp8_e4m3, dtypes.f32) @ weights["W_down"].astype(numpy.float32)) * s_h * s_dw
    out = out.reshape(lead + (d,))
    target = dtypes.as_dtype(out_dtype) if out_dtype is not None else default_out
    if target is dtypes.fp8_e4m3:
        s_out = _scale_array(xp, scales.get("output"), "output")
        if s_out is None:
            raise TesseraError("swiglu_quantized: out_dtype=fp8_e4m3 needs scales['output']")
        q, _ = quant.quantize(out, dtypes.fp8_e4m3, scale=s_out)
        return Tensor(q, dtypes.fp8_e4m3)
    if target not in COMPUTE_DTYPES and target is not dtypes.f64:
        raise DTypeError(f"swiglu_quantized: out_dtype must be bf16, f16, f32, f64 or fp8_e4m3, got {target.name}")
    return Tensor(out.astype(target.storage), target)
