"""Reductions over dimensions (sum, mean, max/min, var, logsumexp) and softmax, with their gradients.

Half-precision inputs accumulate in f32, or in f64 under ``precision(accumulate=f64)``; results come back in the
input's dtype.
"""
import numpy

from .. import backend
from ..precision import accumulate_storage
from ..autograd import Function


def normalize_dims(dim, ndim):
    """dim as a sorted tuple of non-negative axes (None means all)."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    from ..errors import ShapeError
    out = []
    for d in dims:
        if not -ndim <= d < max(ndim, 1):
            raise ShapeError(f"dim {d} is out of range for a tensor of rank {ndim}")
        out.append(d % max(ndim, 1))
    return tuple(sorted(set(out)))


def _expand_back(g, shape, dims, keepdim):
    """Give a reduced gradient its reduced dimensions back (size 1) so it broadcasts against the input."""
    if not keepdim:
        for d in dims:
            g = backend.array_module(g).expand_dims(g, d)
    return g


def _accumulate(a):
    """The array to reduce in: f32 (or f64 when asked) for half types, f64 when precision asks for it."""
    acc = accumulate_storage(a.dtype)
    return a if acc == a.dtype else a.astype(acc)


class Sum(Function):
    def forward(self, a, dims=(), keepdim=False):
        self.shape, self.dims, self.keepdim = a.shape, dims, keepdim
        return _accumulate(a).sum(axis=dims, keepdims=keepdim).astype(a.dtype, copy=False)

    def backward(self, g):
        xp = backend.array_module(g)
        return (xp.broadcast_to(_expand_back(g, self.shape, self.dims, self.keepdim), self.shape),)


class Mean(Function):
    def forward(self, a, dims=(), keepdim=False):
        self.shape, self.dims, self.keepdim = a.shape, dims, keepdim
        self.count = 1
        for d in dims:
            self.count *= a.shape[d]
        return _accumulate(a).mean(axis=dims, keepdims=keepdim).astype(a.dtype, copy=False)

    def backward(self, g):
        xp = backend.array_module(g)
        g = _expand_back(g, self.shape, self.dims, self.keepdim) / g.dtype.type(self.count)
        return (xp.broadcast_to(g, self.shape),)


class Var(Function):
    """Variance with Bessel's correction ``correction`` (1 = unbiased, as torch.var defaults to)."""

    def forward(self, a, dims=(), keepdim=False, correction=1):
        acc = _accumulate(a)
        count = 1
        for d in dims:
            count *= a.shape[d]
        centered = acc - acc.mean(axis=dims, keepdims=True)
        self.save(centered)
        self.dims, self.keepdim, self.dtype = dims, keepdim, a.dtype
        # Fewer elements than the correction leaves the variance undefined: NaN, as NumPy and PyTorch give.
        self.inverse = 1.0 / (count - correction) if count > correction else float("nan")
        out = (centered * centered).sum(axis=dims, keepdims=keepdim) * self.inverse
        return out.astype(a.dtype, copy=False)

    def backward(self, g):
        (centered,) = self.saved
        g = _expand_back(g, centered.shape, self.dims, self.keepdim).astype(centered.dtype)
        return ((g * 2 * centered * self.inverse).astype(self.dtype, copy=False),)


class MaxMin(Function):
    """max (is_max=True) or min over dims; the gradient goes to the winners, split evenly between ties."""

    def forward(self, a, dims=(), keepdim=False, is_max=True):
        out = a.max(axis=dims, keepdims=True) if is_max else a.min(axis=dims, keepdims=True)
        winners = a == out
        self.save(winners)
        self.dims, self.keepdim = dims, keepdim
        return out if keepdim else out.squeeze(axis=dims)

    def backward(self, g):
        (winners,) = self.saved
        g = _expand_back(g, winners.shape, self.dims, self.keepdim)
        count = winners.sum(axis=self.dims, keepdims=True).astype(g.dtype)
        return (g * winners / count,)


class LogSumExp(Function):
    def forward(self, a, dims=(), keepdim=False):
        xp = backend.array_module(a)
        acc = _accumulate(a)
        peak = acc.max(axis=dims, keepdims=True)
        peak = xp.where(xp.isfinite(peak), peak, 0)  # all -inf rows give -inf, not NaN
        with numpy.errstate(divide="ignore"):  # a row of only -inf sums to 0: log gives -inf, the right answer
            out = xp.log(xp.exp(acc - peak).sum(axis=dims, keepdims=True)) + peak
        self.save(acc, out)
        self.dims, self.keepdim, self.dtype = dims, keepdim, a.dtype
        return (out if keepdim else out.squeeze(axis=dims)).astype(a.dtype, copy=False)

    def backward(self, g):
        acc, out = self.saved
        g = _expand_back(g, acc.shape, self.dims, self.keepdim)
        xp = backend.array_module(acc)
        return ((g * xp.exp(acc - out)).astype(self.dtype, copy=False),)


class Softmax(Function):
    def forward(self, a, dim=-1, log=False):
        xp = backend.array_module(a)
        acc = _accumulate(a)
        shifted = acc - acc.max(axis=dim, keepdims=True)
        exp = xp.exp(shifted)
        total = exp.sum(axis=dim, keepdims=True)
        self.dim, self.log, self.dtype = dim, log, a.dtype
        if log:
            out = shifted - xp.log(total)
            self.save(xp.exp(out))
        else:
            out = exp / total
            self.save(out)
        return out.astype(a.dtype, copy=False)

    def backward(self, g):
        (probs,) = self.saved
        g = g.astype(probs.dtype)
        if self.log:
            grad = g - probs * g.sum(axis=self.dim, keepdims=True)
        else:
            grad = probs * (g - (g * probs).sum(axis=self.dim, keepdims=True))
        return (grad.astype(self.dtype, copy=False),)
