"""The backend switch: TESSERA_DEVICE (checked in fresh interpreters, since the choice is made once per process),
device names, the array-module helpers, info()."""
import os
import subprocess
import sys
import textwrap

import numpy
import pytest

import tessera_cp as tc
from tessera_cp import backend
from tessera_cp.errors import DeviceError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent("""
    import tessera_cp as tc
    try:
        t = tc.zeros(2)
        print("OK", t.device, tc.info()["backend"])
    except tc.TesseraError as e:
        print("ERROR", type(e).__name__, "|", e)
""")


def run_probe(device_env):
    env = dict(os.environ)
    if device_env is None:
        env.pop("TESSERA_DEVICE", None)
    else:
        env["TESSERA_DEVICE"] = device_env
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(backend.cuda_available(), reason="checks the error of a machine without a GPU")
def test_tessera_device_cuda_without_gpu_is_a_clear_device_error():
    out = run_probe("cuda")
    assert out.startswith("ERROR DeviceError |"), out
    message = out.split("|", 1)[1]
    assert "TESSERA_DEVICE=cuda" in message  # names the switch
    assert "CuPy" in message  # says why: no CuPy, or CuPy sees no GPU
    assert "TESSERA_DEVICE=cpu" in message  # and what to do


@pytest.mark.gpu
def test_tessera_device_cuda_with_a_gpu():
    pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("CuPy sees no GPU")
    assert run_probe("cuda") == "OK cuda cupy"
    assert run_probe("auto") == "OK cuda cupy"
    assert run_probe("cpu") == "OK cpu numpy"  # the override still wins on a GPU machine


@pytest.mark.parametrize("bogus", ["bogus", "tpu", "cuda1"])
def test_tessera_device_bogus_is_a_device_error(bogus):
    out = run_probe(bogus)
    assert out.startswith("ERROR DeviceError |"), out
    assert repr(bogus) in out and "cpu" in out and "cuda" in out  # what came and what is accepted


@pytest.mark.parametrize("setting", ["cpu", "CPU", " cpu "])
def test_tessera_device_cpu(setting):
    assert run_probe(setting) == "OK cpu numpy"


@pytest.mark.skipif(backend.cuda_available(), reason="auto picks the GPU where there is one")
@pytest.mark.parametrize("setting", [None, "", "auto"])
def test_auto_without_gpu_is_cpu(setting):
    assert run_probe(setting) == "OK cpu numpy"


def test_info_keys():
    info = tc.info()
    assert set(info) == {"backend", "numpy", "cupy", "device", "compute_capability", "cuda_runtime", "cuda_driver"}
    assert info["numpy"] == numpy.__version__
    if tc.default_device() == "cpu":
        assert info["backend"] == "numpy" and info["device"] == "cpu" and info["compute_capability"] is None
    else:  # pragma: no cover - GPU machines
        assert info["backend"] == "cupy" and isinstance(info["device"], str) and info["cuda_runtime"] > 0


def test_check_device_and_array_module():
    assert backend.check_device("cpu") == "cpu" and backend.check_device("CPU") == "cpu"
    assert backend.check_device(None) == backend.default_device()
    with pytest.raises(DeviceError, match="tpu"):
        backend.check_device("tpu")
    if not backend.cuda_available():
        for name in ("cuda", "cuda:0", "CUDA"):
            with pytest.raises(DeviceError, match="cuda"):
                backend.check_device(name)
        with pytest.raises(DeviceError):
            backend.xp_for("cuda")
    assert backend.xp_for("cpu") is numpy
    a = numpy.zeros(3)
    assert backend.array_module(a, a) is numpy and backend.array_module() is numpy
    assert not backend.is_cupy_array(a) and backend.device_of(a) == "cpu"
    assert backend.to_device(a, "cpu") is a
    assert isinstance(backend.cuda_available(), bool)


def test_add_at_accumulates_repeated_indices():
    target = numpy.zeros(4)
    backend.add_at(target, numpy.array([1, 1, 3, 1]), numpy.array([1.0, 2.0, 3.0, 4.0]))
    assert target.tolist() == [0, 7, 0, 3]
