"""TMA tensor maps built on the host: the 128-byte ``CUtensorMap`` a Hopper kernel's ``cp.async.bulk.tensor`` reads.

::

    from tessera_cp.cuda import runtime, tma
    tmap = tma.encode_tiled(x, box=(64, 64))          # x: a 2-D bf16 CuPy array; box in x's axis order
    kernel = runtime.get_cute_kernel("tma_copy.cu", "tma_copy_2d<64, 64>")
    runtime.launch(kernel, grid, 128, (tmap.param, y, numpy.int32(rows), numpy.int32(cols), numpy.int64(ld)))

The kernel takes the map by value: ``const __grid_constant__ CUtensorMap`` (``cute::TmaDescriptor`` under NVRTC,
an ``alignas(64)`` struct of 128 bytes). ``TensorMap.param`` is a one-element NumPy array of 128 raw bytes, which
CuPy's launch passes by value (it hands the driver a pointer to the array's data; the driver copies as many bytes
as the kernel's parameter has). A map holds the array's device address: build a new one for another array, and
keep the array alive while kernels use the map (``TensorMap.array`` does that).

Axis order: ``shape``, ``strides``, ``box`` and ``element_strides`` are given in NumPy order (outermost first);
the driver wants them innermost first, and ``tiled_args`` reverses them. ``tiled_args`` checks every rule of
``cuTensorMapEncodeTiled`` (CUDA 13 ``cuda.h``) that can fail for a plain tiled map, so a bad map is a
TesseraError naming the argument rather than ``CUDA_ERROR_INVALID_VALUE``; it needs no GPU. ``encode_tiled`` then
calls the driver through ctypes on ``libcuda.so.1``.
"""
import ctypes
from dataclasses import dataclass

import numpy

from ..errors import DTypeError, ShapeError, TesseraError

TENSOR_MAP_BYTES = 128
MAX_RANK = 5
MAX_BOX = 256

# CUtensorMapDataType. The copy is bitwise: signed 8/16-bit integers (int8, fp8 kept as uint8) travel as unsigned.
DATA_TYPES = {"uint8": 0, "int8": 0, "bool": 0, "uint16": 1, "int16": 1, "uint32": 2, "int32": 3, "uint64": 4,
              "int64": 5, "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
_FLOAT_TYPES = {6, 7, 8, 9}
SWIZZLES = {0: 0, 32: 1, 64: 2, 128: 3}        # bytes of the swizzle span -> CUtensorMapSwizzle
L2_PROMOTIONS = {0: 0, 64: 1, 128: 2, 256: 3}  # bytes -> CUtensorMapL2promotion
OOB_FILLS = {"zero": 0, "nan": 1}              # "nan": CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA


@dataclass(frozen=True)
class TiledArgs:
    """The arguments of cuTensorMapEncodeTiled, validated, in the driver's order (innermost dimension first)."""
    data_type: int
    address: int
    dims: tuple             # elements per dimension
    strides: tuple          # bytes, of dimensions 1 .. rank-1 (dimension 0 is contiguous)
    box: tuple              # elements per dimension of the box one copy moves
    element_strides: tuple
    swizzle: int = 0
    l2_promotion: int = 2
    oob_fill: int = 0
    interleave: int = 0     # CU_TENSOR_MAP_INTERLEAVE_NONE; the interleaved layouts are not offered

    @property
    def rank(self):
        return len(self.dims)

    @property
    def itemsize(self):
        return {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 5: 8, 6: 2, 7: 4, 8: 8, 9: 2}[self.data_type]

    @property
    def box_bytes(self):
        """Bytes one copy of the whole box writes to shared memory (what an mbarrier's expect_tx counts)."""
        n = self.itemsize * self.box[0]  # the innermost element stride is ignored (no interleave)
        for b, e in zip(self.box[1:], self.element_strides[1:]):
            n *= -(-b // e)
        return n


def data_type_of(dtype):
    """The CUtensorMapDataType of a NumPy dtype (ml_dtypes.bfloat16 included)."""
    name = numpy.dtype(dtype).name
    if name not in DATA_TYPES:
        raise DTypeError(f"a TMA tensor map has no data type for {name}; supported: {', '.join(DATA_TYPES)}")
    return DATA_TYPES[name]


def _ints(value, what, rank):
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ShapeError(f"{what} must be a sequence of {rank} ints, got {value!r}") from None
    if len(out) != rank:
        raise ShapeError(f"{what} must have {rank} entries (one per dimension of the tensor), got {value!r}")
    return out


def tiled_args(dtype, shape, strides, address, box, *, element_strides=None, swizzle=0, l2_promotion=128,
               oob_fill="zero"):
    """Validate a tiled tensor map and return its TiledArgs; no GPU needed.

    ``shape`` (elements), ``strides`` (bytes, as NumPy and CuPy report them), ``box`` (elements) and
    ``element_strides`` (1 to 8; default all 1) are in NumPy axis order. ``swizzle`` is the span in bytes (0, 32,
    64 or 128), ``l2_promotion`` in bytes (0, 64, 128 or 256), ``oob_fill`` "zero" or "nan" (float types only).
    """
    data_type = data_type_of(dtype)
    itemsize = numpy.dtype(dtype).itemsize
    shape = tuple(int(s) for s in shape)
    rank = len(shape)
    if not 1 <= rank <= MAX_RANK:
        raise ShapeError(f"a TMA tensor map describes 1 to {MAX_RANK} dimensions, got shape {shape}")
    strides = _ints(strides, "strides", rank)
    box = _ints(box, "box", rank)
    element_strides = (1,) * rank if element_strides is None else _ints(element_strides, "element_strides", rank)
    for i, n in enumerate(shape):
        if not 1 <= n <= 2 ** 32:
            raise ShapeError(f"dimension {i} of the tensor has {n} elements; TMA needs 1 to 2**32")
    if int(address) % 16:
        raise TesseraError(f"the tensor's address {int(address):#x} is not 16-byte aligned, as TMA needs")
    if shape[-1] > 1 and strides[-1] != itemsize:
        raise ShapeError(f"the last axis must be contiguous for TMA (stride {itemsize} bytes), got strides "
                         f"{strides}")
    strides = list(strides)
    for i in range(rank - 2, -1, -1):
        if shape[i] == 1:  # never stepped along: any valid stride will do (CuPy may report an odd one)
            strides[i] = max(16, -(-strides[i + 1] * shape[i + 1] // 16) * 16)
    strides = tuple(strides)
    for i, s in enumerate(strides[:-1]):
        if s <= 0 or s % 16 or s >= 2 ** 40:
            raise ShapeError(f"stride {s} bytes of axis {i} is not a positive multiple of 16 below 2**40, as TMA "
                             f"needs (strides {strides}, shape {shape}); pad the rows of the tensor to 16 bytes")
    for i, b in enumerate(box):
        if not 1 <= b <= MAX_BOX:
            raise ShapeError(f"box[{i}] is {b} elements; each box dimension must be 1 to {MAX_BOX}")
    if box[-1] * itemsize % 16:
        raise ShapeError(f"the box's last axis spans {box[-1] * itemsize} bytes ({box[-1]} x {itemsize}); TMA "
                         "needs a multiple of 16")
    for i, e in enumerate(element_strides):
        if not 1 <= e <= 8:
            raise ShapeError(f"element_strides[{i}] is {e}; each must be 1 to 8")
    if swizzle not in SWIZZLES:
        raise TesseraError(f"swizzle must be one of {sorted(SWIZZLES)} (bytes), got {swizzle!r}")
    if swizzle and box[-1] * itemsize > swizzle:
        raise ShapeError(f"with a {swizzle}-byte swizzle the box's last axis may span at most {swizzle} bytes, "
                         f"got {box[-1] * itemsize}")
    if l2_promotion not in L2_PROMOTIONS:
        raise TesseraError(f"l2_promotion must be one of {sorted(L2_PROMOTIONS)} (bytes), got {l2_promotion!r}")
    if oob_fill not in OOB_FILLS:
        raise TesseraError(f"oob_fill must be one of {sorted(OOB_FILLS)}, got {oob_fill!r}")
    if oob_fill == "nan" and data_type not in _FLOAT_TYPES:
        raise DTypeError(f"oob_fill='nan' needs a floating-point tensor, got {numpy.dtype(dtype).name}")
    return TiledArgs(data_type=data_type, address=int(address), dims=shape[::-1], strides=strides[-2::-1],
                     box=box[::-1], element_strides=element_strides[::-1], swizzle=SWIZZLES[swizzle],
                     l2_promotion=L2_PROMOTIONS[l2_promotion], oob_fill=OOB_FILLS[oob_fill])


def pack(args):
    """The ctypes arrays cuTensorMapEncodeTiled reads: (globalDim, globalStrides, boxDim, elementStrides)."""
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    strides = args.strides or (0,)  # rank 1: the driver reads no stride, but the pointer must be valid
    return ((u64 * args.rank)(*args.dims), (u64 * len(strides))(*strides), (u32 * args.rank)(*args.box),
            (u32 * args.rank)(*args.element_strides))


class _Driver:
    """cuInit and cuTensorMapEncodeTiled from libcuda.so.1, through ctypes."""

    def __init__(self):
        try:
            lib = self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise TesseraError(f"building a TMA tensor map needs the NVIDIA driver (libcuda.so.1): {e}") from None
        P, I, U = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
        lib.cuInit.argtypes, lib.cuInit.restype = [U], I
        lib.cuGetErrorString.argtypes, lib.cuGetErrorString.restype = [I, ctypes.POINTER(ctypes.c_char_p)], I
        lib.cuTensorMapEncodeTiled.argtypes = [P, I, U, P, P, P, P, P, I, I, I, I]
        lib.cuTensorMapEncodeTiled.restype = I
        self.check(lib.cuInit(0), "cuInit")

    def check(self, result, what):
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            raise TesseraError(f"{what} failed: error {result} ({(text.value or b'?').decode()})")

    def encode_tiled(self, args):
        buf = ctypes.create_string_buffer(2 * TENSOR_MAP_BYTES)
        base = ctypes.addressof(buf)
        ptr = base + (-base) % TENSOR_MAP_BYTES  # CUtensorMap is alignas(128)
        dims, strides, box, elem = pack(args)
        self.check(self.lib.cuTensorMapEncodeTiled(
            ptr, args.data_type, args.rank, args.address, dims, strides, box, elem, args.interleave, args.swizzle,
            args.l2_promotion, args.oob_fill), f"cuTensorMapEncodeTiled({args})")
        return ctypes.string_at(ptr, TENSOR_MAP_BYTES)


_driver_cache = []


def _driver():
    if not _driver_cache:
        _driver_cache.append(_Driver())
    return _driver_cache[0]


class TensorMap:
    """A CUtensorMap over one device array. Pass ``param`` among a kernel's arguments (by value)."""

    def __init__(self, raw, args, array):
        if len(raw) != TENSOR_MAP_BYTES:
            raise TesseraError(f"a tensor map has {TENSOR_MAP_BYTES} bytes, got {len(raw)}")
        self.param = numpy.frombuffer(bytes(raw), dtype=numpy.dtype((numpy.void, TENSOR_MAP_BYTES))).copy()
        self.args, self.array = args, array  # the array is kept alive: the map holds its address

    @property
    def box_bytes(self):
        return self.args.box_bytes

    def __repr__(self):
        return (f"TensorMap(dims={self.args.dims[::-1]}, box={self.args.box[::-1]}, "
                f"address={self.args.address:#x})")


def encode_tiled(array, box, *, element_strides=None, swizzle=0, l2_promotion=128, oob_fill="zero"):
    """A tiled TMA tensor map of a CuPy ``array`` (any rank 1-5, last axis contiguous, other strides multiples of
    16 bytes) with ``box`` in the array's axis order; see ``tiled_args`` for the other arguments."""
    if isinstance(array, numpy.ndarray) or not hasattr(array, "__cuda_array_interface__"):
        raise TesseraError(f"encode_tiled needs a CuPy array, got {type(array).__name__}")
    args = tiled_args(array.dtype, array.shape, array.strides, array.data.ptr, box, element_strides=element_strides,
                      swizzle=swizzle, l2_promotion=l2_promotion, oob_fill=oob_fill)
    return TensorMap(_driver().encode_tiled(args), args, array)


_params = {}  # (address, shape, strides, dtype, box, swizzle) -> the 128-byte kernel parameter
_PARAMS_KEPT = 512


def tensor_map_param(array, box, *, swizzle=0):
    """``encode_tiled(array, box, swizzle=swizzle).param``, kept per (address, shape, strides, dtype, box, swizzle):
    the map depends on nothing else, so a repeated call skips the checks and the driver call (tens of microseconds,
    several per attention call). Unlike a TensorMap, nothing keeps ``array`` alive: the caller must, while a kernel
    launched with the parameter may run (a launch on the array's stream does)."""
    key = (array.data.ptr, array.shape, array.strides, array.dtype.str, tuple(box), swizzle)
    param = _params.get(key)
    if param is None:
        if len(_params) >= _PARAMS_KEPT:
            _params.clear()
        param = _params[key] = encode_tiled(array, box, swizzle=swizzle).param
    return param
