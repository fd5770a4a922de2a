"""The device mesh: MPI processes laid out on named axes, one sub-communicator per axis (and per group of axes).

``Mesh(devices=np.array(range(16)).reshape(2, 4, 2), axis_names=["data", "model", "pipeline"])``: the entries are
ranks of COMM_WORLD (or of ``comm=``); every process builds the same Mesh and finds its own coordinates. On a GPU
machine each process binds GPU ``local_rank % gpus_on_node`` (local rank among the processes of its node).

Faults: arguments that differ between ranks, or a mesh that does not fit the job, raise the same TesseraError on
every rank (``agree``). An uncaught exception on any rank prints that rank's traceback and aborts the whole job
(``install_abort_on_exception``, installed by every Mesh of more than one process) instead of leaving the other
ranks blocked in their next collective.
"""
import contextlib
import functools
import itertools
import sys
import threading
import time
import zlib

import numpy

from .. import backend, dtypes, errors
from ..errors import ShapeError, TesseraError
from ..tensor import Tensor
from .transport import MPITransport, NCCLTransport, mpi, mpi_cuda_aware, nccl_module, wait_requests

_local = threading.local()


# ----------------------------------------------------------------------------------------------- agreement
def _allgather_bytes(comm, payload, timeout=None):
    """Every rank's ``payload`` (bytes), in rank order: two small MPI allgathers, no pickle."""
    MPI = mpi()
    size = comm.Get_size()
    lengths = numpy.zeros(size, dtype=numpy.int64)
    wait_requests([comm.Iallgather(numpy.array([len(payload)], dtype=numpy.int64), lengths)], timeout, "agreement")
    out = numpy.empty(int(lengths.sum()), dtype=numpy.uint8)
    displs = numpy.concatenate([[0], numpy.cumsum(lengths)[:-1]])
    wait_requests([comm.Iallgatherv([numpy.frombuffer(payload, dtype=numpy.uint8).copy(), MPI.BYTE],
                            [out, lengths.tolist(), displs.tolist(), MPI.BYTE])], timeout, "agreement")
    return [out[d:d + n].tobytes() for d, n in zip(displs, lengths)]


def agree(comm, error, ranks=None, timeout=None):
    """Collective: raise on EVERY rank when any rank has an error (an exception or None here).

    The raised error has the class and message of the first failing rank, prefixed with the ranks that failed
    (``ranks``: the name of each member of ``comm``, e.g. its world rank; default its rank in ``comm``), so all
    ranks report the same thing instead of the healthy ones blocking in the next collective.
    """
    payload = b"" if error is None else f"{type(error).__name__}\0{error}".encode()
    reports = _allgather_bytes(comm, payload, timeout)
    ranks = list(range(len(reports))) if ranks is None else list(ranks)
    failed = [ranks[r] for r, p in enumerate(reports) if p]
    if not failed:
        return
    reports = [p for p in reports if p]
    name, message = reports[0].decode().split("\0", 1)
    cls = getattr(errors, name, TesseraError)
    cls = cls if isinstance(cls, type) and issubclass(cls, TesseraError) else TesseraError
    raise cls(f"rank {failed[0]}{' (and ' + str(failed[1:]) + ')' if failed[1:] else ''}: {message}")


HEADER_DIMS = 14
_HEADER = 6 + HEADER_DIMS  # dtype, ndim, 3 parameters, shape checksum, dims


def _shape_crc(shape):
    return zlib.crc32(repr(tuple(int(n) for n in shape)).encode())


# ----------------------------------------------------------------------------------------------- groups
class Group:
    """The processes that share every coordinate except those on ``axes``: an MPI communicator and transports.

    Ranks are ordered row-major over ``axes`` in the order given; ``rank`` is this process's index.
    """

    def __init__(self, mesh, axes, comm, members):
        self.mesh, self.axes, self.comm = mesh, axes, comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.members = members  # ranks of the mesh's parent communicator, in group order
        self.mpi = MPITransport(comm, mesh.cuda_aware)
        self._nccl = None

    def transport(self, array):
        if backend.is_cupy_array(array) and self.mesh.use_nccl:
            if self._nccl is None:  # collective over this group; every member is in the same call
                self._nccl = NCCLTransport(self.mpi)
            return self._nccl
        return self.mpi

    def allgather_ints(self, values, timeout=None):
        """Collective: every member's small int vector, as a (size, len) int64 array in group order."""
        values = numpy.asarray(values, dtype=numpy.int64).reshape(-1)
        out = numpy.empty((self.size, values.size), dtype=numpy.int64)
        wait_requests([self.comm.Iallgather(values, out)], timeout, "allgather of sizes")
        return out

    def describe(self):
        names = ", ".join(repr(a) for a in self.axes)
        return f"axis {names} (size {self.size}, ranks {list(self.members)})"

    def check(self, what, array_dtype, shape, params=(), free_dim=None, timeout=None):
        """Collective: every member's dtype, shape and parameters must agree (except ``shape[free_dim]``).

        Costs one MPI allgather of 20 int64 per call (latency-bound: microseconds on one node); ``Mesh(check=
        False)`` skips it. Returns the table of every member's dims (rows in group order) for callers that need
        the other shards' sizes. Raises the same error on every member when they disagree.
        """
        if self.size == 1:
            return numpy.array([list(shape)], dtype=numpy.int64)
        shape = tuple(int(n) for n in shape)
        header = numpy.full(_HEADER, -1, dtype=numpy.int64)
        header[0] = dtypes.ALL.index(array_dtype)
        header[1] = len(shape)
        for i, (_, value, _labels) in enumerate(params):
            header[2 + i] = value
        header[5] = _shape_crc(tuple(-1 if d == free_dim else n for d, n in enumerate(shape)))
        header[6:6 + min(len(shape), HEADER_DIMS)] = shape[:HEADER_DIMS]
        table = numpy.empty((self.size, _HEADER), dtype=numpy.int64)
        wait_requests([self.comm.Iallgather(header, table)], timeout, f"{what} (argument check)")
        differ = (table != table[0]).any(axis=0)
        if free_dim is not None and free_dim < HEADER_DIMS:
            differ[6 + free_dim] = False
        if differ.any():
            self._disagreement(what, table, differ, params, free_dim)
        return table[:, 6:6 + min(len(shape), HEADER_DIMS)]

    def _disagreement(self, what, table, differ, params, free_dim):
        where = f"{what} over {self.describe()}"

        def shape_of(row):
            dims = [int(n) for n in row[6:6 + min(int(row[1]), HEADER_DIMS)]]
            return "(" + ", ".join(map(str, dims)) + (", ..." if row[1] > HEADER_DIMS else "") + ")"

        for i, (name, _, labels) in enumerate(params):
            if differ[2 + i]:
                values = [labels[v] if labels else int(v) for v in table[:, 2 + i]]
                listing = ", ".join(f"rank {m}: {name}={v!r}" for m, v in zip(self.members, values))
                raise TesseraError(f"{where}: the ranks passed different arguments ({listing})")
        listing = ", ".join(f"rank {m}: {dtypes.ALL[int(row[0])].name} {shape_of(row)}"
                            for m, row in zip(self.members, table))
        if differ[0]:
            raise errors.DTypeError(f"{where}: the ranks' dtypes disagree ({listing})")
        rule = "shapes must match" + (f" except along dim {free_dim}" if free_dim is not None else "")
        raise ShapeError(f"{where}: the ranks' shapes disagree ({listing}); {rule}")


# ----------------------------------------------------------------------------------------------- Mesh
class Mesh:
    """MPI processes on named axes. Every process of the job must build the same Mesh at the same point.

    ``transport``: "auto" (NCCL for CuPy arrays when every rank has a GPU of its own, else MPI: CUDA-aware if the
    library says so, host-staged otherwise), "mpi", or "nccl" (an error where NCCL cannot run). ``check``: before
    each collective, compare the ranks' dtypes, shapes and arguments (one small allgather). ``timeout``: the
    default seconds every collective on this mesh may wait (None: forever). The communicators of single axes and
    of the whole mesh are made here; that of a group of axes (``axis=("data", "model")``) on its first use, by
    the members of that group only.
    """

    def __init__(self, devices, axis_names=None, *, comm=None, transport="auto", check=True, timeout=None,
                 bind_gpu=True, abort_on_exception=True):
        MPI = mpi()
        self.parent = MPI.COMM_WORLD if comm is None else comm
        size, rank = self.parent.Get_size(), self.parent.Get_rank()
        devices = numpy.asarray(devices)
        if axis_names is None:
            axis_names = tuple(f"axis{i}" for i in range(devices.ndim))
        axis_names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
        error = None
        try:
            self._validate(devices, axis_names, size, transport)
        except TesseraError as e:
            error = e
        agree(self.parent, error)
        # The same arguments on every rank, or nothing works: compare a checksum of them.
        digest = zlib.crc32(devices.astype(numpy.int64).tobytes() + repr((devices.shape, axis_names)).encode())
        digests = _allgather_bytes(self.parent, digest.to_bytes(4, "little"))
        if len(set(digests)) > 1:
            groups = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            raise TesseraError("Mesh: the ranks built different meshes (devices or axis_names differ); ranks that "
                               f"agree with each other: {sorted(groups.values())}")
        if abort_on_exception and size > 1:
            install_abort_on_exception()
        self.devices = devices.astype(numpy.int64)
        self.axis_names = axis_names
        self.shape = devices.shape
        self.check_shapes = check
        self.timeout = timeout
        self.coords = tuple(int(c) for c in numpy.argwhere(self.devices == rank)[0])
        self.rank = int(numpy.ravel_multi_index(self.coords, self.shape))  # row-major position in the mesh
        self.local_rank, self.gpu = self._bind_gpu(MPI, bind_gpu)
        self.cuda_aware = mpi_cuda_aware()
        self.use_nccl = self._choose_nccl(MPI, transport)
        self._groups = {}
        # One communicator per axis, and one for the whole mesh (Split is collective over the parent).
        for name in axis_names:
            self._split((name,))
        if len(axis_names) > 1:
            self._split(axis_names)

    @staticmethod
    def _validate(devices, axis_names, size, transport):
        if devices.ndim == 0 or devices.size == 0:
            raise ShapeError(f"Mesh: devices must be a non-empty array of ranks, got shape {devices.shape}")
        if devices.dtype.kind not in "iu":
            raise TesseraError(f"Mesh: devices must hold integer ranks, got dtype {devices.dtype}")
        if len(axis_names) != devices.ndim:
            raise ShapeError(f"Mesh: {len(axis_names)} axis_names {list(axis_names)} for a devices array of rank "
                             f"{devices.ndim} (shape {devices.shape})")
        if len(set(axis_names)) != len(axis_names) or not all(isinstance(n, str) for n in axis_names):
            raise TesseraError(f"Mesh: axis_names must be distinct strings, got {list(axis_names)}")
        if devices.size != size:
            raise ShapeError(f"Mesh: devices has {devices.size} entries (shape {devices.shape}) but the job has "
                             f"{size} processes; launch with mpiexec -n {devices.size}")
        flat = devices.reshape(-1)
        if len(set(flat.tolist())) != flat.size:
            repeated = sorted({int(r) for r in flat if (flat == r).sum() > 1})
            raise TesseraError(f"Mesh: devices repeats ranks {repeated}; each of the {size} ranks must appear once")
        if flat.min() < 0 or flat.max() >= size:
            raise TesseraError(f"Mesh: devices holds ranks outside 0..{size - 1}: {sorted(set(flat.tolist()))}")
        if transport not in ("auto", "mpi", "nccl"):
            raise TesseraError(f"Mesh: transport must be 'auto', 'mpi' or 'nccl', got {transport!r}")

    def _bind_gpu(self, MPI, bind_gpu):
        local = self.parent.Split_type(MPI.COMM_TYPE_SHARED, key=self.parent.Get_rank())
        local_rank = local.Get_rank()
        self._local_comm = local
        if not (bind_gpu and backend.default_device() == "cuda"):
            return local_rank, None
        cupy = backend.xp_for("cuda")
        gpu = local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(gpu).use()
        return local_rank, gpu

    def _choose_nccl(self, MPI, transport):
        """NCCL when asked or 'auto', CuPy and NCCL load, and no two ranks of the mesh share a GPU."""
        reason = None
        if transport == "mpi":
            reason = "transport='mpi'"
        elif self.gpu is None:
            reason = "not on a GPU"
        elif nccl_module() is None:
            reason = "cupy.cuda.nccl is not available"
        cupy = backend.xp_for("cuda") if self.gpu is not None else None
        key = b"" if cupy is None else (MPI.Get_processor_name() + "/" + cupy.cuda.Device().pci_bus_id).encode()
        keys = _allgather_bytes(self.parent, key if reason is None else b"")
        if reason is None and (b"" in keys or len(set(keys)) != len(keys)):
            reason = "some ranks share a GPU or are not on one"
        verdicts = _allgather_bytes(self.parent, b"1" if reason is None else b"0")
        if b"0" in verdicts and reason is None:
            reason = "another rank cannot use NCCL"
        self.transport_reason = reason or "every rank has its own GPU"
        if transport == "nccl" and reason is not None:
            raise TesseraError(f"Mesh(transport='nccl'): NCCL cannot be used: {reason}")
        return reason is None

    def _members(self, axes):
        """Parent-communicator ranks of this process's group along ``axes``, row-major over ``axes``."""
        index = [self.axis_names.index(a) for a in axes]
        members = []
        for picked in itertools.product(*(range(self.shape[i]) for i in index)):
            coords = list(self.coords)
            for i, c in zip(index, picked):
                coords[i] = c
            members.append(int(self.devices[tuple(coords)]))
        return members

    def _split(self, axes):
        members = self._members(axes)
        others = [i for i, n in enumerate(self.axis_names) if n not in axes]
        color = int(numpy.ravel_multi_index([self.coords[i] for i in others], [self.shape[i] for i in others])) \
            if others else 0
        comm = self.parent.Split(color, members.index(self.parent.Get_rank()))
        self._groups[axes] = Group(self, axes, comm, members)

    def group(self, axis=None):
        """The Group of this process along ``axis``: a name, a tuple of names, or None (the current default axis
        inside ``mesh.axis(name)``, else the whole mesh)."""
        axes = self._axes(axis)
        found = self._groups.get(axes)
        if found is None:  # a group of axes: created on first use, collectively over its members only
            members = self._members(axes)
            comm = self.parent.Create_group(self.parent.Get_group().Incl(members), tag=7)
            found = self._groups[axes] = Group(self, axes, comm, members)
        return found

    def _axes(self, axis):
        if axis is None:
            axis = getattr(_local, "axis", {}).get(id(self)) or self.axis_names
        axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
        unknown = [a for a in axes if a not in self.axis_names]
        if unknown or not axes or len(set(axes)) != len(axes):
            raise TesseraError(f"mesh axis {axis!r} is not one (or a tuple of distinct ones) of "
                               f"{list(self.axis_names)}")
        return axes

    # -------------------------------------------------------------- queries
    @property
    def ndim(self):
        return len(self.shape)

    def size(self, axis=None):
        """Number of processes in the mesh, or along ``axis`` (the seeds call ``mesh.size()``). No communication."""
        if axis is None:
            return int(self.devices.size)
        return int(numpy.prod([self.shape[self.axis_names.index(a)] for a in self._axes(axis)]))

    def axis_rank(self, axis):
        """This process's index along ``axis`` (a name or a tuple of names, row-major). No communication."""
        index = [self.axis_names.index(a) for a in self._axes(axis)]
        return int(numpy.ravel_multi_index([self.coords[i] for i in index], [self.shape[i] for i in index]))

    def __enter__(self):
        _stack().append(self)
        return self

    def __exit__(self, *exc):
        _stack().pop()
        return False

    @contextlib.contextmanager
    def axis(self, name):
        """Inside, this mesh is current and collectives without an ``axis`` use ``name`` (the seeds'
        ``with mesh.axis("model"):``)."""
        self._axes(name)
        defaults = _local.__dict__.setdefault("axis", {})
        previous = defaults.get(id(self))
        defaults[id(self)] = name
        _stack().append(self)
        try:
            yield self
        finally:
            _stack().pop()
            if previous is None:
                defaults.pop(id(self), None)
            else:
                defaults[id(self)] = previous

    def __repr__(self):
        axes = ", ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.shape))
        return f"Mesh({axes}; rank {self.rank} at {dict(zip(self.axis_names, self.coords))})"


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def current_mesh():
    """The innermost mesh made current by ``with mesh:``, ``mesh.axis(...)`` or ``@on_mesh``; None outside."""
    stack = _stack()
    return stack[-1] if stack else None


def on_mesh(mesh):
    """Decorator: run the function with ``mesh`` current, so the collectives inside need no ``mesh=``."""
    if not isinstance(mesh, Mesh):
        raise TesseraError(f"on_mesh expects a Mesh, got {type(mesh).__name__}")

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for value in itertools.chain(args, kwargs.values()):
                if isinstance(value, MeshTensor) and value.mesh is not mesh:
                    raise TesseraError(f"{fn.__name__}: a MeshTensor of another mesh was passed to a function "
                                       f"on {mesh!r}")
            with mesh:
                return fn(*args, **kwargs)
        return wrapper
    return decorate


# ----------------------------------------------------------------------------------------------- shards
def shard_bounds(n, parts, index):
    """(start, stop) of piece ``index`` when ``n`` items split into ``parts`` pieces as numpy.array_split does
    (the first n % parts pieces one longer)."""
    q, r = divmod(int(n), int(parts))
    start = index * q + min(index, r)
    return start, start + q + (1 if index < r else 0)


class MeshTensor:
    """This process's shard of a tensor laid over a mesh, and which mesh axes split which dimensions.

    ``sharding`` maps a dimension to the axis (or tuple of axes) that splits it; other dimensions are whole on
    every process (replicated). Arithmetic with a scalar, a plain Tensor (applied to the shard) or a MeshTensor
    of the same layout works on the shard and keeps the layout.
    """

    __slots__ = ("local", "mesh", "sharding")

    def __init__(self, local, mesh, sharding=None):
        if not isinstance(local, Tensor):
            raise TesseraError(f"MeshTensor holds a Tensor shard, got {type(local).__name__}")
        if not isinstance(mesh, Mesh):
            raise TesseraError(f"MeshTensor needs a Mesh, got {type(mesh).__name__}")
        self.local, self.mesh = local, mesh
        self.sharding = normalize_sharding(sharding, local.ndim, mesh)

    shape = property(lambda self: self.local.shape, doc="the shard's shape")
    dtype = property(lambda self: self.local.dtype)
    device = property(lambda self: self.local.device)
    ndim = property(lambda self: self.local.ndim)
    requires_grad = property(lambda self: self.local.requires_grad)
    grad = property(lambda self: self.local.grad)

    def backward(self, grad=None):
        self.local.backward(grad.local if isinstance(grad, MeshTensor) else grad)

    def numpy(self):
        return self.local.numpy()

    def with_local(self, local, sharding=None):
        return MeshTensor(local, self.mesh, self.sharding if sharding is None else sharding)

    def _binary(self, other, op):
        if isinstance(other, MeshTensor):
            if other.mesh is not self.mesh or other.sharding != self.sharding:
                raise TesseraError(f"MeshTensor arithmetic needs the same mesh and sharding, got {self.sharding} "
                                   f"and {other.sharding}")
            other = other.local
        return self.with_local(op(self.local, other))

    __add__ = lambda self, o: self._binary(o, lambda a, b: a + b)
    __radd__ = lambda self, o: self._binary(o, lambda a, b: b + a)
    __sub__ = lambda self, o: self._binary(o, lambda a, b: a - b)
    __rsub__ = lambda self, o: self._binary(o, lambda a, b: b - a)
    __mul__ = lambda self, o: self._binary(o, lambda a, b: a * b)
    __rmul__ = lambda self, o: self._binary(o, lambda a, b: b * a)
    __truediv__ = lambda self, o: self._binary(o, lambda a, b: a / b)
    __rtruediv__ = lambda self, o: self._binary(o, lambda a, b: b / a)
    __pow__ = lambda self, o: self._binary(o, lambda a, b: a ** b)
    __neg__ = lambda self: self.with_local(-self.local)

    def __repr__(self):
        return f"MeshTensor(shard {self.shape} {self.dtype.name}, sharding={self.sharding}, {self.mesh!r})"


def normalize_sharding(sharding, ndim, mesh):
    """{dim: axes tuple} with dims made non-negative; each axis may split one dimension only."""
    out, used = {}, set()
    for dim, axis in dict(sharding or {}).items():
        if not isinstance(dim, int) or not -ndim <= dim < ndim:
            raise ShapeError(f"sharding: dim {dim!r} is not a dimension of a rank-{ndim} tensor")
        axes = mesh._axes(axis)
        if used & set(axes):
            raise TesseraError(f"sharding: axis {sorted(used & set(axes))} splits two dimensions in {sharding}")
        used |= set(axes)
        out[dim % ndim] = axes
    return out


# ----------------------------------------------------------------------------------------------- faults
_installed = False
# Before the abort: mpiexec forwards a rank's output through its proxies, and an abort can end the job before the
# last lines (this traceback) arrive; a failing job waits this long so that the user sees why it failed.
ABORT_GRACE_S = 0.5


def install_abort_on_exception():
    """An uncaught exception prints its traceback (with the rank) and aborts every process of the job."""
    global _installed
    if _installed:
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        MPI = mpi()
        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        sys.stderr.write(f"tessera_cp: uncaught exception on rank {rank} of {size}; aborting the MPI job\n")
        previous(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
    _installed = True
