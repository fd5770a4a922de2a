"""The Hopper GEMMs of gemm_sm90.cu (CUTLASS wgmma): int8_matmul / w8a8_linear with gemm="sm90" and fp8_matmul.

CPU tests cover the fp8 reference against ml_dtypes and the argument checks (the sources' compile is
tests/cuda/test_compile_all.py). GPU tests (sm_90 with the CUTLASS headers; skipped elsewhere) check the int32 sums
bit for bit against an exact reference on shapes that are multiples of no tile, the W8A8 forward bit for bit
against the mma.sync path, and fp8 products against the float64 product of the decoded operands within the
accumulation and rounding bound.
"""
import ml_dtypes
import numpy
import pytest

import tessera_cp as tc
from tessera_cp import backend, dtypes, quant
from tessera_cp.errors import DTypeError, ShapeError, TesseraError
from tessera_cp.nn import casted

BF16 = ml_dtypes.bfloat16


def exact_int32(a, b):
    """a @ b.T for int8 a, b: exact in float64 (partial sums < 2^53), wrapped to int32."""
    return (a.astype(numpy.float64) @ b.astype(numpy.float64).T).astype(numpy.int64).astype(numpy.int32)


def e4m3(rng, shape, spread=4.0):
    x = (rng.standard_normal(shape) * spread).astype(numpy.float32)
    return quant.quantize(x, dtypes.fp8_e4m3, scale=numpy.float32(1.0))[0]


def decode64(bits):
    return numpy.asarray(bits).view(ml_dtypes.float8_e4m3fn).astype(numpy.float64)


# ---------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("a_scale, b_scale", [(None, None), (0.5, None), ("row", "col"), ("one", "col")])
def test_fp8_matmul_reference(rng, a_scale, b_scale):
    m, n, k = 7, 5, 33
    a, b = e4m3(rng, (m, k)), e4m3(rng, (n, k))
    sa = {None: None, 0.5: numpy.float32(0.5), "row": rng.uniform(0.5, 2, m).astype(numpy.float32),
          "one": numpy.array([3.0], numpy.float32)}[a_scale]
    sb = None if b_scale is None else rng.uniform(0.5, 2, n).astype(numpy.float32)
    want = decode64(a) @ decode64(b).T
    if sa is not None:
        want = want * numpy.asarray(sa, numpy.float64).reshape(-1, 1)
    if sb is not None:
        want = want * sb.astype(numpy.float64)[None, :]
    got = casted.fp8_matmul(a, b, sa, sb)
    assert got.dtype == BF16
    assert numpy.array_equal(got.view(numpy.uint16), want.astype(numpy.float32).astype(BF16).view(numpy.uint16))
    assert numpy.array_equal(casted.fp8_matmul(a, b, sa, sb, fast_accum=True).view(numpy.uint16),
                             got.view(numpy.uint16))
    t = casted.fp8_matmul(tc.tensor(a), tc.tensor(b), out_dtype=tc.f32)
    assert t.dtype is dtypes.f32 and numpy.allclose(t.numpy(), decode64(a) @ decode64(b).T, rtol=1e-6)


def test_fp8_matmul_argument_errors():
    a = numpy.zeros((4, 16), numpy.uint8)
    with pytest.raises(DTypeError, match="uint8"):
        casted.fp8_matmul(a.astype(numpy.int8), a)
    with pytest.raises(ShapeError, match="K differs"):
        casted.fp8_matmul(a, numpy.zeros((4, 32), numpy.uint8))
    with pytest.raises(ShapeError, match="a_scale"):
        casted.fp8_matmul(a, a, numpy.ones(3, numpy.float32))
    with pytest.raises(DTypeError, match="out_dtype"):
        casted.fp8_matmul(a, a, out_dtype=dtypes.int8)


def test_sm90_is_a_gemm_choice_and_not_the_cpu_default():
    assert "sm90" in casted.GEMMS
    a = numpy.ones((2, 3), numpy.int8)
    assert not casted.sm90_supported(a) and casted._default_gemm(a) == "mma"
    assert numpy.array_equal(casted.int8_matmul(a, a, gemm="sm90"), numpy.full((2, 2), 3, numpy.int32))
    with pytest.raises(TesseraError, match="gemm must be one of"):
        casted.int8_matmul(a, a, gemm="wgmma")


# ---------------------------------------------------------------------------------------------------- GPU
def _cupy():
    cupy = pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    if not casted.sm90_supported(cupy.zeros(1)):
        pytest.skip("needs an sm_90 GPU and the CUTLASS headers")
    return cupy


GEMM_SHAPES = [(1, 1, 1), (33, 33, 33), (1000, 1000, 4097), (4097, 33, 1000), (17, 4097, 1000), (1, 4097, 4097),
               (257, 129, 200), (4097, 4097, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gpu_sm90_int8_matmul_bit_exact(m, n, k):
    """Raw int32 sums against the exact reference; the last shape has more tiles than the persistent grid."""
    cupy = _cupy()
    rng = numpy.random.default_rng(m * 7919 + n * 31 + k)
    a = rng.integers(-128, 128, (m, k), dtype=numpy.int8)
    b = rng.integers(-128, 128, (n, k), dtype=numpy.int8)
    out = cupy.full((m, n), -0x5A5A5A5A, dtype=numpy.int32)  # poisoned: a missed element keeps this pattern
    casted.int8_matmul(cupy.asarray(a), cupy.asarray(b), gemm="sm90", out=out)
    got, want = cupy.asnumpy(out), exact_int32(a, b)
    assert numpy.array_equal(got, want), f"{int((got != want).sum())} of {got.size} differ"


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(129, 257, 4112), (3, 300, 2 ** 16 + 16)])
def test_gpu_sm90_int8_large_sums_stay_exact(m, n, k):
    """Sums far past 2^24 with odd values: any rounding through float32 on the way to D would show."""
    cupy = _cupy()
    rng = numpy.random.default_rng(k)
    a = numpy.full((m, k), 127, dtype=numpy.int8)
    a[:, ::7] = -128
    b = rng.integers(125, 128, (n, k), dtype=numpy.int8)
    got = cupy.asnumpy(casted.int8_matmul(cupy.asarray(a), cupy.asarray(b), gemm="sm90"))
    want = exact_int32(a, b)
    assert numpy.abs(want.astype(numpy.int64)).max() > 2 ** 25 and (want % 2 == 1).any()
    assert numpy.array_equal(got, want), f"{int((got != want).sum())} of {got.size} differ"


@pytest.mark.gpu
def test_gpu_sm90_int8_extremes_wrap_like_int32():
    """-128 * -128 * K with K = 2^17 reaches 2^31: the sum wraps as int32 arithmetic does (mma path alike)."""
    cupy = _cupy()
    a = cupy.full((3, 2 ** 17), -128, dtype=numpy.int8)
    got = cupy.asnumpy(casted.int8_matmul(a, a, gemm="sm90"))
    assert (got == -2 ** 31).all()


@pytest.mark.gpu
@pytest.mark.parametrize("storage", [BF16, numpy.float16, numpy.float32])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (33, 33, 33), (1000, 1000, 4097), (17, 4097, 1000)])
def test_gpu_sm90_w8a8_equals_mma_path(storage, m, n, k):
    """W8A8 through gemm="sm90" (int32 GEMM + epilogue kernel) equals the mma.sync path's fused epilogue bit for
    bit, with and without bias."""
    cupy = _cupy()
    rng = numpy.random.default_rng(m + n + k)
    x = cupy.asarray((rng.standard_normal((m, k)) * rng.uniform(0.01, 10, (m, 1))).astype(storage))
    w = cupy.asarray(rng.integers(-127, 128, (n, k), dtype=numpy.int8))
    ws = cupy.asarray(rng.uniform(1e-3, 2e-2, n).astype(numpy.float32))
    for bias in (cupy.asarray(rng.standard_normal(n).astype(numpy.float32)), None):
        outs = []
        for gemm in ("mma", "sm90"):
            out = cupy.full((m, n), numpy.nan, dtype=storage)
            casted.w8a8_linear(x, w, ws, bias, storage, gemm, out=out)
            outs.append(cupy.asnumpy(out))
        assert numpy.array_equal(outs[0].view(f"u{outs[0].itemsize}"), outs[1].view(f"u{outs[1].itemsize}"))


@pytest.mark.gpu
@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("scales", ["none", "tensor", "row_col", "row_only"])
@pytest.mark.parametrize("out_dtype", [dtypes.bf16, dtypes.f16, dtypes.f32])
@pytest.mark.parametrize("m,n,k", [(1, 1, 16), (33, 33, 48), (1000, 1000, 4097), (17, 4097, 1000),
                                   (4097, 4097, 1024)])
def test_gpu_sm90_fp8_matmul(scales, out_dtype, m, n, k, fast_accum):
    """Against the float64 product of the decoded operands: |err| <= ulp(out) * |ref| + 2^-12 * sum |a b| (the
    f32 sums of wgmma's fp8 partial products, promoted every 4 k-blocks, stay well inside 2^-12). With
    fast_accum the tensor cores keep about 14 bits at each addition (one per wgmma, 32 of K): the second term
    becomes 2^-12 * ceil(K / 32) * sum |a b|."""
    cupy = _cupy()
    rng = numpy.random.default_rng(m * 3 + n + k)
    a, b = e4m3(rng, (m, k)), e4m3(rng, (n, k))
    sa = {"none": None, "tensor": numpy.float32([0.75]), "row_col": rng.uniform(0.5, 2, m).astype(numpy.float32),
          "row_only": rng.uniform(0.5, 2, m).astype(numpy.float32)}[scales]
    sb = {"none": None, "tensor": numpy.float32([1.5]), "row_col": rng.uniform(0.5, 2, n).astype(numpy.float32),
          "row_only": None}[scales]
    out = cupy.full((m, n), numpy.nan, dtype=out_dtype.storage)
    casted.fp8_matmul(cupy.asarray(a), cupy.asarray(b), None if sa is None else cupy.asarray(sa),
                      None if sb is None else cupy.asarray(sb), out_dtype, out=out, fast_accum=fast_accum)
    s = numpy.ones((m, n))
    if sa is not None:
        s = s * sa.astype(numpy.float64).reshape(-1, 1)
    if sb is not None:
        s = s * sb.astype(numpy.float64).reshape(1, -1)
    a64, b64 = decode64(a), decode64(b)
    ref, mag = (a64 @ b64.T) * s, (numpy.abs(a64) @ numpy.abs(b64).T) * s
    got = cupy.asnumpy(out).astype(numpy.float64)
    ulp = {dtypes.bf16: 2.0 ** -8, dtypes.f16: 2.0 ** -11, dtypes.f32: 2.0 ** -24}[out_dtype]
    assert numpy.isfinite(got).all()
    steps = -(-k // 32) if fast_accum else 1
    excess = numpy.abs(got - ref) - (ulp * numpy.abs(ref) + 2.0 ** -12 * steps * mag)
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} of {got.size} outside the bound"


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 1, 16), (33, 33, 48), (1000, 1000, 4097), (4097, 4097, 1024)])
def test_gpu_sm90_fp8_fast_accum_ping_pong_equals_cooperative(m, n, k):
    """fp8_matmul(fast_accum=True) with a bf16 result runs the ping-pong config: each element's k order is the
    cooperative config's, so the bits are the same."""
    cupy = _cupy()
    rng = numpy.random.default_rng(m + n + k)
    a, b = cupy.asarray(e4m3(rng, (m, k))), cupy.asarray(e4m3(rng, (n, k)))
    scale = cupy.asarray(numpy.float32([0.75]))
    outs = [cupy.full((m, n), numpy.nan, dtype=dtypes.bf16.storage) for _ in range(2)]
    casted.fp8_matmul(a, b, scale, scale, dtypes.bf16, out=outs[0], fast_accum=True)
    casted._sm90_gemm("e4m3_bf16_fast", casted._pad_k(a), casted._pad_k(b), m, n, outs[1], scale, scale)
    assert numpy.array_equal(cupy.asnumpy(outs[0]).view(numpy.uint16), cupy.asnumpy(outs[1]).view(numpy.uint16))
