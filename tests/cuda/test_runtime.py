"""The kernel runtime: CPU tests of its pure parts, and GPU tests (marked gpu) of compile, launch and errors."""
import numpy
import pytest

from tessera_cp.backend import cuda_available
from tessera_cp.cuda import SOURCE_DIR, runtime
from tessera_cp.errors import CompileError, TesseraError

gpu = pytest.mark.skipif(not cuda_available(), reason="needs a GPU and CuPy")


# ---- CPU: source conventions -------------------------------------------------------------------------------

def test_parse_instantiations_reads_every_line_and_keeps_commas_inside_templates():
    code = """
    // tessera-instantiate: rms_norm_fwd<float, 256>;  rms_norm_fwd<__nv_bfloat16,  256>
    __global__ void k() {}
    //tessera-instantiate: softmax<__half>; rms_norm_fwd<float, 256>;
    // a comment that mentions tessera-instantiate: not_this<int> is not a directive line
    """
    assert runtime.parse_instantiations(code) == [
        "rms_norm_fwd<float, 256>", "rms_norm_fwd<__nv_bfloat16, 256>", "softmax<__half>"]
    assert runtime.parse_instantiations("__global__ void k() {}") == []


def test_headers_hash_follows_nested_includes_and_changes_with_a_header(tmp_path):
    (tmp_path / "outer.cuh").write_text('#pragma once\n#include "inner.cuh"\n')
    (tmp_path / "inner.cuh").write_text("#define TESSERA_X 1\n")
    code = '#include <cuda_fp16.h>\n#include "outer.cuh"\n__global__ void k() {}\n'
    assert runtime.included_headers(code, (tmp_path,)) == [tmp_path / "inner.cuh", tmp_path / "outer.cuh"]
    before = runtime.headers_hash(code, (tmp_path,))
    assert before and before == runtime.headers_hash(code, (tmp_path,))
    (tmp_path / "inner.cuh").write_text("#define TESSERA_X 2\n")
    assert runtime.headers_hash(code, (tmp_path,)) != before
    assert runtime.headers_hash("#include <cuda_fp16.h>\n", (tmp_path,)) == ""


def test_headers_hash_covers_common_cuh():
    assert SOURCE_DIR / "common.cuh" in runtime.included_headers('#include "common.cuh"\n')


def test_sync_switch_parsing(monkeypatch):
    for text in ("1", "true", "YES", " on "):
        assert runtime.sync_enabled(text) is True
    for text in ("", "0", "false", "No", "off"):
        assert runtime.sync_enabled(text) is False
    with pytest.raises(TesseraError, match="TESSERA_SYNC"):
        runtime.sync_enabled("sometimes")
    monkeypatch.setenv("TESSERA_SYNC", "1")
    assert runtime.sync_enabled() is True
    monkeypatch.delenv("TESSERA_SYNC")
    assert runtime.sync_enabled() is False


def test_arch_for_uses_sm_90a_on_hopper():
    assert runtime.arch_for("90") == "sm_90a"
    assert runtime.arch_for("80") == "sm_80"
    assert runtime.arch_for("8.9") == "sm_89"


# ---- CPU: finding the CUDA headers and NVRTC ---------------------------------------------------------------

def _fake_include(folder):
    folder.mkdir(parents=True)
    (folder / "cuda_runtime_api.h").write_text("")
    return folder


def test_cuda_include_prefers_a_toolkit_and_falls_back_to_the_pip_headers(tmp_path):
    toolkit = tmp_path / "toolkit"
    targets = _fake_include(toolkit / "targets" / "x86_64-linux" / "include")
    pip = tmp_path / "site" / "nvidia"
    pip_inc = _fake_include(pip / "cu13" / "include")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runtime.find_cuda_include(roots=[empty, toolkit], nvidia_dirs=[pip]) == targets
    top = _fake_include(toolkit / "include")
    assert runtime.find_cuda_include(roots=[toolkit], nvidia_dirs=[pip]) == top
    assert runtime.find_cuda_include(roots=[empty], nvidia_dirs=[pip]) == pip_inc
    assert runtime.find_cuda_include(roots=[], nvidia_dirs=[]) is None


def test_toolkit_roots_honour_cuda_path_first(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "a"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "b"))
    roots = runtime.toolkit_roots()
    assert roots[:2] == [tmp_path / "a", tmp_path / "b"]


def test_nvcc_on_the_path_points_at_its_toolkit(monkeypatch, tmp_path):
    bin_dir = tmp_path / "cuda-x" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").write_text("#!/bin/sh\n")
    (bin_dir / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert runtime.toolkit_roots()[0] == tmp_path / "cuda-x"


def test_find_nvrtc_library_prefers_the_wheel(tmp_path):
    pip = tmp_path / "nvidia"
    (pip / "cu13" / "lib").mkdir(parents=True)
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc.alt.so.13"):
        (pip / "cu13" / "lib" / name).write_text("")
    toolkit = tmp_path / "toolkit"
    (toolkit / "lib64").mkdir(parents=True)
    (toolkit / "lib64" / "libnvrtc.so.12").write_text("")
    assert runtime.find_nvrtc_library([pip], [toolkit]) == str(pip / "cu13" / "lib" / "libnvrtc.so.13")
    assert runtime.find_nvrtc_library([], [toolkit]) == str(toolkit / "lib64" / "libnvrtc.so.12")
    assert runtime.find_nvrtc_library([], []) is None


def test_include_options_name_our_folder_and_the_cuda_headers():
    opts = runtime.include_options()
    assert opts[0] == f"-I{SOURCE_DIR}"
    if runtime.cuda_include() is not None:
        assert f"-I{runtime.cuda_include()}" in opts


# ---- CPU: launch refuses what would go wrong silently ------------------------------------------------------

@pytest.mark.parametrize("bad", [3, 2.5, True])
def test_launch_refuses_python_scalars(bad):
    with pytest.raises(TesseraError, match="argument 1 .*NumPy scalar"):
        runtime.launch(object(), 1, 32, (None, bad))


def test_launch_dims_accept_ints_tuples_lists_and_numpy_ints():
    assert runtime._dims(7, "grid") == (7,)
    assert runtime._dims((2, 3), "grid") == (2, 3)
    assert runtime._dims([numpy.int64(2), 3, numpy.int32(4)], "grid") == (2, 3, 4)
    assert runtime._dims(numpy.int64(5), "grid") == (5,)


@pytest.mark.parametrize("grid", [0, (), (1, 2, 3, 4), (2, -1), "x", None])
def test_launch_checks_grid(grid):
    with pytest.raises(TesseraError, match="grid"):
        runtime.launch(object(), grid, 32, ())


def test_launch_plans_build_once_per_key_and_clear_when_full():
    plans = runtime.LaunchPlans(kept=3)
    built = []

    def build(key):
        return lambda: built.append(key) or ("plan", key)

    assert plans.get("a", build("a")) == ("plan", "a")
    assert plans.get("a", build("a")) == ("plan", "a")
    assert built == ["a"]
    for key in "bc":
        plans.get(key, build(key))
    assert len(plans) == 3
    plans.get("d", build("d"))      # full: cleared, then d kept
    assert len(plans) == 1 and built == ["a", "b", "c", "d"]
    plans.get("a", build("a"))
    assert built[-1] == "a"


def test_launch_planned_calls_the_kernel_with_its_arguments_as_given(monkeypatch):
    monkeypatch.delenv("TESSERA_SYNC", raising=False)
    calls = []

    def kernel(grid, block, args, shared_mem=0):
        calls.append((grid, block, args, shared_mem))
    args = (None, numpy.int32(3))
    runtime.launch_planned(kernel, (4, 1, 1), (128, 1, 1), args, 1024)
    assert calls == [((4, 1, 1), (128, 1, 1), args, 1024)]


def test_launch_planned_in_sync_mode_is_launch_with_its_checks(monkeypatch):
    monkeypatch.setenv("TESSERA_SYNC", "1")
    with pytest.raises(TesseraError, match="argument 1 .*NumPy scalar"):
        runtime.launch_planned(object(), (1, 1, 1), (32, 1, 1), (None, 3))


def test_device_attributes_are_asked_once_and_give_the_compute_capability(monkeypatch):
    asked = []

    class FakeRuntime:
        @staticmethod
        def getDevice():
            return 1

        @staticmethod
        def deviceGetAttribute(attribute, device):
            asked.append((attribute, device))
            return {runtime.CC_MAJOR: 9, runtime.CC_MINOR: 0, runtime.SM_COUNT: 132}[attribute]

    class FakeCupy:
        class cuda:
            runtime = FakeRuntime

    monkeypatch.setattr(runtime, "_cupy", lambda: FakeCupy)
    monkeypatch.setattr(runtime, "_device_attributes", {})
    assert runtime.compute_capability() == 90 and runtime.compute_capability(1) == 90
    assert runtime.device_attribute(runtime.SM_COUNT) == 132 == runtime.device_attribute(runtime.SM_COUNT, 1)
    assert sorted(asked) == sorted([(runtime.CC_MAJOR, 1), (runtime.CC_MINOR, 1), (runtime.SM_COUNT, 1)])


# ---- GPU ---------------------------------------------------------------------------------------------------

AXPY = r"""
extern "C" __global__ void axpy(float a, const float *x, float *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""


@pytest.mark.gpu
@gpu
def test_compile_source_and_launch_axpy():
    import cupy
    rng = numpy.random.default_rng(0)
    x, y = rng.standard_normal(1000, dtype=numpy.float32), rng.standard_normal(1000, dtype=numpy.float32)
    dx, dy = cupy.asarray(x), cupy.asarray(y)
    kernel = runtime.compile_source(AXPY, "axpy", filename="axpy_test.cu")
    assert runtime.compile_source(AXPY, "axpy", filename="axpy_test.cu") is kernel  # kept, not rebuilt
    runtime.launch(kernel, (1000 + 255) // 256, 256, (numpy.float32(2.5), dx, dy, numpy.int32(1000)))
    expected = 2.5 * x.astype(numpy.float64) + y  # the GPU fuses a*x+y into one rounding
    numpy.testing.assert_allclose(dy.get(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@gpu
def test_launch_on_a_stream_with_large_dynamic_shared_memory():
    import cupy
    code = r"""
    extern "C" __global__ void reverse(const float *x, float *y, int n) {
        extern __shared__ float buf[];
        for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = x[i];
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = buf[n - 1 - i];
    }
    """
    n = 20000  # 80 KB of shared memory: past the 48 KiB a kernel gets without opting in
    x = cupy.arange(n, dtype=cupy.float32)
    y = cupy.full(n, cupy.nan, dtype=cupy.float32)
    kernel = runtime.compile_source(code, "reverse", filename="reverse_test.cu")
    stream = cupy.cuda.Stream(non_blocking=True)
    runtime.launch(kernel, 1, 256, (x, y, numpy.int32(n)), shared_mem=4 * n, stream=stream)
    stream.synchronize()
    numpy.testing.assert_array_equal(y.get(), numpy.arange(n, dtype=numpy.float32)[::-1])


@pytest.mark.gpu
@gpu
def test_template_kernel_through_get_kernel_with_our_header(monkeypatch, tmp_path):
    import cupy
    monkeypatch.setattr(runtime, "SOURCE_DIR", tmp_path)
    (tmp_path / "common.cuh").write_text((SOURCE_DIR / "common.cuh").read_text())
    (tmp_path / "rowsum_test.cu").write_text(r"""
    #include "common.cuh"
    // tessera-instantiate: row_sum<float, 128>
    // One block per row; every thread of the block gets the row's sum and max, thread 0 writes them.
    template <typename T, int BLOCK> __global__ void row_sum(const T *x, float *out, int cols) {
        const T *row = x + (long long)blockIdx.x * cols;
        float s = 0.f, m = tessera::neg_inf();
        for (int c = threadIdx.x; c < cols; c += BLOCK) {
            float v = tessera::load_float(row, c);
            s += v;
            m = fmaxf(m, v);
        }
        s = tessera::block_sum(s);
        m = tessera::block_max(m);
        if (threadIdx.x == 0) { out[2 * blockIdx.x] = s; out[2 * blockIdx.x + 1] = m; }
    }
    """)
    rng = numpy.random.default_rng(1)
    x = rng.standard_normal((7, 1001)).astype(numpy.float32)
    expected = numpy.stack([x.astype(numpy.float64).sum(1), x.max(1)], 1)
    for dtype, name, block in [(numpy.float32, "row_sum<float, 128>", 128),
                               (numpy.float16, "row_sum<__half, 256>", 256)]:  # the second is not listed
        kernel = runtime.get_kernel("rowsum_test.cu", name)
        xs = cupy.asarray(x.astype(dtype))
        out = cupy.full((7, 2), cupy.nan, dtype=cupy.float32)
        runtime.launch(kernel, 7, block, (xs, out, numpy.int32(1001)))
        ref = numpy.stack([x.astype(dtype).astype(numpy.float64).sum(1), x.astype(dtype).max(1)], 1)
        numpy.testing.assert_allclose(out.get(), ref, rtol=1e-5, atol=1e-3)
    first = runtime.get_kernel("rowsum_test.cu", "row_sum<float, 128>")  # still usable after the rebuild
    out = cupy.zeros((7, 2), dtype=cupy.float32)
    runtime.launch(first, 7, 128, (cupy.asarray(x), out, numpy.int32(1001)))
    numpy.testing.assert_allclose(out.get(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
@gpu
def test_an_edited_header_is_never_served_from_a_stale_binary(monkeypatch, tmp_path):
    import cupy
    monkeypatch.setattr(runtime, "SOURCE_DIR", tmp_path)
    (tmp_path / "value_test.cuh").write_text("#define TESSERA_TEST_VALUE 1\n")
    (tmp_path / "value_test.cu").write_text('#include "value_test.cuh"\n'
                                            'extern "C" __global__ void value(int *out) { *out = TESSERA_TEST_VALUE; }\n')
    out = cupy.zeros(1, dtype=cupy.int32)
    for expected in (1, 2):
        (tmp_path / "value_test.cuh").write_text(f"#define TESSERA_TEST_VALUE {expected}\n")
        monkeypatch.setattr(runtime, "_modules", {})  # as a new process would start: only CuPy's disk cache is left
        runtime.launch(runtime.get_kernel("value_test.cu", "value"), 1, 1, (out,))
        assert int(out.get()[0]) == expected


@pytest.mark.gpu
@gpu
def test_wmma_through_mma_h():
    import cupy
    code = r"""
    #include <mma.h>
    using namespace nvcuda;
    // One warp multiplies one 16x16x16 half tile into float.
    extern "C" __global__ void wmma_16(const __half *a, const __half *b, float *c) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
        wmma::fill_fragment(fc, 0.0f);
        wmma::load_matrix_sync(fa, a, 16);
        wmma::load_matrix_sync(fb, b, 16);
        wmma::mma_sync(fc, fa, fb, fc);
        wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
    }
    """
    rng = numpy.random.default_rng(2)
    a = rng.standard_normal((16, 16)).astype(numpy.float16)
    b = rng.standard_normal((16, 16)).astype(numpy.float16)
    c = cupy.full((16, 16), cupy.nan, dtype=cupy.float32)
    kernel = runtime.compile_source(code, "wmma_16", filename="wmma_test.cu")
    runtime.launch(kernel, 1, 32, (cupy.asarray(a), cupy.asarray(b), c))
    ref = a.astype(numpy.float64) @ b.astype(numpy.float64)
    numpy.testing.assert_allclose(c.get(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@gpu
def test_compile_error_names_the_file_and_carries_the_log():
    code = 'extern "C" __global__ void broken(float *x) { x[0] = undefined_name; }\n'
    with pytest.raises(CompileError) as info:
        runtime.compile_source(code, "broken", filename="broken_test.cu")
    assert "broken_test.cu" in str(info.value)
    assert "undefined_name" in str(info.value)


@pytest.mark.gpu
@gpu
def test_unknown_kernel_name_is_a_compile_error():
    with pytest.raises(CompileError, match="no_such_kernel"):
        runtime.compile_source(AXPY, "no_such_kernel", filename="axpy_test.cu")


@pytest.mark.gpu
@gpu
def test_sync_mode_turns_a_bad_launch_into_an_error_naming_the_kernel(monkeypatch):
    import cupy
    monkeypatch.setenv("TESSERA_SYNC", "1")
    kernel = runtime.compile_source(AXPY, "axpy", filename="axpy_test.cu")
    x = cupy.zeros(4, dtype=cupy.float32)
    with pytest.raises(TesseraError, match="axpy_test.cu:axpy"):
        runtime.launch(kernel, 1, 2048, (numpy.float32(1), x, x, numpy.int32(4)))  # 2048 threads: too many
    runtime.launch(kernel, 1, 32, (numpy.float32(1), x, x, numpy.int32(4)))  # the context is still sound
