"""Matrix products with NumPy's matmul broadcasting, and their gradients.

CuPy cannot multiply bf16 arrays of rank 3 or more (cuBLAS batched GEMM has no bf16 there), so such products
flatten the leading dimensions into one 2-D GEMM when the right operand is a matrix (the common x @ W case), and
otherwise compute in f32 and cast back.
"""
from .. import backend, dtypes
from ..autograd import Function


def matmul(a, b):
    xp = backend.array_module(a, b)
    if xp.__name__ != "cupy" or a.dtype != dtypes.bf16.storage or (a.ndim <= 2 and b.ndim <= 2):
        # NumPy's bf16 matmul (ml_dtypes) computes and returns f32: round back so the dtype is kept.
        return xp.matmul(a, b).astype(a.dtype, copy=False)
    if b.ndim == 2 and a.ndim > 2:
        return xp.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + (b.shape[-1],))
    return xp.matmul(a.astype(xp.float32), b.astype(xp.float32)).astype(a.dtype)


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
