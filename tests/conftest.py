"""Test set-up: tensors default to the CPU (GPU tests ask for device='cuda' explicitly); `gpu` tests skip
without a usable GPU and `mpi` tests without mpi4py."""
import os

os.environ.setdefault("TESSERA_DEVICE", "cpu")

import pytest  # noqa: E402

from tessera_cp import backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU and CuPy")
    gpu_ok = backend.cuda_available()
    for item in items:
        if item.get_closest_marker("gpu") and not gpu_ok:
            item.add_marker(no_gpu)


@pytest.fixture
def rng():
    import numpy
    return numpy.random.default_rng(1234)
