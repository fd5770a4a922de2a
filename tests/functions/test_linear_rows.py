"""linear_rows: out (+)= x @ W.T on 2-D arrays, the GEMM the Llama prefill uses (residual added by the GEMM)."""
import ml_dtypes
import numpy
import pytest

from tessera_cp import backend
from tessera_cp.errors import ShapeError
from tessera_cp.functions.matmul import linear_rows


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
def test_columns_with_a_stride_are_refused():
    cupy = pytest.importorskip("cupy")
    x = cupy.zeros((4, 8), dtype=numpy.float32)
    with pytest.raises(ShapeError, match="unit-stride rows"):
        linear_rows(x[:, ::2], cupy.zeros((3, 4), dtype=numpy.float32))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ShapeError, match=r"x \[M, K\], weight \[N, K\]"):
        linear_rows(numpy.zeros((4, 8)), numpy.zeros((3, 7)))
    with pytest.raises(ShapeError):
        linear_rows(numpy.zeros((4, 8)), numpy.zeros((3, 8)), out=numpy.zeros((4, 4)))
