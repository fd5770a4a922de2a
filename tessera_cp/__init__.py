"""tessera_cp: transformer building blocks on NVIDIA GPUs from plain Python (CuPy raw kernels; NumPy on the CPU)."""
from . import dtypes
from .autograd import Function, enable_grad, is_grad_enabled, no_grad
from .checkpoint import checkpoint, checkpoint_region
from .backend import cuda_available, default_device, info as _backend_info
from .dtypes import (DType, bf16, bool_, f16, f32, f64, finfo, fp8_e4m3, fp8_e5m2, iinfo, int8, int32, int64,
                     uint8)
from .errors import (CompileError, DeviceError, DTypeError, IndexOutOfRangeError, ShapeError, TesseraError)
from .kernel import kernel
from .precision import precision
from .shapes import Tile, function
from .tensor import (Generator, Tensor, arange, cat, empty, empty_like, eye, from_dlpack, full, full_like,
                     manual_seed, matmul, ones, ones_like, rand, rand_like, randint, randn, randn_like, stack, tensor,
                     where, zeros, zeros_like)

__version__ = "0.1.0"


def info():
    """Backend, device name, compute capability, CuPy and CUDA versions (a dict)."""
    return _backend_info()


def _method_as_function(name):
    def function(x, *args, **kwargs):
        return getattr(x if isinstance(x, Tensor) else tensor(x), name)(*args, **kwargs)
    function.__name__ = function.__qualname__ = name
    function.__doc__ = f"tessera_cp.{name}(x, ...) is x.{name}(...)."
    return function


# The seeds write tessera.sqrt(tessera.mean(x ** 2, dim=-1, keepdim=True)): the methods as functions.
for _name in ("exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "relu", "abs", "square", "clamp",
              "maximum", "minimum", "softmax", "log_softmax", "sum", "mean", "var", "std", "max", "min", "argmax",
              "argmin", "logsumexp", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "flatten",
              "chunk", "split", "gather", "masked_fill", "isnan", "isfinite"):
    globals()[_name] = _method_as_function(_name)
del _name


_MESH_NAMES = ("Mesh", "MeshTensor", "on_mesh", "mesh_reduce", "all_reduce", "all_gather", "reduce_scatter",
               "broadcast", "barrier", "ring_exchange", "distribute")


def __getattr__(name):
    # Later layers load on first use, so `import tessera_cp` stays light.
    import importlib
    if name in ("fp8", "quant", "nn", "comm", "cuda", "testing", "optim", "models"):
        return importlib.import_module("." + name, __name__)
    if name in _MESH_NAMES:  # the seeds' tessera.Mesh, tessera.mesh_reduce, ...
        return getattr(importlib.import_module(".comm", __name__), name)
    raise AttributeError(f"module 'tessera_cp' has no attribute {name!r}")
