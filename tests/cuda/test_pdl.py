"""Programmatic dependent launch (cuda/pdl.py): the driver structures and argument marshalling on the CPU; on a
Hopper GPU, a programmatic launch that reads what a slow kernel before it wrote, eagerly and in a CUDA graph."""
import ctypes

import numpy
import pytest

from tessera_cp.backend import cuda_available
from tessera_cp.cuda import pdl, runtime
from tessera_cp.errors import TesseraError


def test_driver_structures_have_the_c_layout():
    assert ctypes.sizeof(pdl._LaunchAttribute) == 72          # id, 4 bytes of padding, a 64-byte union
    assert pdl._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(pdl._LaunchConfig) == 56             # 7 uints, stream, attrs, numAttrs (padded)
    assert pdl._LaunchConfig.stream.offset == 32 and pdl._LaunchConfig.num_attrs.offset == 48
    config, attr = pdl.launch_config((3, 2, 1), (128, 1, 1), 4096, 0x1234)
    assert list(config.grid) == [3, 2, 1] and list(config.block) == [128, 1, 1] and config.shared_mem == 4096
    assert config.stream == 0x1234 and config.num_attrs == 1
    assert config.attrs.contents.id == pdl.PROGRAMMATIC_STREAM_SERIALIZATION and config.attrs.contents.value.flag == 1


class _FakeArray:
    class data:
        ptr = 0xDEAD0000


def test_kernel_params_point_at_each_value_in_its_c_type():
    args = (_FakeArray(), numpy.int32(-7), numpy.int64(1 << 40), numpy.float32(0.1), numpy.uint64(0))
    params, values = pdl.kernel_params(args)
    read = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64]
    got = [t.from_address(params[i]).value for i, t in enumerate(read)]
    assert got == [0xDEAD0000, -7, 1 << 40, numpy.float32(0.1), 0]


@pytest.mark.parametrize("bad", [3, 2.5, "x", numpy.float16(1)])
def test_kernel_params_refuse_what_has_no_c_type(bad):
    with pytest.raises(TesseraError, match="argument 1 of a programmatic launch"):
        pdl.kernel_params((_FakeArray(), bad))


SPIN_THEN_READ = r"""
#include "common.cuh"
extern "C" __global__ void slow_write(int *flag, long long spins) {
    long long t0 = clock64();
    while (clock64() - t0 < spins) {}
    flag[threadIdx.x] = 1000 + threadIdx.x;
}
extern "C" __global__ void read_after(const int *flag, int *out) {
    tessera::pdl_launch_dependents();
    tessera::pdl_wait();
    out[threadIdx.x] = flag[threadIdx.x] + 1;
}
"""


def _hopper():
    if not cuda_available():
        return False
    import cupy
    return int(cupy.cuda.Device().compute_capability) >= pdl.MIN_COMPUTE_CAPABILITY


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("in_graph", [False, True])
def test_programmatic_launch_waits_for_the_kernel_before(in_graph):
    import cupy
    slow = runtime.compile_source(SPIN_THEN_READ, "slow_write", filename="pdl_test.cu")
    after = runtime.compile_source(SPIN_THEN_READ, "read_after", filename="pdl_test.cu")
    flag, out = cupy.zeros(64, dtype=numpy.int32), cupy.full(64, -1, dtype=numpy.int32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        def run():
            runtime.launch(slow, 1, 64, (flag, numpy.int64(20_000_000)))   # ~10 ms at 2 GHz
            runtime.launch(after, 1, 64, (flag, out), pdl=True)
        if in_graph:
            stream.begin_capture()
            run()
            graph = stream.end_capture()
            graph.launch(stream)
        else:
            run()
        stream.synchronize()
    numpy.testing.assert_array_equal(cupy.asnumpy(out), numpy.arange(64) + 1001)
