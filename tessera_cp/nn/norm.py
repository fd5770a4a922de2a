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
from ..autograd import Function, is_grad_enabled
from ..cuda import runtime
from ..errors import DeviceError, DTypeError, ShapeError, TesseraError
from ..precision import accumulate_storage, compute_dtype
from ..tensor import Tensor, ones, tensor
from .module import Module, Parameter

_KERNEL_TYPES = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float16): "__half",
                 dtypes.bf16.storage: "__nv_bfloat16"}
WARP_ROWS_PER_BLOCK = 4    # rows per block when a warp owns a row
REDUCE_COLS, REDUCE_SLICES = 32, 32   # rms_norm_dw_reduce's block (norm.cu's constants)
ASYNC_STAGES = 5           # rows the NV-1 forward stages per thread in shared memory (norm.cu's)


# ------------------------------------------------------------------------------------------ dispatch helpers
def _use_kernel(*arrays):
    """The CUDA fast path runs when every array is a CuPy array of a kernel dtype and TESSERA_REFERENCE != "1"."""
    if os.environ.get("TESSERA_REFERENCE", "") == "1":
        return False
    for a in arrays:   # a loop rather than all(...): this runs on every op's hot path
        if not (backend.is_cupy_array(a) and a.dtype in _KERNEL_TYPES):
            return False
    return True


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
    return runtime.get_kernel(source, name)


def _launch(source, name, grid, block, args, kernel=None):
    runtime.launch(kernel if kernel is not None else runtime.get_kernel(source, name), grid, block, args)


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
def _row_tiling(nvec, limits):
    """(NV, threads per row, rows per block) for rows of ``nvec`` vectors; ``limits[nv]``: the most threads a block
    of the NV-instantiation may have (its __launch_bounds__ and registers). One vector per thread (NV 1) when a
    block holds the row, else four (NV 4), with as many threads as that needs up to the limit (the rest of a
    longer row is re-read); short rows get a warp each, WARP_ROWS_PER_BLOCK to a block."""
    whole_warps = {nv: limit // 32 * 32 for nv, limit in limits.items()}
    nv = 1 if nvec <= whole_warps[1] else 4    # NV 1 kernels have no re-read path: the block must hold the row
    needed = -(-nvec // nv)
    threads = min(whole_warps[nv], -(-needed // 32) * 32)
    return nv, threads, (WARP_ROWS_PER_BLOCK if threads == 32 else 1)


def _resident_blocks(kernel, threads_per_block, smem_per_block, smem_per_sm):
    """Blocks of a kernel one SM holds at once, from its register count (granularity: 256 registers a warp) and
    its shared memory (1 KB reserved per block)."""
    regs_per_warp = -(-max(kernel.num_regs, 1) * 32 // 256) * 256
    warps = -(-threads_per_block // 32)
    by_smem = smem_per_sm // (smem_per_block + kernel.shared_size_bytes + 1024)
    return max(1, min(32, 2048 // threads_per_block, 65536 // (regs_per_warp * warps), by_smem))


def _persistent_grid(units, max_grid):
    """Blocks for ``units`` row slots: all of them when they fit in ``max_grid`` (one wave of resident blocks),
    else an even split, so every block walks the same number of rows (no last-row straggler)."""
    waves = -(-units // max_grid)
    return -(-units // waves)


_plans = runtime.LaunchPlans()   # see _row_plan


def _row_plan(xp, kind, x_dtype, w_dtype, D, vec):
    """(kernel, block, max_grid, shared_mem) of norm.cu's ``kind`` for rows of D elements read as VEC-vectors."""
    names = {nv: f"{kind}<{_kernel_type(x_dtype)}, {_kernel_type(w_dtype)}, {vec}, {nv}>" for nv in (1, 4)}
    kernels = {nv: _kernel("norm.cu", name) for nv, name in names.items()}
    nv, threads, rows_per_block = _row_tiling(D // vec, {nv: k.max_threads_per_block for nv, k in kernels.items()})
    block = (threads, rows_per_block)
    # The forward stages 16-byte vectors in shared memory when NV is 1 (norm.cu's ASYNC_STAGES ring).
    async_ring = kind == "rms_norm_fwd" and nv == 1 and vec * numpy.dtype(x_dtype).itemsize == 16
    smem = ASYNC_STAGES * threads * rows_per_block * 16 if async_ring else 0
    sm_count, smem_per_sm = runtime.device_attribute(runtime.SM_COUNT), runtime.device_attribute(runtime.SMEM_PER_SM)
    max_grid = sm_count * _resident_blocks(kernels[nv], threads * rows_per_block, smem, smem_per_sm)
    return kernels[nv], block, max_grid, smem


def _plan(xp, kind, x, weight, D, arrays):
    """_row_plan for these arrays, cached by what decides it (dtypes, D, the pointers' alignment, the device):
    a launch then costs a dictionary look-up on top of CuPy's."""
    key = (kind, x.dtype, weight.dtype, D, _or_pointers(arrays) & 15, weight.data.ptr & 31,
           xp.cuda.runtime.getDevice())
    return _plans.get(key, lambda: _row_plan(xp, kind, x.dtype, weight.dtype, D,
                                             _vector_width(x.dtype.itemsize, D, (*arrays, weight))))


def _or_pointers(arrays):
    bits = 0
    for a in arrays:
        bits |= a.data.ptr
    return bits


_forward_launches = runtime.LaunchPlans()   # see _launch_forward
# The forward's grid: up to FORWARD_WAVES waves of resident blocks, each block walking its rows grid-stride. With
# one wave every block has the same row count and the slowest SM sets the time; with more, the later blocks go to
# the SMs that finish first. 16384 x 4096 bf16 on the H100 (kernel alone, bench/tune_norm.py, one run): 1 wave
# 104.9 us, 2: 99.6, 3: 97.0, 4: 95.8, 8: 94.6 (4 rows a block), one row a block 98.1; a copy of the bytes 92.1.
FORWARD_WAVES = 8


def _launch_forward(x, weight, eps, out=None):
    """y = rms_norm(x) by norm.cu; ``out`` (contiguous, x's shape and dtype) receives it when given.

    Everything but the arrays (kernel, grid, block, shared memory, the scalar arguments) is kept per (shape,
    dtypes, eps, the pointers' alignment, device) in a runtime.LaunchPlans.
    """
    xp = backend.array_module(x)
    if not x.flags.c_contiguous:
        x = xp.ascontiguousarray(x)
    if not weight.flags.c_contiguous:
        weight = xp.ascontiguousarray(weight)
    y = xp.empty(x.shape, dtype=x.dtype) if out is None else out
    key = (x.shape, x.dtype, weight.dtype, eps, (x.data.ptr | y.data.ptr) & 15, weight.data.ptr & 31,
           xp.cuda.runtime.getDevice())
    launch = _forward_launches.get(key, lambda: _forward_launch(xp, x, weight, eps, y))
    if launch:
        kernel, grid, block, smem, scalars = launch
        runtime.launch_planned(kernel, grid, block, (x, weight, y) + scalars, smem)
    return y


def _forward_launch(xp, x, weight, eps, y):
    """(kernel, grid, block, shared_mem, scalar arguments) of the forward for these arrays; () when x has no rows."""
    D = x.shape[-1]
    rows = x.size // D if D else 0
    if rows == 0:
        return ()
    kernel, block, max_grid, smem = _plan(xp, "rms_norm_fwd", x, weight, D, (x, y))
    if smem > runtime.SMEM_DEFAULT_LIMIT:
        kernel.max_dynamic_shared_size_bytes = smem
    grid = _persistent_grid(-(-rows // block[1]), max_grid * FORWARD_WAVES)
    return kernel, (grid,), block, smem, (numpy.int64(rows), numpy.int32(D), numpy.float32(eps))


def _launch_backward(x, weight, g, eps, dx=None, dw=None):
    """(dx, dw) by norm.cu: dx in one pass; dw from per-group partial sums and a fixed-order reduction."""
    xp = backend.array_module(x)
    x, g, weight = xp.ascontiguousarray(x), xp.ascontiguousarray(g), xp.ascontiguousarray(weight)
    D = x.shape[-1]
    rows = x.size // D if D else 0
    dx = xp.empty(x.shape, dtype=x.dtype) if dx is None else dx
    dw = xp.empty(D, dtype=weight.dtype) if dw is None else dw
    if rows == 0 or D == 0:
        dw[...] = 0
        return dx, dw
    kernel, block, max_grid, smem = _plan(xp, "rms_norm_bwd", x, weight, D, (x, g, dx))
    grid = _persistent_grid(-(-rows // block[1]), max_grid)
    groups = grid * block[1]   # one partial dw row per row slot; the grid is one wave, so this stays small
    partial = xp.empty((groups, D), dtype=numpy.float32)
    runtime.launch(kernel, grid, block,
                   (x, weight, g, dx, partial, numpy.int64(rows), numpy.int32(D), numpy.float32(eps)))
    _launch("norm.cu", f"rms_norm_dw_reduce<{_kernel_type(weight.dtype)}>", -(-D // REDUCE_COLS),
            (REDUCE_COLS, REDUCE_SLICES), (partial, dw, numpy.int32(groups), numpy.int32(D)))
    return dx, dw


# ------------------------------------------------------------------------------------------ Functions
def _forward(x, weight, eps):
    return _launch_forward(x, weight, eps) if _use_kernel(x, weight) else _reference_forward(x, weight, eps)


class RMSNormFunction(Function):
    def forward(self, x, weight, eps=1e-6):
        self.save(x, weight)
        self.eps = eps
        return _forward(x, weight, eps)

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
    if (x.requires_grad or weight.requires_grad) and is_grad_enabled():
        return RMSNormFunction.apply(x, weight, eps=eps)
    return Tensor(_forward(x.data, weight.data, eps), x.dtype)   # inference: no graph node to build


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
