"""Matrix products with NumPy's matmul broadcasting, and their gradients.

CuPy cannot multiply bf16 arrays of rank 3 or more (cuBLAS batched GEMM has no bf16 there), so such products
flatten the leading dimensions into one 2-D GEMM when the right operand is a matrix (the common x @ W case), and
otherwise compute in f32 and cast back. ``gemm`` / ``linear_rows`` make one cuBLAS call into a given output
(cuda/cublas.py), adding into it when asked.
"""
from .. import backend, dtypes
from ..autograd import Function
from ..cuda import cublas
from ..errors import ShapeError


def matmul(a, b):
    xp = backend.array_module(a, b)
    if xp.__name__ != "cupy" or a.dtype != dtypes.bf16.storage or (a.ndim <= 2 and b.ndim <= 2):
        # NumPy's bf16 matmul (ml_dtypes) computes and returns f32: round back so the dtype is kept.
        return xp.matmul(a, b).astype(a.dtype, copy=False)
    if b.ndim == 2 and a.ndim > 2:
        return xp.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + (b.shape[-1],))
    return xp.matmul(a.astype(xp.float32), b.astype(xp.float32)).astype(a.dtype)


_OP_N, _OP_T = cublas.OP_N, cublas.OP_T


def _column_major(a):
    """(op, leading dimension) under which cuBLAS, reading column-major, sees the row-major matrix a [R, C] as its
    transpose [C, R]: rows with unit stride (a C-order array or a column slice of one) read as they are, a transposed
    view (unit stride down the columns) through op T. None for anything else."""
    item = a.itemsize
    rows, cols = a.shape
    if a.strides[1] == item or cols == 1:
        ld = a.strides[0] // item if rows > 1 else cols
        if a.strides[0] % item == 0 and ld >= cols:
            return _OP_N, max(ld, 1)
    if a.strides[0] == item or rows == 1:
        ld = a.strides[1] // item if cols > 1 else rows
        if a.strides[1] % item == 0 and ld >= rows:
            return _OP_T, max(ld, 1)
    return None  # broadcast, overlapping or doubly strided: the caller copies


def gemm(a, b, out=None, accumulate=False):
    """out[M, N] = a[M, K] @ b[K, N], or out += a @ b with ``accumulate`` (the GEMM adds into out itself: a fused
    residual, or a gradient summed over chunks, with no [M, N] temporary; rounded to out's dtype once per call).
    2-D arrays of one dtype; a and b may be transposed views or column slices, out needs unit-stride rows. On the GPU
    (f32, f16, bf16) one cuBLAS GemmEx call with f32 arithmetic, made directly: CuPy's matmul costs tens of
    microseconds of host time per call and cannot add into its output. Elsewhere, matmul."""
    xp = backend.array_module(a, b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ShapeError(f"gemm: a [M, K] and b [K, N], got {a.shape} and {b.shape}")
    M, K, N = a.shape[0], a.shape[1], b.shape[1]
    if out is None:
        out = xp.empty((M, N), dtype=a.dtype)
    if out.shape != (M, N):
        raise ShapeError(f"gemm: out must be [M, N] = [{M}, {N}], got {out.shape}")
    if xp.__name__ != "cupy" or a.dtype not in cublas.DATA_TYPES or not a.dtype == b.dtype == out.dtype:
        product = matmul(a, b)
        if accumulate:
            out += product
        else:
            out[...] = product
        return out
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.fill(0)
        return out
    a = a if _column_major(a) else xp.ascontiguousarray(a)
    b = b if _column_major(b) else xp.ascontiguousarray(b)
    layout_out = _column_major(out)
    if layout_out is None or layout_out[0] != _OP_N:
        raise ShapeError(f"gemm: out needs unit-stride rows, got strides {out.strides}")
    (op_a, ld_a), (op_b, ld_b) = _column_major(a), _column_major(b)
    # column-major, out^T [N, M] = b^T a^T: cuBLAS's first operand is b
    cublas.gemm_ex(op_b, op_a, N, M, K, b, ld_b, a, ld_a, out, layout_out[1], accumulate)
    return out


def linear_rows(x, weight, out=None, accumulate=False):
    """out[M, N] (+)= x[M, K] @ weight[N, K].T: ``gemm`` in the linear-layer layout."""
    if x.ndim != 2 or weight.ndim != 2:
        raise ShapeError(f"linear_rows: x [M, K] and weight [N, K], got {x.shape} and {weight.shape}")
    return gemm(x, weight.T, out=out, accumulate=accumulate)


class MatMul(Function):
    def forward(self, a, b):
        self.save(a, b)
        return matmul(a, b)

    def backward(self, g):
        a, b = self.saved
        xp = backend.array_module(g)
        a2 = a[None, :] if a.ndim == 1 else a   # treat vectors as 1-row / 1-column matrices
        b2 = b[:, None] if b.ndim == 1 else b
        g2 = g
        if b.ndim == 1:  # first, so that vector @ vector (g of rank 0) becomes (1, 1)
            g2 = xp.expand_dims(g2, -1)
        if a.ndim == 1:
            g2 = xp.expand_dims(g2, -2)
        ga = matmul(g2, xp.swapaxes(b2, -1, -2))
        gb = matmul(xp.swapaxes(a2, -1, -2), g2)
        ga = ga.reshape(ga.shape[:-2] + (a.shape[-1],)) if a.ndim == 1 else ga
        gb = gb.reshape(gb.shape[:-2] + (b.shape[0],)) if b.ndim == 1 else gb
        # Broadcast batch dimensions are summed away by the tape; a vector's leading ones too.
        if a.ndim == 1 and ga.ndim > 1:
            ga = ga.reshape(-1, a.shape[0]).sum(axis=0)
        if b.ndim == 1 and gb.ndim > 1:
            gb = gb.reshape(-1, b.shape[0]).sum(axis=0)
        return ga, gb
