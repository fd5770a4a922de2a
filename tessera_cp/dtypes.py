"""tessera_cp dtypes: f32, f16, bf16, fp8_e4m3, fp8_e5m2, int8, int32, int64, bool.

Each DType knows the NumPy/CuPy dtype its elements are stored in. bf16 is ``ml_dtypes.bfloat16`` on both
backends (CuPy 14 supports it). fp8 has no CuPy dtype, so fp8 tensors keep their bits in uint8 storage on both
backends and only casts (``tessera_cp.fp8``) and kernels interpret them.
"""
import ml_dtypes
import numpy

from .errors import DTypeError


class DType:
    __slots__ = ("name", "storage", "kind", "itemsize", "ml_type")

    def __init__(self, name, storage, kind, ml_type=None):
        self.name = name
        self.storage = numpy.dtype(storage)   # what the array holds
        self.kind = kind                      # 'float', 'fp8', 'int', 'bool'
        self.itemsize = self.storage.itemsize
        self.ml_type = numpy.dtype(ml_type) if ml_type is not None else self.storage  # true value type (CPU)

    @property
    def is_floating(self):
        return self.kind in ("float", "fp8")

    @property
    def is_fp8(self):
        return self.kind == "fp8"

    def __repr__(self):
        return f"tessera_cp.{self.name}"

    def __reduce__(self):
        return (as_dtype, (self.name,))


f32 = DType("f32", numpy.float32, "float")
f64 = DType("f64", numpy.float64, "float")
f16 = DType("f16", numpy.float16, "float")
bf16 = DType("bf16", ml_dtypes.bfloat16, "float")
fp8_e4m3 = DType("fp8_e4m3", numpy.uint8, "fp8", ml_dtypes.float8_e4m3fn)
fp8_e5m2 = DType("fp8_e5m2", numpy.uint8, "fp8", ml_dtypes.float8_e5m2)
int8 = DType("int8", numpy.int8, "int")
uint8 = DType("uint8", numpy.uint8, "int")
int32 = DType("int32", numpy.int32, "int")
int64 = DType("int64", numpy.int64, "int")
bool_ = DType("bool", numpy.bool_, "bool")

ALL = (f32, f64, f16, bf16, fp8_e4m3, fp8_e5m2, int8, uint8, int32, int64, bool_)
_BY_NAME = {d.name: d for d in ALL}
_BY_NAME.update({"float32": f32, "float": f32, "float64": f64, "double": f64, "float16": f16, "half": f16,
                 "bfloat16": bf16, "float8_e4m3fn": fp8_e4m3, "float8_e4m3": fp8_e4m3, "e4m3": fp8_e4m3,
                 "float8_e5m2": fp8_e5m2, "e5m2": fp8_e5m2, "bool_": bool_, "long": int64, "int": int64})
# Storage dtypes map back to one DType (uint8 storage means uint8, never fp8: fp8 must be named).
_BY_STORAGE = {d.storage: d for d in (f32, f64, f16, bf16, int8, uint8, int32, int64, bool_)}
_BY_STORAGE[numpy.dtype(numpy.int16)] = int32
_BY_STORAGE[numpy.dtype(ml_dtypes.float8_e4m3fn)] = fp8_e4m3
_BY_STORAGE[numpy.dtype(ml_dtypes.float8_e5m2)] = fp8_e5m2


def as_dtype(dtype):
    """A DType from a DType, a name ('bf16', 'float32'), a NumPy dtype or a Python type."""
    if isinstance(dtype, DType):
        return dtype
    if isinstance(dtype, str):
        if dtype in _BY_NAME:
            return _BY_NAME[dtype]
        raise DTypeError(f"unknown dtype name {dtype!r}; expected one of {sorted(_BY_NAME)}")
    if dtype is float:
        return f32
    if dtype is int:
        return int64
    if dtype is bool:
        return bool_
    try:
        np_dtype = numpy.dtype(dtype)
    except TypeError:
        raise DTypeError(f"expected a tessera_cp dtype, a dtype name or a NumPy dtype, got {dtype!r}") from None
    if np_dtype in _BY_STORAGE:
        return _BY_STORAGE[np_dtype]
    raise DTypeError(f"NumPy dtype {np_dtype} has no tessera_cp dtype; supported: {[d.name for d in ALL]}")


class finfo:
    """Limits of a floating dtype, like numpy.finfo: bits, eps, max, min, tiny (smallest normal), smallest_subnormal."""

    def __init__(self, dtype):
        dtype = as_dtype(dtype)
        if not dtype.is_floating:
            raise DTypeError(f"finfo expects a floating dtype, got {dtype.name}")
        info = ml_dtypes.finfo(dtype.ml_type)
        self.dtype = dtype
        self.bits = info.bits
        self.eps = float(info.eps)
        self.max = float(info.max)
        self.min = float(info.min)
        self.tiny = float(info.tiny)
        self.smallest_normal = self.tiny
        self.smallest_subnormal = float(info.smallest_subnormal)
        self.resolution = float(info.resolution)

    def __repr__(self):
        return f"finfo({self.dtype.name}, max={self.max}, eps={self.eps}, tiny={self.tiny})"


class iinfo:
    """Limits of an integer dtype, like numpy.iinfo."""

    def __init__(self, dtype):
        dtype = as_dtype(dtype)
        if dtype.kind != "int":
            raise DTypeError(f"iinfo expects an integer dtype, got {dtype.name}")
        info = numpy.iinfo(dtype.storage)
        self.dtype, self.bits, self.min, self.max = dtype, info.bits, int(info.min), int(info.max)


def promote(a, b):
    """The dtype of a binary op's result: NumPy's rule within floats and within integers, PyTorch's across them
    (the float's dtype wins), bf16 with f16 gives f32; fp8 must be cast first."""
    if a is b:
        return a
    if a.is_fp8 or b.is_fp8:
        raise DTypeError(f"fp8 tensors are storage only: cast to f32/bf16 before arithmetic (got {a.name} and {b.name})")
    if {a, b} == {bf16, f16}:
        return f32
    if a.is_floating != b.is_floating:  # an integer or bool operand takes the float's dtype (int32 + f32 is f32)
        return a if a.is_floating else b
    return as_dtype(numpy.promote_types(a.storage, b.storage))
