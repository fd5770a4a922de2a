"""@tessera_cp.kernel: declarations, the argument checks made before any GPU is touched, the launch arguments
handed to the runtime (with a recording runtime and stand-in GPU arrays on the CPU), compiling the source for
sm_80/sm_90a without a GPU, and the real launches on a GPU."""
import importlib
import shutil
from typing import Optional

import numpy as np
import pytest

import tessera_cp
from tessera_cp import backend
from tessera_cp.cuda import runtime
from tessera_cp.dtypes import f32, f64, fp8_e4m3
from tessera_cp.errors import CompileError, DeviceError, DTypeError, ShapeError, TesseraError
from tessera_cp.kernel import Kernel, kernel
from tessera_cp.shapes import Tile
from tessera_cp.tensor import Tensor

kernel_module = importlib.import_module("tessera_cp.kernel")

SCALE_ROWS = r"""
// out[s, d] = x[s, d] * w[d]. One block per row; its threads stride over the row's D columns.
extern "C" __global__ void scale_rows(const float* __restrict__ x, const float* __restrict__ w,
                                      float* __restrict__ out, int S, int D) {
    const int s = blockIdx.x;
    if (s >= S) return;
    const size_t row = (size_t)s * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[row + d] = x[row + d] * w[d];
}
"""

# out[i] = a * x[i] (+ b[i] when b is not null). A template, so it is asked for as "axpb<float>".
AXPB = r"""
template <typename T>
__global__ void axpb(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ out, float a, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = a * (float)x[i];
    if (b != nullptr) v = v + (float)b[i];
    out[i] = (T)v;
}
"""


def make_scale_rows(**kw):
    @kernel(SCALE_ROWS, grid=lambda S: (S,), block=256, **kw)
    def scale_rows(x: Tile["S", "D", f32], w: Tile["D", f32], out: Tile["S", "D", f32], S: int, D: int):
        """out[s, d] = x[s, d] * w[d]"""
    return scale_rows


def make_axpb():
    # --fmad=false: a*x + b rounds twice, as NumPy's float32 a*x + b does, so the GPU test can ask for equality.
    @kernel(AXPB, name="axpb<float>", grid=lambda N: ((N + 255) // 256,), block=256, options=("--fmad=false",))
    def axpb(x: Tile["N", f32], b: Optional[Tile["N", f32]], out: Tile["N", f32], a: float, N: int):
        """out = a * x + b"""
    return axpb


def z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


# --------------------------------------------------------------------------------------------------------------
# Declaring a kernel (works anywhere)
# --------------------------------------------------------------------------------------------------------------

def test_public_name():
    assert tessera_cp.kernel is kernel


def test_declaration_keeps_name_doc_and_parameters():
    k = make_scale_rows()
    assert isinstance(k, Kernel)
    assert k.name == "scale_rows" and k.__name__ == "scale_rows" and k.__doc__ == "out[s, d] = x[s, d] * w[d]"
    assert [p.name for p in k.params] == ["x", "w", "out", "S", "D"]
    assert [p.ctype for p in k.params[3:]] == [np.int32, np.int32]
    assert k.params[0].spec == Tile["S", "D", f32]
    assert make_axpb().name == "axpb<float>"
    assert make_axpb().params[1].optional and make_axpb().params[3].ctype is np.float32


def test_scalar_annotations():
    @kernel("", grid=1, block=1)
    def k(a: int, b: float, c: bool, d: np.int64, e: np.float64, f: f64, g: np.uint32):
        pass

    assert [p.ctype for p in k.params] == [np.int32, np.float32, np.bool_, np.int64, np.float64, np.float64,
                                           np.uint32]


@pytest.mark.parametrize("annotation", [None, list, str, fp8_e4m3, np.complex64, "int64"])
def test_parameters_need_a_kernel_annotation(annotation):
    def k(x: Tile["N", f32], n):
        pass

    if annotation is not None:
        k.__annotations__["n"] = annotation
    with pytest.raises(TesseraError, match="parameter 'n' is annotated"):
        kernel("", grid=1)(k)


def test_star_arguments_and_bad_sources_are_refused():
    with pytest.raises(TesseraError, match=r"\*xs"):
        @kernel("", grid=1)
        def k(*xs: Tile["N"]):
            pass
    with pytest.raises(TesseraError, match="source must be CUDA C"):
        @kernel(b"bytes", grid=1)
        def k2(x: Tile["N"]):
            pass


@pytest.mark.parametrize("what, value", [("grid", (1, 2, 3, 4)), ("grid", ()), ("grid", -1), ("grid", 2.0),
                                         ("block", 2048), ("block", 0), ("block", (32, 64)), ("shared_mem", -1)])
def test_constant_launch_shapes_are_checked_when_declared(what, value):
    kw = {"grid": 1, "block": 1, what: value}
    with pytest.raises(ShapeError, match=what):
        @kernel("", **kw)
        def k(x: Tile["N"]):
            pass


def test_source_from_a_path(tmp_path):
    path = tmp_path / "scale_rows.cu"
    path.write_text(SCALE_ROWS)

    @kernel(path, grid=lambda S: S)
    def scale_rows(x: Tile["S", "D", f32], w: Tile["D", f32], out: Tile["S", "D", f32], S: int, D: int):
        pass

    assert scale_rows.source == SCALE_ROWS and scale_rows.filename == str(path)


# --------------------------------------------------------------------------------------------------------------
# Checks before any GPU is touched
# --------------------------------------------------------------------------------------------------------------

def test_no_gpu_raises_device_error():
    if backend.cuda_available():
        pytest.skip("this machine has a GPU")
    k = make_scale_rows()
    with pytest.raises(DeviceError, match="kernel scale_rows: launching a CUDA kernel needs a GPU"):
        k(z(3, 4), z(4), z(3, 4))
    with pytest.raises(DeviceError, match="needs a GPU"):
        k(Tensor(z(3, 4)), Tensor(z(4)), Tensor(z(3, 4)))


def test_wrong_dtype_raises_dtype_error():
    k = make_scale_rows()
    with pytest.raises(DTypeError, match=r"kernel scale_rows: argument 'x' must have dtype f32.*got float64"):
        k(z(3, 4, dtype=np.float64), z(4), z(3, 4))
    with pytest.raises(DTypeError, match=r"argument 'out' must have dtype f32.*got f64"):
        k(Tensor(z(3, 4)), Tensor(z(4)), Tensor(z(3, 4, dtype=np.float64)))


def test_wrong_shape_raises_shape_error():
    k = make_scale_rows()
    with pytest.raises(ShapeError, match=r"kernel scale_rows: argument 'w' of shape \(999,\).*dim 0 \('D'\) is 999, "
                                         r"but D=1000 from argument 'x'"):
        k(Tensor(z(17, 1000)), Tensor(z(999)), Tensor(z(17, 1000)))
    with pytest.raises(ShapeError, match=r"argument 'out'.*dim 0 \('S'\) is 16, but S=17"):
        k(z(17, 1000), z(1000), z(16, 1000))
    with pytest.raises(ShapeError, match=r"argument 'x' must have 2 dims"):
        k(z(1000), z(1000), z(16, 1000))


def test_explicit_int_must_agree_with_the_dimension_of_the_same_name():
    k = make_scale_rows()
    with pytest.raises(ShapeError, match=r"argument 'x'.*dim 1 \('D'\) is 1000, but D=999 from argument 'D'"):
        k(z(17, 1000), z(1000), z(17, 1000), D=999)


@pytest.mark.parametrize("value, message", [("17", "must be a scalar of type int32, got str"),
                                            (17.0, "must be a scalar of type int32, got float"),
                                            (True, "must be a scalar of type int32, got bool"),
                                            (2**31, "does not fit int32")])
def test_scalar_arguments_are_checked(value, message):
    with pytest.raises(DTypeError, match=message):
        make_scale_rows()(z(17, 4), z(4), z(17, 4), S=value)


def test_missing_and_extra_arguments():
    k = make_scale_rows()
    with pytest.raises(TypeError, match="missing argument 'out'"):
        k(z(3, 4), z(4))
    with pytest.raises(TypeError, match="kernel scale_rows"):
        k(z(3, 4), z(4), z(3, 4), 3, 4, 5)

    @kernel("", grid=1)
    def k2(x: Tile["N", f32], n: int):
        pass

    with pytest.raises(TypeError, match="missing argument 'n': no Tile argument has a dimension of that name"):
        k2(z(3))
    with pytest.raises(ShapeError, match="argument 'x' must be a Tensor or an array"):
        k2(None, 3)


# --------------------------------------------------------------------------------------------------------------
# What reaches the runtime: stand-in GPU arrays on the CPU, and a runtime that records its calls
# --------------------------------------------------------------------------------------------------------------

class FakeDevice:
    def __init__(self, id):
        self.id, self.entered = id, 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc):
        return False


class FakeGpuArray:
    """What the kernel reads of a CuPy array: shape, dtype, flags, strides, device."""

    def __init__(self, array, device):
        self.array, self.device = array, device
        self.shape, self.dtype, self.flags, self.strides = array.shape, array.dtype, array.flags, array.strides


class FakeGpuTensor:
    """What the kernel reads of a Tensor on the GPU: shape, dtype (a DType), device == 'cuda', data."""

    def __init__(self, array, dtype=f32, device=None, shape=None):
        self.data = FakeGpuArray(array, device or FakeDevice(0))
        self.shape = shape or array.shape
        self.dtype, self.device = dtype, "cuda"


class RecordingRuntime:
    def __init__(self):
        self.compiled, self.launched = [], []

    def compile_source(self, code, name, options=(), filename="<user>"):
        self.compiled.append((code, name, tuple(options), filename))
        return ("kernel", name)

    def launch(self, kernel, grid, block, args, shared_mem=0):
        self.launched.append((kernel, grid, block, tuple(args), shared_mem))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible 'GPU' and a recording runtime, so everything up to the launch runs here."""
    rt = RecordingRuntime()
    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    monkeypatch.setattr(kernel_module, "_runtime", lambda: rt)
    return rt


def test_launch_arguments_grid_and_block(fake_gpu):
    k = make_scale_rows()
    dev = FakeDevice(0)
    x, w, out = (FakeGpuTensor(z(*s), device=dev) for s in [(17, 1000), (1000,), (17, 1000)])
    k(x, w, out)
    assert len(fake_gpu.compiled) == 1
    code, name, options, filename = fake_gpu.compiled[0]
    assert code == SCALE_ROWS and name == "scale_rows" and options == ()
    assert "scale_rows" in filename and "test_kernel.py" in filename
    (handle, grid, block, args, shared_mem), = fake_gpu.launched
    assert handle == ("kernel", "scale_rows") and grid == (17,) and block == (256,) and shared_mem == 0
    assert args[0] is x.data and args[1] is w.data and args[2] is out.data
    assert type(args[3]) is np.int32 and args[3] == 17
    assert type(args[4]) is np.int32 and args[4] == 1000
    assert dev.entered == 1  # launched with the tensors' GPU current

    k(x, w, out, S=17)
    assert len(fake_gpu.compiled) == 1 and len(fake_gpu.launched) == 2  # compiled once per GPU


def test_template_name_options_optional_pointer_and_float_scalar(fake_gpu):
    k = make_axpb()
    x, out = FakeGpuTensor(z(1000)), FakeGpuTensor(z(1000))
    k(x, None, out, 0.5)
    code, name, options, _ = fake_gpu.compiled[0]
    assert name == "axpb<float>" and options == ("--fmad=false",)
    (_, grid, block, args, _), = fake_gpu.launched
    assert grid == (4,) and block == (256,)
    assert type(args[1]) is np.uintp and args[1] == 0 and args[1].itemsize == 8  # a null pointer, by value
    assert type(args[3]) is np.float32 and args[3] == 0.5
    assert type(args[4]) is np.int32 and args[4] == 1000


def test_callable_block_shared_mem_and_grid_of_scalars(fake_gpu):
    @kernel("", grid=lambda rows, **dims: (rows, dims["D"] // 32), block=lambda D: min(D, 128),
            shared_mem=lambda D: 4 * D)
    def k(x: Tile["S", "D"], rows: np.int64, flag: bool = True, eps: float = 1e-6):
        pass

    k(FakeGpuTensor(z(5, 64)), 3)
    (_, grid, block, args, shared_mem), = fake_gpu.launched
    assert grid == (3, 2) and block == (64,) and shared_mem == 256
    assert type(args[1]) is np.int64 and args[1] == 3
    assert type(args[2]) is np.bool_ and args[2]
    assert type(args[3]) is np.float32 and args[3] == np.float32(1e-6)


def test_grid_asking_for_an_unknown_name(fake_gpu):
    @kernel("", grid=lambda M: M)
    def k(x: Tile["N"]):
        pass

    with pytest.raises(ShapeError, match=r"grid asks for \['M'\].*known: \['N'\]"):
        k(FakeGpuTensor(z(3)))


def test_empty_tensors_launch_nothing(fake_gpu):
    k = make_scale_rows()
    k(FakeGpuTensor(z(0, 8)), FakeGpuTensor(z(8)), FakeGpuTensor(z(0, 8)))
    assert fake_gpu.launched == [] and fake_gpu.compiled == []


def test_dimension_too_large_for_int32(fake_gpu):
    @kernel("", grid=1)
    def k32(x: Tile["N", f32], N: int):
        pass

    @kernel("", grid=1)
    def k64(x: Tile["N", f32], N: np.int64):
        pass

    big = FakeGpuTensor(z(1), shape=(2**31,))  # only the shape is read: nothing that large is allocated
    with pytest.raises(DTypeError, match=r"N from argument 'x' = 2147483648 does not fit int32"):
        k32(big)
    k64(big)
    assert fake_gpu.launched[0][3][1] == 2**31 and type(fake_gpu.launched[0][3][1]) is np.int64


def test_cpu_tensors_next_to_gpu_ones_raise_device_error(fake_gpu):
    k = make_scale_rows()
    with pytest.raises(DeviceError, match=r"argument 'w' is on the CPU \(Tensor\); kernels need tensors on the GPU"):
        k(FakeGpuTensor(z(3, 4)), Tensor(z(4)), FakeGpuTensor(z(3, 4)))
    with pytest.raises(DeviceError, match=r"argument 'x' is on the CPU \(ndarray\)"):
        k(z(3, 4), FakeGpuTensor(z(4)), FakeGpuTensor(z(3, 4)))
    assert fake_gpu.launched == []


def test_tensors_on_two_gpus_raise_device_error(fake_gpu):
    k = make_scale_rows()
    with pytest.raises(DeviceError, match="argument 'out' is on GPU 1 but 'x' is on GPU 0"):
        k(FakeGpuTensor(z(3, 4)), FakeGpuTensor(z(4)), FakeGpuTensor(z(3, 4), device=FakeDevice(1)))


def test_non_contiguous_tensor_raises_shape_error(fake_gpu):
    k = make_scale_rows()
    strided = np.zeros((3, 8), np.float32)[:, ::2]
    with pytest.raises(ShapeError, match=r"argument 'x' of shape \(3, 4\) is not C-contiguous"):
        k(FakeGpuTensor(strided), FakeGpuTensor(z(4)), FakeGpuTensor(z(3, 4)))
    assert fake_gpu.launched == []


# --------------------------------------------------------------------------------------------------------------
# The sources compile for Ampere and Hopper without a GPU
# --------------------------------------------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(runtime.nvrtc() is None and shutil.which("nvcc") is None,
                                    reason="neither NVRTC (pip install nvidia-cuda-nvrtc) nor nvcc is installed")


@needs_compiler
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("make", [make_scale_rows, make_axpb])
def test_kernel_sources_compile(make, arch):
    assert make().compile_for_arch(arch)[:4] == b"\x7fELF"


@needs_compiler
def test_compile_error_names_the_kernel():
    @kernel('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }', grid=1)
    def broken(x: Tile["N", f32]):
        pass

    with pytest.raises(CompileError, match=r"broken\.cu.*undefined_name"):
        broken.compile_for_arch("sm_90a")


# --------------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------------

def _gpu():
    cupy = pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cupy


@pytest.mark.gpu
def test_scale_rows_on_gpu():
    cupy = _gpu()
    rng = np.random.default_rng(0)
    S, D = 17, 1000  # not multiples of the block (256)
    x = rng.standard_normal((S, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    xt, wt = Tensor(cupy.asarray(x)), Tensor(cupy.asarray(w))
    out = Tensor(cupy.full((S, D), np.nan, dtype=np.float32))
    make_scale_rows()(xt, wt, out)
    # The product of two floats is exact in float64, so rounding it once to float32 is the kernel's one rounding.
    expected = (x.astype(np.float64) * w.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(cupy.asnumpy(out.data), expected)


@pytest.mark.gpu
def test_template_kernel_with_null_pointer_on_gpu():
    cupy = _gpu()
    rng = np.random.default_rng(1)
    n, a = 1000, np.float32(0.75)
    x = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    axpb = make_axpb()
    out = Tensor(cupy.full(n, np.nan, dtype=np.float32))
    axpb(Tensor(cupy.asarray(x)), None, out, float(a))
    np.testing.assert_array_equal(cupy.asnumpy(out.data), a * x)
    out = Tensor(cupy.full(n, np.nan, dtype=np.float32))
    axpb(Tensor(cupy.asarray(x)), Tensor(cupy.asarray(b)), out, float(a))
    np.testing.assert_array_equal(cupy.asnumpy(out.data), a * x + b)  # two float32 roundings, fmad off


@pytest.mark.gpu
def test_gpu_checks_contiguity_and_device():
    cupy = _gpu()
    k = make_scale_rows()
    x = Tensor(cupy.zeros((3, 8), dtype=np.float32)[:, ::2])
    with pytest.raises(ShapeError, match="not C-contiguous"):
        k(x, Tensor(cupy.zeros(4, np.float32)), Tensor(cupy.zeros((3, 4), np.float32)))
    with pytest.raises(DeviceError, match="argument 'w' is on the CPU"):
        k(Tensor(cupy.zeros((3, 4), np.float32)), Tensor(z(4)), Tensor(cupy.zeros((3, 4), np.float32)))
