"""dtype objects: names, storage, limits (written out from the IEEE / OCP fp8 definitions, not read from a
library), promotion, and errors."""
import pickle

import ml_dtypes
import numpy
import pytest

import tessera_cp as tc
from tessera_cp import dtypes
from tessera_cp.errors import DTypeError


def test_the_dtypes_and_their_storage():
    expected = {
        "f32": (numpy.float32, 4, "float"), "f64": (numpy.float64, 8, "float"), "f16": (numpy.float16, 2, "float"),
        "bf16": (ml_dtypes.bfloat16, 2, "float"), "fp8_e4m3": (numpy.uint8, 1, "fp8"),
        "fp8_e5m2": (numpy.uint8, 1, "fp8"), "int8": (numpy.int8, 1, "int"), "uint8": (numpy.uint8, 1, "int"),
        "int32": (numpy.int32, 4, "int"), "int64": (numpy.int64, 8, "int"), "bool": (numpy.bool_, 1, "bool"),
    }
    for name, (storage, size, kind) in expected.items():
        d = dtypes.as_dtype(name)
        assert d.name == name and d.storage == numpy.dtype(storage) and d.itemsize == size and d.kind == kind
        assert d.is_floating == (kind in ("float", "fp8")) and d.is_fp8 == (kind == "fp8")
        assert repr(d) == f"tessera_cp.{name}"
        assert pickle.loads(pickle.dumps(d)) is d  # one object per dtype
    assert tc.fp8_e4m3.ml_type == numpy.dtype(ml_dtypes.float8_e4m3fn)
    assert tc.fp8_e5m2.ml_type == numpy.dtype(ml_dtypes.float8_e5m2)
    assert tc.bf16.ml_type == numpy.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("spelling,expected", [
    ("float32", tc.f32), ("float", tc.f32), ("double", tc.f64), ("half", tc.f16), ("float16", tc.f16),
    ("bfloat16", tc.bf16), ("e4m3", tc.fp8_e4m3), ("float8_e4m3fn", tc.fp8_e4m3), ("e5m2", tc.fp8_e5m2),
    ("long", tc.int64), ("int", tc.int64), ("bool_", tc.bool_), (float, tc.f32), (int, tc.int64), (bool, tc.bool_),
    (numpy.float32, tc.f32), (numpy.dtype("float16"), tc.f16), (ml_dtypes.bfloat16, tc.bf16),
    (ml_dtypes.float8_e4m3fn, tc.fp8_e4m3), (ml_dtypes.float8_e5m2, tc.fp8_e5m2), (numpy.uint8, tc.uint8),
    (numpy.int16, tc.int32), (tc.int8, tc.int8)])
def test_as_dtype_spellings(spelling, expected):
    assert dtypes.as_dtype(spelling) is expected


@pytest.mark.parametrize("bad", ["float128", "fp4", "", numpy.complex64, numpy.uint32, object, 3.5, "F32 "])
def test_unknown_dtypes_are_dtype_errors(bad):
    with pytest.raises(DTypeError):
        dtypes.as_dtype(bad)


# (bits, eps, max, tiny = smallest normal, smallest subnormal), from each format's exponent/mantissa widths
LIMITS = {
    "f64": (64, 2.0 ** -52, (2 - 2.0 ** -52) * 2.0 ** 1023, 2.0 ** -1022, 2.0 ** -1074),
    "f32": (32, 2.0 ** -23, (2 - 2.0 ** -23) * 2.0 ** 127, 2.0 ** -126, 2.0 ** -149),
    "f16": (16, 2.0 ** -10, 65504.0, 2.0 ** -14, 2.0 ** -24),
    "bf16": (16, 2.0 ** -7, (2 - 2.0 ** -7) * 2.0 ** 127, 2.0 ** -126, 2.0 ** -133),
    "fp8_e4m3": (8, 2.0 ** -3, 448.0, 2.0 ** -6, 2.0 ** -9),
    "fp8_e5m2": (8, 2.0 ** -2, 57344.0, 2.0 ** -14, 2.0 ** -16),
}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_finfo(name):
    bits, eps, big, tiny, sub = LIMITS[name]
    info = tc.finfo(name)
    assert (info.bits, info.eps, info.max, info.tiny, info.smallest_subnormal) == (bits, eps, big, tiny, sub)
    assert info.min == -big and info.smallest_normal == tiny and info.dtype is dtypes.as_dtype(name)
    assert name in repr(info)


def test_iinfo_and_wrong_kinds():
    assert (tc.iinfo(tc.int8).min, tc.iinfo(tc.int8).max, tc.iinfo(tc.int8).bits) == (-128, 127, 8)
    assert (tc.iinfo("uint8").min, tc.iinfo("uint8").max) == (0, 255)
    assert (tc.iinfo(tc.int32).min, tc.iinfo(tc.int32).max) == (-2 ** 31, 2 ** 31 - 1)
    assert (tc.iinfo(tc.int64).min, tc.iinfo(tc.int64).max) == (-2 ** 63, 2 ** 63 - 1)
    for bad in (tc.int32, tc.bool_, "int8"):
        with pytest.raises(DTypeError):
            tc.finfo(bad)
    for bad in (tc.f32, tc.bf16, tc.fp8_e4m3, tc.bool_):
        with pytest.raises(DTypeError):
            tc.iinfo(bad)


@pytest.mark.parametrize("a,b,expected", [
    (tc.f32, tc.f32, tc.f32), (tc.bf16, tc.f16, tc.f32), (tc.f16, tc.bf16, tc.f32), (tc.bf16, tc.f32, tc.f32),
    (tc.f16, tc.f32, tc.f32), (tc.bf16, tc.f64, tc.f64), (tc.f32, tc.f64, tc.f64), (tc.int8, tc.int32, tc.int32),
    (tc.int32, tc.int64, tc.int64), (tc.uint8, tc.int8, tc.int32), (tc.bool_, tc.int8, tc.int8),
    (tc.int64, tc.f16, tc.f16), (tc.int64, tc.bf16, tc.bf16), (tc.int32, tc.f32, tc.f32),
    (tc.bool_, tc.bf16, tc.bf16), (tc.f64, tc.int64, tc.f64), (tc.bool_, tc.bool_, tc.bool_)])
def test_promote(a, b, expected):
    assert dtypes.promote(a, b) is expected
    assert dtypes.promote(b, a) is expected


@pytest.mark.parametrize("other", [tc.f32, tc.int8, tc.bf16, tc.f64])
def test_promote_fp8_is_refused(other):
    with pytest.raises(DTypeError, match="fp8"):
        dtypes.promote(tc.fp8_e4m3, other)
    with pytest.raises(DTypeError):
        dtypes.promote(other, tc.fp8_e5m2)
    with pytest.raises(DTypeError):
        dtypes.promote(tc.fp8_e4m3, tc.fp8_e5m2)
    assert dtypes.promote(tc.fp8_e4m3, tc.fp8_e4m3) is tc.fp8_e4m3  # same dtype (cat of fp8 tensors)


def test_uint8_storage_means_uint8_not_fp8():
    t = tc.tensor(numpy.array([1, 2], dtype=numpy.uint8))
    assert t.dtype is tc.uint8
    q = tc.Tensor(numpy.array([0x38, 0x40], dtype=numpy.uint8), dtype=tc.fp8_e4m3)  # fp8 must be named
    assert q.dtype is tc.fp8_e4m3
    assert q.numpy().astype(numpy.float64).tolist() == [1.0, 2.0]  # e4m3 codes 0x38 = 1.0, 0x40 = 2.0
