"""The CuTe/CUTLASS compile path (nvrtc_cache + runtime.get_cute_kernel): CPU tests of header discovery, options,
the cache key, the on-disk cache (cold, warm, two processes at once) and the CuTe proof source; GPU tests (marked
gpu) of loading and launching cached cubins."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

from tessera_cp.backend import cuda_available
from tessera_cp.cuda import SOURCE_DIR, nvrtc_cache, runtime
from tessera_cp.errors import CompileError

gpu = pytest.mark.skipif(not cuda_available(), reason="needs a GPU and CuPy")

# The GPU machine may lack the CUTLASS/CCCL headers (they come with the cuda extras): its CuTe tests skip, saying so.
needs_cute = pytest.mark.skipif(not nvrtc_cache.headers_available(), reason="needs the CUTLASS/CuTe and CCCL "
                                "headers (pip install nvidia-cutlass 'nvidia-cuda-cccl<13.2')")
needs_nvrtc = pytest.mark.skipif(runtime.nvrtc() is None, reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")

REPO = Path(__file__).resolve().parents[2]


# ---- CPU: which sources take this path, and where the headers come from -------------------------------------

def test_uses_cute_looks_at_include_lines_only():
    assert nvrtc_cache.uses_cute('#include <cute/tensor.hpp>\n')
    assert nvrtc_cache.uses_cute('  #  include "cutlass/arch/barrier.h"\n')
    assert not nvrtc_cache.uses_cute('#include "common.cuh"\n// cute/tensor.hpp is not included here\n')
    assert nvrtc_cache.uses_cute((SOURCE_DIR / "tma_copy.cu").read_text())
    assert not nvrtc_cache.uses_cute((SOURCE_DIR / "norm.cu").read_text())


def _fake_cutlass(folder):
    (folder / "cute").mkdir(parents=True)
    (folder / "cutlass").mkdir(parents=True)
    (folder / "cute" / "tensor.hpp").write_text("")
    (folder / "cutlass" / "cutlass.h").write_text("")
    (folder / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 4\n")
    return folder


def _fake_cccl(folder):
    (folder / "cuda" / "std" / "__cccl").mkdir(parents=True)
    (folder / "cuda" / "std" / "type_traits").write_text("")
    (folder / "cuda" / "std" / "__cccl" / "version.h").write_text("#define CCCL_VERSION 3000001\n")
    return folder


def _fake_cuda(folder):
    folder.mkdir(parents=True)
    (folder / "cuda_runtime_api.h").write_text("#define CUDART_VERSION  13000\n")
    return folder


def test_cutlass_include_prefers_cutlass_path_then_the_wheel(tmp_path):
    checkout = _fake_cutlass(tmp_path / "checkout" / "include").parent
    wheel = tmp_path / "site" / "cutlass_library"
    wheel_inc = _fake_cutlass(wheel / "source" / "include")
    assert nvrtc_cache.find_cutlass_include(str(checkout), [wheel]) == checkout / "include"
    assert nvrtc_cache.find_cutlass_include(str(tmp_path / "nothing"), [wheel]) == wheel_inc
    assert nvrtc_cache.find_cutlass_include("", [tmp_path]) is None


def test_the_installed_wheel_is_found_without_importing_it():
    inc = nvrtc_cache.find_cutlass_include()
    if inc is None:
        pytest.skip("nvidia-cutlass is not installed")
    assert (inc / "cute" / "tensor.hpp").is_file()
    assert "cutlass_library" not in sys.modules


def test_cccl_include_beside_the_cuda_headers_or_from_the_pip_wheels(tmp_path):
    cuda13 = _fake_cuda(tmp_path / "cuda13" / "include")
    cccl13 = _fake_cccl(cuda13 / "cccl")
    assert nvrtc_cache.find_cccl_include(cuda13, nvidia_dirs=[]) == cccl13
    cuda12 = _fake_cuda(tmp_path / "cuda12" / "include")
    _fake_cccl(cuda12)
    assert nvrtc_cache.find_cccl_include(cuda12, nvidia_dirs=[]) == cuda12
    pip = tmp_path / "site" / "nvidia"
    pip12 = _fake_cccl(pip / "cuda_cccl" / "include")
    bare = _fake_cuda(tmp_path / "bare" / "include")
    assert nvrtc_cache.find_cccl_include(bare, nvidia_dirs=[pip]) == pip12
    assert nvrtc_cache.find_cccl_include(None, nvidia_dirs=[]) is None


def test_cute_options_name_every_folder_in_order(tmp_path):
    cutlass = _fake_cutlass(tmp_path / "cutlass")
    cuda = _fake_cuda(tmp_path / "cuda")
    cccl = _fake_cccl(cuda / "cccl")
    opts = nvrtc_cache.cute_options("sm_90a", (tmp_path,), cutlass, cuda, cccl)
    assert opts[:3] == ("-std=c++17", "-default-device", "-DNDEBUG") and opts[-1] == "-arch=sm_90a"
    assert [o for o in opts if o.startswith("-I")] == [f"-I{d}" for d in (tmp_path, SOURCE_DIR, cutlass, cuda, cccl)]


def test_missing_headers_are_a_compile_error_naming_the_packages(tmp_path):
    cuda = _fake_cuda(tmp_path / "cuda")
    with pytest.raises(CompileError) as info:
        nvrtc_cache.cute_options("sm_90a", (), tmp_path / "none", cuda, tmp_path / "none")
    message = str(info.value)
    assert "nvidia-cutlass" in message and "CUTLASS_PATH" in message and "nvidia-cuda-cccl" in message
    assert "nvidia-cuda-runtime" not in message
    with pytest.raises(CompileError, match="nvidia-cuda-runtime"):
        nvrtc_cache.cute_options("sm_90a", (), _fake_cutlass(tmp_path / "c"), tmp_path / "none",
                                 _fake_cccl(tmp_path / "cc"))


# ---- CPU: the cache's folder and key -----------------------------------------------------------------------

def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "a"))
    assert nvrtc_cache.cache_dir() == tmp_path / "a" / "cubin"
    monkeypatch.delenv("TESSERA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert nvrtc_cache.cache_dir() == tmp_path / "xdg" / "tessera_cp" / "cubin"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert nvrtc_cache.cache_dir() == tmp_path / "home" / ".cache" / "tessera_cp" / "cubin"


def test_cache_key_covers_every_input():
    base = dict(code="k", options=("-arch=sm_90a",), names=["a<1>"], nvrtc_version=(13, 0), our_headers="h",
                fingerprint="f")
    key = nvrtc_cache.cache_key(**base)
    assert key == nvrtc_cache.cache_key(**base) and len(key) == 64
    changed = [dict(base, code="k2"), dict(base, options=("-arch=sm_80",)), dict(base, names=["a<2>"]),
               dict(base, nvrtc_version=(13, 1)), dict(base, our_headers="h2"), dict(base, fingerprint="f2")]
    assert len({nvrtc_cache.cache_key(**c) for c in changed} | {key}) == len(changed) + 1
    swapped = [nvrtc_cache.cache_key(**dict(base, names=names)) for names in (["b", "a"], ["a", "b"])]
    assert swapped[0] == swapped[1]


def test_fingerprint_follows_the_third_party_header_versions(tmp_path):
    cutlass = _fake_cutlass(tmp_path / "cutlass")
    cuda = _fake_cuda(tmp_path / "cuda")
    cccl = _fake_cccl(cuda / "cccl")
    opts = ("-std=c++17", f"-I{cutlass}", f"-I{cuda}", f"-I{cccl}")
    before = nvrtc_cache.headers_fingerprint(opts)
    assert "cutlass/version.h" in before and "cuda/std/__cccl/version.h" in before and "cudart:13000" in before
    (cutlass / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 5\n")
    assert nvrtc_cache.headers_fingerprint(opts) != before


def test_a_failed_write_leaves_no_file(monkeypatch, tmp_path):
    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        nvrtc_cache._atomic_write(tmp_path / "x.cubin", b"data")
    assert list(tmp_path.iterdir()) == []


# ---- CPU: compiling through the cache (small sources, a few hundred ms each) -------------------------------

SMALL = r"""
#include "small_scale.cuh"
// tessera-instantiate: scale<float>
template <typename T> __global__ void scale(T *x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= T(SMALL_FACTOR);
}
extern "C" __global__ void scale_plain(float *x, int n) { scale<float>(x, n); }
"""


def _compile_small(tmp_path, names=("scale<float>", "scale_plain")):
    opts = runtime.BASE_OPTIONS + (f"-I{tmp_path}", "-arch=sm_80")
    return nvrtc_cache.compile_cached(SMALL, "small.cu", opts, names, (tmp_path,), tmp_path / "cache")


@needs_nvrtc
def test_cold_then_warm_and_an_edited_header_recompiles(tmp_path, caplog):
    (tmp_path / "small_scale.cuh").write_text("#define SMALL_FACTOR 2\n")
    caplog.set_level("INFO", logger="tessera_cp.cuda")
    cold = _compile_small(tmp_path)
    assert not cold.cached and cold.path.read_bytes()[:4] == b"\x7fELF"
    assert cold.lowered["scale_plain"] == "scale_plain" and cold.lowered["scale<float>"].startswith("_Z")
    meta = json.loads((cold.path.parent / f"{cold.key}.json").read_text())
    assert meta["binary"] == cold.path.name and meta["arch"] == "sm_80" and meta["lowered"] == cold.lowered
    warm = _compile_small(tmp_path)
    assert warm.cached and (warm.path, warm.lowered, warm.key) == (cold.path, cold.lowered, cold.key)
    assert any("(cold)" in r.message for r in caplog.records) and any("found in the cache" in r.message
                                                                      for r in caplog.records)
    (tmp_path / "small_scale.cuh").write_text("#define SMALL_FACTOR 3\n")
    edited = _compile_small(tmp_path)
    assert not edited.cached and edited.key != cold.key and edited.path != cold.path


@needs_nvrtc
def test_a_broken_entry_is_compiled_again(tmp_path):
    (tmp_path / "small_scale.cuh").write_text("#define SMALL_FACTOR 2\n")
    cold = _compile_small(tmp_path)
    cold.path.write_bytes(cold.path.read_bytes()[:100])  # a damaged binary: its size no longer matches
    again = _compile_small(tmp_path)
    assert not again.cached and again.path.read_bytes()[:4] == b"\x7fELF"
    (cold.path.parent / f"{cold.key}.json").write_text("{not json")
    assert not _compile_small(tmp_path).cached


@needs_nvrtc
def test_compile_errors_name_the_source_and_carry_the_log(tmp_path):
    opts = runtime.BASE_OPTIONS + ("-arch=sm_80",)
    with pytest.raises(CompileError) as info:
        nvrtc_cache.compile_cached("__global__ void k() { undefined_name; }", "broken.cu", opts, ("k",), (),
                                   tmp_path)
    assert "broken.cu" in str(info.value) and "undefined_name" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing cached


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tessera_cp.cuda import nvrtc_cache, runtime
    folder, go = Path(sys.argv[1]), Path(sys.argv[2])
    code = (folder / "small.cu").read_text()
    opts = runtime.BASE_OPTIONS + (f"-I{folder}", "-arch=sm_80")
    runtime.nvrtc().version()  # NVRTC loaded before the start signal, so both compile at the same moment
    while not go.exists():
        time.sleep(0.001)
    c = nvrtc_cache.compile_cached(code, "small.cu", opts, ["scale<float>"], (folder,), folder / "cache")
    print(json.dumps({"path": str(c.path), "cached": c.cached, "lowered": c.lowered}))
""")


@needs_nvrtc
def test_two_processes_compiling_the_same_key_at_once_get_one_valid_file(tmp_path):
    (tmp_path / "small_scale.cuh").write_text("#define SMALL_FACTOR 2\n")
    (tmp_path / "small.cu").write_text(SMALL)
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    import time
    time.sleep(1.0)  # both started and waiting
    go.write_text("")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"] and results[0]["lowered"] == results[1]["lowered"]
    binary = Path(results[0]["path"]).read_bytes()
    assert binary[:4] == b"\x7fELF" and b"scale" in binary
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and not any(name.endswith(".tmp") for name in files)  # one .json, one .cubin
    opts = runtime.BASE_OPTIONS + (f"-I{tmp_path}", "-arch=sm_80")
    again = nvrtc_cache.compile_cached(SMALL, "small.cu", opts, ["scale<float>"], (tmp_path,), tmp_path / "cache")
    assert again.cached and again.path.read_bytes() == binary


# ---- CPU: the CuTe proof source (the suite's one CuTe compile per architecture; cached on disk) ---------------

@needs_nvrtc
def test_the_cute_proof_source_compiles_for_sm_90a_with_its_tma_load():
    if nvrtc_cache.find_cutlass_include() is None:
        pytest.skip("nvidia-cutlass is not installed")
    cubin = runtime.compile_for_arch("tma_copy.cu", "sm_90a")  # compiled by test_compile_all too: a cache hit
    assert cubin[:4] == b"\x7fELF"
    code = (SOURCE_DIR / "tma_copy.cu").read_text()
    names = runtime.parse_instantiations(code)
    opts = nvrtc_cache.cute_options("sm_90a", (SOURCE_DIR,))
    entry = nvrtc_cache.compile_cached(code, "tma_copy.cu", opts, names, (SOURCE_DIR,))
    assert entry.cached and entry.path.read_bytes() == cubin
    for name in names:
        assert entry.lowered[name].encode() in cubin


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_without_nvrtc_cute_sources_compile_with_nvcc(monkeypatch):
    if nvrtc_cache.find_cutlass_include() is None:
        pytest.skip("nvidia-cutlass is not installed")
    monkeypatch.setattr(runtime, "nvrtc", lambda: None)
    cubin = runtime.compile_for_arch("tma_copy.cu", "sm_90a")
    assert cubin[:4] == b"\x7fELF" and b"tma_copy_2d" in cubin


# ---- GPU ---------------------------------------------------------------------------------------------------

CUTE_SCALE = r"""
#include <cute/tensor.hpp>
// tessera-instantiate: cute_scale<float>
template <typename T> __global__ void cute_scale(T *x, int n, T factor) {
    using namespace cute;
    Tensor t = make_tensor(make_gmem_ptr(x), make_shape(n));
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) t(i) *= factor;
}
"""


@pytest.mark.gpu
@gpu
@needs_cute
def test_a_cute_source_compiles_caches_loads_and_runs(monkeypatch, tmp_path):
    import cupy
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    kernel = runtime.compile_cute_source(CUTE_SCALE, "cute_scale<float>", filename="cute_scale.cu")
    assert runtime.compile_cute_source(CUTE_SCALE, "cute_scale<float>", filename="cute_scale.cu") is kernel
    x = cupy.random.standard_normal(1001, dtype=cupy.float32)
    expected = x * 3
    runtime.launch(kernel, 4, 128, (x, numpy.int32(1001), numpy.float32(3)))
    cupy.testing.assert_allclose(x, expected, rtol=0, atol=0)
    # A second instantiation, not listed in the source, rebuilds the module with both.
    kd = runtime.compile_cute_source(CUTE_SCALE, "cute_scale<double>", filename="cute_scale.cu")
    y = cupy.random.standard_normal(5, dtype=cupy.float64)
    expected = y * 0.5
    runtime.launch(kd, 1, 32, (y, numpy.int32(5), numpy.float64(0.5)))
    cupy.testing.assert_allclose(y, expected, rtol=0, atol=0)
    assert len(list((tmp_path / "cubin").glob("*.json"))) == 2


@pytest.mark.gpu
@gpu
@needs_cute
def test_get_cute_kernel_loads_the_proof_kernel_from_the_disk_cache(monkeypatch, tmp_path, caplog):
    def forget():  # as a new process would: only the disk cache is left
        for key in [k for k in runtime._modules if k[0] == "cute-file" and k[1] == "tma_copy.cu"]:
            del runtime._modules[key]

    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    caplog.set_level("INFO", logger="tessera_cp.cuda")
    forget()
    kernel = runtime.get_cute_kernel("tma_copy.cu", "tma_copy_2d<64, 64>")
    assert kernel.num_regs > 0 and kernel.local_size_bytes == 0
    forget()
    runtime.get_cute_kernel("tma_copy.cu", "tma_copy_2d<64, 64>")
    messages = [r.message for r in caplog.records]
    assert any("(cold)" in m for m in messages) and any("found in the cache" in m for m in messages)


@pytest.mark.gpu
@gpu
@needs_cute
def test_an_unknown_cute_kernel_is_a_compile_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    with pytest.raises(CompileError, match="cute_scale.cu"):
        runtime.compile_cute_source(CUTE_SCALE, "no_such_kernel<int>", filename="cute_scale.cu")
