"""fp8 casts: float32 / float16 / bfloat16 (float64 through float32) <-> fp8 e4m3 and e5m2 bits kept in uint8.

``encode(array, fmt, saturate=False)`` gives the fp8 bits; ``decode(bits, fmt, out_dtype)`` gives the values back.
Both match ml_dtypes (``float8_e4m3fn``, ``float8_e5m2``) bit for bit: round to nearest even, subnormals and signed
zero kept, any NaN becomes the canonical NaN with its sign (e4m3 0x7F, e5m2 0x7E), and overflow past half a step
above the largest finite value gives NaN for e4m3 (it has no inf: 448 is the largest, 464 still rounds to it, above
464 is NaN) and inf for e5m2 (57344 the largest, from 61440 up inf). ``saturate=True`` is CUDA's SATFINITE mode,
the one quantization wants: overflow and +-inf give +-max finite, NaN stays NaN.

The reference works on integer bit patterns only, through the array module, so one body serves NumPy and CuPy
and no hardware float conversion (which may drop a NaN's sign) is involved. On CuPy arrays the kernels of
``cuda/cast.cu`` compute the same codes, unless ``TESSERA_REFERENCE=1`` asks for the reference everywhere.
"""
import functools

import numpy

from . import backend, dtypes
from .cuda import runtime
from .errors import DTypeError


class _Format:
    """An fp8 layout: mantissa bits, exponent bias, and its special codes (all without the sign bit)."""

    def __init__(self, dtype, man, bias, max_code, overflow_code, nan_code, has_inf, kernel_suffix):
        self.dtype, self.man, self.bias = dtype, man, bias
        self.max_code = max_code            # largest finite magnitude
        self.overflow_code = overflow_code  # what overflow gives without saturation: NaN (e4m3) or inf (e5m2)
        self.nan_code = nan_code            # the canonical NaN
        self.has_inf = has_inf
        self.kernel_suffix = kernel_suffix


_FORMATS = {
    dtypes.fp8_e4m3: _Format(dtypes.fp8_e4m3, 3, 7, 0x7E, 0x7F, 0x7F, False, "e4m3"),
    dtypes.fp8_e5m2: _Format(dtypes.fp8_e5m2, 2, 15, 0x7B, 0x7C, 0x7E, True, "e5m2"),
}

# Float types by storage dtype: (unsigned bits, signed working integer, exponent bits, mantissa bits, CUDA type).
# The working integer holds the significand shifted by up to mantissa + 2 bits, so int32 serves all three.
_FLOATS = {
    numpy.dtype(numpy.float32): (numpy.uint32, numpy.int32, 8, 23, "float"),
    numpy.dtype(numpy.float16): (numpy.uint16, numpy.int32, 5, 10, "__half"),
    dtypes.bf16.storage: (numpy.uint16, numpy.int32, 8, 7, "__nv_bfloat16"),
}
_F64 = numpy.dtype(numpy.float64)
_UINT = {2: numpy.uint16, 4: numpy.uint32, 8: numpy.uint64}
_DECODE_TO = (dtypes.f32, dtypes.f16, dtypes.bf16, dtypes.f64)

THREADS = 256              # threads per block of the cast kernels
ENCODE_UNROLL = 2          # encode: 16-byte vectors of x a thread loads per grid-stride step (cast.cu's)
DECODE_PER_THREAD = 4      # decode: codes a thread converts per grid-stride step (one 4-byte load)
MAX_BLOCKS = 8192          # the kernels loop over the rest; enough blocks to fill any current GPU
# encode: 64M bf16 on the H100 took 72.9 us with 4096 blocks, 75.6 with 8192, 74.2 with 2112 (bench/tune_norm.py)
ENCODE_MAX_BLOCKS = 4096


def _format(fmt):
    try:
        dtype = dtypes.as_dtype(fmt)
    except DTypeError as e:
        raise DTypeError(f"fmt must be tessera_cp.fp8_e4m3 or tessera_cp.fp8_e5m2, got {fmt!r} ({e})") from None
    if dtype not in _FORMATS:
        raise DTypeError(f"fmt must be tessera_cp.fp8_e4m3 or tessera_cp.fp8_e5m2, got {fmt!r}")
    return _FORMATS[dtype]


def _array_dtype(array, what):
    dtype = getattr(array, "dtype", None)
    if dtype is None or not hasattr(array, "shape"):
        raise DTypeError(f"{what} must be a NumPy or CuPy array, got {type(array).__name__}")
    return numpy.dtype(dtype)


def _use_kernel(array):
    return backend.is_cupy_array(array) and not backend.reference_forced()


# ------------------------------------------------------------------------------------------------------------
# Public entry points: argument checks, then the kernel on CuPy arrays or the reference
# ------------------------------------------------------------------------------------------------------------

def encode(array, fmt, saturate=False):
    """fp8 bits (a uint8 array of the same shape and backend) of a float32, float16, bfloat16 or float64 array.

    float64 is rounded to float32 first, as ml_dtypes does (so two roundings; the tests hold it to ml_dtypes there
    too). ``saturate`` clamps to the finite range.
    """
    f = _format(fmt)
    dtype = _array_dtype(array, "array")
    if dtype != _F64 and dtype not in _FLOATS:
        raise DTypeError(f"fp8.encode expects a float32, float16, bfloat16 or float64 array, got {dtype}")
    saturate = bool(saturate)
    if dtype == _F64:
        array = _f64_to_f32(array)
    if _use_kernel(array):
        return _encode_cuda(array, f, saturate)
    return _encode_reference(array, f, saturate)


def decode(bits, fmt, out_dtype=dtypes.f32):
    """The values (an array of ``out_dtype``: f32, f16, bf16 or f64) of fp8 bits held in a uint8 array. Exact."""
    f = _format(fmt)
    dtype = _array_dtype(bits, "bits")
    if dtype != numpy.uint8:
        raise DTypeError(f"fp8.decode expects the fp8 bits as a uint8 array, got {dtype}")
    out = dtypes.as_dtype(out_dtype)
    if out not in _DECODE_TO:
        raise DTypeError(f"fp8.decode out_dtype must be one of {[d.name for d in _DECODE_TO]}, got {out.name}")
    if _use_kernel(bits) and out is not dtypes.f64:
        return _decode_cuda(bits, f, out)
    return _decode_reference(bits, f, out)


def _f64_to_f32(array):
    """Round float64 to float32 (nearest even), keeping each NaN's sign, which a GPU conversion may drop."""
    xp = backend.array_module(array)
    with numpy.errstate(over="ignore", invalid="ignore"):
        bits = array.astype(numpy.float32).view(numpy.uint32)
    nan_bits = xp.where(xp.signbit(array), numpy.uint32(0xFFC00000), numpy.uint32(0x7FC00000))
    return xp.where(xp.isnan(array), nan_bits, bits).view(numpy.float32)


# ------------------------------------------------------------------------------------------------------------
# Reference: integer bit manipulation through the array module (NumPy or CuPy). cast.cu's decode mirrors it; its
# encode computes the same codes branch-free from the input widened to float (the tests hold both to ml_dtypes)
# ------------------------------------------------------------------------------------------------------------

def _encode_reference(array, f, saturate):
    xp = backend.array_module(array)
    ubits, wint, exp, man, _ = _FLOATS[numpy.dtype(array.dtype)]
    shape = array.shape
    array = array.reshape(-1)  # NumPy turns 0-d results into scalars; 1-D keeps them arrays
    bias = (1 << (exp - 1)) - 1
    emin8 = 1 - f.bias  # exponent of the smallest normal fp8
    one = wint(1)  # scalars stay on the right of operators or go through xp functions, so CuPy handles them
    u = array.view(ubits)
    sign = (u >> (exp + man)).astype(numpy.uint8) << numpy.uint8(7)
    e = ((u >> man) & ubits((1 << exp) - 1)).astype(wint)
    m = (u & ubits((1 << man) - 1)).astype(wint)
    # |x| = M * 2^(ex - man). Below the fp8 normal range the fp8 step stays 2^(emin8 - f.man), so d more bits go;
    # past man + 2 bits everything left is under half a step and rounds to zero, so the shift stops there.
    M = xp.where(e > 0, m | wint(1 << man), m)
    ex = xp.maximum(e, one) - wint(bias)
    d = xp.maximum(xp.subtract(wint(emin8), ex), wint(0))
    shift = xp.minimum(wint(man - f.man) + d, wint(man + 2))
    q = M >> shift
    rem = M & (xp.left_shift(one, shift) - one)
    half = xp.left_shift(one, shift - one)
    q = q + ((rem > half) | ((rem == half) & ((q & one) == one))).astype(wint)
    # q still holds the implicit bit, so adding it carries into the exponent field exactly as rounding up should.
    code = ((ex - wint(emin8) + d) << wint(f.man)) + q
    over = wint(f.max_code if saturate else f.overflow_code)  # inf input and finite overflow alike
    code = xp.where(code > wint(f.max_code), over, code)
    special = e == wint((1 << exp) - 1)
    code = xp.where(special, xp.where(m != 0, wint(f.nan_code), over), code)
    return (sign | code.astype(numpy.uint8)).reshape(shape)


@functools.lru_cache(maxsize=None)
def _decode_table(fmt_dtype, out_dtype):
    """The bit patterns of the 256 values of an fp8 format in ``out_dtype`` (NumPy unsigned integers), built from
    integer fields alone."""
    f = _FORMATS[fmt_dtype]
    exp, man = {dtypes.f32: (8, 23), dtypes.f16: (5, 10), dtypes.bf16: (8, 7), dtypes.f64: (11, 52)}[out_dtype]
    bias = (1 << (exp - 1)) - 1
    width = exp + man + 1
    inf = ((1 << exp) - 1) << man
    table = []
    for c in range(256):
        sign, mag = (c >> 7) << (width - 1), c & 0x7F
        if (mag > 0x7C) if f.has_inf else (mag == 0x7F):
            table.append(sign | inf | 1 << (man - 1))  # the canonical quiet NaN, sign kept
            continue
        if f.has_inf and mag == 0x7C:
            table.append(sign | inf)
            continue
        E, m = mag >> f.man, mag & ((1 << f.man) - 1)
        M = m | (1 << f.man) if E > 0 else m      # |value| = M * 2^k, exactly
        k = max(E, 1) - f.bias - f.man
        if M == 0:
            table.append(sign)
            continue
        top = M.bit_length() - 1                 # |value| = 1.xxx * 2^(k + top)
        if k + top >= 1 - bias:
            table.append(sign | (k + top + bias) << man | ((M << (man - top)) & ((1 << man) - 1)))
        else:                                     # a subnormal of the output (e5m2's smallest in float16)
            table.append(sign | M << (k - (1 - bias - man)))
    return numpy.array(table, dtype=_UINT[out_dtype.itemsize])


def _decode_reference(bits, f, out):
    xp = backend.array_module(bits)
    # The gather moves integer bits and the result is viewed as floats: no backend float kernel (bfloat16 on
    # CuPy) or NaN handling is involved.
    table = xp.asarray(_decode_table(f.dtype, out))
    return xp.take(table, bits.reshape(-1)).reshape(bits.shape).view(out.storage)


# ------------------------------------------------------------------------------------------------------------
# CUDA fast path (cuda/cast.cu)
# ------------------------------------------------------------------------------------------------------------

def _grid(n, per_thread, max_blocks=MAX_BLOCKS):
    return max(1, min(max_blocks, -(-n // (THREADS * per_thread))))


_kernels = {}   # (kind, fmt, float dtype, device) -> cast.cu kernel: a call then skips get_kernel's own look-up


def _cast_kernel(xp, kind, f, dtype):
    key = (kind, f.kernel_suffix, dtype, xp.cuda.runtime.getDevice())
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = runtime.get_kernel("cast.cu", f"{kind}_{f.kernel_suffix}<{_FLOATS[dtype][4]}>")
    return kernel


def _encode_cuda(array, f, saturate, out=None):
    """Launch encode_<fmt><T>; ``out`` (uint8, contiguous, same size) lets tests hand in a poisoned buffer."""
    xp = backend.array_module(array)
    x = array if array.flags.c_contiguous else xp.ascontiguousarray(array)
    if out is None:
        out = xp.empty(x.shape, dtype=numpy.uint8)
    n = x.size
    if n:
        grid = _grid(n, 16 // x.dtype.itemsize * ENCODE_UNROLL, ENCODE_MAX_BLOCKS)
        runtime.launch(_cast_kernel(xp, "encode", f, x.dtype), grid, THREADS,
                       (x, out, numpy.int64(n), numpy.int32(saturate)))
    return out


def _decode_cuda(bits, f, out_dtype, out=None):
    """Launch decode_<fmt><T>; ``out`` (contiguous, same size) lets tests hand in a poisoned buffer."""
    import cupy

    x = cupy.ascontiguousarray(bits)
    if out is None:
        out = cupy.empty(x.shape, dtype=out_dtype.storage)
    if x.size:
        runtime.launch(_cast_kernel(cupy, "decode", f, out.dtype), _grid(x.size, DECODE_PER_THREAD), THREADS,
                       (x, out, numpy.int64(x.size)))
    return out
