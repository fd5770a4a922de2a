"""gemm / linear_rows: out (+)= a @ b by one cuBLAS call (the Llama prefill adds its residuals with it, the fused
linear cross-entropy its weight gradient over chunks); the layouts handed to cuBLAS."""
import ctypes

import ml_dtypes
import numpy
import pytest

from tessera_cp import backend
from tessera_cp.errors import ShapeError
from tessera_cp.functions.matmul import gemm, linear_rows


def _operands(xp, dtype, m=33, k=70, n=19, seed=0):
    rng = numpy.random.default_rng(seed)
    x, w, r = (rng.standard_normal(s) for s in ((m, k), (n, k), (m, n)))
    return x, w, r, [xp.asarray(a.astype(dtype)) for a in (x, w, r)]


def _f64(a):
    return numpy.asarray(backend.to_device(a, "cpu"), dtype=numpy.float64)


@pytest.mark.parametrize("dtype, tol", [(numpy.float64, 1e-12), (numpy.float32, 1e-5)])
def test_product_and_accumulated_residual_on_the_cpu(dtype, tol):
    x, w, r, (xa, wa, ra) = _operands(numpy, dtype)
    assert numpy.allclose(_f64(linear_rows(xa, wa)), x @ w.T, rtol=tol, atol=tol)
    out = linear_rows(xa, wa, out=ra, accumulate=True)
    assert out is ra
    assert numpy.allclose(_f64(out), r + x @ w.T, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, numpy.float16, numpy.float32])
def test_cublas_product_and_residual_on_the_gpu(dtype):
    cupy = pytest.importorskip("cupy")
    x, w, r, (xa, wa, ra) = _operands(cupy, dtype, m=1000, k=4097 if dtype == numpy.float32 else 4104, n=77)
    x, w, r = (_f64(a) for a in (xa, wa, ra))            # the rounded operands
    want = x @ w.T
    tol = 1e-5 if dtype == numpy.float32 else 1e-2
    got = _f64(linear_rows(xa, wa))
    assert numpy.linalg.norm(got - want) / numpy.linalg.norm(want) < tol
    got = _f64(linear_rows(xa, wa, out=ra, accumulate=True))
    assert numpy.linalg.norm(got - (r + want)) / numpy.linalg.norm(r + want) < tol
    # a strided row view (a column slice of a wider array) is read through its leading dimension
    wide = cupy.asarray(numpy.concatenate([w, w], axis=1).astype(dtype))
    got = _f64(linear_rows(xa, wide[:, :w.shape[1]]))
    assert numpy.linalg.norm(got - want) / numpy.linalg.norm(want) < tol


@pytest.mark.gpu
def test_operands_cublas_cannot_read_are_copied_and_a_strided_out_is_refused():
    cupy = pytest.importorskip("cupy")
    rng = numpy.random.default_rng(2)
    a, b = rng.standard_normal((6, 16)).astype(numpy.float32), rng.standard_normal((8, 5)).astype(numpy.float32)
    got = gemm(cupy.asarray(a)[:, ::2], cupy.asarray(b))              # a column-strided operand: copied first
    assert numpy.allclose(_f64(got), a[:, ::2].astype(numpy.float64) @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match="out needs unit-stride rows"):
        gemm(cupy.asarray(a[:, :8]), cupy.asarray(b), out=cupy.zeros((6, 10), dtype=numpy.float32)[:, ::2])


def test_mismatched_shapes_are_refused():
    with pytest.raises(ShapeError, match=r"a \[M, K\] and b \[K, N\]"):
        linear_rows(numpy.zeros((4, 8)), numpy.zeros((3, 7)))
    with pytest.raises(ShapeError, match=r"x \[M, K\] and weight \[N, K\]"):
        linear_rows(numpy.zeros(4), numpy.zeros((3, 4)))
    with pytest.raises(ShapeError):
        linear_rows(numpy.zeros((4, 8)), numpy.zeros((3, 8)), out=numpy.zeros((4, 4)))


@pytest.mark.parametrize("make", [
    lambda b: b,                       # C order
    lambda b: b.T,                     # a transposed view
    lambda b: b[:, 3:10],              # a column slice: rows of unit stride, leading dimension 24
    lambda b: b[2:3],                  # one row
    lambda b: b[:, 5:6],               # one column
    lambda b: b.T[4:9, 1:2],           # one column of a transposed view
])
def test_cublas_layout_addresses_every_element_where_it_lies(make):
    """_column_major's (op, ld) must address each element (r, c) at the offset its strides give, as cuBLAS reads."""
    from tessera_cp.functions.matmul import _OP_N, _column_major
    a = make(numpy.arange(16 * 24, dtype=numpy.float32).reshape(16, 24))
    op, ld = _column_major(a)
    item = a.itemsize
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            at = r * ld + c if op == _OP_N else c * ld + r
            if a.shape[0] > 1 and a.shape[1] > 1:
                assert at == (r * a.strides[0] + c * a.strides[1]) // item
            else:  # a vector: only the varying index's stride matters
                assert at == (r * a.strides[0] if a.shape[0] > 1 else c * a.strides[1]) // item


@pytest.mark.parametrize("make", [
    lambda b: b[:, ::2],                                        # strided both ways
    lambda b: numpy.broadcast_to(b[:1], (16, 24)),             # a broadcast row: stride 0
    lambda b: b[::-1],                                          # negative row stride
])
def test_layouts_cublas_cannot_read_are_copied(make):
    from tessera_cp.functions.matmul import _column_major
    assert _column_major(make(numpy.zeros((16, 24), dtype=numpy.float32))) is None


def test_gemm_accumulates_and_checks_shapes_on_the_cpu():
    from tessera_cp.functions.matmul import gemm
    rng = numpy.random.default_rng(1)
    a, b, c = rng.standard_normal((5, 7)), rng.standard_normal((7, 3)), rng.standard_normal((5, 3))
    assert numpy.allclose(gemm(a, b), a @ b)
    assert numpy.allclose(gemm(a.T.copy().T, b, out=c.copy(), accumulate=True), c + a @ b)
    with pytest.raises(ShapeError, match=r"a \[M, K\] and b \[K, N\]"):
        gemm(a, a)
    with pytest.raises(ShapeError, match="out must be"):
        gemm(a, b, out=numpy.zeros((3, 5)))


def test_gemm_ex_passes_cublas_its_problem_and_restores_the_pointer_mode(monkeypatch):
    """cuda/cublas.gemm_ex against stand-ins for CuPy's modules (runs without a GPU): the GemmEx arguments in
    cuBLAS's order, beta 1 only when accumulating, the current stream set, a device pointer mode put back."""
    import sys
    import types
    from tessera_cp.cuda import cublas
    calls = []
    fake = types.SimpleNamespace(
        setStream=lambda h, s: calls.append(("stream", h, s)),
        getPointerMode=lambda h: 1,                                   # the handle was left in device mode
        setPointerMode=lambda h, m: calls.append(("mode", h, m)),
        gemmEx=lambda *args: calls.append(("gemm",) + args))
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = fake
    cuda = types.ModuleType("cupy.cuda")
    cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 77)
    cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=1234)
    for name, module in (("cupy_backends", types.ModuleType("cupy_backends")),
                         ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                         ("cupy_backends.cuda.libs", libs), ("cupy", types.ModuleType("cupy")), ("cupy.cuda", cuda)):
        monkeypatch.setitem(sys.modules, name, module)

    def array(ptr):
        return types.SimpleNamespace(dtype=numpy.dtype(ml_dtypes.bfloat16), data=types.SimpleNamespace(ptr=ptr))
    for accumulate, beta in ((False, 0.0), (True, 1.0)):
        calls.clear()
        cublas.gemm_ex(cublas.OP_T, cublas.OP_N, 5, 6, 7, array(100), 8, array(200), 9, array(300), 10, accumulate)
        assert calls[0] == ("stream", 77, 1234) and calls[1] == ("mode", 77, 0) and calls[-1] == ("mode", 77, 1)
        g = calls[2]
        assert g[1:7] == (77, cublas.OP_T, cublas.OP_N, 5, 6, 7)
        assert g[8:11] == (100, 14, 8) and g[11:14] == (200, 14, 9) and g[15:18] == (300, 14, 10)
        assert g[18:] == (68, -1)                                     # f32 compute, default algorithm
        alpha, beta_read = (numpy.ctypeslib.as_array((ctypes.c_float * 1).from_address(g[i])) for i in (7, 14))
        assert alpha[0] == 1.0 and beta_read[0] == beta
