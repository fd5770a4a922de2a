"""How bytes move between the processes of one group (an MPI sub-communicator of a Mesh).

Two transports, both working on raw backend arrays (NumPy or CuPy), both taking an optional ``timeout``:

- ``MPITransport``: mpi4py. NumPy arrays go straight to MPI. CuPy arrays are staged through host memory unless the
  MPI library reports that it is CUDA-aware (``mpi_cuda_aware()``: Open MPI's ``MPIX_Query_cuda_support`` or
  MPICH's ``MPIX_GPU_query_support``, read from the loaded library; never assumed). The CuPy stream is synchronised
  before every MPI call, since MPI knows nothing of CUDA streams. MPI knows no bf16/f16 arithmetic: reductions of
  16-bit floats run in f32 and are rounded once at the end; data movement (gather, broadcast, ring) is raw bytes.
- ``NCCLTransport``: ``cupy.cuda.nccl`` for CuPy arrays when every rank of the mesh has a GPU of its own (NCCL
  refuses two ranks on one GPU). Its unique id travels over MPI. Work is enqueued on the current CuPy stream (the
  ring exchange on a side stream so it overlaps compute); nothing waits on the host unless a timeout is given.

Every blocking call is an MPI non-blocking call plus a wait, so that a ``timeout`` (seconds) can turn a hang into
``CommTimeoutError``. A timed-out collective is still pending: the group is unusable afterwards; let the error
propagate (the Mesh's excepthook then aborts the job with the message).
"""
import ctypes
import os
import time

import numpy

from .. import backend
from ..errors import DTypeError, TesseraError

REDUCE_OPS = ("sum", "mean", "max", "min")


class CommTimeoutError(TesseraError, TimeoutError):
    """A collective or ring exchange did not complete within its timeout (another rank failed or never came)."""


def mpi():
    """The mpi4py.MPI module (importing it initialises MPI)."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise TesseraError("tessera_cp.comm needs mpi4py and an MPI runtime: pip install 'tessera_cp[mpi]' "
                           f"(or mpi4py over your system MPI); import failed: {e}") from None
    return MPI


# ----------------------------------------------------------------------------------------------- detection
def _loaded_mpi_library():
    """Path of the libmpi that mpi4py loaded (from /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libmpi.so"):
                    return path
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def mpi_cuda_aware():
    """True only when the MPI library says it accepts device buffers. ``TESSERA_MPI_CUDA_AWARE=0`` forces host
    staging; ``=1`` asserts CUDA-awareness the library cannot report (the user's responsibility)."""
    forced = os.environ.get("TESSERA_MPI_CUDA_AWARE", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    mpi()  # the library must be loaded (and initialised) before it is asked
    path = _loaded_mpi_library()
    try:
        lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
    except OSError:  # pragma: no cover
        return False
    if hasattr(lib, "MPIX_Query_cuda_support"):  # Open MPI
        lib.MPIX_Query_cuda_support.restype = ctypes.c_int
        return bool(lib.MPIX_Query_cuda_support())
    if hasattr(lib, "MPIX_GPU_query_support"):  # MPICH >= 4: (MPIX_GPU_SUPPORT_CUDA = 0, int *is_supported)
        flag = ctypes.c_int(0)
        if lib.MPIX_GPU_query_support(ctypes.c_int(0), ctypes.byref(flag)) == 0:
            return bool(flag.value)
    return False


def nccl_module():
    """cupy.cuda.nccl when it imports and its library loads, else None."""
    if not backend.cuda_available():
        return None
    try:
        from cupy.cuda import nccl
    except Exception:
        return None
    return nccl if getattr(nccl, "available", False) else None


# ----------------------------------------------------------------------------------------------- helpers
def wait_requests(requests, timeout, what):
    """Complete MPI requests, or raise CommTimeoutError after ``timeout`` seconds (None: wait forever)."""
    MPI = mpi()
    if timeout is None:
        MPI.Request.Waitall(requests)
        return
    deadline = time.monotonic() + timeout
    pause = 1e-5
    while not MPI.Request.Testall(requests):
        if time.monotonic() > deadline:
            raise CommTimeoutError(
                f"{what} did not complete within {timeout} s on world rank {MPI.COMM_WORLD.Get_rank()}: another "
                "rank failed or never reached it. The group is unusable now; let this error abort the job.")
        time.sleep(pause)  # back off so ranks sharing cores keep running
        pause = min(2 * pause, 1e-3)


def _wide_storage(dtype):
    """The dtype MPI reduces ``dtype`` in: 16-bit floats in f32 (MPI has no bf16), bool as uint8."""
    dtype = numpy.dtype(dtype)
    if dtype.kind == "b":
        return numpy.dtype(numpy.uint8)
    if dtype.name in ("float16", "bfloat16"):
        return numpy.dtype(numpy.float32)
    return dtype


def _mpi_op(op):
    MPI = mpi()
    return {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]  # mean: sum, then divide


def _flat_bytes(array):
    return array.reshape(-1).view(numpy.uint8)


def _byte_counts(rows, row_bytes):
    counts = numpy.asarray(rows, dtype=numpy.int64) * row_bytes
    displs = numpy.concatenate([[0], numpy.cumsum(counts)[:-1]]).astype(numpy.int64)
    return counts.tolist(), displs.tolist()


# ----------------------------------------------------------------------------------------------- MPI
class MPITransport:
    """Collectives over an mpi4py communicator, for NumPy arrays and (staged or direct) CuPy arrays."""

    name = "mpi"

    def __init__(self, comm, cuda_aware=False):
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.cuda_aware = cuda_aware
        self._tag = 0

    # Staging: what MPI may touch for array ``a``, and how a result comes back to a's device.
    def _out_module(self, a):
        return backend.array_module(a) if (self.cuda_aware or not backend.is_cupy_array(a)) else numpy

    def _stage(self, a):
        a = backend.array_module(a).ascontiguousarray(a).reshape(a.shape)  # (ascontiguousarray makes 0-d 1-d)
        if backend.is_cupy_array(a):
            backend.xp_for("cuda").cuda.get_current_stream().synchronize()  # MPI knows no streams
            if not self.cuda_aware:
                return a.get()
        return a

    @staticmethod
    def _unstage(out, like):
        return backend.xp_for("cuda").asarray(out) if backend.is_cupy_array(like) and not \
            backend.is_cupy_array(out) else out

    def all_reduce(self, a, op, timeout=None):
        wide = _wide_storage(a.dtype)
        send = self._stage(a.astype(wide, copy=False))
        out = self._out_module(a).empty_like(send)
        wait_requests([self.comm.Iallreduce(send, out, _mpi_op(op))], timeout, f"all_reduce({op})")
        if op == "mean":
            out = out / self.size
        return self._unstage(out, a).astype(a.dtype, copy=False)

    def all_gather(self, a, rows, timeout=None):
        """Concatenate along axis 0 the arrays of every rank; rank r holds ``rows[r]`` rows of a's row shape."""
        MPI = mpi()
        send = self._stage(a)
        row_shape = a.shape[1:]
        row_bytes = int(numpy.prod(row_shape, dtype=numpy.int64)) * a.dtype.itemsize
        out = self._out_module(a).empty((int(sum(rows)),) + tuple(row_shape), dtype=a.dtype)
        counts, displs = _byte_counts(rows, row_bytes)
        request = self.comm.Iallgatherv([_flat_bytes(send), MPI.BYTE], [_flat_bytes(out), counts, displs, MPI.BYTE])
        wait_requests([request], timeout, "all_gather")
        return self._unstage(out, a)

    def reduce_scatter(self, a, rows, op, timeout=None):
        """Reduce ``a`` (rows along axis 0) over the ranks; rank r keeps its block of ``rows[r]`` rows."""
        wide = _wide_storage(a.dtype)
        send = self._stage(a.astype(wide, copy=False))
        row = int(numpy.prod(a.shape[1:], dtype=numpy.int64))
        out = self._out_module(a).empty((rows[self.rank],) + tuple(a.shape[1:]), dtype=wide)
        counts = [int(r) * row for r in rows]
        wait_requests([self.comm.Ireduce_scatter(send, out, counts, _mpi_op(op))], timeout, f"reduce_scatter({op})")
        if op == "mean":
            out = out / self.size
        return self._unstage(out, a).astype(a.dtype, copy=False)

    def broadcast(self, a, root, timeout=None):
        MPI = mpi()
        xp = self._out_module(a)
        buf = self._stage(a).copy() if self.rank == root else xp.empty(a.shape, dtype=a.dtype)
        wait_requests([self.comm.Ibcast([_flat_bytes(buf), MPI.BYTE], root)], timeout, "broadcast")
        return self._unstage(buf, a)

    def reduce(self, a, root, timeout=None):
        """Sum of every rank's ``a`` on ``root``; zeros elsewhere (the gradient of a broadcast)."""
        MPI = mpi()
        wide = _wide_storage(a.dtype)
        send = self._stage(a.astype(wide, copy=False))
        out = self._out_module(a).zeros_like(send)
        wait_requests([self.comm.Ireduce(send, out, MPI.SUM, root)], timeout, "reduce")
        return self._unstage(out, a).astype(a.dtype, copy=False)

    def barrier(self, timeout=None):
        wait_requests([self.comm.Ibarrier()], timeout, "barrier")

    def ring_start(self, a, shift=1, recv_shape=None, timeout=None):
        """Send ``a`` to the rank ``shift`` ahead, receive from the one ``shift`` behind; returns a handle whose
        ``wait()`` gives the received array. Both transfers are in flight while the caller computes."""
        MPI = mpi()
        recv_shape = a.shape if recv_shape is None else tuple(recv_shape)
        send = self._stage(a)
        recv = self._out_module(a).empty(recv_shape, dtype=a.dtype)
        self._tag = (self._tag + 1) % 32000  # every rank posts its rings in the same order: tags pair up
        dest, source = (self.rank + shift) % self.size, (self.rank - shift) % self.size
        requests = [self.comm.Irecv([_flat_bytes(recv), MPI.BYTE], source, self._tag),
                    self.comm.Isend([_flat_bytes(send), MPI.BYTE], dest, self._tag)]
        return _MPIRing(requests, send, recv, a, timeout)


class _MPIRing:
    def __init__(self, requests, send, recv, like, timeout):
        self._requests, self._send, self._recv, self._like = requests, send, recv, like
        self.timeout = timeout
        self._result = None

    def wait(self, timeout=None):
        if self._result is None:
            wait_requests(self._requests, self.timeout if timeout is None else timeout, "ring_exchange")
            self._result = MPITransport._unstage(self._recv, self._like)
            self._send = self._recv = self._like = None
        return self._result


# ----------------------------------------------------------------------------------------------- NCCL
# ncclDataType_t and ncclRedOp_t values (nccl.h); CuPy builds may lack the newer names, the library has them.
_NCCL_TYPES = {"int8": 0, "uint8": 1, "bool": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
               "float32": 7, "float64": 8, "bfloat16": 9}
_NCCL_OPS = {"sum": 0, "mean": 0, "max": 2, "min": 3}


class NCCLTransport:
    """Collectives through NCCL for CuPy arrays; NumPy arrays and barriers go to the group's MPI transport."""

    name = "nccl"

    def __init__(self, mpi_transport):
        nccl = nccl_module()
        if nccl is None:
            raise TesseraError("NCCL is not available: cupy.cuda.nccl did not load (install nvidia-nccl-cu12/13)")
        self.mpi = mpi_transport
        self.size, self.rank = mpi_transport.size, mpi_transport.rank
        self._nccl = nccl
        uid = numpy.zeros(128, dtype=numpy.int8)  # ncclUniqueId is 128 chars
        if self.rank == 0:
            uid[:] = nccl.get_unique_id()
        mpi_transport.comm.Bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, tuple(int(c) for c in uid), self.rank)
        cupy = backend.xp_for("cuda")
        self._side = cupy.cuda.Stream(non_blocking=True)  # ring exchanges run here, beside compute

    @staticmethod
    def _type(dtype):
        name = numpy.dtype(dtype).name
        if name not in _NCCL_TYPES:
            raise DTypeError(f"NCCL cannot reduce {name} arrays")
        return _NCCL_TYPES[name]

    def _finish(self, stream, timeout, what):
        """With a timeout, wait on the host for the stream's work (aborting the communicator if it never ends)."""
        if timeout is None:
            return
        event = stream.record()
        deadline = time.monotonic() + timeout
        while not event.done:
            if time.monotonic() > deadline:
                self.comm.abort()
                raise CommTimeoutError(f"{what} (NCCL) did not complete within {timeout} s; the NCCL communicator "
                                       "was aborted. Let this error abort the job.")
            time.sleep(1e-4)

    def _stream(self):
        return backend.xp_for("cuda").cuda.get_current_stream()

    def all_reduce(self, a, op, timeout=None):
        cupy = backend.xp_for("cuda")
        send = cupy.ascontiguousarray(a).reshape(a.shape)
        send = send.view(numpy.uint8) if a.dtype == numpy.bool_ else send
        out = cupy.empty_like(send)
        stream = self._stream()
        self.comm.allReduce(send.data.ptr, out.data.ptr, send.size, self._type(send.dtype), _NCCL_OPS[op],
                            stream.ptr)
        if op == "mean":
            out /= self.size
        self._finish(stream, timeout, f"all_reduce({op})")
        return out.view(a.dtype)

    @staticmethod
    def _padded(a, most):
        """``a`` padded with zero rows to ``most`` rows, so NCCL's equal-count collectives serve unequal shards."""
        cupy = backend.xp_for("cuda")
        if a.shape[0] == most:
            return a
        pad = cupy.zeros((most - a.shape[0],) + a.shape[1:], dtype=a.dtype)
        return cupy.concatenate([a, pad])

    def all_gather(self, a, rows, timeout=None):
        cupy = backend.xp_for("cuda")
        most = max(rows)
        send = cupy.ascontiguousarray(self._padded(a, most))
        out = cupy.empty((self.size * most,) + a.shape[1:], dtype=a.dtype)
        stream = self._stream()
        self.comm.allGather(send.data.ptr, out.data.ptr, send.nbytes, _NCCL_TYPES["uint8"], stream.ptr)
        self._finish(stream, timeout, "all_gather")
        if all(r == most for r in rows):
            return out
        return cupy.concatenate([out[r * most:r * most + n] for r, n in enumerate(rows)])

    def reduce_scatter(self, a, rows, op, timeout=None):
        cupy = backend.xp_for("cuda")
        most = max(rows)
        if any(r != most for r in rows):  # lay every rank's block out at a stride of `most` rows
            blocks, start = [], 0
            for n in rows:
                blocks.append(self._padded(a[start:start + n], most))
                start += n
            a = cupy.concatenate(blocks)
        send = cupy.ascontiguousarray(a)
        out = cupy.empty((most,) + a.shape[1:], dtype=a.dtype)
        stream = self._stream()
        count = int(out.size)
        self.comm.reduceScatter(send.data.ptr, out.data.ptr, count, self._type(a.dtype), _NCCL_OPS[op], stream.ptr)
        if op == "mean":
            out /= self.size
        self._finish(stream, timeout, f"reduce_scatter({op})")
        return out[:rows[self.rank]]

    def broadcast(self, a, root, timeout=None):
        cupy = backend.xp_for("cuda")
        buf = cupy.ascontiguousarray(a).reshape(a.shape).copy() if self.rank == root else \
            cupy.empty(a.shape, dtype=a.dtype)
        stream = self._stream()
        self.comm.bcast(buf.data.ptr, buf.nbytes, _NCCL_TYPES["uint8"], root, stream.ptr)
        self._finish(stream, timeout, "broadcast")
        return buf

    def reduce(self, a, root, timeout=None):
        cupy = backend.xp_for("cuda")
        a = cupy.ascontiguousarray(a).reshape(a.shape)
        out = cupy.zeros_like(a)
        stream = self._stream()
        self.comm.reduce(a.data.ptr, out.data.ptr, a.size, self._type(a.dtype), _NCCL_OPS["sum"], root, stream.ptr)
        self._finish(stream, timeout, "reduce")
        return out

    def barrier(self, timeout=None):
        self._stream().synchronize()
        self.mpi.barrier(timeout)

    def ring_start(self, a, shift=1, recv_shape=None, timeout=None):
        cupy = backend.xp_for("cuda")
        recv_shape = a.shape if recv_shape is None else tuple(recv_shape)
        send = cupy.ascontiguousarray(a)
        recv = cupy.empty(recv_shape, dtype=a.dtype)
        current = self._stream()
        if self.size == 1:  # a ring of one: the message is our own
            return _NCCLRing(self, send, send.copy().reshape(recv_shape), current.record(), timeout)
        self._side.wait_event(current.record())  # the side stream sees `send` fully written
        dest, source = (self.rank + shift) % self.size, (self.rank - shift) % self.size
        nccl = self._nccl
        with self._side:
            nccl.groupStart()
            if send.nbytes:
                self.comm.send(send.data.ptr, send.nbytes, _NCCL_TYPES["uint8"], dest, self._side.ptr)
            if recv.nbytes:
                self.comm.recv(recv.data.ptr, recv.nbytes, _NCCL_TYPES["uint8"], source, self._side.ptr)
            nccl.groupEnd()
        return _NCCLRing(self, send, recv, self._side.record(), timeout)


class _NCCLRing:
    def __init__(self, transport, send, recv, done, timeout):
        self._transport, self._send, self._recv, self._done = transport, send, recv, done
        self.timeout = timeout

    def wait(self, timeout=None):
        if self._send is not None:
            timeout = self.timeout if timeout is None else timeout
            stream = self._transport._stream()
            stream.wait_event(self._done)  # later work on the compute stream runs after the transfer
            self._transport._finish(stream, timeout, "ring_exchange")
            self._send = None  # kept alive until here: the side stream was reading it
        return self._recv
