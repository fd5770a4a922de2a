"""Shape changes: reshape, transpose/permute, expand, concatenation and stacking. Backward undoes each."""
from .. import backend
from ..autograd import Function


class Reshape(Function):
    def forward(self, a, shape=()):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return (g.reshape(self.shape),)


class Permute(Function):
    def forward(self, a, axes=()):
        self.axes = axes
        return a.transpose(axes)

    def backward(self, g):
        inverse = [0] * len(self.axes)
        for i, axis in enumerate(self.axes):
            inverse[axis] = i
        return (g.transpose(inverse),)


class Expand(Function):
    def forward(self, a, shape=()):
        self.shape = a.shape
        return backend.array_module(a).broadcast_to(a, shape)

    def backward(self, g):
        return (g,)  # the tape's unbroadcast sums it back to self.shape


class Copy(Function):
    """A contiguous copy (clone / contiguous)."""

    def forward(self, a):
        return backend.array_module(a).ascontiguousarray(a).copy()

    def backward(self, g):
        return (g,)


class Concatenate(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.bounds = []
        start = 0
        for a in arrays:
            self.bounds.append((start, start + a.shape[axis]))
            start += a.shape[axis]
        return backend.array_module(*arrays).concatenate(arrays, axis=axis)

    def backward(self, g):
        index = [slice(None)] * g.ndim
        grads = []
        for start, stop in self.bounds:
            index[self.axis] = slice(start, stop)
            grads.append(g[tuple(index)])
        return tuple(grads)


class Stack(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        return backend.array_module(*arrays).stack(arrays, axis=axis)

    def backward(self, g):
        xp = backend.array_module(g)
        return tuple(xp.take(g, i, axis=self.axis) for i in range(g.shape[self.axis]))


class ToDevice(Function):
    """A copy to another device; the gradient travels back."""

    def forward(self, a, device="cpu"):
        self.source = backend.device_of(a)
        return backend.to_device(a, device)

    def backward(self, g):
        return (backend.to_device(g, self.source),)
