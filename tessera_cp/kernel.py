"""Your own CUDA C++ kernels on Tensors: ``@tessera_cp.kernel``, the machinery the built-in ops use, made public.

The decorated Python function declares the kernel's parameters, in order, and its body is never run::

    SRC = r'''
    extern "C" __global__ void scale_rows(const float* x, const float* w, float* out, int S, int D) {
        const int s = blockIdx.x;                     // one block per row
        for (int d = threadIdx.x; d < D; d += blockDim.x) out[(size_t)s * D + d] = x[(size_t)s * D + d] * w[d];
    }
    '''

    @tessera_cp.kernel(SRC, grid=lambda S: (S,), block=256)
    def scale_rows(x: Tile["S", "D", f32], w: Tile["D", f32], out: Tile["S", "D", f32], S: int, D: int):
        "out[s, d] = x[s, d] * w[d]"

    scale_rows(x, w, out)   # S and D come from the shapes; shapes, dtypes and devices are checked; then it launches

Parameters, one per kernel parameter:

* ``Tile[...]`` / ``Tensor[...]`` (or ``Optional[...]``): a pointer. The argument is a Tensor (or CuPy array) on the
  GPU, C-contiguous, on the same GPU as the other tensors; its shape and dtype are checked like ``@function`` does
  (names bind across arguments, expressions such as ``"D/2"``). Its ``.data`` is passed. ``None`` for an
  ``Optional`` one passes a null pointer.
* ``int`` -> ``int32``, ``float`` -> ``float32``, ``bool`` -> ``bool``, or a NumPy scalar type (``numpy.int64``,
  ``numpy.float64``, ...) for other C types. An int parameter left out takes the size of the dimension of the
  same name; one passed explicitly is checked against that dimension.

``grid``, ``block`` and ``shared_mem`` are ints, tuples, or callables whose parameter names are dimension names or
scalar parameters (``grid=lambda S, D: (S, (D + 255) // 256)``). A grid with a zero in it launches nothing (empty
tensors). ``name`` is the kernel's name in the source (default: the function's), a template instantiation such as
``"k<float, 128>"`` included; ``options`` go to NVRTC; ``source`` may be a ``pathlib.Path`` to a ``.cu`` file.
The source compiles on first call (once per GPU); ``compile_for_arch("sm_90a")`` compiles it without a GPU.
Defining a kernel works anywhere; calling one without a GPU raises DeviceError.
"""
import contextlib
import functools
import inspect
import numbers
import os
import tempfile
from pathlib import Path

import numpy

from . import backend
from .dtypes import DType
from .errors import DeviceError, DTypeError, ShapeError, TesseraError
from .shapes import Bindings, resolved_signature, spec_of

__all__ = ["kernel", "Kernel"]

_PYTHON_SCALARS = {int: numpy.int32, float: numpy.float32, bool: numpy.bool_}
_CUPY_SCALAR_CHARS = "?bhilqBHILQefd"  # the NumPy scalar types CuPy passes to kernels by value
_MAX_THREADS_PER_BLOCK = 1024
_NULL = numpy.uintp(0)  # the null pointer an Optional Tile argument of None passes


def _runtime():
    from .cuda import runtime  # imported on first launch: defining a kernel needs no CUDA at all
    return runtime


def kernel(source, *, grid, block=256, shared_mem=0, name=None, options=()):
    """Decorator: declare a kernel of ``source`` (CUDA C++ text or a Path) by a Python signature; see the module doc."""
    def decorate(fn):
        return Kernel(fn, source, grid=grid, block=block, shared_mem=shared_mem, name=name, options=options)
    return decorate


class _Param:
    __slots__ = ("name", "spec", "optional", "ctype", "default")

    def __init__(self, name, spec=None, optional=False, ctype=None, default=inspect.Parameter.empty):
        self.name, self.spec, self.optional, self.ctype, self.default = name, spec, optional, ctype, default


def _scalar_type(annotation):
    """The NumPy scalar type a scalar parameter is passed as, or None when the annotation is not a scalar one."""
    if isinstance(annotation, type) and annotation in _PYTHON_SCALARS:
        return _PYTHON_SCALARS[annotation]
    if isinstance(annotation, DType):
        annotation = annotation.storage.type if not annotation.is_fp8 else None
    if isinstance(annotation, type) and issubclass(annotation, numpy.generic):
        if numpy.dtype(annotation).char in _CUPY_SCALAR_CHARS:
            return annotation
    return None


class Kernel:
    """A CUDA kernel of user source, launched on Tensors with checked shapes; made by ``@tessera_cp.kernel``."""

    def __init__(self, fn, source, *, grid, block=256, shared_mem=0, name=None, options=()):
        functools.update_wrapper(self, fn)
        self.name = name or fn.__name__
        self._where = f"kernel {self.name}"
        if isinstance(source, os.PathLike):
            self.source_path = Path(source)
            self.source = self.source_path.read_text()
            self.filename = str(self.source_path)
        elif isinstance(source, str):
            self.source_path = None
            self.source = source
            code = getattr(fn, "__code__", None)
            self.filename = (f"@kernel {fn.__qualname__} ({os.path.basename(code.co_filename)}:"
                             f"{code.co_firstlineno})" if code else f"@kernel {self.name}")
        else:
            raise TesseraError(f"{self._where}: source must be CUDA C++ text or a pathlib.Path, "
                               f"got {type(source).__name__}")
        self.options = tuple(options)
        self.grid, self.block, self.shared_mem = grid, block, shared_mem
        self._signature = resolved_signature(fn)
        self.params = []
        for p in self._signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TesseraError(f"{self._where}: *{p.name} cannot map to kernel parameters; list each one")
            spec, optional = spec_of(p.annotation)
            if spec is not None:
                self.params.append(_Param(p.name, spec=spec, optional=optional or p.default is None,
                                          default=p.default))
                continue
            ctype = _scalar_type(p.annotation)
            if ctype is None:
                raise TesseraError(
                    f"{self._where}: parameter {p.name!r} is annotated {p.annotation!r}; annotate each parameter "
                    f"with Tile[...] (a pointer), int, float, bool or a NumPy scalar type such as numpy.int64")
            self.params.append(_Param(p.name, ctype=ctype, default=p.default))
        self._dim_names = {n for p in self.params if p.spec is not None for n in p.spec.names}
        for what in ("grid", "block", "shared_mem"):
            if not callable(getattr(self, what)):  # a constant: check it now, not at the first launch
                self._launch_value(what, {})
        self._compiled = {}  # device id -> kernel from the runtime

    def __repr__(self):
        return f"<tessera_cp.kernel {self.name}{self._signature}>"

    # ------------------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        try:
            given = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError as e:
            raise TypeError(f"{self._where}: {e}") from None
        shapes = Bindings(self._where)
        scalars = {}
        for p in self.params:  # explicit scalars first: an int named like a dimension must agree with it
            if p.spec is None and p.name in given:
                scalars[p.name] = self._scalar(p, given[p.name], f"argument {p.name!r}")
                if p.name in self._dim_names and numpy.dtype(p.ctype).kind in "iu":
                    shapes.bind(p.name, int(scalars[p.name]), f"argument {p.name!r}")
        tensors = []
        for p in self.params:
            if p.spec is None:
                continue
            value = given.get(p.name, p.default)
            if value is inspect.Parameter.empty:
                raise TypeError(f"{self._where}: missing argument {p.name!r} ({p.spec!r})")
            shapes.check(f"argument {p.name!r}", value, p.spec, p.optional)
            tensors.append((p.name, value))
        shapes.finish()
        for p in self.params:
            if p.spec is None and p.name not in scalars:
                if p.name in shapes.sizes:
                    scalars[p.name] = self._scalar(p, shapes.sizes[p.name], f"{p.name} from {shapes.origin[p.name]}")
                elif p.default is not inspect.Parameter.empty:
                    scalars[p.name] = self._scalar(p, p.default, f"the default of {p.name!r}")
                else:
                    raise TypeError(f"{self._where}: missing argument {p.name!r}: no Tile argument has a "
                                    f"dimension of that name to take it from")
        arrays, device = self._device_arrays(tensors)

        env = dict(shapes.sizes)
        env.update((k, v.item()) for k, v in scalars.items())
        grid = self._launch_value("grid", env)
        block = self._launch_value("block", env)
        shared_mem = self._launch_value("shared_mem", env)
        if 0 in grid:
            return None  # empty tensors: nothing to do
        launch_args = tuple(arrays[p.name] if p.spec is not None else scalars[p.name] for p in self.params)
        runtime = _runtime()
        with device if device is not None else contextlib.nullcontext():  # compile for, launch on the tensors' GPU
            key = getattr(device, "id", None)
            kern = self._compiled.get(key)
            if kern is None:
                kern = self._compiled[key] = runtime.compile_source(self.source, self.name, options=self.options,
                                                                    filename=self.filename)
            runtime.launch(kern, grid, block, launch_args, shared_mem=shared_mem)
        return None

    def _scalar(self, p, value, origin):
        kind = numpy.dtype(p.ctype).kind
        wanted = {"b": (bool, numpy.bool_), "f": numbers.Real}.get(kind, numbers.Integral)
        if not isinstance(value, wanted) or (kind != "b" and isinstance(value, (bool, numpy.bool_))):
            raise DTypeError(f"{self._where}: {origin} must be a scalar of type {numpy.dtype(p.ctype).name}, "
                             f"got {type(value).__name__} {value!r:.60}")
        if kind in "iu":
            info = numpy.iinfo(p.ctype)
            if not info.min <= int(value) <= info.max:
                raise DTypeError(f"{self._where}: {origin} = {int(value)} does not fit {numpy.dtype(p.ctype).name}; "
                                 f"annotate it numpy.int64 and take a long long in the kernel")
        return p.ctype(value)

    def _device_arrays(self, tensors):
        """The CuPy array of each tensor argument, and the GPU they share; DeviceError/ShapeError otherwise."""
        if not backend.cuda_available():
            raise DeviceError(f"{self._where}: launching a CUDA kernel needs a GPU, and none is usable here "
                              f"(no CuPy, or CuPy sees no GPU)")
        arrays, device, first = {}, None, None
        for name, value in tensors:
            if value is None:
                arrays[name] = _NULL  # a pointer-sized zero by value (older CuPy turns None into no value)
                continue
            if isinstance(value, numpy.ndarray):
                array, on_gpu = value, False
            elif backend.is_cupy_array(value):
                array, on_gpu = value, True
            else:
                array, on_gpu = value.data, getattr(value, "device", None) == "cuda"
            if not on_gpu:
                raise DeviceError(f"{self._where}: argument {name!r} is on the CPU ({type(value).__name__}); "
                                  f"kernels need tensors on the GPU (device 'cuda')")
            if not array.flags.c_contiguous:
                raise ShapeError(f"{self._where}: argument {name!r} of shape {tuple(value.shape)} is not "
                                 f"C-contiguous (strides {tuple(array.strides)}); pass a contiguous copy")
            if device is None:
                device, first = array.device, name
            elif array.device.id != device.id:
                raise DeviceError(f"{self._where}: argument {name!r} is on GPU {array.device.id} but "
                                  f"{first!r} is on GPU {device.id}; all tensors must be on one GPU")
            arrays[name] = array
        return arrays, device

    def _launch_value(self, what, env):
        """grid/block as a tuple of 1 to 3 ints, shared_mem as an int, from a constant or a callable of env."""
        value = getattr(self, what)
        if callable(value):
            wanted = inspect.signature(value).parameters.values()
            if any(q.kind is q.VAR_KEYWORD for q in wanted):
                kwargs = env
            else:
                missing = [q.name for q in wanted if q.name not in env and q.default is inspect.Parameter.empty]
                if missing:
                    raise ShapeError(f"{self._where}: {what} asks for {missing}, which are neither dimension "
                                     f"names of its Tile parameters nor scalar parameters (known: {sorted(env)})")
                kwargs = {q.name: env[q.name] for q in wanted if q.name in env}
            value = value(**kwargs)
        if what == "shared_mem":
            if not isinstance(value, numbers.Integral) or value < 0:
                raise ShapeError(f"{self._where}: shared_mem must be an int >= 0 (bytes), got {value!r}")
            return int(value)
        dims = (value,) if isinstance(value, numbers.Integral) else value
        if (not isinstance(dims, (tuple, list)) or not 1 <= len(dims) <= 3
                or not all(isinstance(d, numbers.Integral) and d >= 0 for d in dims)):
            raise ShapeError(f"{self._where}: {what} must be an int or a tuple of 1 to 3 ints >= 0, got {value!r}")
        dims = tuple(int(d) for d in dims)
        if what == "block" and not 1 <= numpy.prod(dims) <= _MAX_THREADS_PER_BLOCK:
            raise ShapeError(f"{self._where}: block {dims} must hold 1 to {_MAX_THREADS_PER_BLOCK} threads")
        return dims

    # ------------------------------------------------------------------------------------------------------
    def compile_for_arch(self, arch="sm_90a"):
        """Compile the source for ``arch`` without a GPU (NVRTC, else nvcc); the cubin bytes, or CompileError."""
        runtime = _runtime()
        names = (self.name,) if "<" in self.name else ()
        if self.source_path is not None:
            return runtime.compile_for_arch(None, arch, names, self.options, source_path=self.source_path)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{self.__name__}.cu"
            path.write_text(self.source)
            return runtime.compile_for_arch(None, arch, names, self.options, source_path=path)

