"""Collectives over a mesh axis (or a tuple of axes, or the whole mesh), each a Function whose backward is the
matching collective: all_reduce <-> all_reduce, all_gather <-> reduce_scatter, broadcast <-> reduce to the source,
ring_exchange <-> the ring the other way.

Gradient convention: the objective is the SUM over ranks of what each rank calls ``backward()`` on (the SPMD
program read as one function). That is exact for sharded values (sequence or hidden shards: ring attention,
distributed RMSNorm). Where every rank computes the same loss from replicated values, that loss counts once per
rank; the tensor-parallel layers (``parallel.py``) use their own identity/all-reduce pairs for that case.

Every rank along the axis must make the same calls in the same order, backward included. Before moving data each
collective compares the ranks' dtypes, shapes and arguments (``Group.check``: one small allgather), so a mismatch
is the same error on every rank instead of a hang or garbage; ``Mesh(check=False)`` skips that. ``timeout``
(seconds, default the mesh's) turns a hang into ``CommTimeoutError``.
"""
from ..autograd import Function
from ..errors import DTypeError, ShapeError, TesseraError
from ..tensor import Tensor, tensor
from .mesh import HEADER_DIMS, Mesh, MeshTensor, current_mesh, shard_bounds
from .transport import REDUCE_OPS


# ----------------------------------------------------------------------------------------------- Functions
def _moved(xp, a, dim):
    """``a`` with ``dim`` first, contiguous: the shards of a gather/scatter are then contiguous byte ranges."""
    return xp.ascontiguousarray(xp.moveaxis(a, dim, 0))


def _xp(a):
    from .. import backend
    return backend.array_module(a)


class _AllReduce(Function):
    def forward(self, x, *, group, op, timeout):
        self.group, self.op, self.timeout = group, op, timeout
        out = group.transport(x).all_reduce(x, op, timeout)
        if op in ("max", "min"):
            self.save(x, out)
        return out

    def backward(self, grad):
        transport = self.group.transport(grad)
        total = transport.all_reduce(grad, "sum", self.timeout)  # every rank's output depends on every input
        if self.op == "sum":
            return (total,)
        if self.op == "mean":
            return (total * (1.0 / self.group.size),)
        x, out = self.saved  # max/min: the ranks holding the extreme share the gradient equally
        hit = (x == out).astype(grad.dtype)
        ties = transport.all_reduce(hit, "sum", self.timeout)
        return (total * hit / ties,)


class _AllGather(Function):
    def forward(self, x, *, group, dim, rows, timeout):
        self.group, self.dim, self.rows, self.timeout = group, dim, rows, timeout
        xp = _xp(x)
        out = group.transport(x).all_gather(_moved(xp, x, dim), rows, timeout)
        return xp.ascontiguousarray(xp.moveaxis(out, 0, dim))

    def backward(self, grad):
        xp = _xp(grad)
        piece = self.group.transport(grad).reduce_scatter(_moved(xp, grad, self.dim), self.rows, "sum", self.timeout)
        return (xp.ascontiguousarray(xp.moveaxis(piece, 0, self.dim)),)


class _ReduceScatter(Function):
    def forward(self, x, *, group, dim, rows, op, timeout):
        self.group, self.dim, self.rows, self.op, self.timeout = group, dim, rows, op, timeout
        xp = _xp(x)
        out = group.transport(x).reduce_scatter(_moved(xp, x, dim), rows, op, timeout)
        return xp.ascontiguousarray(xp.moveaxis(out, 0, dim))

    def backward(self, grad):
        xp = _xp(grad)
        full = self.group.transport(grad).all_gather(_moved(xp, grad, self.dim), self.rows, self.timeout)
        full = xp.ascontiguousarray(xp.moveaxis(full, 0, self.dim))
        return (full * (1.0 / self.group.size) if self.op == "mean" else full,)


class _Broadcast(Function):
    def forward(self, x, *, group, src, timeout):
        self.group, self.src, self.timeout = group, src, timeout
        return group.transport(x).broadcast(x, src, timeout)

    def backward(self, grad):
        # Every rank's output is the source's input: the source gets the sum, the others' inputs were unused.
        return (self.group.transport(grad).reduce(grad, self.src, self.timeout),)


class _RingExchange(Function):
    def forward(self, x, *, received, group, shift, timeout):
        self.group, self.shift, self.timeout = group, shift, timeout
        return received  # the transfer already happened (possibly overlapped); the tape records it here

    def backward(self, grad):
        # My input went `shift` ranks ahead: its gradient comes back from there.
        return (self.group.transport(grad).ring_start(grad, -self.shift, None, self.timeout).wait(),)


# ----------------------------------------------------------------------------------------------- entries
def _resolve(x, axis, mesh, what):
    """(local Tensor, Group, Mesh, MeshTensor or None). Accepts the seeds' ``all_gather(x, mesh, dim=2)``."""
    if isinstance(axis, Mesh):
        mesh, axis = axis, None
    layout = None
    if isinstance(x, MeshTensor):
        if mesh is not None and mesh is not x.mesh:
            raise TesseraError(f"{what}: the MeshTensor lives on {x.mesh!r}, but mesh={mesh!r} was passed")
        mesh, layout, x = x.mesh, x, x.local
    elif not isinstance(x, Tensor):
        x = tensor(x)
    mesh = mesh if mesh is not None else current_mesh()
    if not isinstance(mesh, Mesh):
        raise TesseraError(f"{what}: no mesh; pass mesh=..., a MeshTensor, or call inside `with mesh:` or "
                           "a function decorated with @on_mesh(mesh)")
    return x, mesh.group(axis), mesh, layout


def _finish(out, x, layout, sharding=None):
    out = x._keep_dtype(out)  # fp8 travels as its uint8 bits: keep its dtype tag
    return layout.with_local(out, sharding) if layout is not None else out


def _dim(dim, ndim, what):
    if not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ShapeError(f"{what}: dim {dim!r} is out of range for a rank-{ndim} tensor")
    return dim % ndim


def _check_op(op, dtype, what, allowed=REDUCE_OPS):
    if op not in allowed:
        raise TesseraError(f"{what}: op must be one of {list(allowed)}, got {op!r}")
    if dtype.is_fp8:
        raise DTypeError(f"{what}: fp8 tensors cannot be reduced (storage only); cast to f32/bf16 first")
    if op in ("sum", "mean") and dtype.kind == "bool":
        raise DTypeError(f"{what}: op={op!r} on a bool tensor; use 'max' (any) or 'min' (all)")
    if op == "mean" and not dtype.is_floating:
        raise DTypeError(f"{what}: op='mean' needs a floating tensor, got {dtype.name}")


def _timeout(mesh, timeout):
    return mesh.timeout if timeout is None else timeout


def all_reduce(x, axis=None, op="sum", *, mesh=None, timeout=None):
    """Elementwise ``op`` (sum, mean, max, min) of ``x`` over the ranks along ``axis``; every rank gets it."""
    x, group, mesh, layout = _resolve(x, axis, mesh, "all_reduce")
    _check_op(op, x.dtype, "all_reduce")
    timeout = _timeout(mesh, timeout)
    if mesh.check_shapes:
        group.check("all_reduce", x.dtype, x.shape, [("op", REDUCE_OPS.index(op), REDUCE_OPS)], timeout=timeout)
    out = _AllReduce.apply(x, group=group, op=op, timeout=timeout)
    return _finish(out, x, layout)


mesh_reduce = all_reduce  # the seeds' name: tessera.mesh_reduce(x, axis="data", op="mean")


def all_gather(x, axis=None, dim=0, *, mesh=None, timeout=None):
    """Every rank's ``x`` concatenated along ``dim`` in axis order. Shards may differ in size along ``dim``
    only (as ``distribute`` makes them when the size does not divide)."""
    x, group, mesh, layout = _resolve(x, axis, mesh, "all_gather")
    dim = _dim(dim, x.ndim, "all_gather")
    timeout = _timeout(mesh, timeout)
    if mesh.check_shapes:
        if dim >= HEADER_DIMS:
            raise ShapeError(f"all_gather: dim {dim} >= {HEADER_DIMS} is not supported")
        table = group.check("all_gather", x.dtype, x.shape, [("dim", dim, None)], free_dim=dim, timeout=timeout)
        rows = [int(n) for n in table[:, dim]]
    else:
        rows = [x.shape[dim]] * group.size
    out = _AllGather.apply(x, group=group, dim=dim, rows=rows, timeout=timeout)
    sharding = None
    if layout is not None:
        sharding = {d: a for d, a in layout.sharding.items() if d != dim}
    return _finish(out, x, layout, sharding)


def reduce_scatter(x, axis=None, dim=0, op="sum", *, mesh=None, timeout=None):
    """Sum (or mean) of ``x`` over the ranks, each rank keeping its piece along ``dim`` (array_split sizes)."""
    x, group, mesh, layout = _resolve(x, axis, mesh, "reduce_scatter")
    dim = _dim(dim, x.ndim, "reduce_scatter")
    _check_op(op, x.dtype, "reduce_scatter", ("sum", "mean"))
    timeout = _timeout(mesh, timeout)
    if mesh.check_shapes:
        group.check("reduce_scatter", x.dtype, x.shape, [("op", REDUCE_OPS.index(op), REDUCE_OPS), ("dim", dim, None)],
                    timeout=timeout)
    rows = [b - a for a, b in (shard_bounds(x.shape[dim], group.size, r) for r in range(group.size))]
    out = _ReduceScatter.apply(x, group=group, dim=dim, rows=rows, op=op, timeout=timeout)
    sharding = None
    if layout is not None:
        sharding = dict(layout.sharding)
        sharding[dim] = group.axes
    return _finish(out, x, layout, sharding)


def broadcast(x, axis=None, src=0, *, mesh=None, timeout=None):
    """The ``x`` of the rank at index ``src`` along ``axis``, on every rank of the axis. The others pass a tensor
    of the same shape and dtype (its values are ignored)."""
    x, group, mesh, layout = _resolve(x, axis, mesh, "broadcast")
    if not isinstance(src, int) or not 0 <= src < group.size:
        raise TesseraError(f"broadcast: src must be an index in 0..{group.size - 1} along {group.describe()}, "
                           f"got {src!r}")
    timeout = _timeout(mesh, timeout)
    if mesh.check_shapes:
        group.check("broadcast", x.dtype, x.shape, [("src", src, None)], timeout=timeout)
    out = _Broadcast.apply(x, group=group, src=src, timeout=timeout)
    return _finish(out, x, layout)


def barrier(axis=None, *, mesh=None, timeout=None):
    """Wait until every rank along ``axis`` (default: the whole mesh) has arrived."""
    if isinstance(axis, Mesh):
        mesh, axis = axis, None
    mesh = mesh if mesh is not None else current_mesh()
    if not isinstance(mesh, Mesh):
        raise TesseraError("barrier: no mesh; pass mesh=... or call inside `with mesh:` / @on_mesh(mesh)")
    group = mesh.group(axis)
    group.mpi.barrier(_timeout(mesh, timeout))


class RingHandle:
    """A ring exchange in flight: ``wait()`` returns the received Tensor (recorded on the tape)."""

    def __init__(self, pending, x, group, shift, layout, timeout):
        self._pending, self._x, self._group, self._shift, self._layout = pending, x, group, shift, layout
        self._timeout = timeout
        self._result = None

    def wait(self, timeout=None):
        if self._result is None:
            received = self._pending.wait(timeout)
            out = _RingExchange.apply(self._x, received=received, group=self._group, shift=self._shift,
                                      timeout=self._timeout)
            self._result = _finish(out, self._x, self._layout)
            self._pending = self._x = None
        return self._result


def ring_exchange(x, axis=None, shift=1, *, mesh=None, wait=True, timeout=None):
    """Send ``x`` to the rank ``shift`` ahead along ``axis`` (wrapping) and receive the one from ``shift`` behind.

    With ``wait=False`` the transfer is started and a ``RingHandle`` returned: compute, then ``handle.wait()``.
    """
    x, group, mesh, layout = _resolve(x, axis, mesh, "ring_exchange")
    if not isinstance(shift, int):
        raise TesseraError(f"ring_exchange: shift must be an int, got {shift!r}")
    timeout = _timeout(mesh, timeout)
    if mesh.check_shapes:
        group.check("ring_exchange", x.dtype, x.shape, [("shift", shift % group.size, None)], timeout=timeout)
    pending = group.transport(x.data).ring_start(x.data, shift, None, timeout)
    handle = RingHandle(pending, x, group, shift, layout, timeout)
    return handle.wait() if wait else handle


# ----------------------------------------------------------------------------------------------- layout helpers
def distribute(x, mesh=None, sharding=None, *, src=None, timeout=None):
    """A MeshTensor holding this rank's piece of the full tensor ``x`` (array_split sizes along each sharded dim).

    Every rank passes the full ``x`` (e.g. made from one seed); with ``src=r`` only mesh rank ``r``'s values
    count: they are broadcast first. ``sharding`` maps dims to axes, e.g. ``{-1: "model"}``.
    """
    from .mesh import normalize_sharding
    if not isinstance(x, Tensor):
        x = tensor(x)
    mesh = mesh if mesh is not None else current_mesh()
    if not isinstance(mesh, Mesh):
        raise TesseraError("distribute: no mesh; pass one or call inside `with mesh:` / @on_mesh(mesh)")
    sharding = normalize_sharding(sharding, x.ndim, mesh)
    if src is not None:
        if not isinstance(src, int) or not 0 <= src < mesh.size():
            raise TesseraError(f"distribute: src must be a mesh rank in 0..{mesh.size() - 1}, got {src!r}")
        x = broadcast(x, mesh.axis_names, src=src, mesh=mesh, timeout=timeout)
    index = [slice(None)] * x.ndim
    for dim, axes in sharding.items():
        group = mesh.group(axes)
        index[dim] = slice(*shard_bounds(x.shape[dim], group.size, group.rank))
    local = x[tuple(index)] if sharding else x
    return MeshTensor(local, mesh, sharding)


def gather(x, *, timeout=None):
    """The full tensor of a MeshTensor, on every rank (all_gather along each sharded dim)."""
    if not isinstance(x, MeshTensor):
        raise TesseraError(f"gather expects a MeshTensor, got {type(x).__name__}")
    local = x.local
    for dim, axes in sorted(x.sharding.items()):
        local = all_gather(local, axes, dim, mesh=x.mesh, timeout=timeout)
    return local
