"""Activations: ``swish``/``silu``, ``gelu``, and SwiGLU (``swiglu``, ``swiglu_fused``, ``swiglu_memory_efficient``,
the ``SwiGLU`` module).

SwiGLU is ``(swish(x @ W_gate, beta) * (x @ W_up)) @ W_down``. The fused path multiplies x by the concatenated
weight ``[W_gate | W_up]`` in ONE GEMM (cuBLAS through CuPy), applies ``swish(gate) * up`` in one elementwise kernel
(``cuda/activation.cu``, which reads the two halves of the GEMM output in place), then runs the down GEMM; the
elementwise backward is one kernel too, writing both halves of one gradient. ``swiglu_memory_efficient`` walks
D_ff in chunks and recomputes each chunk's intermediates in backward, keeping only its inputs.
"""
import math

import numpy

from .. import backend
from ..autograd import Function
from ..errors import DeviceError, DTypeError, ShapeError, TesseraError
from ..functions.matmul import matmul
from ..precision import accumulate_storage
from ..tensor import Tensor, cat, empty, zeros
from . import init
from .module import Module, Parameter
from .norm import _as_tensor, _kernel_type, _launch, _use_kernel, _vector_width

BLOCK_THREADS = 256     # activation.cu: threads per block
MAX_GRID_Y = 65535


def _compute_storage(dtype):
    """Elementwise math of half types runs in f32 (one rounding at the end); f32 and f64 in their own dtype."""
    return numpy.dtype(numpy.float32) if numpy.dtype(dtype).itemsize < 4 else numpy.dtype(dtype)


def _sigmoid(xp, z):
    """1 / (1 + e^-z) without overflow: e^-|z| never exceeds 1."""
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


# ------------------------------------------------------------------------------------------ swish / silu
class Swish(Function):
    def forward(self, x, beta=1.0):
        self.save(x)
        self.beta = beta
        xp = backend.array_module(x)
        xc = x.astype(_compute_storage(x.dtype))
        return (xc * _sigmoid(xp, beta * xc)).astype(x.dtype)

    def backward(self, g):
        (x,) = self.saved
        xp = backend.array_module(x)
        xc = x.astype(_compute_storage(x.dtype))
        s = _sigmoid(xp, self.beta * xc)
        return (g * (s + self.beta * xc * s * (1 - s))).astype(g.dtype)


def _check_float(x, what):
    x = _as_tensor(x, what)
    if not x.dtype.is_floating or x.dtype.is_fp8:
        raise DTypeError(f"{what}: expected f16, bf16, f32 or f64, got {x.dtype.name}")
    return x


def swish(x, beta=1.0):
    """x * sigmoid(beta * x) (Swish; beta = 1 is SiLU)."""
    return Swish.apply(_check_float(x, "swish"), beta=float(beta))


def silu(x):
    """x * sigmoid(x)."""
    return swish(x, 1.0)


# ------------------------------------------------------------------------------------------ gelu
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


def _erf(xp, a):
    if xp is numpy:
        return numpy.vectorize(math.erf, otypes=[numpy.float64])(a).astype(a.dtype)
    import cupyx.scipy.special  # the array module's own special functions
    return cupyx.scipy.special.erf(a)


class Gelu(Function):
    def forward(self, x, approximate="none"):
        self.save(x)
        self.approximate = approximate
        xp = backend.array_module(x)
        xc = x.astype(_compute_storage(x.dtype))
        if approximate == "tanh":
            out = 0.5 * xc * (1 + xp.tanh(_SQRT_2_OVER_PI * (xc + _GELU_CUBIC * xc ** 3)))
        else:
            out = 0.5 * xc * (1 + _erf(xp, xc / math.sqrt(2)))
        return out.astype(x.dtype)

    def backward(self, g):
        (x,) = self.saved
        xp = backend.array_module(x)
        xc = x.astype(_compute_storage(x.dtype))
        if self.approximate == "tanh":
            t = xp.tanh(_SQRT_2_OVER_PI * (xc + _GELU_CUBIC * xc ** 3))
            d = 0.5 * (1 + t) + 0.5 * xc * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * xc * xc)
        else:
            d = 0.5 * (1 + _erf(xp, xc / math.sqrt(2))) + xc * xp.exp(-0.5 * xc * xc) / math.sqrt(2 * math.pi)
        return (g * d).astype(g.dtype)


def gelu(x, approximate="none"):
    """x * Phi(x) (Phi the standard normal CDF); ``approximate="tanh"`` is the tanh form GPT-2 used."""
    if approximate not in ("none", "tanh"):
        raise TesseraError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return Gelu.apply(_check_float(x, "gelu"), approximate=approximate)


# ------------------------------------------------------------------------------------------ swiglu elementwise
def _swiglu_reference(gate, up, beta):
    xp = backend.array_module(gate)
    c = _compute_storage(gate.dtype)
    g = gate.astype(c)
    return (g * _sigmoid(xp, beta * g) * up.astype(c)).astype(gate.dtype)


def _swiglu_reference_backward(gate, up, dout, beta):
    xp = backend.array_module(gate)
    c = _compute_storage(gate.dtype)
    g, u, d = gate.astype(c), up.astype(c), dout.astype(c)
    s = _sigmoid(xp, beta * g)
    return (d * u * (s + beta * g * s * (1 - s))).astype(gate.dtype), (d * g * s).astype(gate.dtype)


def _row_stride(a):
    """Elements between rows of a 2-D array whose last dimension is contiguous."""
    return a.strides[0] // a.dtype.itemsize if a.shape[0] > 1 else a.shape[1]


def _elementwise_grid(rows, cols, vec):
    nv = cols // vec
    bx = min(BLOCK_THREADS, -(-nv // 32) * 32)
    by = max(1, BLOCK_THREADS // bx)
    return (-(-nv // bx), min(-(-rows // by), MAX_GRID_Y)), (bx, by)


def _launch_swiglu_forward(gate, up, beta, out=None):
    """swish(gate) * up by activation.cu; gate, up: 2-D [rows, cols] with contiguous rows (any row stride)."""
    xp = backend.array_module(gate)
    rows, cols = gate.shape
    out = xp.empty((rows, cols), dtype=gate.dtype) if out is None else out
    if rows == 0 or cols == 0:
        return out
    gs, us = _row_stride(gate), _row_stride(up)
    vec = _vector_width(gate.dtype.itemsize, cols, (gate, up, out), (gs, us))
    grid, block = _elementwise_grid(rows, cols, vec)
    _launch("activation.cu", f"swiglu_fwd<{_kernel_type(gate.dtype)}, {vec}>", grid, block,
            (gate, numpy.int64(gs), up, numpy.int64(us), out, numpy.int64(rows), numpy.int32(cols),
             numpy.float32(beta)))
    return out


def _launch_swiglu_backward(gate, up, dout, beta, dgate, dup):
    """(dgate, dup) by activation.cu into the given 2-D outputs (contiguous rows, any row stride)."""
    rows, cols = gate.shape
    if rows == 0 or cols == 0:
        return dgate, dup
    strides = (_row_stride(gate), _row_stride(up), _row_stride(dgate), _row_stride(dup))
    vec = _vector_width(gate.dtype.itemsize, cols, (gate, up, dout, dgate, dup), strides)
    grid, block = _elementwise_grid(rows, cols, vec)
    _launch("activation.cu", f"swiglu_bwd<{_kernel_type(gate.dtype)}, {vec}>", grid, block,
            (gate, numpy.int64(strides[0]), up, numpy.int64(strides[1]), dout, dgate, numpy.int64(strides[2]),
             dup, numpy.int64(strides[3]), numpy.int64(rows), numpy.int32(cols), numpy.float32(beta)))
    return dgate, dup


def _swiglu_forward(gate, up, beta):
    """swish(gate, beta) * up for 2-D arrays: the kernel on the GPU, else the reference."""
    if _use_kernel(gate, up):
        return _launch_swiglu_forward(gate, up, beta)
    return _swiglu_reference(gate, up, beta)


def _swiglu_backward(gate, up, dout, beta, dgate=None, dup=None):
    xp = backend.array_module(gate)
    if _use_kernel(gate, up, dout):
        dgate = xp.empty(gate.shape, gate.dtype) if dgate is None else dgate
        dup = xp.empty(up.shape, up.dtype) if dup is None else dup
        return _launch_swiglu_backward(gate, up, xp.ascontiguousarray(dout), beta, dgate, dup)
    dg, du = _swiglu_reference_backward(gate, up, dout, beta)
    if dgate is None:
        return dg, du
    dgate[...], dup[...] = dg, du
    return dgate, dup


class SwiGLUGate(Function):
    """swish(gate, beta) * up for gate and up of one shape [..., F]."""

    def forward(self, gate, up, beta=1.0):
        xp = backend.array_module(gate)
        self.shape, self.beta = gate.shape, beta
        F = gate.shape[-1]
        gate2 = xp.ascontiguousarray(gate).reshape(-1, F)
        up2 = xp.ascontiguousarray(up).reshape(-1, F)
        self.save(gate2, up2)
        return _swiglu_forward(gate2, up2, beta).reshape(self.shape)

    def backward(self, g):
        gate2, up2 = self.saved
        dgate, dup = _swiglu_backward(gate2, up2, g.reshape(gate2.shape), self.beta)
        return dgate.reshape(self.shape), dup.reshape(self.shape)


class SwiGLUPacked(Function):
    """swish(h[..., :F], beta) * h[..., F:] for h = [gate | up] of shape [..., 2F], read in place."""

    def forward(self, h, beta=1.0):
        xp = backend.array_module(h)
        self.shape, self.beta = h.shape, beta
        F = h.shape[-1] // 2
        h2 = xp.ascontiguousarray(h).reshape(-1, 2 * F)
        self.save(h2)
        return _swiglu_forward(h2[:, :F], h2[:, F:], beta).reshape(h.shape[:-1] + (F,))

    def backward(self, g):
        (h2,) = self.saved
        xp = backend.array_module(h2)
        F = h2.shape[1] // 2
        dh = xp.empty_like(h2)
        _swiglu_backward(h2[:, :F], h2[:, F:], g.reshape(-1, F), self.beta, dh[:, :F], dh[:, F:])
        return dh.reshape(self.shape)


def swiglu_activation(gate, up=None, beta=1.0):
    """swish(gate, beta) * up, elementwise. With ``up=None``, ``gate`` is the packed [..., 2F] = [gate | up]."""
    gate = _check_float(gate, "swiglu_activation(gate)")
    if up is None:
        if gate.ndim < 1 or gate.shape[-1] % 2:
            raise ShapeError(f"swiglu_activation: packed [gate | up] needs an even last dimension, got {gate.shape}")
        return SwiGLUPacked.apply(gate, beta=float(beta))
    up = _check_float(up, "swiglu_activation(up)")
    if up.shape != gate.shape:
        raise ShapeError(f"swiglu_activation: gate has shape {gate.shape}, up {up.shape}; they must match")
    if up.dtype is not gate.dtype:
        raise DTypeError(f"swiglu_activation: gate is {gate.dtype.name}, up {up.dtype.name}; they must match")
    if up.device != gate.device:
        raise DeviceError(f"swiglu_activation: gate is on {gate.device}, up on {up.device}")
    return SwiGLUGate.apply(gate, up, beta=float(beta))


# ------------------------------------------------------------------------------------------ swiglu
def _check_swiglu(x, named_weights, what):
    """Tensors, one floating dtype, one device; x [..., D] and each (name, W, expected shape with None = any)."""
    x = _check_float(x, f"{what}(x)")
    if x.ndim < 1:
        raise ShapeError(f"{what}: x must be [..., D], got a 0-d tensor")
    out = [x]
    for name, w, expected in named_weights:
        w = _check_float(w, f"{what}({name})")
        if w.ndim != 2 or any(e is not None and e != n for e, n in zip(expected, w.shape)):
            want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
            raise ShapeError(f"{what}: {name} must be {want} for x of shape {x.shape}, got {w.shape}")
        if w.dtype is not x.dtype:
            raise DTypeError(f"{what}: {name} is {w.dtype.name} but x is {x.dtype.name}; they must match")
        if w.device != x.device:
            raise DeviceError(f"{what}: {name} is on {w.device}, x on {x.device}")
        out.append(w)
    return out


def swiglu_fused(x, w_gate_up, w_down, beta=1.0):
    """SwiGLU with the gate and up weights held concatenated: ``w_gate_up`` = [W_gate | W_up] of shape [D, 2 D_ff].

    One GEMM for both projections, one elementwise kernel, the down GEMM. x: [..., D] -> [..., D_out].
    """
    D = x.shape[-1] if isinstance(x, Tensor) and x.ndim else None
    x, w_gate_up, w_down = _check_swiglu(x, [("w_gate_up", w_gate_up, (D, None)), ("w_down", w_down, (None, None))],
                                         "swiglu_fused")
    F2 = w_gate_up.shape[1]
    if F2 % 2 or w_down.shape[0] != F2 // 2:
        raise ShapeError(f"swiglu_fused: w_gate_up [D, 2 D_ff] = {w_gate_up.shape} and w_down [D_ff, D_out] = "
                         f"{w_down.shape} disagree on D_ff")
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1]) @ w_gate_up          # [N, 2 D_ff]: both projections in one GEMM
    hidden = SwiGLUPacked.apply(h, beta=float(beta))    # [N, D_ff]
    return (hidden @ w_down).reshape(*lead, w_down.shape[1])


def swiglu(x, W_gate, W_up, W_down, beta=1.0):
    """``(swish(x @ W_gate, beta) * (x @ W_up)) @ W_down``; x [..., D], W_gate/W_up [D, D_ff], W_down [D_ff, D_out].

    Runs the fused path on ``[W_gate | W_up]`` concatenated here (a copy of both weights per call: hold them
    concatenated, as the ``SwiGLU`` module does, to skip it).
    """
    D = x.shape[-1] if isinstance(x, Tensor) and x.ndim else None
    F = W_gate.shape[-1] if isinstance(W_gate, Tensor) and W_gate.ndim == 2 else None
    x, W_gate, W_up, W_down = _check_swiglu(
        x, [("W_gate", W_gate, (D, None)), ("W_up", W_up, (D, F)), ("W_down", W_down, (F, None))], "swiglu")
    return swiglu_fused(x, cat([W_gate, W_up], dim=1), W_down, beta)


class SwiGLUChunked(Function):
    """SwiGLU over D_ff in chunks: forward keeps only its inputs; backward recomputes each chunk's gate and up."""

    def forward(self, x2, w_gate, w_up, w_down, chunk_size=512, beta=1.0):
        xp = backend.array_module(x2)
        self.save(x2, w_gate, w_up, w_down)
        self.chunk_size, self.beta = chunk_size, beta
        acc = accumulate_storage(x2.dtype)
        out = xp.zeros((x2.shape[0], w_down.shape[1]), dtype=acc)
        for lo, hi in self._chunks(w_gate.shape[1]):
            hidden = _swiglu_forward(matmul(x2, w_gate[:, lo:hi]), matmul(x2, w_up[:, lo:hi]), beta)
            out += matmul(hidden, w_down[lo:hi]).astype(acc)
        return out.astype(x2.dtype)

    def _chunks(self, F):
        return [(lo, min(F, lo + self.chunk_size)) for lo in range(0, F, self.chunk_size)]

    def backward(self, g):
        x2, w_gate, w_up, w_down = self.saved
        xp = backend.array_module(x2)
        need_x, need_gate, need_up, need_down = (self.inputs[i] is not None for i in range(4))
        acc = accumulate_storage(x2.dtype)
        dx = xp.zeros(x2.shape, dtype=acc) if need_x else None
        dw_gate = xp.empty_like(w_gate) if need_gate else None
        dw_up = xp.empty_like(w_up) if need_up else None
        dw_down = xp.empty_like(w_down) if need_down else None
        for lo, hi in self._chunks(w_gate.shape[1]):
            gate, up = matmul(x2, w_gate[:, lo:hi]), matmul(x2, w_up[:, lo:hi])
            if need_down:
                dw_down[lo:hi] = matmul(_swiglu_forward(gate, up, self.beta).T, g)
            dgate, dup = _swiglu_backward(gate, up, matmul(g, w_down[lo:hi].T), self.beta)
            if need_gate:
                dw_gate[:, lo:hi] = matmul(x2.T, dgate)
            if need_up:
                dw_up[:, lo:hi] = matmul(x2.T, dup)
            if need_x:
                dx += matmul(dgate, w_gate[:, lo:hi].T).astype(acc)
                dx += matmul(dup, w_up[:, lo:hi].T).astype(acc)
        return (dx.astype(x2.dtype) if need_x else None), dw_gate, dw_up, dw_down


def swiglu_memory_efficient(x, W_gate, W_up, W_down, chunk_size=512, beta=1.0):
    """The same result as ``swiglu``, computed over D_ff in chunks of ``chunk_size`` with recomputation.

    Memory beyond the inputs and output: one chunk's [N, chunk_size] intermediates, forward and backward (the plain
    path keeps [N, 2 D_ff] and [N, D_ff] for backward). Chunk outputs are summed in f32 for half inputs.
    """
    if not isinstance(chunk_size, (int, numpy.integer)) or chunk_size < 1:
        raise TesseraError(f"swiglu_memory_efficient: chunk_size must be an int >= 1, got {chunk_size!r}")
    D = x.shape[-1] if isinstance(x, Tensor) and x.ndim else None
    F = W_gate.shape[-1] if isinstance(W_gate, Tensor) and W_gate.ndim == 2 else None
    x, W_gate, W_up, W_down = _check_swiglu(
        x, [("W_gate", W_gate, (D, None)), ("W_up", W_up, (D, F)), ("W_down", W_down, (F, None))],
        "swiglu_memory_efficient")
    lead = x.shape[:-1]
    out = SwiGLUChunked.apply(x.reshape(-1, x.shape[-1]), W_gate, W_up, W_down, chunk_size=int(chunk_size),
                              beta=float(beta))
    return out.reshape(*lead, W_down.shape[1])


class SwiGLU(Module):
    """SwiGLU feed-forward block: ``w_gate_up`` [dim, 2 hidden_dim] = [W_gate | W_up] and ``w_down`` [hidden_dim,
    dim_out]. Weights are drawn from N(0, 1/fan_in). ``chunk_size`` switches to the memory-efficient path."""

    def __init__(self, dim, hidden_dim, dim_out=None, beta=1.0, dtype=None, device=None, generator=None,
                 chunk_size=None):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        if min(dim, hidden_dim, dim_out) < 1:
            raise ShapeError(f"SwiGLU: sizes must be >= 1, got dim={dim}, hidden_dim={hidden_dim}, dim_out={dim_out}")
        self.dim, self.hidden_dim, self.dim_out, self.beta, self.chunk_size = dim, hidden_dim, dim_out, beta, chunk_size
        self.w_gate_up = Parameter(empty(dim, 2 * hidden_dim, dtype=dtype, device=device))
        self.w_down = Parameter(empty(hidden_dim, dim_out, dtype=dtype, device=device))
        init.normal_(self.w_gate_up, std=dim ** -0.5, generator=generator)
        init.normal_(self.w_down, std=hidden_dim ** -0.5, generator=generator)

    @classmethod
    def from_weights(cls, W_gate, W_up, W_down, beta=1.0, chunk_size=None):
        """A module holding copies of [D, D_ff], [D, D_ff] and [D_ff, D_out] weights (the x @ W layout: Hugging
        Face's gate_proj/up_proj/down_proj weights are their transposes)."""
        W_gate = _check_float(W_gate, "SwiGLU.from_weights(W_gate)")
        if W_gate.ndim != 2:
            raise ShapeError(f"SwiGLU.from_weights: W_gate must be [D, D_ff], got {W_gate.shape}")
        D, F = W_gate.shape
        probe = zeros(1, D, dtype=W_gate.dtype, device=W_gate.device)
        _, W_gate, W_up, W_down = _check_swiglu(
            probe, [("W_gate", W_gate, (D, F)), ("W_up", W_up, (D, F)), ("W_down", W_down, (F, None))],
            "SwiGLU.from_weights")
        module = cls(D, F, W_down.shape[1], beta, dtype=W_gate.dtype, device=W_gate.device, chunk_size=chunk_size)
        module.w_gate_up.data[...] = cat([W_gate.detach(), W_up.detach()], dim=1).data
        module.w_down.data[...] = W_down.data
        return module

    def forward(self, x):
        if self.chunk_size:
            F = self.hidden_dim
            return swiglu_memory_efficient(x, self.w_gate_up[:, :F], self.w_gate_up[:, F:], self.w_down,
                                           self.chunk_size, self.beta)
        return swiglu_fused(x, self.w_gate_up, self.w_down, self.beta)

    def extra_repr(self):
        return f"{self.dim}, {self.hidden_dim}, dim_out={self.dim_out}, beta={self.beta}"


__all__ = ["swish", "silu", "gelu", "swiglu_activation", "swiglu", "swiglu_fused", "swiglu_memory_efficient",
           "SwiGLU"]
