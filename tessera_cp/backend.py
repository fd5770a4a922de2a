"""Which array module runs the work: CuPy on a GPU, NumPy on the CPU.

One switch decides: CuPy when it imports and a GPU is visible, else NumPy; ``TESSERA_DEVICE=cpu|cuda`` overrides.
Nothing else in tessera_cp imports cupy directly except the kernel runtime (``tessera_cp.cuda``).
"""
import os

import numpy

from .errors import DeviceError

try:  # CuPy imports without a GPU; is_available() tells whether one is usable and never raises.
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None

DEVICES = ("cpu", "cuda")


def cuda_available():
    """True when CuPy imports and at least one GPU is visible."""
    if _cupy is None:
        return False
    try:
        return bool(_cupy.is_available())
    except Exception:  # pragma: no cover
        return False


def _choose_default_device():
    asked = os.environ.get("TESSERA_DEVICE", "").strip().lower()
    if asked in ("", "auto"):
        return "cuda" if cuda_available() else "cpu"
    if asked not in DEVICES:
        raise DeviceError(f"TESSERA_DEVICE must be one of {DEVICES} or 'auto', got {asked!r}")
    if asked == "cuda" and not cuda_available():
        why = "CuPy is not installed" if _cupy is None else "CuPy sees no GPU"
        raise DeviceError(f"TESSERA_DEVICE=cuda asks for a GPU, but {why}; use TESSERA_DEVICE=cpu")
    return asked


_default_device = None


def default_device():
    """The device new tensors go to: 'cuda' or 'cpu'."""
    global _default_device
    if _default_device is None:
        _default_device = _choose_default_device()
    return _default_device


def check_device(device):
    """Normalise a device name ('cpu', 'cuda', 'cuda:0', None for the default) and check it is usable."""
    if device is None:
        return default_device()
    name = str(device).lower()
    if name.startswith("cuda"):
        name = "cuda"
    if name not in DEVICES:
        raise DeviceError(f"device must be one of {DEVICES}, got {device!r}")
    if name == "cuda" and not cuda_available():
        raise DeviceError("device 'cuda' was asked for, but no GPU is usable here (no CuPy or no visible GPU)")
    return name


def xp_for(device):
    """The array module of a device: cupy for 'cuda', numpy for 'cpu'."""
    return _cupy if check_device(device) == "cuda" else numpy


def is_cupy_array(array):
    return _cupy is not None and isinstance(array, _cupy.ndarray)


def device_of(array):
    return "cuda" if is_cupy_array(array) else "cpu"


def array_module(*arrays):
    """cupy if any argument is a CuPy array, else numpy (the chainer/cupy get_array_module rule)."""
    for a in arrays:
        if is_cupy_array(a):
            return _cupy
    return numpy


def to_device(array, device):
    """Move an array to 'cpu' (NumPy) or 'cuda' (CuPy); a no-op when it is already there."""
    device = check_device(device)
    if device == "cuda":
        return array if is_cupy_array(array) else _cupy.asarray(array)
    return _cupy.asnumpy(array) if is_cupy_array(array) else numpy.asarray(array)


def synchronize():
    if default_device() == "cuda":
        _cupy.cuda.get_current_stream().synchronize()


def info():
    """Backend, device name, compute capability, CuPy and CUDA versions, as a dict."""
    out = {"backend": "cupy" if default_device() == "cuda" else "numpy", "numpy": numpy.__version__,
           "cupy": getattr(_cupy, "__version__", None), "device": "cpu", "compute_capability": None,
           "cuda_runtime": None, "cuda_driver": None}
    if default_device() == "cuda":
        dev = _cupy.cuda.Device()
        props = _cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        out.update(device=name.decode() if isinstance(name, bytes) else name,
                   compute_capability=dev.compute_capability,
                   cuda_runtime=_cupy.cuda.runtime.runtimeGetVersion(),
                   cuda_driver=_cupy.cuda.runtime.driverGetVersion())
    return out


def add_at(target, key, values):
    """target[key] += values, accumulating repeated indices (numpy.add.at; cupyx.scatter_add on the GPU)."""
    if not is_cupy_array(target):
        numpy.add.at(target, key, values)
        return
    import cupyx
    if target.dtype.itemsize < 4:  # atomics on 16-bit floats are not everywhere: accumulate in f32
        wide = target.astype(numpy.float32)
        cupyx.scatter_add(wide, key, values.astype(numpy.float32))
        target[...] = wide.astype(target.dtype)
    else:
        cupyx.scatter_add(target, key, values)


def reference_forced():
    """``TESSERA_REFERENCE=1`` forces the array-module reference of every op (no kernels), for debugging."""
    return os.environ.get("TESSERA_REFERENCE", "").strip() == "1"
