"""The Tensor: a backend array (NumPy or CuPy) plus a tessera_cp dtype, with NumPy-like methods and operators.

The class is a thin front: the math of every differentiable method lives in a ``Function`` of
``tessera_cp.functions`` and the tape (``autograd``) records it. fp8 tensors keep their bits in uint8 storage and
only support casts, indexing and movement; cast them to f32/bf16 for arithmetic.
"""
import collections
import numbers

import numpy

from . import autograd, backend, dtypes
from .dtypes import DType
from .errors import DeviceError, DTypeError, IndexOutOfRangeError, ShapeError, TesseraError

MinMax = collections.namedtuple("MinMax", ["values", "indices"])


class Tensor:
    __slots__ = ("data", "dtype", "requires_grad", "grad", "_node", "_version", "__weakref__")
    __array_priority__ = 1000  # NumPy defers to our operators: ndarray + Tensor -> Tensor

    def __init__(self, data, dtype=None, requires_grad=False):
        """Wrap a backend array without copying. fp8 tensors must name their dtype (their storage is uint8)."""
        if isinstance(data, Tensor):
            data = data.data
        self.data = data
        self.dtype = dtypes.as_dtype(data.dtype) if dtype is None else dtypes.as_dtype(dtype)
        if data.dtype != self.dtype.storage:
            raise DTypeError(f"a {self.dtype.name} tensor needs {self.dtype.storage} storage, got {data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._node = None
        self._version = 0  # counts in-place writes, so backward can refuse arrays changed since they were saved

    # Shape-checked annotations: Tensor["B", "S", "D"] (see tessera_cp.shapes).
    def __class_getitem__(cls, dims):
        from .shapes import TensorSpec
        return TensorSpec(dims)

    # ----------------------------------------------------------------- properties
    shape = property(lambda self: tuple(self.data.shape))
    ndim = property(lambda self: self.data.ndim)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._node is None)
    T = property(lambda self: self.transpose())
    mT = property(lambda self: self.transpose(-2, -1))

    @property
    def size_bytes(self):
        return self.data.size * self.dtype.itemsize

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self):
        return int(self.data.size)

    def dim(self):
        return self.ndim

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    __hash__ = object.__hash__  # == is elementwise, so hash by identity

    # ----------------------------------------------------------------- conversion
    def numpy(self):
        """A NumPy array (a copy when on the GPU). fp8 comes back as ml_dtypes float8 values."""
        array = backend.to_device(self.data, "cpu")
        return array.view(self.dtype.ml_type) if self.dtype.is_fp8 else array

    def item(self):
        if self.data.size != 1:
            raise ShapeError(f"item() needs a tensor of one element, got shape {self.shape}")
        value = self.numpy().reshape(()).item()
        return float(value) if self.dtype.is_floating else value

    def tolist(self):
        array = self.numpy()
        if self.dtype in (dtypes.bf16,) or self.dtype.is_fp8:
            array = array.astype(numpy.float32)
        return array.tolist()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __bool__(self):
        return bool(self.item())

    def __index__(self):
        if self.dtype.kind != "int":
            raise DTypeError(f"only integer tensors can be used as an index, got {self.dtype.name}")
        return int(self.item())

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def to(self, target, **kwargs):
        """``.to('cuda')``, ``.to('cpu')`` or ``.to(bf16)``: a device move or a cast."""
        if isinstance(target, DType) or (isinstance(target, str) and target not in ("cpu", "cuda")
                                          and not target.startswith("cuda")):
            return self.astype(target, **kwargs)
        device = backend.check_device(target)
        if device == self.device:
            return self
        from .functions.shape import ToDevice
        return self._keep_dtype(ToDevice.apply(self, device=device))

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def astype(self, dtype, saturate=False):
        """Cast to another dtype. Casts to fp8 round to nearest even; ``saturate=True`` clamps to the finite range."""
        dtype = dtypes.as_dtype(dtype)
        if dtype is self.dtype:
            return self
        if dtype.is_fp8 or self.dtype.is_fp8:
            return self._fp8_cast(dtype, saturate)
        from .functions.math import Cast
        if not dtype.is_floating:  # integer and bool results carry no gradient (as in PyTorch)
            return Cast.apply(self.detach(), storage=dtype.storage)
        return Cast.apply(self, storage=dtype.storage)

    cast = astype

    def _fp8_cast(self, dtype, saturate):
        from . import fp8
        if self.requires_grad and autograd.is_grad_enabled():
            raise DTypeError("casts to and from fp8 are not differentiable; detach() first")
        source = self
        if self.dtype.is_fp8:
            if dtype.is_fp8:  # fp8 -> fp8 goes through f32, which holds every fp8 value exactly
                source = Tensor(fp8.decode(self.data, self.dtype, dtypes.f32), dtypes.f32)
            else:
                return Tensor(fp8.decode(self.data, self.dtype, dtype), dtype)
        if not source.dtype.is_floating:
            source = Tensor(source.data.astype(numpy.float32))
        return Tensor(fp8.encode(source.data, dtype, saturate=saturate), dtype)

    def float(self):
        return self.astype(dtypes.f32)

    def half(self):
        return self.astype(dtypes.f16)

    def bfloat16(self):
        return self.astype(dtypes.bf16)

    def double(self):
        return self.astype(dtypes.f64)

    def long(self):
        return self.astype(dtypes.int64)

    def int(self):
        return self.astype(dtypes.int32)

    def bool(self):
        return self.astype(dtypes.bool_)

    # DLPack and the CUDA array interface: zero-copy exchange with CuPy, NumPy and PyTorch.
    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    @property
    def __cuda_array_interface__(self):
        if self.device != "cuda":
            raise AttributeError("__cuda_array_interface__ exists only for tensors on the GPU")
        return self.data.__cuda_array_interface__

    # ----------------------------------------------------------------- autograd
    def backward(self, grad=None):
        autograd.backward(self, grad)

    def detach(self):
        return Tensor(self.data, self.dtype)

    def requires_grad_(self, flag=True):
        if flag and not self.dtype.is_floating:
            raise DTypeError(f"only floating tensors can require grad, got {self.dtype.name}")
        self.requires_grad = flag
        return self

    def zero_grad(self):
        self.grad = None

    # ----------------------------------------------------------------- helpers
    def _keep_dtype(self, out):
        """Re-tag an op's result with this tensor's dtype (fp8 results come back as uint8 storage)."""
        if out.dtype is not self.dtype and out.data.dtype == self.dtype.storage:
            out.dtype = self.dtype
        return out

    def _check_math(self, what):
        if self.dtype.is_fp8:
            raise DTypeError(f"{what} on an fp8 tensor: fp8 is storage only, cast to f32/bf16 first")

    def _as_float(self, what):
        """Self for floating tensors; integer and bool tensors become f32 (as torch does for float math)."""
        self._check_math(what)
        return self if self.dtype.is_floating else self.astype(dtypes.f32)

    def _coerce(self, other, what, broadcast=True):
        """Both operands of a binary op as Tensors of one dtype on one device (and shapes that broadcast)."""
        self._check_math(what)
        if isinstance(other, Tensor):
            if other.device != self.device:
                raise DeviceError(f"{what}: operands on different devices ({self.device} and {other.device})")
            other._check_math(what)
            if broadcast:
                _broadcast_shape(what, self.shape, other.shape)
            dtype = dtypes.promote(self.dtype, other.dtype)
            return self.astype(dtype), other.astype(dtype)
        if isinstance(other, (bool, numbers.Number)) and not isinstance(other, complex):
            # A Python scalar keeps the tensor's dtype, except that a float scalar makes an integer tensor f32
            # and an int scalar makes a bool tensor int64 (True + 1 is 2, not True).
            a = self
            if isinstance(other, float) and not self.dtype.is_floating:
                a = self.astype(dtypes.f32)
            elif not isinstance(other, bool) and self.dtype is dtypes.bool_:
                a = self.astype(dtypes.int64)
            xp = backend.array_module(self.data)
            return a, Tensor(xp.asarray(other, dtype=a.dtype.storage), a.dtype)
        return self._coerce(tensor(other, device=self.device), what, broadcast)

    def _binary(self, other, function, what, reverse=False):
        a, b = self._coerce(other, what)
        return function.apply(b, a) if reverse else function.apply(a, b)

    def _compare(self, other, op):
        a, b = self._coerce(other, "comparison")
        return Tensor(op(a.data, b.data))

    def _unary(self, function, what, **kwargs):
        return function.apply(self._as_float(what), **kwargs)

    # ----------------------------------------------------------------- arithmetic
    def __add__(self, other):
        return self._binary(other, _m.Add, "+")

    def __radd__(self, other):
        return self._binary(other, _m.Add, "+", reverse=True)

    def __sub__(self, other):
        return self._binary(other, _m.Sub, "-")

    def __rsub__(self, other):
        return self._binary(other, _m.Sub, "-", reverse=True)

    def __mul__(self, other):
        return self._binary(other, _m.Mul, "*")

    def __rmul__(self, other):
        return self._binary(other, _m.Mul, "*", reverse=True)

    def __truediv__(self, other):
        return self._as_float("/")._binary(other, _m.Div, "/")

    def __rtruediv__(self, other):
        return self._as_float("/")._binary(other, _m.Div, "/", reverse=True)

    def __floordiv__(self, other):
        a, b = self._coerce(other, "//")
        return Tensor(a.data // b.data)

    def __mod__(self, other):
        a, b = self._coerce(other, "%")
        return Tensor(a.data % b.data)

    def __pow__(self, other):
        return self._binary(other, _m.Pow, "**")

    def __rpow__(self, other):
        return self._binary(other, _m.Pow, "**", reverse=True)

    def __neg__(self):
        self._check_math("negation")
        return _m.Neg.apply(self)

    def __pos__(self):
        return self

    def __abs__(self):
        return self.abs()

    def __matmul__(self, other):
        a, b = self._coerce(other, "@", broadcast=False)
        if a.ndim == 0 or b.ndim == 0:
            raise ShapeError(f"@ needs tensors of rank >= 1, got shapes {a.shape} and {b.shape}")
        k_a, k_b = a.shape[-1], b.shape[-2] if b.ndim > 1 else b.shape[0]
        if k_a != k_b:
            raise ShapeError(f"@: the inner dimensions differ: {a.shape} @ {b.shape} ({k_a} != {k_b})")
        _broadcast_shape(f"@ of {a.shape} and {b.shape}: the batch dims", a.shape[:-2], b.shape[:-2])
        return _mm.MatMul.apply(a, b)

    def __rmatmul__(self, other):
        return tensor(other, device=self.device).__matmul__(self)

    def __eq__(self, other):
        return self._compare(other, lambda a, b: a == b)

    def __ne__(self, other):
        return self._compare(other, lambda a, b: a != b)

    def __lt__(self, other):
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other):
        return self._compare(other, lambda a, b: a <= b)

    def __gt__(self, other):
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other):
        return self._compare(other, lambda a, b: a >= b)

    def _logical(self, other, op, what):
        a, b = self._coerce(other, what)
        if a.dtype.kind not in ("bool", "int"):
            raise DTypeError(f"{what} needs bool or integer tensors, got {a.dtype.name}")
        return Tensor(op(a.data, b.data))

    def __and__(self, other):
        return self._logical(other, lambda a, b: a & b, "&")

    def __or__(self, other):
        return self._logical(other, lambda a, b: a | b, "|")

    def __xor__(self, other):
        return self._logical(other, lambda a, b: a ^ b, "^")

    def __invert__(self):
        if self.dtype.kind not in ("bool", "int"):
            raise DTypeError(f"~ needs a bool or integer tensor, got {self.dtype.name}")
        return Tensor(~self.data)

    # ----------------------------------------------------------------- unary math
    def exp(self):
        return self._unary(_m.Exp, "exp")

    def log(self):
        return self._unary(_m.Log, "log")

    def sqrt(self):
        return self._unary(_m.Sqrt, "sqrt")

    def rsqrt(self):
        return self._unary(_m.Rsqrt, "rsqrt")

    def sin(self):
        return self._unary(_m.Sin, "sin")

    def cos(self):
        return self._unary(_m.Cos, "cos")

    def tanh(self):
        return self._unary(_m.Tanh, "tanh")

    def sigmoid(self):
        return self._unary(_m.Sigmoid, "sigmoid")

    def relu(self):
        return self._unary(_m.Relu, "relu")

    def abs(self):
        self._check_math("abs")
        return _m.Abs.apply(self)

    def square(self):
        return self * self

    def reciprocal(self):
        return 1.0 / self._as_float("reciprocal")

    def sign(self):
        self._check_math("sign")
        return Tensor(backend.array_module(self.data).sign(self.data))

    def floor(self):
        self._check_math("floor")
        return Tensor(backend.array_module(self.data).floor(self.data))

    def ceil(self):
        self._check_math("ceil")
        return Tensor(backend.array_module(self.data).ceil(self.data))

    def round(self):
        self._check_math("round")
        return Tensor(backend.array_module(self.data).round(self.data))

    def isnan(self):
        return Tensor(backend.array_module(self.data).isnan(self._as_float("isnan").data))

    def isfinite(self):
        return Tensor(backend.array_module(self.data).isfinite(self._as_float("isfinite").data))

    def clamp(self, min=None, max=None):
        self._check_math("clamp")
        if min is None and max is None:
            raise TesseraError("clamp() needs min or max")
        return _m.Clamp.apply(self, lo=min, hi=max)

    clip = clamp

    def maximum(self, other):
        return self._binary(other, _m.Maximum, "maximum")

    def minimum(self, other):
        return self._binary(other, _m.Minimum, "minimum")

    def softmax(self, dim=-1):
        return _r.Softmax.apply(self._as_float("softmax"), dim=self._one_dim(dim))

    def log_softmax(self, dim=-1):
        return _r.Softmax.apply(self._as_float("log_softmax"), dim=self._one_dim(dim), log=True)

    # ----------------------------------------------------------------- reductions
    def _dims(self, dim, axis):
        if dim is not None and axis is not None:
            raise TesseraError("pass dim or axis, not both")
        return _r.normalize_dims(dim if dim is not None else axis, self.ndim)

    def _one_dim(self, dim):
        (d,) = _r.normalize_dims(dim, self.ndim) if self.ndim else (0,)
        return d

    def sum(self, dim=None, keepdim=False, *, axis=None, dtype=None):
        self._check_math("sum")
        source = self.astype(dtype) if dtype is not None else self
        if source.dtype.kind == "bool":
            source = source.astype(dtypes.int64)
        return _r.Sum.apply(source, dims=self._dims(dim, axis), keepdim=keepdim)

    def mean(self, dim=None, keepdim=False, *, axis=None):
        return _r.Mean.apply(self._as_float("mean"), dims=self._dims(dim, axis), keepdim=keepdim)

    def var(self, dim=None, keepdim=False, *, axis=None, unbiased=True, correction=None):
        correction = (1 if unbiased else 0) if correction is None else correction
        return _r.Var.apply(self._as_float("var"), dims=self._dims(dim, axis), keepdim=keepdim,
                            correction=correction)

    def std(self, dim=None, keepdim=False, *, axis=None, unbiased=True, correction=None):
        return self.var(dim, keepdim, axis=axis, unbiased=unbiased, correction=correction).sqrt()

    def logsumexp(self, dim=None, keepdim=False, *, axis=None):
        return _r.LogSumExp.apply(self._as_float("logsumexp"), dims=self._dims(dim, axis), keepdim=keepdim)

    def _extreme(self, dim, keepdim, axis, is_max):
        self._check_math("max/min")
        if self.data.size == 0:
            raise ShapeError(f"max/min of an empty tensor of shape {self.shape}")
        if isinstance(dim, Tensor):  # torch's max(other): elementwise
            return self.maximum(dim) if is_max else self.minimum(dim)
        dims = self._dims(dim, axis)
        values = _r.MaxMin.apply(self, dims=dims, keepdim=keepdim, is_max=is_max)
        if dim is None and axis is None:
            return values
        if len(dims) != 1:  # one dim has (values, indices); argmax over several dims has no single index
            raise ShapeError(f"max/min with indices takes one dim, got {dim if dim is not None else axis}")
        indices = self.argmax(dims[0], keepdim) if is_max else self.argmin(dims[0], keepdim)
        return MinMax(values, indices)

    def max(self, dim=None, keepdim=False, *, axis=None):
        """The maximum; with ``dim``, a (values, indices) named tuple as the seeds use."""
        return self._extreme(dim, keepdim, axis, True)

    def min(self, dim=None, keepdim=False, *, axis=None):
        return self._extreme(dim, keepdim, axis, False)

    def _arg(self, dim, keepdim, is_max):
        self._check_math("argmax/argmin")
        xp = backend.array_module(self.data)
        data = self.data if dim is not None else self.data.reshape(-1)
        axis = self._one_dim(dim) if dim is not None else 0
        out = xp.argmax(data, axis=axis) if is_max else xp.argmin(data, axis=axis)
        if keepdim and dim is not None:
            out = xp.expand_dims(out, axis)
        return Tensor(out.astype(numpy.int64))

    def argmax(self, dim=None, keepdim=False):
        return self._arg(dim, keepdim, True)

    def argmin(self, dim=None, keepdim=False):
        return self._arg(dim, keepdim, False)

    def all(self):
        return Tensor(backend.array_module(self.data).asarray(self.data.all()))

    def any(self):
        return Tensor(backend.array_module(self.data).asarray(self.data.any()))

    # ----------------------------------------------------------------- shapes
    def _shaped(self, function, **kwargs):
        return self._keep_dtype(function.apply(self, **kwargs))

    def reshape(self, *shape):
        shape = _shape_arg(shape)
        known = 1
        for n in shape:
            known *= n if n != -1 else 1
        if shape.count(-1) > 1 or any(n < -1 for n in shape) or (-1 not in shape and known != self.data.size) or \
                (-1 in shape and (known == 0 or self.data.size % known)):
            raise ShapeError(f"cannot reshape a tensor of shape {self.shape} ({self.data.size} elements) to {shape}")
        return self._shaped(_s.Reshape, shape=shape)

    view = reshape

    def flatten(self, start_dim=0, end_dim=-1):
        if self.ndim == 0:
            return self.reshape(1)
        start, end = self._one_dim(start_dim), self._one_dim(end_dim)
        if start > end:
            raise ShapeError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim} (rank {self.ndim})")
        return self.reshape(self.shape[:start] + (-1,) + self.shape[end + 1:])

    def permute(self, *dims):
        dims = _shape_arg(dims)
        if any(not -self.ndim <= d < self.ndim for d in dims) or \
                sorted(d % max(self.ndim, 1) for d in dims) != list(range(self.ndim)):
            raise ShapeError(f"permute needs a permutation of the {self.ndim} dims, got {dims}")
        return self._shaped(_s.Permute, axes=tuple(d % self.ndim for d in dims))

    def transpose(self, dim0=None, dim1=None):
        """transpose() reverses all dims (NumPy); transpose(d0, d1) swaps two (PyTorch)."""
        if dim0 is None and dim1 is None:
            return self.permute(*reversed(range(self.ndim)))
        axes = list(range(self.ndim))
        d0, d1 = self._one_dim(dim0), self._one_dim(dim1)
        axes[d0], axes[d1] = axes[d1], axes[d0]
        return self.permute(*axes)

    def swapaxes(self, a, b):
        return self.transpose(a, b)

    def unsqueeze(self, dim):
        dim = dim if dim >= 0 else dim + self.ndim + 1
        if not 0 <= dim <= self.ndim:
            raise ShapeError(f"unsqueeze({dim}) is out of range for a tensor of rank {self.ndim}")
        return self.reshape(self.shape[:dim] + (1,) + self.shape[dim:])

    def squeeze(self, dim=None):
        if dim is None:
            return self.reshape(tuple(n for n in self.shape if n != 1))
        d = self._one_dim(dim)
        if self.shape[d] != 1:
            return self
        return self.reshape(self.shape[:d] + self.shape[d + 1:])

    def expand(self, *sizes):
        sizes = _shape_arg(sizes)
        if len(sizes) < self.ndim:
            raise ShapeError(f"expand to {sizes} has fewer dims than the tensor's shape {self.shape}")
        lead = len(sizes) - self.ndim
        target = []
        for i, n in enumerate(sizes):
            own = self.shape[i - lead] if i >= lead else 1
            n = own if n == -1 else n
            if own != 1 and own != n:
                raise ShapeError(f"cannot expand dim {i - lead} of size {own} to {n} (shape {self.shape} to {sizes})")
            target.append(n)
        return self._shaped(_s.Expand, shape=tuple(target))

    def broadcast_to(self, shape):
        return self.expand(*shape)

    def contiguous(self):
        if self.data.flags.c_contiguous:
            return self
        return self._shaped(_s.Copy)

    def clone(self):
        return self._shaped(_s.Copy)

    def chunk(self, chunks, dim=0):
        """``chunks`` pieces along dim (the last may be smaller), as torch.chunk."""
        d = self._one_dim(dim)
        if chunks < 1:
            raise ShapeError(f"chunk needs chunks >= 1, got {chunks}")
        step = -(-self.shape[d] // chunks)
        return self.split(max(step, 1), d)

    def split(self, split_size_or_sections, dim=0):
        """Pieces of ``split_size`` along dim (the last may be smaller), or of the listed sizes."""
        d = self._one_dim(dim)
        n = self.shape[d]
        if isinstance(split_size_or_sections, int):
            if split_size_or_sections < 1:
                raise ShapeError(f"split size must be >= 1, got {split_size_or_sections}")
            sizes = [min(split_size_or_sections, n - s) for s in range(0, n, split_size_or_sections)] or [0]
        else:
            sizes = list(split_size_or_sections)
            if sum(sizes) != n:
                raise ShapeError(f"split sizes {sizes} sum to {sum(sizes)}, but dim {d} has size {n}")
        pieces, start = [], 0
        for size in sizes:
            key = (slice(None),) * d + (slice(start, start + size),)
            pieces.append(self[key])
            start += size
        return tuple(pieces)

    # ----------------------------------------------------------------- indexing
    def _index_key(self, key):
        """Tensors in a key become arrays; integer arrays are bounds-checked (CuPy would silently wrap)."""
        xp = backend.array_module(self.data)
        parts = key if isinstance(key, tuple) else (key,)
        parts = [k.data if isinstance(k, Tensor) else
                 (xp.asarray(k) if k else xp.zeros(0, dtype=numpy.int64)) if isinstance(k, list) else k
                 for k in parts]
        # Dims the key consumes (a boolean mask takes as many as its rank), to place an Ellipsis and catch
        # too many indices before NumPy/CuPy see them.
        used = sum(0 if k is None or k is Ellipsis else
                   k.ndim if getattr(k, "dtype", None) == numpy.bool_ and hasattr(k, "ndim") else 1 for k in parts)
        if used > self.ndim or sum(k is Ellipsis for k in parts) > 1:
            raise IndexOutOfRangeError(f"index {key!r} addresses {used} dims (at most one Ellipsis), "
                                       f"the tensor has shape {self.shape}")
        out, dim = [], 0
        for k in parts:
            if hasattr(k, "dtype") and getattr(k, "ndim", 0) >= 0 and not isinstance(k, (int, numpy.integer)):
                k = backend.to_device(k, self.device) if hasattr(k, "shape") else k
                if k.dtype == numpy.bool_:
                    if k.shape != self.shape[dim:dim + k.ndim]:
                        raise IndexOutOfRangeError(f"boolean mask of shape {k.shape} does not match the indexed "
                                                   f"dims {self.shape[dim:dim + k.ndim]}")
                    dim += k.ndim
                elif k.dtype.kind in "iu":
                    self._check_bounds(xp, k, dim)
                    dim += 1
                else:
                    raise DTypeError(f"index arrays must be integer or bool, got {k.dtype}")
            elif isinstance(k, (int, numpy.integer)):
                if dim >= self.ndim or not -self.shape[dim] <= int(k) < self.shape[dim]:
                    raise IndexOutOfRangeError(f"index {int(k)} is out of range for dim {dim} of shape {self.shape}")
                dim += 1
            elif k is Ellipsis:
                dim = self.ndim - used + dim
            elif isinstance(k, slice):
                dim += 1
            elif k is not None:
                raise TesseraError(f"unsupported index {k!r}")
            out.append(k)
        return tuple(out)

    def _check_bounds(self, xp, index, dim):
        if dim >= self.ndim:
            raise IndexOutOfRangeError(f"too many indices for a tensor of shape {self.shape}")
        n = self.shape[dim]
        if index.size and bool(((index < -n) | (index >= n)).any()):
            bad = int(index[(index < -n) | (index >= n)].ravel()[0])
            raise IndexOutOfRangeError(f"index {bad} is out of range for dim {dim} of size {n} (shape {self.shape})")

    def __getitem__(self, key):
        return self._shaped(_i.GetItem, key=self._index_key(key))

    def __setitem__(self, key, value):
        key = self._index_key(key)
        value = value if isinstance(value, Tensor) else tensor(value, device=self.device)
        value = value.astype(self.dtype)
        if value.device != self.device:
            raise DeviceError(f"setitem: a value on {value.device} into a tensor on {self.device}")
        recorded = (self.requires_grad or value.requires_grad) and autograd.is_grad_enabled()
        if recorded and self.is_leaf and self.requires_grad:
            raise TesseraError("in-place assignment into a leaf tensor that requires grad; "
                               "use `with no_grad():` or clone() first")
        try:
            if recorded:
                self._rebind(_i.SetItem.apply(self._snapshot(), value, key=key))
            else:
                self.data[key] = value.data
                self._version += 1
        except ValueError as e:  # NumPy/CuPy's broadcast failure, said in our terms
            raise ShapeError(f"setitem: a value of shape {value.shape} does not fit the indexed part of a tensor "
                             f"of shape {self.shape} ({e})") from None

    def _snapshot(self):
        """This tensor's current version, for a graph that is about to rebind self to a new one."""
        old = Tensor(self.data, self.dtype, self.requires_grad)
        old._node = self._node
        return old

    def _rebind(self, new):
        self.data, self._node, self.requires_grad = new.data, new._node, new.requires_grad

    def masked_fill(self, mask, value):
        return where(mask, value, self)

    def gather(self, dim, index):
        d = self._one_dim(dim)
        index = index.data if isinstance(index, Tensor) else backend.to_device(numpy.asarray(index), self.device)
        self._check_bounds(backend.array_module(self.data), index, d)
        if index.ndim != self.ndim:
            raise ShapeError(f"gather: index has rank {index.ndim}, the tensor {self.ndim}")
        return self._keep_dtype(_i.Gather.apply(self, index, axis=d))

    def scatter(self, dim, index, src):
        d = self._one_dim(dim)
        index = index.data if isinstance(index, Tensor) else backend.to_device(numpy.asarray(index), self.device)
        self._check_bounds(backend.array_module(self.data), index, d)
        if isinstance(src, Tensor):
            src = src.astype(self.dtype)
            if src.ndim != index.ndim or any(s < i for s, i in zip(src.shape, index.shape)):
                raise ShapeError(f"scatter: src of shape {src.shape} must cover index of shape {index.shape}")
        else:
            xp = backend.array_module(self.data)
            src = Tensor(xp.asarray(src, dtype=self.dtype.storage), self.dtype)
        return self._keep_dtype(_i.Scatter.apply(self, index, src, axis=d))

    def scatter_(self, dim, index, src):
        new = self.scatter(dim, index, src)
        if self.is_leaf and self.requires_grad and autograd.is_grad_enabled():
            raise TesseraError("in-place scatter_ into a leaf tensor that requires grad")
        self._rebind(new)
        return self

    # ----------------------------------------------------------------- printing
    def __repr__(self):
        array = self.numpy()
        if self.dtype is dtypes.bf16 or self.dtype.is_fp8:
            array = array.astype(numpy.float32)
        body = numpy.array2string(array, separator=", ", prefix="tensor(", threshold=200, edgeitems=3)
        extras = [f"dtype={self.dtype.name}", f"device='{self.device}'"]
        if self.requires_grad:
            extras.append("requires_grad=True")
        return f"tensor({body}, {', '.join(extras)})"


# --------------------------------------------------------------------- creation
def _shape_arg(shape):
    """Accept f(2, 3), f((2, 3)) and f([2, 3])."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    try:
        return tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ShapeError(f"a shape is a sequence of ints, got {shape!r}") from None


def _broadcast_shape(what, *shapes):
    """The shape the operands broadcast to, or a ShapeError naming the op and the shapes."""
    try:
        return numpy.broadcast_shapes(*shapes)
    except ValueError:
        raise ShapeError(f"{what}: shapes {', '.join(map(str, shapes))} do not broadcast") from None


def _default_float(dtype):
    return dtypes.f32 if dtype is None else dtypes.as_dtype(dtype)


def tensor(obj, dtype=None, device=None, requires_grad=False):
    """A new tensor from a list, scalar, NumPy/CuPy array or Tensor (copied), on ``device``.

    Python floats become f32 and ints int64 (as in PyTorch); arrays keep their dtype unless ``dtype`` is given.
    NumPy arrays of ml_dtypes float8 become fp8 tensors. Asking for an fp8 dtype rounds floats to it.
    """
    device = backend.check_device(device if device is not None else
                                  (obj.device if isinstance(obj, Tensor) else
                                   ("cuda" if backend.is_cupy_array(obj) else None)))
    if isinstance(obj, Tensor):
        source_dtype, array = obj.dtype, obj.data
    else:
        array = obj
        if not hasattr(obj, "dtype"):
            try:
                array = numpy.asarray(obj)
            except ValueError:
                raise ShapeError(f"tensor(): nested sequences of unequal lengths ({type(obj).__name__})") from None
            if array.dtype == numpy.float64 and not isinstance(obj, numpy.ndarray) and dtype is None:
                array = array.astype(numpy.float32)
            if array.dtype.kind not in "fiub":
                raise DTypeError(f"cannot make a tensor from {type(obj).__name__} of dtype {array.dtype}")
        source_dtype = dtypes.as_dtype(array.dtype)
        if source_dtype.is_fp8:
            array = array.view(numpy.uint8)
    out = Tensor(backend.to_device(array, device).copy(), source_dtype)
    if dtype is not None:
        out = out.astype(dtype)
    if requires_grad:
        out.requires_grad_(True)
    return out


def _filled(shape, value, dtype, device, requires_grad):
    dtype = _default_float(dtype)
    xp = backend.xp_for(device)
    if dtype.is_fp8:
        return tensor(xp.full(_shape_arg(shape), value, dtype=numpy.float32), dtype=dtype, device=device)
    out = Tensor(xp.full(_shape_arg(shape), value, dtype=dtype.storage), dtype)
    return out.requires_grad_(True) if requires_grad else out


def zeros(*shape, dtype=None, device=None, requires_grad=False):
    return _filled(shape, 0, dtype, device, requires_grad)


def ones(*shape, dtype=None, device=None, requires_grad=False):
    return _filled(shape, 1, dtype, device, requires_grad)


def full(shape, fill_value, dtype=None, device=None, requires_grad=False):
    return _filled((shape,) if isinstance(shape, int) else (tuple(shape),), fill_value, dtype, device, requires_grad)


def empty(*shape, dtype=None, device=None):
    dtype = _default_float(dtype)
    return Tensor(backend.xp_for(device).empty(_shape_arg(shape), dtype=dtype.storage), dtype)


def arange(start, stop=None, step=1, dtype=None, device=None):
    if stop is None:
        start, stop = 0, start
    if dtype is None:
        is_int = all(isinstance(v, (int, numpy.integer)) for v in (start, stop, step))
        dtype = dtypes.int64 if is_int else dtypes.f32
    dtype = dtypes.as_dtype(dtype)
    xp = backend.xp_for(device)
    return Tensor(xp.arange(start, stop, step).astype(dtype.storage), dtype)


def eye(n, m=None, dtype=None, device=None):
    dtype = _default_float(dtype)
    return Tensor(backend.xp_for(device).eye(n, m, dtype=dtype.storage), dtype)


def _like(t, fill, dtype, device):
    return _filled(t.shape, fill, dtype or t.dtype, device or t.device, False)


def zeros_like(t, dtype=None, device=None):
    return _like(t, 0, dtype, device)


def ones_like(t, dtype=None, device=None):
    return _like(t, 1, dtype, device)


def full_like(t, fill_value, dtype=None, device=None):
    return _like(t, fill_value, dtype, device)


def empty_like(t, dtype=None, device=None):
    return empty(*t.shape, dtype=dtype or t.dtype, device=device or t.device)


class Generator:
    """A seedable source of random tensors, one stream per device (NumPy PCG64 on the CPU, CuPy's on the GPU)."""

    def __init__(self, seed=None):
        self.manual_seed(seed)

    def manual_seed(self, seed):
        self.seed = seed
        self._streams = {}
        return self

    def _stream(self, device):
        device = backend.check_device(device)
        if device not in self._streams:
            xp = backend.xp_for(device)
            self._streams[device] = xp.random.default_rng(self.seed)
        return self._streams[device], device

    def _floats(self, sample, shape, dtype, device, requires_grad):
        dtype = _default_float(dtype)
        rng, device = self._stream(device)
        array = sample(rng, _shape_arg(shape))
        out = tensor(array.astype(numpy.float32, copy=False), dtype=dtype, device=device)
        return out.requires_grad_(True) if requires_grad else out

    def randn(self, *shape, dtype=None, device=None, requires_grad=False):
        return self._floats(lambda rng, s: rng.standard_normal(s, dtype=numpy.float32), shape, dtype, device,
                            requires_grad)

    def rand(self, *shape, dtype=None, device=None, requires_grad=False):
        return self._floats(lambda rng, s: rng.random(s, dtype=numpy.float32), shape, dtype, device, requires_grad)

    def randint(self, low, high=None, size=(), dtype=None, device=None):
        if high is None:
            low, high = 0, low
        rng, device = self._stream(device)
        dtype = dtypes.int64 if dtype is None else dtypes.as_dtype(dtype)
        array = rng.integers(low, high, size=_shape_arg((size,) if isinstance(size, int) else (tuple(size),)))
        return Tensor(array.astype(dtype.storage), dtype)


default_generator = Generator()


def manual_seed(seed):
    """Seed the default generator (randn, rand, randint)."""
    default_generator.manual_seed(seed)


def randn(*shape, dtype=None, device=None, requires_grad=False, generator=None):
    return (generator or default_generator).randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)


def rand(*shape, dtype=None, device=None, requires_grad=False, generator=None):
    return (generator or default_generator).rand(*shape, dtype=dtype, device=device, requires_grad=requires_grad)


def randint(low, high=None, size=(), dtype=None, device=None, generator=None):
    return (generator or default_generator).randint(low, high, size, dtype=dtype, device=device)


def randn_like(t, dtype=None, generator=None):
    return randn(*t.shape, dtype=dtype or t.dtype, device=t.device, generator=generator)


def rand_like(t, dtype=None, generator=None):
    return rand(*t.shape, dtype=dtype or t.dtype, device=t.device, generator=generator)


# --------------------------------------------------------------------- functions over several tensors
def _same_device_and_dtype(tensors, what):
    tensors = [t if isinstance(t, Tensor) else tensor(t) for t in tensors]
    if not tensors:
        raise ShapeError(f"{what} needs at least one tensor")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise DeviceError(f"{what}: tensors on different devices {sorted(devices)}")
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = dtype if t.dtype is dtype else dtypes.promote(dtype, t.dtype)
    return [t.astype(dtype) for t in tensors], dtype


def cat(tensors, dim=0):
    tensors, dtype = _same_device_and_dtype(tensors, "cat")
    d = tensors[0]._one_dim(dim)
    for t in tensors:
        if t.ndim != tensors[0].ndim or t.shape[:d] + t.shape[d + 1:] != tensors[0].shape[:d] + tensors[0].shape[d + 1:]:
            raise ShapeError(f"cat along dim {d}: shapes {[x.shape for x in tensors]} differ outside that dim")
    return tensors[0]._keep_dtype(_s.Concatenate.apply(*tensors, axis=d))


def stack(tensors, dim=0):
    tensors, dtype = _same_device_and_dtype(tensors, "stack")
    if len({t.shape for t in tensors}) > 1:
        raise ShapeError(f"stack needs equal shapes, got {[t.shape for t in tensors]}")
    rank = tensors[0].ndim + 1
    if not -rank <= dim < rank:
        raise ShapeError(f"stack: dim {dim} is out of range for a result of rank {rank}")
    d = dim % rank
    return tensors[0]._keep_dtype(_s.Stack.apply(*tensors, axis=d))


def where(condition, a, b):
    """a where condition holds, else b; a and b may be tensors or scalars and broadcast together."""
    cond = condition if isinstance(condition, Tensor) else tensor(condition)
    if cond.dtype is not dtypes.bool_:
        raise DTypeError(f"where: condition must be bool, got {cond.dtype.name}")
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        a = tensor(a, device=cond.device)
    if isinstance(a, Tensor):
        a_t, b_t = a._coerce(b, "where")
    else:
        b_t, a_t = b._coerce(a, "where")
    if cond.device != a_t.device:
        raise DeviceError(f"where: condition on {cond.device}, values on {a_t.device}")
    _broadcast_shape("where", cond.shape, a_t.shape, b_t.shape)
    return _m.Where.apply(cond, a_t, b_t)


def from_dlpack(obj, dtype=None):
    """A Tensor sharing memory with any DLPack producer (a PyTorch, CuPy or NumPy array), zero copy.

    CUDA producers come in as CuPy arrays, host ones as NumPy arrays. ``dtype`` names an fp8 format for uint8 data.
    """
    device_type = obj.__dlpack_device__()[0]
    if device_type == 2:  # kDLCUDA
        array = backend.xp_for("cuda").from_dlpack(obj)
    elif device_type == 1:  # kDLCPU
        array = numpy.from_dlpack(obj)
    else:
        raise DeviceError(f"from_dlpack: DLPack device type {device_type} is neither the CPU (1) nor CUDA (2)")
    return Tensor(array, dtype)


def matmul(a, b):
    return (a if isinstance(a, Tensor) else tensor(a)) @ b


from .functions import indexing as _i  # noqa: E402  (the functions import Tensor from this module)
from .functions import math as _m  # noqa: E402
from .functions import matmul as _mm  # noqa: E402
from .functions import reduction as _r  # noqa: E402
from .functions import shape as _s  # noqa: E402
