"""Indexing: getitem, setitem, gather and scatter, with their gradients.

Basic indexing (ints, slices, None, Ellipsis) scatters its gradient back by assignment; advanced indexing (integer or
boolean arrays) may pick an element twice, so its gradient is accumulated with ``add.at``.
"""
from .. import backend
from ..autograd import Function


def is_basic_index(key):
    key = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (int, slice)) for k in key)


class GetItem(Function):
    def forward(self, a, key=None):
        self.shape, self.dtype, self.key = a.shape, a.dtype, key
        return a[key]

    def backward(self, g):
        xp = backend.array_module(g)
        full = xp.zeros(self.shape, dtype=self.dtype)
        if is_basic_index(self.key):
            full[self.key] = g
        else:
            backend.add_at(full, self.key, g)
        return (full,)


class SetItem(Function):
    """out = a with out[key] = value, out of place (the Tensor rebinds itself to out)."""

    def forward(self, a, value, key=None):
        self.key = key
        self.value_shape = getattr(value, "shape", ())
        out = a.copy()
        out[key] = value
        return out

    def backward(self, g):
        ga = g.copy()
        ga[self.key] = 0
        gv = g[self.key]
        return ga, gv


class Gather(Function):
    """out[i][j][k] = a[i][index[i][j][k]][k] along ``axis`` (torch.gather)."""

    def forward(self, a, index, axis=0):
        xp = backend.array_module(a)
        self.shape, self.dtype, self.axis = a.shape, a.dtype, axis
        self.save(index)
        return xp.take_along_axis(a, index, axis=axis)

    def backward(self, g):
        (index,) = self.saved
        xp = backend.array_module(g)
        full = xp.zeros(self.shape, dtype=self.dtype)
        backend.add_at(full, _along_axis_key(xp, index, self.axis), g)
        return (full, None)


class Scatter(Function):
    """out = a with out[...index...] = src along ``axis`` (torch.scatter), out of place."""

    def forward(self, a, index, src, axis=0):
        xp = backend.array_module(a)
        self.key = _along_axis_key(xp, index, axis)
        out = a.copy()
        out[self.key] = src if not hasattr(src, "shape") or src.ndim == 0 else src[tuple(slice(0, n) for n in index.shape)]
        self.src_shape = getattr(src, "shape", ())
        return out

    def backward(self, g):
        xp = backend.array_module(g)
        ga = g.copy()
        ga[self.key] = 0
        if len(self.src_shape) == 0:
            return ga, None, None
        gsrc = xp.zeros(self.src_shape, dtype=g.dtype)
        gsrc[tuple(slice(0, n) for n in self.key[0].shape)] = g[self.key]
        return ga, None, gsrc


def _along_axis_key(xp, index, axis):
    """The advanced-index tuple that addresses a[..., index, ...] along ``axis`` element by element."""
    key = []
    for d in range(index.ndim):
        if d == axis:
            key.append(index)
        else:
            shape = [1] * index.ndim
            shape[d] = index.shape[d]
            key.append(xp.arange(index.shape[d]).reshape(shape))
    return tuple(xp.broadcast_arrays(*key))
