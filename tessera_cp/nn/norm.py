"""RMSNorm: ``rms_norm`` (fused CUDA kernels forward and backward), ``stable_rms_norm`` (any magnitude) and the
``RMSNorm`` module.

``rms_norm(x, weight, eps)`` normalizes over the last dimension: ``x * rsqrt(mean(x**2) + eps) * weight``, summing
in f32 for f16/bf16/f32 inputs (f64 under ``precision(accumulate=f64)``). On the GPU, f32/f16/bf16 inputs with an
f32 or same-dtype weight run ``cuda/norm.cu``: one read of x and one write of y forward; backward one read of x
and dy, one write of dx, and dweight through per-block partial sums reduced in a fixed order (deterministic).

This file also holds the dispatch helpers the other op families of this layer share (``_use_kernel``,
``_vector_width``, ``_kernel_type``).
"""
import os

import numpy

from .. import backend, dtypes
from ..autograd import Function
from ..errors import DeviceError, DTypeError, ShapeError, TesseraError
from ..precision import accumulate_storage, compute_dtype
from ..tensor import Tensor, ones, tensor
from .module import Module, Parameter

_KERNEL_TYPES = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float16): "__half",
                 dtypes.bf16.storage: "__nv_bfloat16"}
ITEMS = 4                  # vectors per thread kept in registers (norm.cu's ITEMS)
WARP_ROWS_PER_BLOCK = 4    # rows per block when a warp owns a row
REDUCE_COLS, REDUCE_SLICES = 32, 16   # rms_norm_dw_reduce's block
MAX_GRID = 2 ** 31 - 1


# ------------------------------------------------------------------------------------------ dispatch helpers
def _use_kernel(*arrays):
    """The CUDA fast path runs when every array is a CuPy array of a kernel dtype and TESSERA_REFERENCE != "1"."""
    if os.environ.get("TESSERA_REFERENCE", "") == "1":
        return False
    return all(backend.is_cupy_array(a) and a.dtype in _KERNEL_TYPES for a in arrays)


def _kernel_type(dtype):
    return _KERNEL_TYPES[numpy.dtype(dtype)]


def _vector_width(itemsize, n, arrays=(), strides=()):
    """The widest vector (elements, at most 16 bytes, a power of two) such that it divides ``n`` and every stride
    (in elements), and every array's data pointer is aligned to a whole vector of its own element size."""
    vec = 16 // itemsize
    while vec > 1:
        if n % vec == 0 and all(s % vec == 0 for s in strides) and \
                all(a.data.ptr % (vec * a.dtype.itemsize) == 0 for a in arrays):
            return vec
        vec //= 2
    return 1


def _kernel(source, name):
    from ..cuda import runtime
    return runtime.get_kernel(source, name)


def _launch(source, name, grid, block, args, kernel=None):
    from ..cuda import runtime
    runtime.launch(kernel if kernel is not None else runtime.get_kernel(source, name), grid, block, args)


def _sm_count(xp):
    return xp.cuda.Device().attributes["MultiProcessorCount"]


def _as_tensor(value, what):
    if isinstance(value, Tensor):
        return value
    try:
        return tensor(value)
    except TesseraError as e:
        raise DTypeError(f"{what}: expected a Tensor or an array, got {type(value).__name__} ({e})") from None


# ------------------------------------------------------------------------------------------ references
def _reference_forward(x, weight, eps):
    xp = backend.array_module(x)
    acc = accumulate_storage(x.dtype)
    xf = x.astype(acc)
    r = 1 / xp.sqrt(xp.mean(xf * xf, axis=-1, keepdims=True) + acc.type(eps))
    return (xf * r * weight.astype(acc)).astype(x.dtype)


def _reference_backward(x, weight, g, eps):
    """dx = r * (g*w - xhat * mean(g*w*xhat)), dw = sum over rows of g * xhat, with xhat = x * r."""
    xp = backend.array_module(x)
    acc = accumulate_storage(x.dtype)
    xf, gw = x.astype(acc), g.astype(acc) * weight.astype(acc)
    r = 1 / xp.sqrt(xp.mean(xf * xf, axis=-1, keepdims=True) + acc.type(eps))
    xhat = xf * r
    dx = r * (gw - xhat * xp.mean(gw * xhat, axis=-1, keepdims=True))
    dw = (g.astype(acc) * xhat).reshape(-1, x.shape[-1]).sum(axis=0)
    return dx.astype(x.dtype), dw.astype(weight.dtype)


# ------------------------------------------------------------------------------------------ kernel launches
def _row_tiling(nvec, max_threads):
    """(threads per row, rows per block): enough threads that each holds at most ITEMS vectors, a warp at least,
    at most ``max_threads`` (the kernel's limit, which its register count sets: 1024 threads need <= 64 each)."""
    threads = -(-nvec // ITEMS)
    threads = min(max(32, max_threads // 32 * 32), max(32, -(-threads // 32) * 32))
    return threads, (WARP_ROWS_PER_BLOCK if threads == 32 else 1)


def _launch_forward(x, weight, eps, out=None):
    """y = rms_norm(x) by norm.cu; ``out`` (contiguous, x's shape and dtype) receives it when given."""
    xp = backend.array_module(x)
    x, weight = xp.ascontiguousarray(x), xp.ascontiguousarray(weight)
    D = x.shape[-1]
    rows = x.size // D if D else 0
    y = xp.empty_like(x) if out is None else out
    if rows == 0 or D == 0:
        return y
    vec = _vector_width(x.dtype.itemsize, D, (x, y, weight))
    kernel = _kernel("norm.cu", f"rms_norm_fwd<{_kernel_type(x.dtype)}, {_kernel_type(weight.dtype)}, {vec}>")
    threads, rows_per_block = _row_tiling(D // vec, kernel.max_threads_per_block)
    grid = min(-(-rows // rows_per_block), MAX_GRID)
    _launch("norm.cu", None, grid, (threads, rows_per_block),
            (x, weight, y, numpy.int64(rows), numpy.int32(D), numpy.float32(eps)), kernel=kernel)
    return y


def _resident_blocks(kernel, threads_per_block):
    """Blocks of a kernel one SM holds at once, from its register count (granularity: 256 registers a warp)."""
    regs_per_warp = -(-max(kernel.num_regs, 1) * 32 // 256) * 256
    warps = -(-threads_per_block // 32)
    return max(1, min(32, 2048 // threads_per_block, 65536 // (regs_per_warp * warps)))


def _launch_backward(x, weight, g, eps, dx=None, dw=None):
    """(dx, dw) by norm.cu: dx in one pass; dw from per-group partial sums and a fixed-order reduction."""
    xp = backend.array_module(x)
    x, g, weight = xp.ascontiguousarray(x), xp.ascontiguousarray(g), xp.ascontiguousarray(weight)
    D = x.shape[-1]
    rows = x.size // D if D else 0
    dx = xp.empty_like(x) if dx is None else dx
    dw = xp.empty(D, dtype=weight.dtype) if dw is None else dw
    if rows == 0 or D == 0:
        dw[...] = 0
        return dx, dw
    vec = _vector_width(x.dtype.itemsize, D, (x, g, dx, weight))
    kernel = _kernel("norm.cu", f"rms_norm_bwd<{_kernel_type(x.dtype)}, {_kernel_type(weight.dtype)}, {vec}>")
    threads, rows_per_block = _row_tiling(D // vec, kernel.max_threads_per_block)
    # One wave of resident blocks: fewer groups means a smaller partial buffer for the second stage.
    grid = min(-(-rows // rows_per_block), _sm_count(xp) * _resident_blocks(kernel, threads * rows_per_block))
    groups = grid * rows_per_block
    partial = xp.empty((groups, D), dtype=numpy.float32)
    _launch("norm.cu", None, grid, (threads, rows_per_block),
            (x, weight, g, dx, partial, numpy.int64(rows), numpy.int32(D), numpy.float32(eps)), kernel=kernel)
    _launch("norm.cu", f"rms_norm_dw_reduce<{_kernel_type(weight.dtype)}>", -(-D // REDUCE_COLS),
            (REDUCE_COLS, REDUCE_SLICES), (partial, dw, numpy.int32(groups), numpy.int32(D)))
    return dx, dw


# ------------------------------------------------------------------------------------------ Functions
class RMSNormFunction(Function):
    def forward(self, x, weight, eps=1e-6):
        self.save(x, weight)
        self.eps = eps
        if _use_kernel(x, weight):
            return _launch_forward(x, weight, eps)
        return _reference_forward(x, weight, eps)

    def backward(self, g):
        x, weight = self.saved
        if _use_kernel(x, weight, g):
            dx, dw = _launch_backward(x, weight, g, self.eps)
        else:
            dx, dw = _reference_backward(x, weight, g, self.eps)
        return dx, (dw if self.inputs[1] is not None else None)


def _stable_stats(x, eps):
    """(x / s, q, s) with x / s and q in the compute dtype and s per row: y = (x / s) * q * weight.

    Each row is scaled by a power of two s in [peak / 2, peak], peak = max(|x|, sqrt(eps)) over the row: the scaling
    is exact, every scaled square is below 4, and eps enters as eps / s^2 <= 4. The squares are summed in the
    accumulate dtype; q = 1 / sqrt(mean((x/s)^2) + eps/s^2) (in f64, one value per row) lies between about 1/3 and
    2 sqrt(D), so nothing overflows or underflows for any finite x, and 1 / rms = q / s is never formed.
    """
    xp = backend.array_module(x)
    compute = compute_dtype(dtypes.f32 if x.dtype.itemsize <= 4 else dtypes.f64).storage
    acc = numpy.dtype(accumulate_storage(compute))
    xc = x.astype(compute)
    peak = xp.abs(xc).max(axis=-1, keepdims=True).astype(numpy.float64)
    peak = xp.maximum(peak, numpy.sqrt(eps)) if eps > 0 else xp.where(peak > 0, peak, 1.0)
    _, exponent = xp.frexp(peak)                         # peak = m * 2^e with 0.5 <= m < 1
    scale = xp.ldexp(xp.ones_like(peak), exponent - 1)   # 2^(e-1): in [peak/2, peak], so finite in x's dtype
    scaled = xc / scale.astype(compute)
    squares = scaled.astype(acc)
    mean_sq = xp.mean(squares * squares, axis=-1, keepdims=True).astype(numpy.float64)
    q = 1.0 / xp.sqrt(mean_sq + (eps / scale) / scale)
    return scaled, q.astype(compute), scale.astype(compute)


class StableRMSNormFunction(Function):
    def forward(self, x, weight, eps=1e-6):
        scaled, q, scale = _stable_stats(x, eps)
        self.save(scaled, q, scale, weight)
        return (scaled * q * weight.astype(scaled.dtype)).astype(x.dtype)

    def backward(self, g):
        # dx = (gw - xhat * mean(gw * xhat)) / rms with xhat = (x/s) q and 1/rms = q/s (divided last: exact).
        scaled, q, scale, weight = self.saved
        xp = backend.array_module(scaled)
        acc = numpy.dtype(accumulate_storage(scaled.dtype))
        xhat = scaled * q
        gw = g.astype(scaled.dtype) * weight.astype(scaled.dtype)
        c = xp.mean((gw * xhat).astype(acc), axis=-1, keepdims=True).astype(scaled.dtype)
        dx = (gw - xhat * c) * q / scale
        dw = None
        if self.inputs[1] is not None:
            dw = (g.astype(acc) * xhat.astype(acc)).reshape(-1, scaled.shape[-1]).sum(axis=0).astype(weight.dtype)
        return dx.astype(g.dtype), dw


# ------------------------------------------------------------------------------------------ public API
def _check(x, weight, eps, what):
    x, weight = _as_tensor(x, f"{what}(x)"), _as_tensor(weight, f"{what}(weight)")
    if not x.dtype.is_floating or x.dtype.is_fp8:
        raise DTypeError(f"{what}: x must be f16, bf16, f32 or f64, got {x.dtype.name}")
    if x.ndim < 1:
        raise ShapeError(f"{what}: x must have at least one dimension (the normalized one), got a 0-d tensor")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ShapeError(f"{what}: weight must have shape (D,) = ({D},) for x of shape {x.shape}, got {weight.shape}")
    if weight.dtype is not x.dtype and weight.dtype is not dtypes.f32:
        raise DTypeError(f"{what}: weight must be f32 or x's dtype {x.dtype.name}, got {weight.dtype.name}")
    if weight.device != x.device:
        raise DeviceError(f"{what}: x is on {x.device}, weight on {weight.device}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise TesseraError(f"{what}: eps must be a number >= 0, got {eps!r}")
    return x, weight, float(eps)


def rms_norm(x, weight, eps=1e-6):
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` over the last dimension D, in x's dtype (f32 accumulation).

    x: [..., D] f16/bf16/f32/f64; weight: [D], f32 or x's dtype. Differentiable in x and weight.
    For inputs whose squares overflow or underflow (|x| beyond about 1e19 or below 1e-19 in f32) use
    ``stable_rms_norm``.
    """
    x, weight, eps = _check(x, weight, eps, "rms_norm")
    return RMSNormFunction.apply(x, weight, eps=eps)


def stable_rms_norm(x, weight, eps=1e-6):
    """rms_norm that is exact to rounding for any finite x: each row is scaled by a power of two near its largest
    magnitude before squaring, so nothing overflows or underflows (|x| up to f32's max in f32).

    Elementwise math runs in ``precision(compute=...)`` (default f32, or f64 for f64 input) and the sum of squares
    in ``precision(accumulate=...)`` (default the compute dtype); the result has x's dtype.
    """
    x, weight, eps = _check(x, weight, eps, "stable_rms_norm")
    return StableRMSNormFunction.apply(x, weight, eps=eps)


class RMSNorm(Module):
    """RMSNorm over the last dimension with a learned scale (initialised to ones).

    ``dtype`` is the weight's dtype: f32 (the default; any input dtype may use it) or the input's dtype.
    ``stable=True`` uses ``stable_rms_norm``.
    """

    def __init__(self, dim, eps=1e-6, dtype=None, device=None, stable=False):
        super().__init__()
        if int(dim) < 1:
            raise ShapeError(f"RMSNorm: dim must be >= 1, got {dim}")
        self.dim, self.eps, self.stable = int(dim), float(eps), bool(stable)
        self.weight = Parameter(ones(self.dim, dtype=dtype or dtypes.f32, device=device))

    def forward(self, x):
        return (stable_rms_norm if self.stable else rms_norm)(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}" + (", stable=True" if self.stable else "")


__all__ = ["rms_norm", "stable_rms_norm", "RMSNorm"]
