"""TMA tensor maps (tessera_cp.cuda.tma): CPU tests of validation and argument packing; GPU tests (marked gpu) of
the driver call and of the CuTe proof kernel (tma_copy.cu) on odd shapes, checking that nothing outside the
destination is written."""
import ctypes

import ml_dtypes
import numpy
import pytest

from tessera_cp.backend import cuda_available
from tessera_cp.cuda import nvrtc_cache, runtime, tma
from tessera_cp.errors import DTypeError, ShapeError, TesseraError

gpu = pytest.mark.skipif(not cuda_available(), reason="needs a GPU and CuPy")

# The GPU machine may lack the CUTLASS/CCCL headers (they come with the cuda extras): its CuTe tests skip, saying so.
needs_cute = pytest.mark.skipif(not nvrtc_cache.headers_available(), reason="needs the CUTLASS/CuTe and CCCL "
                                "headers (pip install nvidia-cutlass 'nvidia-cuda-cccl<13.2')")
BF16 = numpy.dtype(ml_dtypes.bfloat16)
ADDR = 0x7F0000000000  # any 16-byte aligned address: validation never dereferences it


# ---- CPU: arguments in the driver's order ------------------------------------------------------------------

def test_axes_are_reversed_for_the_driver():
    a = tma.tiled_args(BF16, (1000, 24), (48, 2), ADDR, (64, 8))
    assert (a.dims, a.strides, a.box, a.element_strides) == ((24, 1000), (48,), (8, 64), (1, 1))
    assert a.data_type == 9 and a.rank == 2 and a.box_bytes == 64 * 8 * 2
    a = tma.tiled_args(numpy.float32, (2, 3, 5, 8), (480, 160, 32, 4), ADDR, (1, 2, 4, 8), element_strides=(1, 1, 2, 1),
                       swizzle=32, l2_promotion=256, oob_fill="nan")
    assert a.dims == (8, 5, 3, 2) and a.strides == (32, 160, 480) and a.box == (8, 4, 2, 1)
    assert a.element_strides == (1, 2, 1, 1) and (a.swizzle, a.l2_promotion, a.oob_fill) == (1, 3, 1)
    assert a.box_bytes == 8 * 4 * 2 * 1 * 4 // 2  # every other element along the strided axis


@pytest.mark.parametrize("dtype, code", [(BF16, 9), (numpy.float16, 6), (numpy.float32, 7), (numpy.float64, 8),
                                         (numpy.int8, 0), (numpy.uint8, 0), (numpy.int16, 1), (numpy.int32, 3),
                                         (numpy.uint32, 2), (numpy.int64, 5)])
def test_data_types(dtype, code):
    assert tma.data_type_of(dtype) == code


def test_unsupported_dtype():
    with pytest.raises(DTypeError, match="complex64"):
        tma.data_type_of(numpy.complex64)


def test_pack_gives_the_driver_arrays():
    a = tma.tiled_args(BF16, (1000, 24), (48, 2), ADDR, (64, 8))
    dims, strides, box, elem = tma.pack(a)
    assert list(dims) == [24, 1000] and list(strides) == [48] and list(box) == [8, 64] and list(elem) == [1, 1]
    assert ctypes.sizeof(dims) == 16 and ctypes.sizeof(box) == 8  # cuuint64_t and cuuint32_t
    one = tma.tiled_args(numpy.float32, (100,), (4,), ADDR, (32,))
    assert one.strides == () and list(tma.pack(one)[1]) == [0]


def test_a_size_one_axis_gets_a_valid_stride():
    a = tma.tiled_args(BF16, (1, 17), (34, 2), ADDR, (1, 8))  # CuPy reports 34: never used, but TMA wants 16k
    assert a.strides == (48,)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(shape=()), ShapeError, "1 to 5 dimensions"),
    (dict(shape=(1, 1, 1, 1, 1, 16), strides=(32,) * 5 + (2,), box=(1,) * 5 + (8,)), ShapeError, "1 to 5"),
    (dict(shape=(0, 16)), ShapeError, "dimension 0 .* 1 to 2\\*\\*32"),
    (dict(address=ADDR + 8), TesseraError, "16-byte aligned"),
    (dict(strides=(32, 4)), ShapeError, "last axis must be contiguous"),
    (dict(shape=(8, 17), strides=(34, 2)), ShapeError, "stride 34 .* multiple of 16"),
    (dict(strides=(-32, 2)), ShapeError, "stride -32"),
    (dict(strides=(2 ** 40, 2)), ShapeError, "below 2\\*\\*40"),
    (dict(box=(0, 8)), ShapeError, "box\\[0\\] is 0"),
    (dict(box=(257, 8)), ShapeError, "box\\[0\\] is 257"),
    (dict(box=(8, 4)), ShapeError, "spans 8 bytes"),
    (dict(box=(8,)), ShapeError, "box must have 2 entries"),
    (dict(box="ab"), ShapeError, "box"),
    (dict(element_strides=(9, 1)), ShapeError, "element_strides\\[0\\] is 9"),
    (dict(swizzle=16), TesseraError, "swizzle must be one of"),
    (dict(box=(8, 128), swizzle=128), ShapeError, "at most 128 bytes, got 256"),
    (dict(l2_promotion=32), TesseraError, "l2_promotion"),
    (dict(oob_fill="one"), TesseraError, "oob_fill"),
    (dict(dtype=numpy.int32, strides=(64, 4), oob_fill="nan"), DTypeError, "floating-point"),
])
def test_validation_errors_name_the_argument(kwargs, error, match):
    args = dict(dtype=BF16, shape=(8, 16), strides=(32, 2), address=ADDR, box=(8, 8))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        tma.tiled_args(args.pop("dtype"), args.pop("shape"), args.pop("strides"), args.pop("address"),
                       args.pop("box"), **args)


def test_tensor_map_param_is_128_bytes_passed_by_value():
    args = tma.tiled_args(BF16, (8, 16), (32, 2), ADDR, (8, 8))
    raw = bytes(range(128))
    owner = object()
    tmap = tma.TensorMap(raw, args, owner)
    assert isinstance(tmap.param, numpy.ndarray) and tmap.param.size == 1 and tmap.param.nbytes == 128
    assert tmap.param.tobytes() == raw and tmap.array is owner and tmap.box_bytes == 128
    assert "box=(8, 8)" in repr(tmap)
    with pytest.raises(TesseraError, match="128 bytes"):
        tma.TensorMap(b"\0" * 64, args, owner)


def test_encode_tiled_needs_a_device_array():
    with pytest.raises(TesseraError, match="CuPy array"):
        tma.encode_tiled(numpy.zeros((8, 16), dtype=BF16), (8, 8))


# ---- GPU: the driver call and the proof kernel -------------------------------------------------------------

def _poisoned(cp, rows, cols):
    return cp.full((rows, cols), numpy.nan, dtype=numpy.float32).astype(BF16)


def _copy(cp, src, box=(64, 64), dst_shape=None):
    """Run tma_copy_2d over src into a NaN-poisoned dst (larger than src when dst_shape says so)."""
    rows, cols = src.shape
    dst = _poisoned(cp, *(dst_shape or src.shape))
    kernel = runtime.get_cute_kernel("tma_copy.cu", f"tma_copy_2d<{box[0]}, {box[1]}>")
    tmap = tma.encode_tiled(src, box)
    grid = (-(-cols // box[1]), -(-rows // box[0]))
    runtime.launch(kernel, grid, 128, (tmap.param, dst, numpy.int32(rows), numpy.int32(cols),
                                       numpy.int64(dst.strides[0] // 2)))
    cp.cuda.get_current_stream().synchronize()
    return dst


def _check(cp, src, dst):
    rows, cols = src.shape
    got = dst.view(cp.uint16)
    assert bool((got[:rows, :cols] == src.view(cp.uint16)).all()), "the copy differs from the source"
    nan_bits = _poisoned(cp, 1, 1).view(cp.uint16)[0, 0]
    assert bool((got[rows:, :] == nan_bits).all()) and bool((got[:, cols:] == nan_bits).all()), \
        "the kernel wrote outside dst[:rows, :cols]"


@pytest.mark.gpu
@gpu
@needs_cute
@pytest.mark.parametrize("rows, cols, box", [(1, 8, (64, 64)), (17, 24, (64, 64)), (1000, 1000, (64, 64)),
                                             (4097, 72, (64, 64)), (65, 136, (32, 128)), (3, 4104, (32, 128))])
def test_tma_copy_matches_the_source_on_odd_shapes(rows, cols, box):
    import cupy as cp
    src = cp.random.standard_normal((rows, cols), dtype=cp.float32).astype(BF16)
    _check(cp, src, _copy(cp, src, box, dst_shape=(rows + 3, cols + 5)))  # dst rows not 16-byte multiples
    _check(cp, src, _copy(cp, src, box, dst_shape=(rows + 1, cols + 8 - cols % 8 + 8)))  # 16-byte rows


@pytest.mark.gpu
@gpu
@needs_cute
def test_tma_copy_of_a_padded_view_with_odd_columns():
    import cupy as cp
    base = cp.random.standard_normal((333, 48), dtype=cp.float32).astype(BF16)
    src = base[:, 8:25]  # 17 columns, rows 96 bytes apart, starting 16 bytes in
    _check(cp, src, _copy(cp, src, dst_shape=(335, 40)))
    with pytest.raises(ShapeError, match="multiple of 16"):
        tma.encode_tiled(cp.ascontiguousarray(src), (64, 64))  # 34-byte rows: TMA cannot describe them
    with pytest.raises(TesseraError, match="16-byte aligned"):
        tma.encode_tiled(base[:, 1:], (64, 64))


@pytest.mark.gpu
@gpu
def test_encode_tiled_calls_the_driver():
    import cupy as cp
    x = cp.zeros((256, 64), dtype=cp.float32)
    tmap = tma.encode_tiled(x, (32, 16), swizzle=64, oob_fill="nan")
    assert tmap.param.tobytes() != b"\0" * 128 and tmap.array is x
    with pytest.raises(TesseraError, match="cuTensorMapEncodeTiled"):
        bad = tma.tiled_args(x.dtype, x.shape, x.strides, x.data.ptr, (32, 16))
        tma._driver().encode_tiled(tma.TiledArgs(**{**bad.__dict__, "box": (16, 0)}))  # past our checks
