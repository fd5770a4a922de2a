"""Programmatic dependent launch (Hopper): a kernel launched with it may start while the kernel before it in the
stream is still running, so its launch and its independent first work (prefetching weights) overlap that
kernel's tail. ``runtime.launch(..., pdl=True)`` comes here.

CuPy's launch takes no launch attributes, so this calls the driver's ``cuLaunchKernelEx`` through ctypes with
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` on CuPy's current stream; under stream capture the
graph gets a programmatic edge. The kernel must call ``tessera::pdl_wait()`` (common.cuh) before it reads
anything the previous kernel writes, and may call ``pdl_launch_dependents()`` to let the next one start early.
Each call marshals its arguments in Python (a few times CuPy's cost), so the decode step uses it only while a
CUDA graph is captured, where that cost is paid once.
"""
import ctypes

import numpy

from ..errors import TesseraError

PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CUlaunchAttributeID
MIN_COMPUTE_CAPABILITY = 90


class _LaunchValue(ctypes.Union):      # CUlaunchAttributeValue: a 64-byte union
    _fields_ = [("raw", ctypes.c_char * 64), ("flag", ctypes.c_int)]


class _LaunchAttribute(ctypes.Structure):   # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _LaunchValue)]


class _LaunchConfig(ctypes.Structure):      # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_C_TYPES = {numpy.dtype(numpy.int32): ctypes.c_int32, numpy.dtype(numpy.int64): ctypes.c_int64,
            numpy.dtype(numpy.uint32): ctypes.c_uint32, numpy.dtype(numpy.uint64): ctypes.c_uint64,
            numpy.dtype(numpy.float32): ctypes.c_float, numpy.dtype(numpy.float64): ctypes.c_double}


def kernel_params(args):
    """(void *[] of the arguments' addresses, the ctypes values it points at: keep them alive until the launch).
    Arrays (anything with ``.data.ptr``) pass their device pointer; NumPy scalars their value in their C type."""
    values = []
    for i, a in enumerate(args):
        if isinstance(a, numpy.generic) and a.dtype in _C_TYPES:
            values.append(_C_TYPES[a.dtype](a.item()))
        elif hasattr(a, "data") and hasattr(a.data, "ptr"):
            values.append(ctypes.c_void_p(a.data.ptr))
        else:
            raise TesseraError(f"argument {i} of a programmatic launch is a {type(a).__name__}; pass a CuPy array "
                               f"or a NumPy scalar of one of {sorted(d.name for d in _C_TYPES)}")
    params = (ctypes.c_void_p * max(1, len(values)))(*(ctypes.addressof(v) for v in values))
    return params, values


def launch_config(grid, block, shared_mem, stream_ptr):
    """(CUlaunchConfig, its attribute) for a programmatic launch; keep both alive until the launch."""
    attr = _LaunchAttribute()
    attr.id = PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.flag = 1
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                           ctypes.c_void_p(stream_ptr), ctypes.pointer(attr), 1)
    return config, attr


class _Driver:
    def __init__(self):
        try:
            lib = self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise TesseraError(f"a programmatic launch needs the NVIDIA driver (libcuda.so.1): {e}") from None
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p]
        lib.cuLaunchKernelEx.restype = ctypes.c_int
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorString.restype = ctypes.c_int

    def error_text(self, result):
        text = ctypes.c_char_p()
        self.lib.cuGetErrorString(result, ctypes.byref(text))
        return (text.value or b"?").decode()


_drivers = []


def launch(kernel, grid, block, args, shared_mem, stream_ptr):
    """cuLaunchKernelEx of a CuPy RawKernel (for the current device) with programmatic stream serialization.
    ``grid`` and ``block``: 3-tuples. Returns the CUresult (0 on success) and its text."""
    if not _drivers:
        _drivers.append(_Driver())
    driver = _drivers[0]
    params, values = kernel_params(args)
    config, attr = launch_config(grid, block, shared_mem, stream_ptr)
    result = driver.lib.cuLaunchKernelEx(ctypes.byref(config), ctypes.c_void_p(kernel.kernel.ptr), params, None)
    del values, attr   # alive until here
    return result, ("" if result == 0 else driver.error_text(result))
