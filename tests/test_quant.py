"""Quantization primitives (tessera_cp.quant): exhaustive casts, round-trip error bounds, scales per group, the
per-token int8 quantization of W8A8 (reference on the CPU, kernel on the GPU, bit for bit).

Expected values come from formulas written here with NumPy and ml_dtypes (an independent fp8 implementation).
"""
import ml_dtypes
import numpy
import pytest

import tessera_cp as tc
from tessera_cp import backend, dtypes, quant

BF16 = ml_dtypes.bfloat16
FP8 = {dtypes.fp8_e4m3: ml_dtypes.float8_e4m3fn, dtypes.fp8_e5m2: ml_dtypes.float8_e5m2}
# (mantissa bits, exponent of the smallest normal) of each fp8 format
FP8_FIELDS = {dtypes.fp8_e4m3: (3, -6), dtypes.fp8_e5m2: (2, -14)}


def ref_rows_int8(x):
    """The documented per-token quantization, independently: scale = absmax / 127 (1 for a zero row)."""
    x32 = numpy.asarray(x, dtype=numpy.float32)
    amax = numpy.abs(x32).max(axis=1) if x32.shape[1] else numpy.zeros(x32.shape[0], numpy.float32)
    s = numpy.where(amax > 0, amax / numpy.float32(127), numpy.float32(1)).astype(numpy.float32)
    q = numpy.clip(numpy.rint(x32 / s[:, None]), -127, 127).astype(numpy.int8)
    return q, s


def test_qmax():
    assert quant.qmax(tc.int8) == 127 and quant.qmax("fp8_e4m3") == 448 and quant.qmax(tc.fp8_e5m2) == 57344
    with pytest.raises(tc.DTypeError):
        quant.qmax(tc.bf16)


# ---------------------------------------------------------------------------------------------------- exhaustive
def test_int8_every_level_round_trips_exactly():
    scale = numpy.float32(0.0625)  # a power of two: k * scale and the divisions are exact
    levels = numpy.arange(-127, 128, dtype=numpy.float32)
    q, s = quant.quantize(levels * scale, tc.int8, scale=scale)
    assert q.dtype == numpy.int8 and numpy.array_equal(q, levels.astype(numpy.int8))
    assert numpy.array_equal(quant.dequantize(q, s, tc.int8), levels * scale)


def test_int8_ties_round_to_even_and_saturate():
    scale = numpy.float32(0.5)
    halves = numpy.arange(-130.5, 131, 1.0, dtype=numpy.float32)  # k + 0.5 for k in [-131, 130]
    q, _ = quant.quantize(halves * scale, tc.int8, scale=scale)
    expected = numpy.clip(2 * numpy.round(halves / 2), -127, 127)  # nearest even, then the symmetric range
    assert numpy.array_equal(q.astype(numpy.float32), expected)
    big, _ = quant.quantize(numpy.array([1e30, -1e30, numpy.inf, -numpy.inf], numpy.float32), tc.int8, scale=1.0)
    assert big.tolist() == [127, -127, 127, -127]  # -128 is never produced


@pytest.mark.parametrize("fmt", [dtypes.fp8_e4m3, dtypes.fp8_e5m2])
def test_fp8_every_code_round_trips_exactly(fmt):
    codes = numpy.arange(256, dtype=numpy.uint8)
    values = codes.view(FP8[fmt]).astype(numpy.float32)
    scale = numpy.float32(0.125)
    q, s = quant.quantize(values * scale, fmt, scale=scale)
    finite = numpy.isfinite(values)
    assert numpy.array_equal(q[finite], codes[finite])          # both signed zeros included
    assert numpy.isnan(q.view(FP8[fmt]).astype(numpy.float32)[numpy.isnan(values)]).all()
    back = quant.dequantize(q, s, fmt)
    assert numpy.array_equal(back[finite], values[finite] * scale)
    if fmt is dtypes.fp8_e5m2:  # inf saturates to the largest finite value (0x7B / 0xFB)
        assert q[codes == 0x7C].tolist() == [0x7B] and q[codes == 0xFC].tolist() == [0xFB]


@pytest.mark.parametrize("fmt", [dtypes.fp8_e4m3, dtypes.fp8_e5m2])
def test_fp8_quantize_is_saturating_round_to_nearest_even(fmt, rng):
    x = rng.standard_normal(20000).astype(numpy.float32) * numpy.float32(30)
    scale = numpy.float32(quant.qmax(fmt) / 100)  # |x| / scale up to ~ 4 x qmax: plenty saturate
    q, _ = quant.quantize(x, fmt, scale=scale)
    top = numpy.float32(quant.qmax(fmt))
    expected = numpy.clip(x / scale, -top, top).astype(FP8[fmt]).view(numpy.uint8)
    assert numpy.array_equal(q, expected)


# ---------------------------------------------------------------------------------------------------- error bounds
@pytest.mark.parametrize("granularity,axis", [("tensor", 0), ("row", 0), ("channel", 0), ("channel", 1)])
@pytest.mark.parametrize("qdtype", [dtypes.int8, dtypes.fp8_e4m3, dtypes.fp8_e5m2])
def test_round_trip_error_bound(qdtype, granularity, axis, rng):
    # rows of very different magnitudes, so per-row and per-channel scales matter
    x = (rng.standard_normal((37, 53)) * numpy.exp(rng.uniform(-6, 6, (37, 1)))).astype(numpy.float32)
    q, s = quant.quantize(x, qdtype, granularity=granularity, axis=axis)
    deq = quant.dequantize(q, s, qdtype).astype(numpy.float64)
    s64 = numpy.broadcast_to(s, x.shape).astype(numpy.float64)
    error = numpy.abs(deq - x)
    if qdtype is dtypes.int8:
        bound = s64 / 2 * (1 + 2 ** -20)  # half a step, plus the float32 rounding of the product
    else:
        man, emin = FP8_FIELDS[qdtype]
        bound = numpy.maximum(numpy.abs(x) * 2.0 ** -(man + 1), s64 * 2.0 ** (emin - man - 1)) * (1 + 2 ** -20)
    assert (error <= bound).all(), f"worst excess {numpy.max(error - bound):.3g}"
    # and the scales are the group absmax / qmax (every group reaches qmax)
    reduce = {"tensor": None, "row": 1, "channel": 1 - axis}[granularity]
    amax = numpy.abs(x).max(axis=reduce, keepdims=True) if reduce is not None else numpy.abs(x).max(keepdims=True)
    assert numpy.array_equal(numpy.broadcast_to(s, amax.shape),
                             (amax / numpy.float32(quant.qmax(qdtype))).astype(numpy.float32))


def test_scale_shapes_and_zero_groups():
    x = numpy.zeros((3, 4), numpy.float32)
    x[1] = [1, -8, 2, 0]
    assert quant.absmax_scale(x, tc.int8).shape == (1, 1)
    s_row = quant.absmax_scale(x, tc.int8, granularity="row")
    assert s_row.shape == (3, 1) and s_row[:, 0].tolist() == [1.0, numpy.float32(8) / numpy.float32(127), 1.0]
    assert quant.absmax_scale(x, tc.int8, granularity="channel", axis=1).shape == (1, 4)
    q, s = quant.quantize(x, tc.int8, granularity="row")
    assert not q[0].any() and not q[2].any() and q[1].tolist() == [16, -127, 32, 0]


def test_nan_inputs():
    x = numpy.array([1.0, numpy.nan, -2.0], numpy.float32)
    q, s = quant.quantize(x, tc.int8)
    assert s.item() == numpy.float32(2) / numpy.float32(127)  # NaN ignored by absmax
    assert q.tolist() == [64, 0, -127]                        # a NaN quotient gives 0
    q8, _ = quant.quantize(x, tc.fp8_e4m3)
    assert q8[1] == 0x7F and q8[0] != 0x7F


def test_tensors_in_tensors_out():
    x = tc.tensor([[0.5, -1.0], [2.0, 0.5]], dtype=tc.bf16)  # x / scale: 28672, 57344, 57344, 14336 (all e5m2)
    q, s = quant.quantize(x, tc.fp8_e5m2, granularity="row")
    assert isinstance(q, tc.Tensor) and q.dtype is tc.fp8_e5m2 and s.dtype is tc.f32
    back = quant.dequantize(q, s, None, out_dtype=tc.bf16)
    assert back.dtype is tc.bf16
    assert numpy.array_equal(back.numpy().astype(numpy.float32), x.numpy().astype(numpy.float32))  # exact here


def test_dequantize_out_dtypes_round_once():
    q = numpy.array([127, -5, 33], numpy.int8)
    s = numpy.float32(0.0123)
    for out in (tc.bf16, tc.f16):
        got = quant.dequantize(q, s, tc.int8, out_dtype=out)
        assert got.dtype == out.storage
        assert numpy.array_equal(got, (q.astype(numpy.float32) * s).astype(out.storage))


def test_argument_errors():
    x = numpy.ones((2, 3), numpy.float32)
    with pytest.raises(tc.DTypeError):
        quant.quantize(x.astype(numpy.int32), tc.int8)
    with pytest.raises(tc.DTypeError):
        quant.quantize(x, tc.f16)
    with pytest.raises(tc.TesseraError, match="granularity"):
        quant.quantize(x, tc.int8, granularity="block")
    with pytest.raises(tc.ShapeError):
        quant.quantize(x, tc.int8, scale=numpy.ones(4, numpy.float32))
    with pytest.raises(tc.TesseraError, match="positive"):
        quant.quantize(x, tc.int8, scale=0.0)
    with pytest.raises(tc.ShapeError):
        quant.quantize(x, tc.int8, granularity="channel", axis=2)
    with pytest.raises(tc.DTypeError):
        quant.dequantize(numpy.ones(3, numpy.uint8), 1.0, tc.int8)
    with pytest.raises(tc.ShapeError):
        quant.quantize_rows_int8(numpy.ones(4, numpy.float32))


# ---------------------------------------------------------------------------------------------------- per token
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 64), (4, 1000)])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16, BF16])
def test_quantize_rows_int8_reference(shape, dtype, rng):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if shape[0] > 2:
        x[1] = 0
    q, s = quant.quantize_rows_int8(x, pad_to=16)
    qr, sr = ref_rows_int8(x)
    kp = -(-shape[1] // 16) * 16
    assert q.shape == (shape[0], kp) and q.dtype == numpy.int8
    assert numpy.array_equal(q[:, :shape[1]], qr) and not q[:, shape[1]:].any()
    assert numpy.array_equal(s.view(numpy.uint32), sr.view(numpy.uint32))


# ---------------------------------------------------------------------------------------------------- GPU
def _cupy():
    cupy = pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 17, 1000])
@pytest.mark.parametrize("cols", [1, 17, 1000, 4097])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16, BF16])
def test_gpu_quantize_rows_int8_bit_exact(rows, cols, dtype, rng):
    cupy = _cupy()
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 100, (rows, 1))).astype(dtype)
    if rows > 2:
        x[rows // 2] = 0
    ldq = -(-cols // 16) * 16
    q = cupy.full((rows, ldq), 0x55, dtype=numpy.int8)      # poisoned: every byte must be written
    s = cupy.full((rows,), numpy.nan, dtype=numpy.float32)
    quant._quantize_rows_cuda(cupy.asarray(x), ldq, q, s)
    qr, sr = ref_rows_int8(x)
    q, s = cupy.asnumpy(q), cupy.asnumpy(s)
    assert numpy.array_equal(q[:, :cols], qr) and not q[:, cols:].any()
    assert numpy.array_equal(s.view(numpy.uint32), sr.view(numpy.uint32))


@pytest.mark.gpu
def test_gpu_quantize_rows_int8_public_entry_and_reference_switch(rng, monkeypatch):
    cupy = _cupy()
    x = cupy.asarray(rng.standard_normal((33, 100)).astype(BF16))
    q, s = quant.quantize_rows_int8(x, pad_to=16)
    monkeypatch.setenv("TESSERA_REFERENCE", "1")
    q_ref, s_ref = quant.quantize_rows_int8(x, pad_to=16)  # the array-module reference, on CuPy
    assert bool((q == q_ref).all()) and bool((s == s_ref).all())


@pytest.mark.gpu
def test_gpu_quantize_rows_int8_past_2_31_elements():
    cupy = _cupy()
    rows, cols = 65537, 32768  # 2^31 + 32768 elements: row offsets past int32
    x = cupy.random.default_rng(7).standard_normal((rows, cols), dtype=numpy.float32).astype(BF16)
    q, s = quant.quantize_rows_int8(x)
    for r in (0, 1, rows // 2, rows - 2, rows - 1):
        qr, sr = ref_rows_int8(cupy.asnumpy(x[r:r + 1]))
        assert numpy.array_equal(cupy.asnumpy(q[r:r + 1]), qr) and float(s[r]) == float(sr[0])
