"""The cuBLAS calls the ops make themselves, through CuPy's bindings (the runtime layer is where CuPy is imported).

``gemm_ex`` is one GemmEx with f32 arithmetic on column-major operands: CuPy's own matmul costs tens of microseconds
of host time per call and cannot add into its output, which the Llama prefill (residual adds) and the fused linear
cross-entropy (a weight gradient summed over chunks) both want.
"""
import numpy

from .. import dtypes

OP_N, OP_T = 0, 1
# cudaDataType by storage dtype; CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT, CUBLAS_POINTER_MODE_HOST.
DATA_TYPES = {numpy.dtype(numpy.float32): 0, numpy.dtype(numpy.float16): 2, dtypes.bf16.storage: 14}
_COMPUTE_32F, _GEMM_DEFAULT, _POINTER_MODE_HOST = 68, -1, 0
_ONE, _ZERO = numpy.ones(1, numpy.float32), numpy.zeros(1, numpy.float32)  # host scalars cuBLAS reads


def gemm_ex(op_a, op_b, m, n, k, a, lda, b, ldb, c, ldc, accumulate):
    """Column-major C[m, n] = op_a(A) @ op_b(B), or C += that with ``accumulate``, on the current stream; A, B and C
    are CuPy arrays of one dtype in DATA_TYPES (their data pointers are what cuBLAS reads)."""
    from cupy.cuda import device, get_current_stream
    from cupy_backends.cuda.libs import cublas
    handle = device.get_cublas_handle()
    cublas.setStream(handle, get_current_stream().ptr)
    mode = cublas.getPointerMode(handle)
    if mode != _POINTER_MODE_HOST:
        cublas.setPointerMode(handle, _POINTER_MODE_HOST)
    kind = DATA_TYPES[numpy.dtype(a.dtype)]
    try:
        cublas.gemmEx(handle, op_a, op_b, m, n, k, _ONE.ctypes.data, a.data.ptr, kind, lda, b.data.ptr, kind, ldb,
                      (_ONE if accumulate else _ZERO).ctypes.data, c.data.ptr, kind, ldc, _COMPUTE_32F,
                      _GEMM_DEFAULT)
    finally:
        if mode != _POINTER_MODE_HOST:
            cublas.setPointerMode(handle, mode)
