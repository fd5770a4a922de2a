"""Every .cu source compiles for Ampere (sm_80) and Hopper (sm_90a, what the runtime uses on an H100), no GPU needed.

Sources are globbed at collection time, so a new .cu file is covered without touching this file. The template
instantiations compiled are those each source lists in its `// tessera-instantiate:` lines. Hopper-only code
(wgmma, TMA) must sit under `#if __CUDA_ARCH__ >= 900` so that the file still compiles for sm_80.
"""
import shutil

import pytest

from tessera_cp.cuda import SOURCE_DIR, runtime
from tessera_cp.errors import CompileError

ARCHS = ("sm_80", "sm_90a")
SOURCES = sorted(p.name for p in SOURCE_DIR.glob("*.cu"))

pytestmark = pytest.mark.skipif(runtime.nvrtc() is None and shutil.which("nvcc") is None,
                                reason="neither NVRTC (pip install nvidia-cuda-nvrtc) nor nvcc is installed")


def _is_cubin(binary):
    return binary[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_source_compiles(source, arch):
    assert _is_cubin(runtime.compile_for_arch(source, arch))


HELPERS = r"""
#include "common.cuh"
// tessera-instantiate: use_helpers<float>; use_helpers<__half>; use_helpers<__nv_bfloat16>
template <typename T> __global__ void use_helpers(const T *x, T *y, float *stats, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    float v = i < n ? tessera::load_float(x, i) : 0.0f;
    float s = tessera::block_sum(v), m = tessera::block_max(i < n ? v : tessera::neg_inf());
    float ws = tessera::warp_sum(v), wm = tessera::warp_max(v);
    if (i < n) tessera::store_float(y, i, v * s + ws - wm);
    if (threadIdx.x == 0) { stats[2 * blockIdx.x] = s; stats[2 * blockIdx.x + 1] = m; }
    (void)tessera::ceil_div(n, TESSERA_WARP_SIZE);
}
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_common_header_compiles_for_every_storage_type(tmp_path, arch):
    src = tmp_path / "helpers_test.cu"
    src.write_text(HELPERS)
    assert _is_cubin(runtime.compile_for_arch(None, arch, source_path=src))


def test_ptx_for_a_virtual_architecture(tmp_path):
    src = tmp_path / "helpers_test.cu"
    src.write_text(HELPERS)
    ptx = runtime.compile_for_arch(None, "compute_80", source_path=src)
    assert b".entry" in ptx and b"use_helpers" in ptx


BROKEN = 'extern "C" __global__ void broken(float *x) { x[0] = undefined_name; }\n'


def test_broken_source_raises_compile_error_naming_the_file(tmp_path):
    src = tmp_path / "broken_test.cu"
    src.write_text(BROKEN)
    with pytest.raises(CompileError) as info:
        runtime.compile_for_arch(None, "sm_80", source_path=src)
    message = str(info.value)
    assert "broken_test.cu" in message and "undefined_name" in message and "error" in message


def test_unknown_instantiation_is_a_compile_error(tmp_path):
    src = tmp_path / "helpers_test.cu"
    src.write_text(HELPERS)
    with pytest.raises(CompileError, match="helpers_test.cu"):
        runtime.compile_for_arch(None, "sm_80", name_expressions=("no_such_kernel<int>",), source_path=src)


def test_missing_source_is_a_compile_error():
    with pytest.raises(CompileError, match="no_such_file.cu"):
        runtime.compile_for_arch("no_such_file.cu", "sm_80")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_fallback_compiles_instantiations_and_reports_errors(tmp_path):
    src = tmp_path / "helpers_test.cu"
    src.write_text(HELPERS)
    options = runtime.BASE_OPTIONS + runtime.include_options((tmp_path,)) + ("-arch=sm_80",)
    ok, log, cubin = runtime._compile_with_nvcc(src, options, runtime.parse_instantiations(HELPERS))
    assert ok, log
    assert _is_cubin(cubin) and b"use_helpers" in cubin
    bad = tmp_path / "broken_test.cu"
    bad.write_text(BROKEN)
    ok, log, _ = runtime._compile_with_nvcc(bad, options, [])
    assert not ok and "broken_test.cu" in log and "undefined_name" in log
