"""Losses: stable and fused cross-entropy, log-softmax, max-margin, contrastive (InfoNCE) and the fused linear
cross-entropy that never holds the whole [N, V] logits.

Cross-entropy (``stable_cross_entropy``, ``softmax_cross_entropy``): class scores on the last axis, integer targets of
the leading shape. Label smoothing is PyTorch's: the target distribution is ``(1 - eps) * onehot + eps / V``, so a
row's loss is ``(1 - eps) * -log p_t + eps * mean_j(-log p_j)``. Rows whose target is ``ignore_index`` add nothing;
"mean" divides by the number of counted rows and is 0 (not NaN) when none is counted. Targets outside ``[0, V)``
(other than ``ignore_index``) raise ``IndexOutOfRangeError`` before the call returns, and nothing reads outside a
row: on the CPU the check runs before anything else; on the GPU a small kernel (count_targets) counts the targets
first on the stream, the forward kernel that follows reads that count (for "mean", its gradient's scale) and writes
nothing at all when a target is out of range, and the host reads the count back only after launching it (so that
its wait overlaps the kernel), then raises. The loss's reduction runs on the device too (reduce_loss).

How the gradient is made: when the logits need a gradient, the forward computes it too, for an upstream gradient of
1, in the same pass over the logits (on a Hopper GPU one kernel reads each row from memory exactly once, splitting
it over a cluster of blocks that hold it in registers, and writes ``softmax - q`` from there; elsewhere, and for
rows it cannot hold, a kernel re-reads each row from L2 for the gradient); the backward only scales it by the
upstream gradient (a kernel that skips rows whose factor is exactly 1: for the usual ``loss.backward()`` this op's
backward moves no memory).
``inplace_backward=True`` writes that gradient over the logits' own memory during the forward (saving one [N, V]
buffer; do not read the logits afterwards; not allowed inside a checkpoint region, whose backward recomputes the
forward from those logits). The saved gradient is handed out once: a second backward through the same loss raises.

The loss is f32 for f16/bf16/f32 logits (a bf16 loss of ~12 would be rounded by up to 0.03) and f64 for f64. Under
``tessera_cp.precision(compute=f64)`` inputs are upcast first (the stable variants honour ``compute``); under
``precision(accumulate=f64)`` the reference runs in f64. The CUDA path runs for CuPy f32/f16/bf16 logits accumulated
in f32, unless ``TESSERA_REFERENCE=1``; everything else runs the array-module reference below.
"""

import threading

import numpy

from .. import autograd, backend, dtypes
from ..autograd import Function
from ..cuda import runtime
from ..errors import DeviceError, DTypeError, IndexOutOfRangeError, ShapeError, TesseraError
from ..functions.matmul import gemm, matmul
from ..precision import accumulate_storage, compute_dtype
from ..tensor import Tensor, tensor

REDUCTIONS = ("mean", "sum", "none")
MAX_THREADS = 1024       # loss.cu's MAX_THREADS (its __launch_bounds__)
LOADS_IN_FLIGHT = 4      # loss.cu's LOADS_IN_FLIGHT: packs of 16 bytes a thread loads per step
CLUSTER_THREADS = 256    # loss.cu's CLUSTER_THREADS: cross_entropy_fwd_cluster's block size
# cross_entropy_fwd_cluster's PACKS per thread: 8 (4 blocks per SM) where a cluster of MAX_CLUSTER such blocks holds
# the row (measured faster), else 16 (2 per SM, twice the row). CLUSTER_SIZES: the cluster sizes loss.cu
# instantiates for each (16 only where the host may pick it, and at 4 for comparison).
CLUSTER_PACKS = (8, 16)
CLUSTER_SIZES = {8: (1, 2, 4, 8), 16: (4, 8)}
MAX_CLUSTER = 8          # the largest cluster loss.cu instantiates (the portable limit)
CLUSTER_MIN_ROW_BYTES = CLUSTER_THREADS * 16  # shorter rows (under one pack per thread) take the one-block kernel
SCALE_THREADS = 256
COUNT_THREADS = 1024     # count_targets: one block
REDUCE_THREADS = 1024    # reduce_loss: one block
SCALE_BLOCKS = 1024      # scale_rows' blocks for one scalar factor (they stride over the rows)
CHUNK_BYTES = 256 << 20  # fused linear cross-entropy: the largest chunk of logits it holds at once
_NO_IGNORE = int(numpy.iinfo(numpy.int64).min)  # no valid target equals it (negatives are rejected)
_NULL = numpy.uint64(0)  # a null pointer argument
_CTYPES = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float16): "__half",
           dtypes.bf16.storage: "__nv_bfloat16"}


# ----------------------------------------------------------------------------------------------- dispatch
def _use_kernel(x):
    """The CUDA path: a CuPy array of a kernel dtype, accumulated in f32, and TESSERA_REFERENCE not set."""
    if backend.reference_forced():
        return False
    return (backend.is_cupy_array(x) and x.dtype in _CTYPES
            and accumulate_storage(x.dtype) == numpy.dtype(numpy.float32))


def _threads(n_cols, itemsize):
    """Block size for a row of n_cols: about LOADS_IN_FLIGHT packs of 16 bytes per thread, 32 to MAX_THREADS."""
    packs = -(-n_cols * itemsize // 16)
    warps = -(-packs // (LOADS_IN_FLIGHT * 32))
    return int(min(MAX_THREADS, max(32, 32 * warps)))


def _kernel(name, dtype=None, *params):
    """(runtime, kernel) of loss.cu: the plain name, or the template instantiated for dtype (and params)."""
    if dtype is None:
        return runtime, runtime.get_kernel("loss.cu", name)
    args = ", ".join((_CTYPES[numpy.dtype(dtype)],) + tuple(str(p) for p in params))
    return runtime, runtime.get_kernel("loss.cu", f"{name}<{args}>")


_KERNELS = {}  # (name, dtype, params, device id) -> (runtime, kernel)


def _kernel_for(x, name, dtype=None, *params):
    """_kernel for a launch on x's device, kept per device: a repeated launch skips the runtime's lookup."""
    if not backend.is_cupy_array(x):
        return _kernel(name, dtype, *params)
    key = (name, dtype, params, x.device.id)
    found = _KERNELS.get(key)
    if found is None:
        found = _KERNELS[key] = _kernel(name, dtype, *params)
    return found


def _has_clusters(x):
    """Whether x lives on a GPU with thread-block clusters (compute capability 9.0 or newer)."""
    return backend.is_cupy_array(x) and runtime.compute_capability(x.device.id) >= 90


def _cluster_blocks(packs, per_thread):
    """The fewest blocks (1, 2, 4 or 8) of per_thread packs per thread that hold ``packs``; 0 if 8 do not."""
    size = 1
    while size * CLUSTER_THREADS * per_thread < packs:
        size *= 2
    return size if size <= MAX_CLUSTER else 0


def _cluster_shape(x, grad):
    """(blocks per row, packs per thread) for cross_entropy_fwd_cluster, or (0, 0) for the one-block-per-row kernel.

    The cluster kernel takes a gradient's rows of more than CLUSTER_MIN_ROW_BYTES that MAX_CLUSTER blocks can hold
    (256k bf16 or 128k f32 logits), on a GPU with clusters, when the gradient buffer has the logits' 16-byte
    alignment; 8 packs per thread where 8 blocks of them hold the row, else 16. Without a gradient the one-block
    kernel reads each row once anyway, and measured faster."""
    row_bytes = x.shape[1] * x.itemsize
    if grad is None or row_bytes <= CLUSTER_MIN_ROW_BYTES or not _has_clusters(x):
        return 0, 0
    if (grad.data.ptr - x.data.ptr) % 16:
        return 0, 0
    packs = row_bytes // 16  # at least the row's whole aligned packs
    for per_thread in CLUSTER_PACKS:
        size = _cluster_blocks(packs, per_thread)
        if size:
            return size, per_thread
    return 0, 0


_FORWARD_PLANS = runtime.LaunchPlans()  # (shape, dtype, device, gradient alignment, forced choice) -> launch


def _forward_plan(x, grad, cluster=None, packs=None):
    """(runtime, kernel, grid, block) of the forward kernel for x [N, V] and grad; on a GPU kept per shape, dtype,
    device and alignment, so that a repeated call (a training loop) skips the choice and the lookups."""
    if not backend.is_cupy_array(x):
        return _build_forward_plan(x, grad, cluster, packs)
    alignment = -1 if grad is None else (grad.data.ptr - x.data.ptr) % 16
    key = (x.shape, x.dtype, x.device.id, alignment, cluster, packs)
    return _FORWARD_PLANS.get(key, lambda: _build_forward_plan(x, grad, cluster, packs))


def _build_forward_plan(x, grad, cluster, packs):
    n, v = x.shape
    if cluster is None:
        cluster, packs = _cluster_shape(x, grad)
    elif cluster and packs is None:  # forced size: the fewest packs per thread that fit
        packs = next((p for p in CLUSTER_PACKS if cluster * CLUSTER_THREADS * p * 16 >= v * x.itemsize),
                     CLUSTER_PACKS[-1])
    if cluster:
        runtime, kernel = _kernel("cross_entropy_fwd_cluster", x.dtype, cluster, packs)
        return runtime, kernel, _grid(n * cluster), (CLUSTER_THREADS,)
    runtime, kernel = _kernel("cross_entropy_fwd", x.dtype)
    return runtime, kernel, _grid(n), (_threads(v, x.itemsize),)


_NO_CHECK = {}  # device id -> a device array (0, 0)


def _no_check(x):
    """The forward kernels' ``check`` when no target count ran on the device: (0, 0), nothing refused."""
    if not backend.is_cupy_array(x):
        return numpy.zeros(2, dtype=numpy.uint64)
    found = _NO_CHECK.get(x.device.id)
    if found is None:
        with x.device:
            found = _NO_CHECK[x.device.id] = backend.array_module(x).zeros(2, dtype=numpy.uint64)
    return found


def _targets_on_gpu(flat):
    """Whether count_targets checks these int64 targets: a CuPy array, TESSERA_REFERENCE not set."""
    return backend.is_cupy_array(flat) and not backend.reference_forced()


def _grid(blocks):
    """A 1-D grid of blocks (one or a cluster per row): the grid's x dimension holds at most 2^31 - 1."""
    if blocks >= 2 ** 31:
        raise ShapeError(f"the CUDA loss kernels launch at most 2^31 - 1 blocks, got {blocks} (rows x blocks per row)")
    return (int(blocks),)


# ----------------------------------------------------------------------------------------------- row operations
# The cross-entropy of a block of rows, on the GPU by loss.cu and otherwise by the reference, with identical
# outputs: per-row loss, max m and log_s = log sum exp(x - m) (kept apart so that x - m stays exact).

def _rows_forward(x, targets, ignore_index, smoothing, grad=None, grad_scale=1.0):
    """(loss, m, log_s) per row of x [N, V] (C-contiguous); with ``grad`` ([N, V], may be x itself) also writes
    ``(softmax - q) * grad_scale`` there, 0 on ignored rows."""
    if _use_kernel(x):
        return _rows_forward_kernel(x, targets, ignore_index, smoothing, grad, grad_scale)
    return _rows_forward_reference(x, targets, ignore_index, smoothing, grad, grad_scale)


def _rows_forward_reference(x, targets, ignore_index, smoothing, grad, grad_scale):
    xp = backend.array_module(x)
    n, v = x.shape
    a = x.astype(accumulate_storage(x.dtype), copy=False)
    counted = targets != ignore_index
    target = xp.where(counted, targets, 0)
    m = a.max(axis=1, keepdims=True)
    shifted = a - m
    log_s = xp.log(xp.exp(shifted).sum(axis=1))
    loss = log_s - (1 - smoothing) * xp.take_along_axis(shifted, target[:, None], axis=1)[:, 0]
    if smoothing:
        loss = loss - smoothing * shifted.mean(axis=1)
    loss = xp.where(counted, loss, 0).astype(a.dtype, copy=False)
    if grad is not None:
        g = xp.exp(shifted - log_s[:, None]) - smoothing / v
        g[xp.arange(n), target] -= 1 - smoothing
        g *= (counted * grad_scale).astype(a.dtype)[:, None]
        grad[...] = g.astype(grad.dtype, copy=False)
    return loss, m[:, 0], log_s


def _rows_forward_kernel(x, targets, ignore_index, smoothing, grad, grad_scale, out=None, cluster=None, packs=None,
                         check=None, per_count=False, stats=True):
    """The CUDA path of _rows_forward; ``out`` (three f32 [N] arrays) lets tests hand in NaN-poisoned outputs;
    ``stats=False``: m and log_s are neither allocated nor written (returned as None);
    ``cluster``: None picks the kernel (_cluster_shape), 0 forces the one-block-per-row kernel, 1/2/4/8 the cluster
    kernel with that many blocks per row (``packs`` per thread: 8 or 16; None: the fewest that hold the row), for
    tests and benchmarks. ``check``: count_targets' [2] result on the device (None: nothing checked); the kernel
    writes nothing when check[1] != 0, and with ``per_count`` divides grad_scale by check[0]."""
    xp = backend.array_module(x)
    n, v = x.shape
    if out is not None:
        loss, m, log_s = out
    else:
        loss = xp.empty(n, dtype=numpy.float32)
        m, log_s = (xp.empty(n, dtype=numpy.float32) for _ in range(2)) if stats else (None, None)
    if n:
        runtime, kernel, grid, block = _forward_plan(x, grad, cluster, packs)
        runtime.launch_planned(kernel, grid, block,
                               (x, targets, loss, _NULL if m is None else m, _NULL if log_s is None else log_s,
                                x if grad is None else grad, numpy.int64(n), numpy.int64(v),
                                numpy.int64(ignore_index), numpy.float32(smoothing), numpy.float32(grad_scale),
                                numpy.int32(grad is not None), _no_check(x) if check is None else check,
                                numpy.int32(per_count)))
    return loss, m, log_s


def _rows_backward(x, targets, m, log_s, col0, vocab, ignore_index, smoothing, out, base_scale=1.0, row_scale=None):
    """out = (softmax - q)[:, col0:col0 + n_cols] * base_scale * row_scale, for x [N, n_cols] holding columns
    col0.. of rows with ``vocab`` classes whose (m, log_s) are known. ``row_scale``: None or [N]; out may be x."""
    if _use_kernel(x):
        xp = backend.array_module(x)
        n, cols = x.shape
        if not n:
            return out
        scale = xp.ones(1, numpy.float32) if row_scale is None else xp.ascontiguousarray(row_scale, numpy.float32)
        runtime, kernel = _kernel_for(x, "cross_entropy_bwd", x.dtype)
        runtime.launch(kernel, _grid(n), (_threads(cols, x.itemsize),),
                       (x, targets, m, log_s, scale, out, numpy.int64(n), numpy.int64(cols), numpy.int64(col0),
                        numpy.int64(vocab), numpy.int64(ignore_index), numpy.float32(smoothing),
                        numpy.float32(base_scale), numpy.int64(0 if row_scale is None else 1)))
        return out
    xp = backend.array_module(x)
    n, cols = x.shape
    acc = accumulate_storage(x.dtype)
    counted = targets != ignore_index
    g = xp.exp((x.astype(acc, copy=False) - m.astype(acc)[:, None]) - log_s.astype(acc)[:, None])
    g -= smoothing / vocab
    local = targets - col0
    hit = counted & (local >= 0) & (local < cols)
    g[xp.arange(n)[hit], local[hit]] -= 1 - smoothing
    factor = counted * base_scale
    if row_scale is not None:
        factor = factor * row_scale.astype(acc, copy=False)
    g *= factor.astype(acc, copy=False)[:, None]
    out[...] = g.astype(out.dtype, copy=False)
    return out


def _scale_rows(x, g, per_row):
    """x [rows, cols] *= g in place: g has one entry per row (per_row) or is a scalar."""
    if x.size == 0:
        return x
    if _use_kernel(x) and x.flags.c_contiguous:
        xp = backend.array_module(x)
        factor = g  # read as g[row * stride]: any C-contiguous f32 array (the usual 0-d upstream of 1 as it is)
        if g.dtype != numpy.float32 or not g.flags.c_contiguous:
            factor = xp.ascontiguousarray(g.reshape(-1), dtype=numpy.float32)
        runtime, kernel = _kernel_for(x, "scale_rows", x.dtype)
        blocks = x.shape[0] if per_row else min(x.shape[0], SCALE_BLOCKS)
        runtime.launch(kernel, _grid(blocks), (SCALE_THREADS,),
                       (x, factor, numpy.int64(x.shape[0]), numpy.int64(x.shape[1]), numpy.int64(1 if per_row else 0)))
        return x
    xp = backend.array_module(x)
    factor = g.reshape(-1, 1) if per_row else g
    xp.multiply(x, factor, out=x, casting="unsafe")
    return x


def _reduce(rows, reduction, count, shape):
    """Per-row losses reduced: "none" keeps ``shape``, "sum" adds, "mean" divides by count (0 when count is 0)."""
    xp = backend.array_module(rows)
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    if reduction == "mean":
        total = total / count if count else xp.zeros((), rows.dtype)
    return xp.asarray(total, dtype=rows.dtype)


def _reduce_on_device(rows, reduction, counts, shape):
    """_reduce on the GPU path, with the count still on the device (count_targets' ``counts``): reduce_loss sums
    the rows (in double, in a fixed order) and for "mean" divides by counts[0] (0 when it is 0)."""
    if reduction == "none":
        return rows.reshape(shape)
    out = backend.array_module(rows).empty((), dtype=numpy.float32)
    runtime, kernel = _kernel_for(rows, "reduce_loss")
    runtime.launch(kernel, (1,), (REDUCE_THREADS,),
                   (rows, numpy.int64(rows.size), counts, numpy.int32(reduction == "mean"), out))
    return out


# ----------------------------------------------------------------------------------------------- argument checks
def _float_input(x, name):
    x = x if isinstance(x, Tensor) else tensor(x)
    if x.dtype.kind != "float":
        raise DTypeError(f"{name} must be f16, bf16, f32 or f64, got {x.dtype.name}")
    return x


def _upcast(x):
    """x in precision(compute=...)'s dtype when that is wider (the stable variants honour it), else x."""
    want = compute_dtype(x.dtype)
    return x.astype(want) if want.itemsize > x.dtype.itemsize else x


def _index_array(targets, device, name):
    """Integer class indices as a backend array on ``device``."""
    if isinstance(targets, Tensor):
        if targets.device != device:
            raise DeviceError(f"{name} is on {targets.device}, the scores on {device}")
        array = targets.data
    else:
        array = backend.to_device(targets if hasattr(targets, "dtype") else numpy.asarray(targets), device)
    if array.dtype.kind not in "iu":
        raise DTypeError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    return array


def _check_ce_options(targets, scores, shape_name, reduction, label_smoothing, ignore_index):
    """(target array, smoothing, ignore value) for a cross-entropy over ``scores`` [..., C]: targets of shape
    scores.shape[:-1] on its device (``shape_name`` says so in the error), a valid reduction and smoothing."""
    target_array = _index_array(targets, scores.device, "targets")
    if tuple(target_array.shape) != scores.shape[:-1]:
        raise ShapeError(f"targets must have {shape_name}, {scores.shape[:-1]}, got {tuple(target_array.shape)}")
    _check_reduction(reduction)
    return target_array, _check_smoothing(label_smoothing), _ignore_value(ignore_index)


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise TesseraError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_smoothing(label_smoothing):
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise TesseraError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


def _ignore_value(ignore_index):
    if ignore_index is None:
        return _NO_IGNORE
    if not isinstance(ignore_index, (int, numpy.integer)) or isinstance(ignore_index, bool):
        raise TesseraError(f"ignore_index must be an int or None, got {ignore_index!r}")
    return int(ignore_index)


def _flat_targets(array):
    """Targets as the contiguous int64 [N] the kernels read: the array itself when it already is one."""
    if array.ndim == 1 and array.dtype == numpy.int64 and array.flags.c_contiguous:
        return array
    return backend.array_module(array).ascontiguousarray(array.reshape(-1), dtype=numpy.int64)


_SIDE = threading.local()  # per thread: device id -> (stream, event) that copy target counts back


def _side_stream(xp, device_id):
    """(stream, event) of this thread for device_id: a non-blocking stream, where a copy waits only for what it is
    told to, and the event that tells it (re-recorded by each check: creating one costs the host several us)."""
    kept = _SIDE.__dict__.setdefault("kept", {})
    found = kept.get(device_id)
    if found is None:
        found = kept[device_id] = (xp.cuda.Stream(non_blocking=True),
                                   xp.cuda.Event(block=False, disable_timing=True))
    return found


class _TargetCheck:
    """count_targets launched on the current stream; ``counts`` [2] (counted, out of range) stays on the device,
    where the forward kernels launched after it read it, and ``result`` reads it back later.

    On a GPU the read-back copy runs on a side stream that waits (through an event) for count_targets alone, not
    for the kernels queued after it: the host waits a few microseconds, while the forward kernel runs."""

    def __init__(self, flat, n_classes, ignore):
        xp = backend.array_module(flat)
        self.flat, self.n_classes, self.ignore = flat, n_classes, ignore
        self.counts = xp.empty(2, dtype=numpy.uint64)
        runtime, kernel = _kernel_for(flat, "count_targets")
        runtime.launch_planned(kernel, (1,), (COUNT_THREADS,), (flat, numpy.int64(flat.size),
                                                                 numpy.int64(n_classes), numpy.int64(ignore),
                                                                 self.counts))
        self.side = None
        if xp is not numpy:
            self.side, self.done = _side_stream(xp, flat.device.id)
            self.done.record()

    def result(self, shape, name):
        """The number of counted (not ignored) targets; IndexOutOfRangeError for any other outside [0, n_classes).
        Called before any other check of this thread records the kept event again."""
        host = self.counts
        if self.side is not None:
            self.side.wait_event(self.done)  # the copy waits for count_targets alone
            host = backend.array_module(self.counts).asnumpy(self.counts, stream=self.side)  # returns once copied
        count, n_bad = int(host[0]), int(host[1])
        if n_bad:
            _raise_out_of_range(self.flat, self.n_classes, self.ignore, n_bad, shape, name)
        return count


def _count_targets(flat, n_classes, ignore, shape, name):
    """The number of counted (not ignored) targets; IndexOutOfRangeError for any other outside [0, n_classes).
    On the GPU count_targets and a 16-byte copy back, waited for at once (_TargetCheck)."""
    if _targets_on_gpu(flat):
        return _TargetCheck(flat, n_classes, ignore).result(shape, name)
    counted = flat != ignore
    count, n_bad = int(counted.sum()), int((counted & ((flat < 0) | (flat >= n_classes))).sum())
    if n_bad:
        _raise_out_of_range(flat, n_classes, ignore, n_bad, shape, name)
    return count


def _raise_out_of_range(flat, n_classes, ignore, n_bad, shape, name):
    """IndexOutOfRangeError naming the count and the first offending target (looked up only now)."""
    xp = backend.array_module(flat)
    bad = (flat != ignore) & ((flat < 0) | (flat >= n_classes))
    first = int(xp.argmax(bad))
    where = numpy.unravel_index(first, shape) if shape else ()
    allowed = f"[0, {n_classes})" + ("" if ignore == _NO_IGNORE else f" or ignore_index={ignore}")
    raise IndexOutOfRangeError(f"{name}: {n_bad} target(s) outside {allowed}; the first is {int(flat[first])} "
                               f"at position {tuple(int(i) for i in where)}")


# ----------------------------------------------------------------------------------------------- cross-entropy
class CrossEntropy(Function):
    """Cross-entropy of logits [..., V] against int64 targets (flattened), with the gradient made in forward."""

    def forward(self, logits, targets, target_shape=(), count=0, ignore_index=_NO_IGNORE, smoothing=0.0,
                reduction="mean", need_grad=False, inplace=False):
        """``count``: the number of counted targets, or a _TargetCheck whose count is still on the device (the
        CUDA path: the kernel reads it there, and reduce_loss reduces the loss)."""
        xp = backend.array_module(logits)
        self.shape, self.reduction, self.done = logits.shape, reduction, False
        x = logits if logits.ndim == 2 else logits.reshape(-1, logits.shape[-1])  # a view when contiguous
        if not x.flags.c_contiguous:
            x = xp.ascontiguousarray(x)
        grad = None
        if need_grad:
            grad = x if inplace else xp.empty(x.shape, dtype=x.dtype)
        self.save(grad)
        if isinstance(count, _TargetCheck):
            loss = _rows_forward_kernel(x, targets, ignore_index, smoothing, grad, 1.0, check=count.counts,
                                        per_count=reduction == "mean", stats=False)[0]
            return _reduce_on_device(loss, reduction, count.counts, target_shape)
        scale = 1.0 / count if reduction == "mean" and count else 1.0
        loss, _, _ = _rows_forward(x, targets, ignore_index, smoothing, grad, scale)
        return _reduce(loss, reduction, count, target_shape)

    def backward(self, g):
        if self.done:
            raise TesseraError("stable_cross_entropy: its gradient was already handed to an earlier backward "
                               "(the loss back-propagates once); compute the loss again")
        (grad,) = self.saved
        self.saved, self.done = (), True
        _scale_rows(grad, g, per_row=self.reduction == "none")
        return grad.reshape(self.shape), None


def stable_cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                         inplace_backward=False):
    """Cross-entropy of ``logits`` [..., V] (class scores last) against integer ``targets`` [...].

    ``ignore_index`` (an int, or None for none) marks rows that add nothing; ``label_smoothing`` in [0, 1] as in
    PyTorch; ``reduction`` "mean" (over counted rows; 0 when none is counted), "sum" or "none" (shape of targets).
    ``inplace_backward=True`` writes the gradient over the logits' memory (see the module docstring).
    Returns an f32 loss for f16/bf16/f32 logits (f64 for f64).
    """
    logits = _float_input(logits, "logits")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ShapeError(f"logits must have a class axis of size >= 1 last, got shape {logits.shape}")
    target_array, smoothing, ignore = _check_ce_options(targets, logits, "the logits' shape without the class axis",
                                                        reduction, label_smoothing, ignore_index)
    logits = _upcast(logits)
    # Read during this call only, so no copy when the targets already are contiguous int64 (the kernels need that).
    flat = _flat_targets(target_array)
    need_grad = autograd.is_grad_enabled() and logits.requires_grad
    if inplace_backward and need_grad and getattr(autograd._state, "region", None) is not None:
        # A checkpoint region recomputes this forward during backward, from the logits it would have overwritten.
        raise TesseraError("stable_cross_entropy(inplace_backward=True) inside a checkpoint region: the recomputed "
                           "forward would read logits already overwritten by the gradient")
    options = dict(target_shape=tuple(target_array.shape), ignore_index=ignore, smoothing=smoothing,
                   reduction=reduction, need_grad=need_grad, inplace=bool(inplace_backward))
    if _use_kernel(logits.data) and _targets_on_gpu(flat):
        # count_targets, then the forward kernel (which reads the count, and writes nothing if a target is out of
        # range), then the wait for the count: the host's wait overlaps the kernel.
        check = _TargetCheck(flat, logits.shape[-1], ignore)
        loss = CrossEntropy.apply(logits, flat, count=check, **options)
        check.result(target_array.shape, "stable_cross_entropy")
        return loss
    count = _count_targets(flat, logits.shape[-1], ignore, target_array.shape, "stable_cross_entropy")
    return CrossEntropy.apply(logits, flat, count=count, **options)


def softmax_cross_entropy(logits, targets, reduction="mean"):
    """Softmax and cross-entropy fused, for logits [B, C] and targets [B] that are all in [0, C) (no ignore index,
    no smoothing): the same fused kernel as ``stable_cross_entropy``, without the softmax ever stored."""
    logits = _float_input(logits, "logits")
    if logits.ndim != 2:
        raise ShapeError(f"softmax_cross_entropy expects logits [B, C], got shape {logits.shape}")
    return stable_cross_entropy(logits, targets, ignore_index=None, reduction=reduction)


def log_softmax_stable(x, dim=-1):
    """log softmax along ``dim`` computed as ``(x - max) - log(sum(exp(x - max)))``: finite for any finite input,
    however large. Half-precision inputs accumulate in f32. Under ``precision(compute=...)`` a wider dtype, the
    input is upcast first and the result comes back in that dtype; otherwise in the input's dtype.

    This is the tape's log-softmax (``Tensor.log_softmax``, one implementation for the whole package) under the
    seeds' name, with the stable variants' handling of ``compute``.
    """
    x = _upcast(_float_input(x, "x"))
    if x.ndim == 0:
        raise ShapeError("log_softmax_stable needs a tensor of rank >= 1, got a 0-d tensor")
    return x.log_softmax(dim)


# ----------------------------------------------------------------------------------------------- max-margin
class MaxMargin(Function):
    """Multi-class hinge: relu(max_{j != t}(s_j + margin) - s_t) per row."""

    def forward(self, scores, targets, margin=1.0, reduction="mean"):
        xp = backend.array_module(scores)
        a = scores.astype(accumulate_storage(scores.dtype), copy=False)
        rows = xp.arange(a.shape[0])
        positive = a[rows, targets]
        others = a + a.dtype.type(margin)
        others[rows, targets] = -numpy.inf  # a row with no other class gets max -inf, so loss 0: never NaN
        best = others.argmax(axis=1)
        hinge = others[rows, best] - positive
        active = hinge > 0
        self.save(targets, best, active)
        self.shape, self.dtype, self.reduction, self.count = a.shape, scores.dtype, reduction, a.shape[0]
        return _reduce(xp.where(active, hinge, 0).astype(a.dtype), reduction, a.shape[0], (a.shape[0],))

    def backward(self, g):
        targets, best, active = self.saved
        xp = backend.array_module(g)
        weight = g.reshape(-1) if self.reduction == "none" else g / max(self.count if self.reduction == "mean" else 1, 1)
        weight = weight * active
        grad = xp.zeros(self.shape, dtype=weight.dtype)
        rows = xp.arange(self.shape[0])
        grad[rows, best] += weight
        grad[rows, targets] -= weight  # best != target wherever weight is non-zero
        return grad.astype(self.dtype, copy=False), None


def stable_max_margin_loss(scores, targets, margin=1.0, reduction="mean"):
    """Multi-class hinge loss for ``scores`` [B, N] and targets [B]: ``relu(max_{j != t}(s_j + margin) - s_t)``.

    The competing maximum excludes the target by masking it to -inf (no large-constant tricks), so rows with a
    single class give 0. "mean" averages over B (0 for B = 0). Ties in the maximum send the gradient to the first.
    """
    scores = _upcast(_float_input(scores, "scores"))
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ShapeError(f"scores must be [B, N] with N >= 1, got shape {scores.shape}")
    target_array = _index_array(targets, scores.device, "targets")
    if tuple(target_array.shape) != scores.shape[:1]:
        raise ShapeError(f"targets must have shape ({scores.shape[0]},), got {tuple(target_array.shape)}")
    _check_reduction(reduction)
    flat = target_array.astype(numpy.int64)
    _count_targets(flat, scores.shape[1], _NO_IGNORE, target_array.shape, "stable_max_margin_loss")
    return MaxMargin.apply(scores, flat, margin=float(margin), reduction=reduction)


# ----------------------------------------------------------------------------------------------- contrastive
def _masked_logsumexp(xp, s, mask):
    """log sum_{mask} exp(s) per row, max-shifted; 0 for rows where the mask is empty (their term is not defined)."""
    has_any = mask.any(axis=1)
    masked = xp.where(mask, s, -numpy.inf)
    peak = xp.where(has_any, masked.max(axis=1), 0)
    total = xp.exp(masked - peak[:, None]).sum(axis=1)  # -inf off the mask gives 0, never an overflow
    return xp.log(xp.where(has_any, total, 1)) + peak


def _masked_softmax(xp, s, mask, lse):
    return xp.exp(xp.where(mask, s - lse[:, None], -numpy.inf))


class Contrastive(Function):
    """InfoNCE over a batch: anchors i, candidates a != i, positives p != i with equal labels."""

    def forward(self, x, labels, temperature=0.07, normalize=True, eps=1e-12, reduction="mean"):
        xp = backend.array_module(x)
        a = x.astype(accumulate_storage(x.dtype), copy=False)
        b = a.shape[0]
        if normalize:
            norm = xp.sqrt((a * a).sum(axis=1))
            self.denominator = xp.maximum(norm, a.dtype.type(eps))
            self.clamped = norm < eps  # there z = x / eps is linear in x
            z = a / self.denominator[:, None]
        else:
            z = a
        s = (z @ z.T) / a.dtype.type(temperature)
        positives = (labels[:, None] == labels[None, :]) & ~xp.eye(b, dtype=bool)
        has_positive = positives.any(axis=1)
        candidates = ~xp.eye(b, dtype=bool) & has_positive[:, None]  # rows without a positive drop out entirely
        lse_all = _masked_logsumexp(xp, s, candidates)
        lse_pos = _masked_logsumexp(xp, s, positives)
        rows = xp.where(has_positive, lse_all - lse_pos, 0).astype(a.dtype)
        count = int(has_positive.sum())
        # d loss_i / d s_ia: softmax over the candidates minus softmax over the positives.
        probs = _masked_softmax(xp, s, candidates, lse_all) - _masked_softmax(xp, s, positives, lse_pos)
        self.save(z, probs)
        self.normalize, self.temperature, self.dtype = normalize, temperature, x.dtype
        self.reduction, self.count = reduction, count
        return _reduce(rows, reduction, count, (b,))

    def backward(self, g):
        z, probs = self.saved
        xp = backend.array_module(z)
        if self.reduction == "none":
            weight = g.reshape(-1, 1).astype(z.dtype)
        else:
            weight = g.astype(z.dtype) / max(self.count if self.reduction == "mean" else 1, 1)
        ds = probs * weight
        dz = ((ds + ds.T) @ z) / z.dtype.type(self.temperature)
        if self.normalize:  # z = x / max(|x|, eps): project out the radial part where |x| > eps
            radial = xp.where(self.clamped, 0, (z * dz).sum(axis=1))
            dz = (dz - z * radial[:, None]) / self.denominator[:, None]
        return dz.astype(self.dtype, copy=False), None


def stable_contrastive_loss(embeddings, labels, temperature=0.07, normalize=True, reduction="mean"):
    """Supervised InfoNCE (SimCLR/MoCo with labels) over ``embeddings`` [B, D] and integer ``labels`` [B].

    Similarities ``s_ia = z_i . z_a / temperature`` with z the L2-normalised embeddings (``normalize=True``, norms
    clamped at 1e-12) or the embeddings themselves. For anchor i, the positives are the other rows with its label and
    ``loss_i = logsumexp_{a != i} s_ia - logsumexp_{p positive} s_ip`` (the seeds' -log(sum of positive exps / sum of
    all exps)), computed with max-shifted log-sum-exps, so tiny temperatures stay finite.
    A row with no positive (a label seen once) has no defined term: its loss is 0, it gets no gradient from its own
    term, and "mean" averages over the rows that have a positive (0 when none has). "sum" adds the defined terms;
    "none" gives [B] with 0 for rows without a positive.
    """
    embeddings = _upcast(_float_input(embeddings, "embeddings"))
    if embeddings.ndim != 2:
        raise ShapeError(f"embeddings must be [B, D], got shape {embeddings.shape}")
    label_array = _index_array(labels, embeddings.device, "labels")
    if tuple(label_array.shape) != embeddings.shape[:1]:
        raise ShapeError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(label_array.shape)}")
    if not float(temperature) > 0:
        raise TesseraError(f"temperature must be > 0, got {temperature}")
    _check_reduction(reduction)
    return Contrastive.apply(embeddings, label_array, temperature=float(temperature), normalize=bool(normalize),
                             reduction=reduction)


# ----------------------------------------------------------------------------------------------- fused linear CE

def _slice_logits(h, weight, bias, v0, v1):
    """h @ weight[v0:v1].T (+ bias[v0:v1]): one slice of the logits, C-contiguous."""
    out = matmul(h, weight[v0:v1].T)
    if bias is not None:
        out += bias[v0:v1]
    return out


def _chunk_sweep(h, weight, bias, targets, ignore, smoothing, rows, need, scale, stats=None, row_scale=None):
    """One pass over chunks of ``rows`` rows of h [N, D]. Per chunk: its logits [rows, V] = h_c @ weight.T (+ bias);
    then either the fused forward kernel (``stats`` None: the rows' loss, m and log_s, and, when a gradient is
    needed, dlogits written over the logits, scaled by ``scale``) or the backward kernel from the saved
    ``stats`` = (m, log_s), scaled by scale * row_scale; then grad_h[chunk] = dlogits @ weight, grad_w += dlogits.T
    @ h_c (a GEMM that adds into grad_w: the first chunk writes it) and the bias gradient's f32 column sums.
    ``need``: which of (grad_h, grad_w, grad_b) to make. Returns (loss, m, log_s, grad_h, grad_w, grad_b)."""
    xp = backend.array_module(h)
    n, vocab = h.shape[0], weight.shape[0]
    acc = accumulate_storage(h.dtype)
    need_h, need_w, need_b = need
    if stats is None:
        loss, m, log_s = (xp.empty(n, dtype=acc) for _ in range(3))
    else:
        loss, (m, log_s) = None, stats
    grad_h = xp.empty(h.shape, dtype=h.dtype) if need_h else None
    grad_w = (xp.zeros if n == 0 else xp.empty)(weight.shape, dtype=weight.dtype) if need_w else None
    sum_b = xp.zeros(vocab, dtype=acc) if need_b else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        logits = _slice_logits(h[r0:r1], weight, bias, 0, vocab)
        if stats is None:
            rows_loss, rows_m, rows_log_s = _rows_forward(logits, targets[r0:r1], ignore, smoothing,
                                                          logits if any(need) else None, scale)
            loss[r0:r1], m[r0:r1], log_s[r0:r1] = rows_loss, rows_m, rows_log_s
        else:
            _rows_backward(logits, targets[r0:r1], m[r0:r1], log_s[r0:r1], 0, vocab, ignore, smoothing, logits,
                           scale, None if row_scale is None else row_scale[r0:r1])
        if need_h:
            gemm(logits, weight, grad_h[r0:r1])
        if need_w:
            gemm(logits.T, h[r0:r1], grad_w, accumulate=r0 > 0)
        if need_b:
            sum_b += logits.sum(axis=0, dtype=acc)
        del logits
    grad_b = sum_b.astype(bias.dtype, copy=False) if need_b else None
    return loss, m, log_s, grad_h, grad_w, grad_b


class FusedLinearCrossEntropy(Function):
    """cross_entropy(hidden @ weight.T + bias, targets) without the [N, V] logits.

    One sweep over chunks of ``rows`` rows (_chunk_sweep). For "mean"/"sum" it runs in the forward and makes every
    gradient then, for an upstream gradient of 1 (the backward only scales them); for "none" the upstream gradient
    differs per row, so the forward makes the loss and row statistics and the backward sweeps again (the logits
    recomputed) with the per-row scales.
    """

    def forward(self, hidden, weight, bias, targets, target_shape=(), count=0, ignore_index=_NO_IGNORE,
                smoothing=0.0, reduction="mean", rows=1024, need=(False, False, False)):
        xp = backend.array_module(hidden)
        h = xp.ascontiguousarray(hidden.reshape(-1, hidden.shape[-1]))
        grads_now = any(need) and reduction != "none"
        scale = 1.0 / count if reduction == "mean" and count else 1.0
        loss, m, log_s, grad_h, grad_w, grad_b = _chunk_sweep(
            h, weight, bias, targets, ignore_index, smoothing, rows, need if grads_now else (False, False, False),
            scale)
        self.hidden_shape, self.reduction, self.need, self.done = hidden.shape, reduction, need, False
        self.config = (ignore_index, smoothing, rows)
        if grads_now:
            self.save(grad_h, grad_w, grad_b)
        elif any(need):
            self.save(h, weight, bias, targets, m, log_s)
        return _reduce(loss, reduction, count, target_shape)

    def backward(self, g):
        if self.done:
            raise TesseraError("fused_linear_cross_entropy: its gradients were already handed to an earlier "
                               "backward (the loss back-propagates once); compute the loss again")
        saved, self.saved, self.done = self.saved, (), True
        if self.reduction == "none":
            h, weight, bias, targets, m, log_s = saved
            ignore, smoothing, rows = self.config
            _, _, _, grad_h, grad_w, grad_b = _chunk_sweep(h, weight, bias, targets, ignore, smoothing, rows,
                                                           self.need, 1.0, stats=(m, log_s), row_scale=g.reshape(-1))
        else:
            grad_h, grad_w, grad_b = saved
            for grad in (grad_h, grad_w, grad_b):
                if grad is not None:
                    _scale_rows(grad.reshape(-1, grad.shape[-1]), g, per_row=False)
        if grad_h is not None:
            grad_h = grad_h.reshape(self.hidden_shape)
        return grad_h, grad_w, grad_b, None


def _default_chunk(budget, other, itemsize, size):
    """How many rows (or columns) of a slice of logits fit in ``budget`` bytes: a multiple of 128 when >= 128."""
    fit = max(1, budget // max(1, other * itemsize))
    if fit >= 128:
        fit -= fit % 128
    return int(min(max(size, 1), fit))


def fused_linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100, label_smoothing=0.0,
                               reduction="mean", chunk_size=None):
    """``stable_cross_entropy(hidden @ weight.T + bias, targets, ...)`` without materialising the logits.

    hidden [..., D], weight [V, D] (the LM-head layout), bias [V] or None, targets [...] (hidden's shape without D).
    The rows go ``chunk_size`` at a time (default: about CHUNK_BYTES, 256 MiB, of logits): a chunk's logits
    [chunk, V] are computed, turned into their gradient in place by the fused cross-entropy kernel, and used for the
    hidden gradient of those rows (dlogits @ weight) and the weight gradient (dlogits.T @ hidden, added into it:
    3 GEMMs in all, as the unfused path does, no recomputation). Peak extra memory: one chunk of logits plus the
    gradients themselves.

    Rounding: the hidden gradient is rounded once, as the unfused path's. The weight gradient is accumulated in
    its own dtype, one GEMM per chunk (f32 arithmetic, ``out += dlogits_c.T @ hidden_c`` with cuBLAS's beta = 1),
    so for bf16/f16 weights it is rounded once per chunk: ceil(N / chunk_size) times rather than once (an f32
    accumulator would cost 2 x V x D bytes more). The bias gradient is summed in f32 and rounded once.

    Same arguments and loss dtype as ``stable_cross_entropy``; the loss back-propagates once.
    """
    hidden = _float_input(hidden, "hidden")
    weight = _float_input(weight, "weight")
    if hidden.ndim < 1 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ShapeError(f"hidden [..., D] and weight [V, D] must share D, got {hidden.shape} and {weight.shape}")
    if weight.shape[0] < 1:
        raise ShapeError(f"weight must have at least one class row, got shape {weight.shape}")
    tensors = [("hidden", hidden), ("weight", weight)]
    if bias is not None:
        bias = _float_input(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ShapeError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
        tensors.append(("bias", bias))
    for name, t in tensors[1:]:
        if t.device != hidden.device:
            raise DeviceError(f"{name} is on {t.device}, hidden on {hidden.device}")
        if t.dtype is not hidden.dtype:
            raise DTypeError(f"{name} must have hidden's dtype {hidden.dtype.name}, got {t.dtype.name}")
    target_array, smoothing, ignore = _check_ce_options(targets, hidden, "hidden's shape without D", reduction,
                                                        label_smoothing, ignore_index)
    if chunk_size is not None and (not isinstance(chunk_size, (int, numpy.integer)) or chunk_size < 1):
        raise TesseraError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    hidden, weight = _upcast(hidden), _upcast(weight)
    bias = _upcast(bias) if bias is not None else None
    n, vocab = int(numpy.prod(hidden.shape[:-1], dtype=numpy.int64)), weight.shape[0]
    itemsize = hidden.dtype.itemsize
    rows = int(chunk_size) if chunk_size else _default_chunk(CHUNK_BYTES, vocab, itemsize, n)
    flat = target_array.reshape(-1).astype(numpy.int64)  # a copy: the "none" backward reads it again
    count = _count_targets(flat, vocab, ignore, target_array.shape, "fused_linear_cross_entropy")
    grad_on = autograd.is_grad_enabled()
    need = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, flat, target_shape=tuple(target_array.shape),
                                         count=count, ignore_index=ignore, smoothing=smoothing, reduction=reduction,
                                         rows=rows, need=need)
