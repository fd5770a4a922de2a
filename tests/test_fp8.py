"""fp8 casts against ml_dtypes, bit for bit: every bf16 and f16 pattern, a structured f32 sample that holds every
exponent and every rounding boundary, a float64 sample, and all 256 codes decoded; on the CPU (the reference) and,
marked gpu, on CuPy (the cast.cu kernels and the reference)."""
import functools
import warnings

import ml_dtypes
import numpy
import pytest

from tessera_cp import backend, dtypes, fp8
from tessera_cp.errors import DTypeError

E4M3, E5M2 = dtypes.fp8_e4m3, dtypes.fp8_e5m2
FORMATS = [E4M3, E5M2]
MAX_FINITE = {E4M3: 448.0, E5M2: 57344.0}  # OCP fp8 spec values, written out rather than read from a library
NAN_CODES = {E4M3: {0x7F, 0xFF}, E5M2: {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}}
OUT_DTYPES = [dtypes.f32, dtypes.f16, dtypes.bf16, dtypes.f64]
UINT = {1: numpy.uint8, 2: numpy.uint16, 4: numpy.uint32, 8: numpy.uint64}
REFERENCE_DECODE = fp8._decode_reference  # kept before any test patches it


# ------------------------------------------------------------------------------------------------------------
# Oracles (ml_dtypes) and inputs
# ------------------------------------------------------------------------------------------------------------

def oracle_encode(x, fmt, saturate):
    """ml_dtypes' cast; saturation is a clamp to [-max, max] first (NaN passes a clamp unchanged)."""
    x = numpy.asarray(x)
    if x.dtype != numpy.float64:
        x = x.astype(numpy.float32)  # exact for f16 and bf16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ml_dtypes warns on NaN and overflow
        if saturate:
            x = numpy.clip(x, -MAX_FINITE[fmt], MAX_FINITE[fmt])
        return x.astype(fmt.ml_type).view(numpy.uint8)


def oracle_decode(codes, fmt, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return numpy.asarray(codes, dtype=numpy.uint8).view(fmt.ml_type).astype(out.storage)


def bits_of(a):
    a = numpy.asarray(a)
    return a.view(UINT[a.dtype.itemsize])


def all_16bit(dtype):
    return numpy.arange(1 << 16, dtype=numpy.uint32).astype(numpy.uint16).view(dtype)


@functools.lru_cache(maxsize=None)
def boundary_values():
    """Every positive fp8 value of both formats, the midpoints between neighbours (the exact ties, including half
    the smallest subnormal and max + half a step, where overflow starts), both as float64."""
    out = []
    for fmt in FORMATS:
        v = numpy.unique(numpy.abs(oracle_decode(numpy.arange(256), fmt, dtypes.f64)))
        v = v[numpy.isfinite(v)]
        step_above_max = v[-1] - v[-2]
        v = numpy.concatenate([v, [v[-1] + step_above_max]])  # the value the next code would have
        out += [v, (v[1:] + v[:-1]) / 2]
    return numpy.concatenate(out)


@functools.lru_cache(maxsize=None)
def f32_sample():
    """All 2^16 (sign, exponent, top 7 mantissa bits) with low halves that decide rounding ties (zero or not,
    exactly half, one either side), every fp8 value and tie with its float32 neighbours, specials, and random bits."""
    high = numpy.arange(1 << 16, dtype=numpy.uint32) << numpy.uint32(16)
    lows = numpy.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF, 0x5A5A], dtype=numpy.uint32)
    structured = (high[:, None] | lows[None, :]).ravel().view(numpy.float32)
    b = boundary_values().astype(numpy.float32)
    near = numpy.concatenate([b, numpy.nextafter(b, numpy.float32(0)), numpy.nextafter(b, numpy.float32(numpy.inf))])
    nan_bits = numpy.array([0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7F900000], dtype=numpy.uint32)
    specials = numpy.concatenate([nan_bits.view(numpy.float32),
                                  numpy.array([0.0, numpy.inf, numpy.finfo(numpy.float32).max,
                                               numpy.finfo(numpy.float32).tiny, 1e-45], dtype=numpy.float32)])
    rand = numpy.random.default_rng(0).integers(0, 1 << 32, size=1 << 20, dtype=numpy.uint32).view(numpy.float32)
    half = numpy.concatenate([near, specials])
    return numpy.concatenate([structured, half, -half, rand])


@functools.lru_cache(maxsize=None)
def f64_sample():
    """float64 near every tie (where rounding to float32 first decides the result), specials and random bits."""
    b = boundary_values()
    near = numpy.concatenate([b, numpy.nextafter(b, 0.0), numpy.nextafter(b, numpy.inf),
                              b * (1 + 2.0 ** -30), b * (1 - 2.0 ** -30)])
    nan = numpy.array([0x7FF8000000000000, 0x7FF0000000000001], dtype=numpy.uint64).view(numpy.float64)
    specials = numpy.concatenate([nan, [0.0, numpy.inf, 1e300, 1e-300, 5e-324]])
    rng = numpy.random.default_rng(1)
    rand = rng.integers(0, 1 << 64, size=1 << 18, dtype=numpy.uint64).view(numpy.float64)
    # Random values inside the fp8 range, where every bit of the mantissa can matter.
    scaled = rng.uniform(-1, 1, size=1 << 18) * numpy.exp2(rng.integers(-20, 18, size=1 << 18))
    half = numpy.concatenate([near, specials])
    return numpy.concatenate([half, -half, rand, scaled])


SOURCES = {"bf16": lambda: all_16bit(ml_dtypes.bfloat16), "f16": lambda: all_16bit(numpy.float16),
           "f32": f32_sample, "f64": f64_sample}


def assert_same_bits(got, want, what):
    got, want = numpy.asarray(got), numpy.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    bad = numpy.flatnonzero(bits_of(got).ravel() != bits_of(want).ravel())
    assert bad.size == 0, (f"{what}: {bad.size} of {got.size} differ; first at {bad[:5]}: got "
                           f"{[hex(int(v)) for v in bits_of(got).ravel()[bad[:5]]]}, want "
                           f"{[hex(int(v)) for v in bits_of(want).ravel()[bad[:5]]]}")


# ------------------------------------------------------------------------------------------------------------
# CPU: the reference
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("source", list(SOURCES))
def test_encode_matches_ml_dtypes(source, fmt, saturate):
    x = SOURCES[source]()
    got = fp8.encode(x, fmt, saturate=saturate)
    assert_same_bits(got, oracle_encode(x, fmt, saturate), f"{source} -> {fmt.name} saturate={saturate}")


# (value, e4m3 code without / with saturation, e5m2 code without / with saturation), from the OCP fp8 spec.
KNOWN = [
    (0.0, 0x00, 0x00, 0x00, 0x00),
    (-0.0, 0x80, 0x80, 0x80, 0x80),
    (1.0, 0x38, 0x38, 0x3C, 0x3C),
    (-2.0, 0xC0, 0xC0, 0xC0, 0xC0),
    (1.0625, 0x38, 0x38, 0x3C, 0x3C),   # e4m3 tie between 1 and 1.125: to even (1)
    (1.1875, 0x3A, 0x3A, 0x3D, 0x3D),   # e4m3 tie between 1.125 and 1.25: to even (1.25)
    (1.125, 0x39, 0x39, 0x3C, 0x3C),    # e5m2 tie between 1 and 1.25: to even (1)
    (2.0 ** -6, 0x08, 0x08, 0x24, 0x24),  # smallest e4m3 normal
    (2.0 ** -9, 0x01, 0x01, 0x18, 0x18),  # smallest e4m3 subnormal
    (2.0 ** -10, 0x00, 0x00, 0x14, 0x14),  # half of it: a tie, to even (0)
    (3 * 2.0 ** -10, 0x02, 0x02, 0x1A, 0x1A),  # e4m3 tie between 1 and 2 subnormal steps: to even (2)
    (2.0 ** -16, 0x00, 0x00, 0x01, 0x01),  # smallest e5m2 subnormal
    (2.0 ** -17, 0x00, 0x00, 0x00, 0x00),  # half of it: a tie, to even (0)
    (448.0, 0x7E, 0x7E, 0x5F, 0x5F),
    (464.0, 0x7E, 0x7E, 0x5F, 0x5F),    # max + half a step: a tie, to even (448)
    (464.00003, 0x7F, 0x7E, 0x5F, 0x5F),  # the next float32 above: NaN unless saturating
    (-1000.0, 0xFF, 0xFE, 0xE4, 0xE4),  # e5m2: 1.953 * 2^9 rounds up to 2^10
    (57344.0, 0x7F, 0x7E, 0x7B, 0x7B),
    (61439.996, 0x7F, 0x7E, 0x7B, 0x7B),  # the float32 just below max + half a step
    (61440.0, 0x7F, 0x7E, 0x7C, 0x7B),  # max + half a step: a tie, to even (inf) unless saturating
    (float("inf"), 0x7F, 0x7E, 0x7C, 0x7B),
    (float("-inf"), 0xFF, 0xFE, 0xFC, 0xFB),
    (float("nan"), 0x7F, 0x7F, 0x7E, 0x7E),
    (-float("nan"), 0xFF, 0xFF, 0xFE, 0xFE),
]


@pytest.mark.parametrize("value,e4,e4_sat,e5,e5_sat", KNOWN)
def test_encode_known_codes(value, e4, e4_sat, e5, e5_sat):
    x = numpy.array([value], dtype=numpy.float32)
    got = [int(fp8.encode(x, fmt, saturate=s)[0]) for fmt in FORMATS for s in (False, True)]
    assert [hex(c) for c in got] == [hex(c) for c in (e4, e4_sat, e5, e5_sat)]


@pytest.mark.parametrize("out", OUT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_decode_all_codes(fmt, out):
    codes = numpy.arange(256, dtype=numpy.uint8)
    got = fp8.decode(codes, fmt, out)
    assert_same_bits(got, oracle_decode(codes, fmt, out), f"{fmt.name} -> {out.name}")
    is_nan = numpy.isnan(got.astype(numpy.float64))
    assert set(numpy.flatnonzero(is_nan)) == NAN_CODES[fmt]
    assert list(numpy.signbit(got.astype(numpy.float64))) == [c >= 0x80 for c in range(256)]


def test_decode_known_values():
    codes = numpy.array([0x7E, 0x01, 0x80, 0x08, 0xB8], dtype=numpy.uint8)
    assert fp8.decode(codes, E4M3, dtypes.f32).tolist() == [448.0, 2.0 ** -9, -0.0, 2.0 ** -6, -1.0]
    codes = numpy.array([0x7B, 0x7C, 0xFC, 0x01, 0x3C], dtype=numpy.uint8)
    assert fp8.decode(codes, E5M2, dtypes.f32).tolist() == [57344.0, numpy.inf, -numpy.inf, 2.0 ** -16, 1.0]
    # 2^-16 is a float16 subnormal: 0x0100. e5m2 is the top byte of float16 for every non-NaN code.
    codes = numpy.arange(256, dtype=numpy.uint8)
    f16 = bits_of(fp8.decode(codes, E5M2, dtypes.f16)).astype(numpy.uint32)
    keep = ~numpy.isin(codes, list(NAN_CODES[E5M2]))
    assert (f16[keep] == codes[keep].astype(numpy.uint32) << 8).all()
    assert {hex(int(b)) for b in f16[~keep]} == {"0x7e00", "0xfe00"}  # canonical NaN, sign kept


@pytest.mark.parametrize("out", OUT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_round_trip(fmt, out):
    codes = numpy.arange(256, dtype=numpy.uint8)
    values = fp8.decode(codes, fmt, out)
    if out is dtypes.f64:
        values = values.astype(numpy.float32)  # float64 goes through float32; exact here
    back = fp8.encode(values, fmt)
    nan = numpy.isin(codes, list(NAN_CODES[fmt]))
    assert (back[~nan] == codes[~nan]).all()
    canonical = {E4M3: 0x7F, E5M2: 0x7E}[fmt]
    assert (back[nan] == (codes[nan] & 0x80) | canonical).all()


def test_shapes_and_strides():
    rng = numpy.random.default_rng(2)
    x = rng.standard_normal((6, 10)).astype(numpy.float32) * 300
    view = x[::2, 1::3].T  # neither C- nor F-contiguous
    got = fp8.encode(view, E4M3)
    assert got.shape == view.shape and got.dtype == numpy.uint8
    assert (got == oracle_encode(numpy.ascontiguousarray(view), E4M3, False)).all()
    back = fp8.decode(got.T, E4M3, dtypes.bf16)
    assert back.shape == got.T.shape and back.dtype == dtypes.bf16.storage
    scalar = fp8.encode(numpy.array(1.0, dtype=numpy.float16), E5M2)
    assert isinstance(scalar, numpy.ndarray) and scalar.shape == () and int(scalar) == 0x3C
    d = fp8.decode(numpy.array(0x38, dtype=numpy.uint8), E4M3, dtypes.f32)
    assert isinstance(d, numpy.ndarray) and d.shape == () and float(d) == 1.0
    assert fp8.encode(numpy.zeros((0, 3), numpy.float32), E5M2).shape == (0, 3)
    assert fp8.decode(numpy.zeros((2, 0), numpy.uint8), E5M2, dtypes.f16).shape == (2, 0)


def test_format_names_accepted():
    x = numpy.array([1.0, -3.0], dtype=numpy.float32)
    assert (fp8.encode(x, "e4m3") == fp8.encode(x, E4M3)).all()
    assert (fp8.encode(x, ml_dtypes.float8_e5m2) == numpy.array([0x3C, 0xC2], dtype=numpy.uint8)).all()


@pytest.mark.parametrize("call", [
    lambda: fp8.encode(numpy.arange(4, dtype=numpy.int32), E4M3),
    lambda: fp8.encode(numpy.zeros(4, dtype=numpy.uint8), E4M3),
    lambda: fp8.encode(numpy.zeros(4, dtype=ml_dtypes.float8_e4m3fn), E5M2),
    lambda: fp8.encode([1.0, 2.0], E4M3),
    lambda: fp8.encode(numpy.zeros(4, numpy.float32), "e3m4"),
    lambda: fp8.encode(numpy.zeros(4, numpy.float32), dtypes.f32),
    lambda: fp8.encode(numpy.zeros(4, numpy.float32), dtypes.int8),
    lambda: fp8.decode(numpy.zeros(4, numpy.float32), E4M3, dtypes.f32),
    lambda: fp8.decode(numpy.zeros(4, numpy.int8), E4M3, dtypes.f32),
    lambda: fp8.decode(numpy.zeros(4, numpy.uint8), "float8_e4m3b11", dtypes.f32),
    lambda: fp8.decode(numpy.zeros(4, numpy.uint8), E4M3, dtypes.int32),
    lambda: fp8.decode(numpy.zeros(4, numpy.uint8), E4M3, dtypes.fp8_e5m2),
], ids=["int32", "uint8", "ml_dtypes-fp8", "list", "bad-fmt-name", "fmt-f32", "fmt-int8", "decode-float-bits",
        "decode-int8-bits", "decode-bad-fmt", "decode-to-int32", "decode-to-fp8"])
def test_bad_input(call):
    with pytest.raises(DTypeError):
        call()


# ------------------------------------------------------------------------------------------------------------
# GPU: the cast.cu kernels and the reference on CuPy, against ml_dtypes on the host
# ------------------------------------------------------------------------------------------------------------

def _cupy():
    cupy = pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("no GPU")
    return cupy


def _fail(*args, **kwargs):
    raise AssertionError("the other path ran")


@pytest.fixture(params=["kernel", "reference"])
def gpu_path(request, monkeypatch):
    """Runs a test once through the kernels and once through the reference on CuPy, proving which one ran."""
    _cupy()
    if request.param == "kernel":
        monkeypatch.delenv("TESSERA_REFERENCE", raising=False)
        monkeypatch.setattr(fp8, "_encode_reference", _fail)
        monkeypatch.setattr(fp8, "_decode_reference", _fail)
    else:
        monkeypatch.setenv("TESSERA_REFERENCE", "1")
        monkeypatch.setattr(fp8, "_encode_cuda", _fail)
        monkeypatch.setattr(fp8, "_decode_cuda", _fail)
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("source", list(SOURCES))
def test_gpu_encode_matches_ml_dtypes(gpu_path, source, fmt, saturate):
    cupy = _cupy()
    x = SOURCES[source]()
    got = fp8.encode(cupy.asarray(x), fmt, saturate=saturate)
    assert isinstance(got, cupy.ndarray)
    assert_same_bits(cupy.asnumpy(got), oracle_encode(x, fmt, saturate),
                     f"{gpu_path}: {source} -> {fmt.name} saturate={saturate}")


@pytest.mark.gpu
@pytest.mark.parametrize("out", OUT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_gpu_decode_all_codes(gpu_path, fmt, out, monkeypatch):
    cupy = _cupy()
    if out is dtypes.f64:  # float64 output takes the reference on both paths (there is no kernel for it)
        monkeypatch.setattr(fp8, "_decode_reference", REFERENCE_DECODE)
    # Every code 9 times, shuffled, plus 3 so that n % 4 != 0: the vector loop and the tail both run.
    codes = numpy.random.default_rng(3).permutation(numpy.tile(numpy.arange(256, dtype=numpy.uint8), 9))
    codes = numpy.concatenate([codes, numpy.array([0x7F, 0x80, 0xFE], dtype=numpy.uint8)])
    got = fp8.decode(cupy.asarray(codes), fmt, out)
    assert isinstance(got, cupy.ndarray)
    assert_same_bits(cupy.asnumpy(got), oracle_decode(codes, fmt, out), f"{gpu_path}: {fmt.name} -> {out.name}")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 3, 17, 1000, 4097])
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_kernels_odd_sizes_and_offsets(n, offset):
    """Every element written (two different poisons), misaligned views (the scalar path), fresh random bits."""
    cupy = _cupy()
    rng = numpy.random.default_rng(n + offset)
    for src in ("bf16", "f16", "f32"):
        dtype = {"bf16": ml_dtypes.bfloat16, "f16": numpy.float16, "f32": numpy.float32}[src]
        size = numpy.dtype(dtype).itemsize
        host = rng.integers(0, 1 << (8 * size), size=n + offset, dtype=UINT[size]).view(dtype)
        x = cupy.asarray(host)[offset:]
        for fmt in FORMATS:
            for saturate in (False, True):
                want = oracle_encode(host[offset:], fmt, saturate)
                for poison in (0x00, 0xFF):
                    out = cupy.full(n + offset, poison, dtype=numpy.uint8)[offset:]
                    fp8._encode_cuda(x, fp8._FORMATS[fmt], saturate, out=out)
                    assert_same_bits(cupy.asnumpy(out), want, f"encode {src} -> {fmt.name} n={n} offset={offset}")
    codes_host = rng.integers(0, 256, size=n + offset, dtype=numpy.uint8)
    codes = cupy.asarray(codes_host)[offset:]
    for fmt in FORMATS:
        for out_dtype in (dtypes.f32, dtypes.f16, dtypes.bf16):
            want = oracle_decode(codes_host[offset:], fmt, out_dtype)
            ubits = UINT[out_dtype.itemsize]
            for poison in (0, numpy.iinfo(ubits).max):
                out = cupy.full(n + offset, poison, dtype=ubits)[offset:].view(out_dtype.storage)
                fp8._decode_cuda(codes, fp8._FORMATS[fmt], out_dtype, out=out)
                assert_same_bits(cupy.asnumpy(out), want, f"decode {fmt.name} -> {out_dtype.name} n={n}")


@pytest.mark.gpu
def test_gpu_kernels_past_2_31_elements(monkeypatch):
    """n > 2^31: the 64-bit indices reach the last elements (checked against ml_dtypes at both ends)."""
    cupy = _cupy()
    monkeypatch.delenv("TESSERA_REFERENCE", raising=False)
    n = (1 << 31) + 4099
    pattern = all_16bit(ml_dtypes.bfloat16)
    x = cupy.empty(n, dtype=numpy.uint16)  # filled through its bits: element i holds pattern[i % 2^16]
    whole = n // pattern.size * pattern.size
    x[:whole].reshape(-1, pattern.size)[...] = cupy.asarray(bits_of(pattern))
    x[whole:] = cupy.asarray(bits_of(pattern)[: n - whole])
    codes = fp8.encode(x.view(ml_dtypes.bfloat16), E4M3)
    del x
    tail = numpy.arange(n - 70000, n) % pattern.size
    want = oracle_encode(pattern, E4M3, False)
    assert_same_bits(cupy.asnumpy(codes[:70000]), want[numpy.arange(70000) % pattern.size], "encode head")
    assert_same_bits(cupy.asnumpy(codes[-70000:]), want[tail], "encode tail")
    values = fp8.decode(codes, E4M3, dtypes.bf16)
    assert_same_bits(cupy.asnumpy(values[-70000:]), oracle_decode(want[tail], E4M3, dtypes.bf16), "decode tail")
