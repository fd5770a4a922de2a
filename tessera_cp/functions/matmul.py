"""Matrix products with NumPy's matmul broadcasting, and their gradients.

CuPy cannot multiply bf16 arrays of rank 3 or more (cuBLAS batched GEMM has no bf16 there), so such products
flatten the leading dimensions into one 2-D GEMM when the right operand is a matrix (the common x @ W case), and
otherwise compute in f32 and cast back.
"""
import numpy

from .. import backend, dtypes
from ..autograd import Function
from ..errors import ShapeError


def matmul(a, b):
    xp = backend.array_module(a, b)
    if xp.__name__ != "cupy" or a.dtype != dtypes.bf16.storage or (a.ndim <= 2 and b.ndim <= 2):
        # NumPy's bf16 matmul (ml_dtypes) computes and returns f32: round back so the dtype is kept.
        return xp.matmul(a, b).astype(a.dtype, copy=False)
    if b.ndim == 2 and a.ndim > 2:
        return xp.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + (b.shape[-1],))
    return xp.matmul(a.astype(xp.float32), b.astype(xp.float32)).astype(a.dtype)


# cuBLAS data types (cudaDataType) by storage dtype, and CUBLAS_COMPUTE_32F / CUBLAS_GEMM_DEFAULT.
_CUDA_DATA_TYPE = {numpy.dtype(numpy.float32): 0, numpy.dtype(numpy.float16): 2, dtypes.bf16.storage: 14}
_COMPUTE_32F, _GEMM_DEFAULT = 68, -1
_ALPHA_BETA = (numpy.ones(1, numpy.float32), numpy.zeros(1, numpy.float32))  # host scalars cuBLAS reads


def linear_rows(x, weight, out=None, accumulate=False):
    """out[M, N] = x[M, K] @ weight[N, K].T, or out += that with ``accumulate`` (a residual added by the GEMM
    itself, no extra pass). 2-D arrays of one dtype with contiguous rows. On the GPU one cuBLAS GemmEx call with f32
    accumulation, made directly: CuPy's matmul costs tens of microseconds of host time per call and cannot add into
    its output, and a prefill makes hundreds of these calls."""
    xp = backend.array_module(x, weight)
    M, N = x.shape[0], weight.shape[0]
    if out is None:
        out = xp.empty((M, N), dtype=x.dtype)
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1] or out.shape != (M, N):
        raise ShapeError(f"linear_rows: x [M, K], weight [N, K] and out [M, N], got {x.shape}, {weight.shape} "
                         f"and {out.shape}")
    if xp.__name__ != "cupy" or x.dtype not in _CUDA_DATA_TYPE or not x.dtype == weight.dtype == out.dtype:
        product = matmul(x, weight.T)
        if accumulate:
            out += product
        else:
            out[...] = product
        return out
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas
    for a in (x, weight, out):
        if a.strides[1] != a.itemsize or a.strides[0] % a.itemsize:
            raise ShapeError(f"linear_rows: 2-D operands need unit-stride rows, got strides {a.strides}")
    K = x.shape[1]
    handle = device.get_cublas_handle()
    cublas.setStream(handle, xp.cuda.get_current_stream().ptr)
    kind = _CUDA_DATA_TYPE[x.dtype]
    # Row-major out[M, N] is column-major out^T[N, M] = weight (as column-major [K, N], transposed) @ x^T.
    cublas.gemmEx(handle, 1, 0, N, M, K, _ALPHA_BETA[0].ctypes.data, weight.data.ptr, kind,
                  weight.strides[0] // weight.itemsize, x.data.ptr, kind, x.strides[0] // x.itemsize,
                  _ALPHA_BETA[0 if accumulate else 1].ctypes.data, out.data.ptr, kind, out.strides[0] // out.itemsize,
                  _COMPUTE_32F, _GEMM_DEFAULT)
    return out


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
