"""Quantization primitives: symmetric absmax scales, saturating quantization to int8 / fp8, dequantization.

A value x is stored as q = Q(x / scale) with scale = absmax / qmax over a group (1 for an all-zero group):
``qmax`` is 127 for int8 (the symmetric range; -128 is never produced), 448 for fp8 e4m3 and 57344 for e5m2.
Q rounds to nearest even and saturates: int8 clamps to [-127, 127] (a NaN quotient gives 0); fp8 uses
``tessera_cp.fp8.encode(..., saturate=True)`` (bit-exact with ml_dtypes, NaN stays NaN). Dequantization is
``decode(q) * scale``. Everything is computed in float32: x is rounded to float32 first, and x / scale is one
IEEE float32 division, so the CUDA kernels (``cuda/quant.cu``) reproduce the reference bit for bit.

Groups (``granularity``): "tensor" (one scale), "row" (one per row: the last axis is reduced; per-token for
activations [..., D]), "channel" (one per index of ``axis``, every other axis reduced; ``axis=0`` is the output
channel of a [out, in] weight). Scales keep the reduced axes as size 1, so they broadcast against x.

Round-trip error, elementwise, for finite x inside the saturation range: int8 |x - deq| <= scale / 2;
fp8 |x - deq| <= max(|x| * 2^-(m + 1), scale * 2^(e_min - m - 1)) with m mantissa bits and 2^e_min the smallest
normal (e4m3: 2^-4 |x| or scale * 2^-10; e5m2: 2^-3 |x| or scale * 2^-17).

Functions take NumPy / CuPy arrays or Tensors and answer in kind. ``quantize_rows_int8`` is the per-token
quantization of W8A8 activations; on CuPy it runs one kernel (unless ``TESSERA_REFERENCE=1``).
"""

import numpy

from . import backend, dtypes, fp8
from .errors import DTypeError, ShapeError, TesseraError

QMAX = {dtypes.int8: 127.0, dtypes.fp8_e4m3: 448.0, dtypes.fp8_e5m2: 57344.0}
GRANULARITIES = ("tensor", "row", "channel")
QUANT_THREADS = 256  # threads per row of quantize_rows_int8 (cuda/quant.cu)
_FLOAT_STORAGE = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64), numpy.dtype(numpy.float16),
                  dtypes.bf16.storage)
_CUDA_TYPE = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float16): "__half",
              dtypes.bf16.storage: "__nv_bfloat16"}


def _use_kernel(*arrays):
    return all(backend.is_cupy_array(a) for a in arrays) and not backend.reference_forced()


def _ptr(array):
    """The address of an array's first element (alignment checks before vector loads)."""
    return array.data.ptr if backend.is_cupy_array(array) else array.ctypes.data


def _unwrap(x, what):
    from .tensor import Tensor
    if isinstance(x, Tensor):
        return x.data, x.dtype, True
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise DTypeError(f"{what} must be a Tensor or a NumPy/CuPy array, got {type(x).__name__}")
    return x, None, False


def _wrap(array, dtype, as_tensor):
    from .tensor import Tensor
    return Tensor(array, dtype) if as_tensor else array


def _quant_dtype(dtype):
    try:
        d = dtypes.as_dtype(dtype)
    except DTypeError:
        d = None
    if d not in QMAX:
        raise DTypeError(f"quantized dtype must be int8, fp8_e4m3 or fp8_e5m2, got {dtype!r}")
    return d


def qmax(dtype):
    """The largest magnitude a quantized value takes: 127 (int8), 448 (e4m3), 57344 (e5m2)."""
    return QMAX[_quant_dtype(dtype)]


def _as_f32(x, what):
    if numpy.dtype(x.dtype) not in _FLOAT_STORAGE:
        raise DTypeError(f"{what} must be a float32, float64, float16 or bfloat16 array, got {x.dtype}")
    return x.astype(numpy.float32, copy=False)


def _reduce_axes(ndim, granularity, axis):
    if granularity not in GRANULARITIES:
        raise TesseraError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return tuple(range(ndim))
    if ndim == 0:
        raise ShapeError(f"granularity {granularity!r} needs an array of rank >= 1, got a scalar")
    if granularity == "row":
        return (ndim - 1,)
    if not -ndim <= axis < ndim:
        raise ShapeError(f"channel axis {axis} is out of range for rank {ndim}")
    axis %= ndim
    return tuple(d for d in range(ndim) if d != axis)


def _absmax_scale(x32, qmax_value, axes):
    """absmax / qmax over ``axes`` (kept as size 1), NaN ignored, 1 where the group is all zero (or empty)."""
    xp = backend.array_module(x32)
    shape = tuple(1 if d in axes else n for d, n in enumerate(x32.shape))
    if x32.size == 0:
        return xp.ones(shape, dtype=numpy.float32)
    a = xp.abs(x32)
    amax = xp.where(xp.isnan(a), numpy.float32(0), a).max(axis=axes, keepdims=True)
    return xp.where(amax > 0, amax / numpy.float32(qmax_value), numpy.float32(1)).astype(numpy.float32)


def absmax_scale(x, dtype, granularity="tensor", axis=0):
    """The float32 scale(s) absmax / qmax(dtype) per group; 1 for an all-zero group."""
    array, _, as_tensor = _unwrap(x, "x")
    q = _quant_dtype(dtype)
    x32 = _as_f32(array, "x")
    scale = _absmax_scale(x32, QMAX[q], _reduce_axes(x32.ndim, granularity, axis))
    return _wrap(scale, dtypes.f32, as_tensor)


def _quantize_f32(x32, scale, q):
    """q bits of x32 / scale (float32 arrays that broadcast), saturating."""
    xp = backend.array_module(x32)
    y = (x32 / scale).astype(numpy.float32, copy=False)
    if q is dtypes.int8:
        r = xp.clip(xp.rint(y), -127, 127)
        return xp.where(xp.isnan(r), numpy.float32(0), r).astype(numpy.int8)
    return fp8.encode(y, q, saturate=True)


def quantize(x, dtype, scale=None, granularity="tensor", axis=0):
    """(q, scale): x quantized to ``dtype`` (int8 values, or fp8 bits in uint8) with absmax scales of the
    ``granularity`` groups, or with the given ``scale`` (anything that broadcasts against x; made float32)."""
    array, _, as_tensor = _unwrap(x, "x")
    q = _quant_dtype(dtype)
    x32 = _as_f32(array, "x")
    xp = backend.array_module(x32)
    if scale is None:
        s = _absmax_scale(x32, QMAX[q], _reduce_axes(x32.ndim, granularity, axis))
    else:
        s, _, _ = _unwrap(scale, "scale") if hasattr(scale, "shape") else (scale, None, False)
        s = xp.asarray(s, dtype=numpy.float32)
        try:
            numpy.broadcast_shapes(s.shape, x32.shape)
        except ValueError:
            raise ShapeError(f"scale of shape {s.shape} does not broadcast against x of shape {x32.shape}") from None
        if s.size and not bool((s > 0).all()):
            raise TesseraError("quantize: scale must be positive everywhere")
    return _wrap(_quantize_f32(x32, s, q), q, as_tensor), _wrap(s, dtypes.f32, as_tensor)


def dequantize(q, scale, dtype, out_dtype=dtypes.f32):
    """decode(q) * scale, computed in float32 and returned in ``out_dtype`` (f32, f16, bf16 or f64)."""
    array, tagged, as_tensor = _unwrap(q, "q")
    d = _quant_dtype(dtype if dtype is not None else tagged)
    out = dtypes.as_dtype(out_dtype)
    if out not in (dtypes.f32, dtypes.f16, dtypes.bf16, dtypes.f64):
        raise DTypeError(f"dequantize out_dtype must be f32, f16, bf16 or f64, got {out.name}")
    expected = numpy.int8 if d is dtypes.int8 else numpy.uint8
    if array.dtype != expected:
        raise DTypeError(f"dequantize: {d.name} values must be held in {numpy.dtype(expected)}, got {array.dtype}")
    xp = backend.array_module(array)
    s, _, _ = _unwrap(scale, "scale") if hasattr(scale, "shape") else (scale, None, False)
    s = xp.asarray(s, dtype=numpy.float32)
    values = array.astype(numpy.float32) if d is dtypes.int8 else fp8.decode(array, d, dtypes.f32)
    return _wrap((values * s).astype(out.storage, copy=False), out, as_tensor)


# ------------------------------------------------------------------------------------------------------------
# Per-token int8 quantization of activations (W8A8)
# ------------------------------------------------------------------------------------------------------------

def quantize_rows_int8(x, pad_to=1):
    """(q, scale) for a 2-D float array x [M, K]: scale[m] = absmax(x[m]) / 127 (1 for a zero row), q [M, Kp]
    int8 with Kp = K rounded up to ``pad_to`` and zeros in the padding columns (the int8 GEMM reads 16-byte
    chunks). One kernel on CuPy (float32, float16, bfloat16); the reference elsewhere."""
    array, _, as_tensor = _unwrap(x, "x")
    if array.ndim != 2:
        raise ShapeError(f"quantize_rows_int8 expects x of shape [M, K], got {tuple(array.shape)}")
    if numpy.dtype(array.dtype) not in _FLOAT_STORAGE:
        raise DTypeError(f"quantize_rows_int8 expects a float array, got {array.dtype}")
    pad_to = int(pad_to)
    if pad_to < 1:
        raise TesseraError(f"pad_to must be >= 1, got {pad_to}")
    rows, cols = array.shape
    ldq = -(-cols // pad_to) * pad_to
    if _use_kernel(array) and numpy.dtype(array.dtype) in _CUDA_TYPE:
        q, s = _quantize_rows_cuda(array, ldq)
    else:
        q, s = _quantize_rows_reference(array, ldq)
    return _wrap(q, dtypes.int8, as_tensor), _wrap(s, dtypes.f32, as_tensor)


def _quantize_rows_reference(array, ldq):
    xp = backend.array_module(array)
    x32 = array.astype(numpy.float32, copy=False)
    s = _absmax_scale(x32, 127.0, (1,))
    q = _quantize_f32(x32, s, dtypes.int8)
    if ldq != x32.shape[1]:
        padded = xp.zeros((x32.shape[0], ldq), dtype=numpy.int8)
        padded[:, :x32.shape[1]] = q
        q = padded
    return q, s.reshape(-1)


def _quantize_rows_cuda(array, ldq, q=None, scale=None):
    """Launch quantize_rows_int8<T>; ``q`` / ``scale`` let tests hand in poisoned buffers."""
    from .cuda import runtime
    xp = backend.array_module(array)
    x = xp.ascontiguousarray(array)
    rows, cols = x.shape
    if q is None:
        q = xp.empty((rows, ldq), dtype=numpy.int8)
    if scale is None:
        scale = xp.empty((rows,), dtype=numpy.float32)
    if rows:
        vec = cols % 8 == 0 and ldq % 8 == 0 and _ptr(x) % (8 * x.itemsize) == 0 and _ptr(q) % 8 == 0
        kernel = runtime.get_kernel("quant.cu", f"quantize_rows_int8<{_CUDA_TYPE[numpy.dtype(x.dtype)]}>")
        runtime.launch(kernel, (rows,), (QUANT_THREADS,),
                       (x, q, scale, numpy.int32(cols), numpy.int32(ldq), numpy.int32(1 if vec else 0)))
    return q, scale
