"""The tape: each result remembers the Function that made it; backward walks them in reverse topological order.

An op is a ``Function`` subclass with ``forward`` and ``backward`` side by side, both on raw backend arrays (NumPy or
CuPy). ``forward`` saves only what ``backward`` needs (``self.save``); ``backward`` returns one gradient per positional
argument of ``apply`` (None where there is none). The walk is iterative, so graphs of any depth back-propagate without
touching Python's recursion limit, and each node is visited once (O(N) Python work).
"""
import contextlib
import threading

from . import backend
from .errors import ShapeError, TesseraError

_state = threading.local()


def is_grad_enabled():
    return getattr(_state, "grad_enabled", True)


class _GradMode(contextlib.ContextDecorator):
    def __init__(self, enabled):
        self.enabled = enabled

    def __enter__(self):
        self.previous = is_grad_enabled()
        _state.grad_enabled = self.enabled

    def __exit__(self, *exc):
        _state.grad_enabled = self.previous
        return False


def no_grad():
    """Context (or decorator) in which no graph is recorded."""
    return _GradMode(False)


def enable_grad():
    """Context (or decorator) that turns recording back on inside a no_grad region."""
    return _GradMode(True)


class Function:
    """One differentiable op. Subclasses write ``forward(*arrays, **kw)`` and ``backward(grad)``."""

    inputs = ()      # the Tensor arguments (None for non-Tensor positions), set when the graph is recorded
    saved = ()

    def save(self, *arrays):
        self.saved = arrays

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        from .tensor import Tensor
        fn = cls()
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        out = fn.forward(*arrays, **kwargs)
        result = Tensor(out)
        if is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            fn.inputs = tuple(a if isinstance(a, Tensor) and a.requires_grad else None for a in args)
            result.requires_grad = True
            result._node = fn
        return result


def unbroadcast(grad, shape):
    """Sum a gradient over the dimensions that broadcasting added or stretched, back to ``shape``."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _topological_order(root):
    """Nodes reachable from root, each after all the nodes that consume it (iterative DFS, no recursion)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        tensor, expanded = stack.pop()
        if expanded:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        node = tensor._node
        if node is not None:
            for parent in node.inputs:
                if parent is not None and id(parent) not in visited:
                    stack.append((parent, False))
    order.reverse()  # consumers first
    return order


def backward(tensor, grad=None):
    """Accumulate d(tensor)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
    from .tensor import Tensor
    if not tensor.requires_grad:
        raise TesseraError("backward() called on a tensor that does not require grad (no recorded graph)")
    xp = backend.array_module(tensor.data)
    if grad is None:
        if tensor.data.size != 1:
            raise ShapeError(f"backward() without a gradient needs a tensor of one element, got shape {tensor.shape}")
        grad_array = xp.ones(tensor.data.shape, dtype=tensor.data.dtype)
    else:
        grad_array = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=tensor.data.dtype)
        if grad_array.shape != tensor.data.shape:
            raise ShapeError(f"backward(grad): grad has shape {grad_array.shape}, the tensor {tensor.shape}")
    grads = {id(tensor): grad_array}
    with no_grad():
        for t in _topological_order(tensor):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            node = t._node
            if node is None:  # a leaf
                g = g.astype(t.data.dtype, copy=False)
                if t.grad is None:
                    t.grad = Tensor(g.copy() if g is grad_array else g, dtype=t.dtype)
                else:
                    t.grad = Tensor(t.grad.data + g, dtype=t.dtype)
                continue
            parent_grads = node.backward(g)
            if not isinstance(parent_grads, tuple):
                parent_grads = (parent_grads,)
            for parent, pg in zip(node.inputs, parent_grads):
                if parent is None or pg is None:
                    continue
                if pg.shape != parent.data.shape:
                    pg = unbroadcast(pg, parent.data.shape)
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg
