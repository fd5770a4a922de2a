"""The tape: each result remembers the Function that made it; backward walks them in reverse topological order.

An op is a ``Function`` subclass with ``forward`` and ``backward`` side by side, both on raw backend arrays (NumPy or
CuPy). ``forward`` saves only what ``backward`` needs (``self.save`` or attributes); ``backward`` returns one gradient
per positional argument of ``apply`` (None where there is none).

The graph links Functions, not Tensors: a node holds its parent nodes (or, for leaves, the leaf Tensor) and the
parents' shapes, so an intermediate's array is freed as soon as nothing but the graph refers to it, unless a
backward saved it. The walk is iterative (no recursion limit on deep graphs) and visits each node once.

Checkpointing (``checkpoint_region``): nodes recorded inside a region keep no saved state. They keep the arrays of
the region's inputs and links to the region nodes that fed them; backward recomputes a region node's forward from
those (once per backward pass) before running its backward.
"""
import contextlib
import threading
import weakref

from . import backend
from .errors import ShapeError, TesseraError
from .precision import current as _precision_now, precision as _precision

_state = threading.local()


def is_grad_enabled():
    return getattr(_state, "grad_enabled", True)


class _GradMode(contextlib.ContextDecorator):
    def __init__(self, enabled):
        self.enabled = enabled

    def _recreate_cm(self):
        # Used as a decorator, each call gets its own context: a shared one would keep a single `previous`,
        # which a recursive or concurrent call overwrites (leaving grad mode off after the outer call).
        return type(self)(self.enabled)

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

    inputs = ()        # per positional arg: None, the leaf Tensor, or the parent Function
    input_shapes = ()
    saved = ()
    saved_versions = ()  # (weak reference, version) of the Tensor arguments whose arrays backward reads
    replay = None      # inside a checkpoint region: how to recompute this node's forward

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
        result = Tensor(fn.forward(*arrays, **kwargs))
        if is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            fn.inputs = tuple(_handle(a) for a in args)
            fn.input_shapes = tuple(getattr(a, "shape", ()) for a in arrays)
            result.requires_grad = True
            result._node = fn
            region = getattr(_state, "region", None)
            kept = arrays if region is not None else fn.saved  # what backward will read of the arguments
            fn.saved_versions = _versions(args, arrays, kept)
            if region is not None:
                region.record(fn, cls, args, arrays, kwargs)
        return result


def _versions(args, arrays, kept):
    """(weak reference, version) of each Tensor argument whose array backward reads, to catch in-place edits."""
    from .tensor import Tensor
    kept_ids = {id(k) for k in kept}
    return tuple((weakref.ref(a), a._version) for a, array in zip(args, arrays)
                 if isinstance(a, Tensor) and id(array) in kept_ids)


def _check_versions(node):
    for ref, version in node.saved_versions:
        t = ref()
        if t is not None and t._version != version:
            raise TesseraError(f"{type(node).__name__}.backward needs a tensor that was modified in place after the "
                               f"forward (its version went from {version} to {t._version}); clone() it before "
                               f"writing into it")


def _handle(arg):
    """What the graph keeps of an argument: the producing node, the leaf Tensor itself, or None."""
    from .tensor import Tensor
    if not isinstance(arg, Tensor) or not arg.requires_grad:
        return None
    return arg if arg._node is None else arg._node


class _Region:
    """The nodes recorded inside one checkpoint region."""

    def __init__(self):
        self.nodes = set()

    def record(self, fn, cls, args, arrays, kwargs):
        from .tensor import Tensor
        # Arguments made inside the region are recomputed; the rest (the region's inputs) are kept as arrays.
        sources = tuple(a._node if isinstance(a, Tensor) and id(a._node) in self.nodes else array
                        for a, array in zip(args, arrays))
        inputs, shapes, versions = fn.inputs, fn.input_shapes, fn.saved_versions
        fn.__dict__.clear()  # drop every saved array; backward recomputes them
        fn.inputs, fn.input_shapes, fn.saved_versions = inputs, shapes, versions
        # The precision setting too: backward may run outside the context the forward ran in.
        fn.replay = (cls, sources, kwargs, _precision_now())
        self.nodes.add(id(fn))


@contextlib.contextmanager
def checkpoint_region():
    """Ops recorded inside keep only the region's inputs; their forward is recomputed during backward."""
    outer = getattr(_state, "region", None)
    region = _Region()
    if outer is not None:  # a nested region belongs to the outer one
        region.nodes = outer.nodes
    _state.region = region
    try:
        yield region
    finally:
        _state.region = outer


def _recompute(node, memo):
    """Re-run a region node's forward (and, first, of the region nodes that feed it); returns the live Function."""
    stack = [node]
    while stack:
        current = stack[-1]
        if id(current) in memo:
            stack.pop()
            continue
        cls, sources, kwargs, setting = current.replay
        pending = [s for s in sources if isinstance(s, Function) and id(s) not in memo]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        live = cls()
        live.inputs = current.inputs
        arrays = [memo[id(s)][1] if isinstance(s, Function) else s for s in sources]
        with _precision(**setting):
            memo[id(current)] = (live, live.forward(*arrays, **kwargs))
    return memo[id(node)][0]


def unbroadcast(grad, shape):
    """Sum a gradient over the dimensions that broadcasting added or stretched, back to ``shape``."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _topological_order(root):
    """Nodes reachable from root, every consumer before the nodes it reads (reverse post-order of a DFS)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        # Mark on expansion, not on push: a node pushed twice must finish after every path that reaches it,
        # else a consumer reached later would run after the node it feeds (and its gradient would be lost).
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node.inputs:
            if isinstance(parent, Function) and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


def _accumulate_leaf(leaf, grad, caller_grad):
    """leaf.grad += grad. The first gradient is kept without a copy (a large one, such as logits', costs a full
    pass to copy) unless it may share memory with the caller's ``backward(grad)`` array. Gradients are never
    written in place afterwards, so two leaves may hold the same array safely."""
    from .tensor import Tensor
    grad = grad.astype(leaf.data.dtype, copy=False)
    if leaf.grad is None:
        xp = backend.array_module(grad)
        aliased = (caller_grad is not None and backend.device_of(grad) == backend.device_of(caller_grad)
                   and xp.may_share_memory(grad, caller_grad))  # a gradient that changed device is a new array
        leaf.grad = Tensor(grad.copy() if aliased else grad, dtype=leaf.dtype)
    else:
        leaf.grad = Tensor(leaf.grad.data + grad, dtype=leaf.dtype)


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
    if tensor._node is None:
        _accumulate_leaf(tensor, grad_array, grad_array)
        return
    grads = {id(tensor._node): grad_array}
    memo = {}
    with no_grad():
        for node in _topological_order(tensor._node):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            _check_versions(node)
            live = node if node.replay is None else _recompute(node, memo)
            parent_grads = live.backward(g)
            if not isinstance(parent_grads, tuple):
                parent_grads = (parent_grads,)
            for parent, shape, pg in zip(node.inputs, node.input_shapes, parent_grads):
                if parent is None or pg is None:
                    continue
                if pg.shape != tuple(shape):
                    pg = unbroadcast(pg, shape)
                if not isinstance(parent, Function):
                    _accumulate_leaf(parent, pg, grad_array)
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg
            memo.pop(id(node), None)  # its consumers are done: nothing recomputes from it any more
