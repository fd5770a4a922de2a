"""Losses: stable and fused cross-entropy, log-softmax, max-margin, contrastive (InfoNCE) and the fused linear
cross-entropy that never holds the whole [N, V] logits.

Cross-entropy (``stable_cross_entropy``, ``softmax_cross_entropy``): class scores on the last axis, integer targets of
the leading shape. Label smoothing is PyTorch's: the target distribution is ``(1 - eps) * onehot + eps / V``, so a
row's loss is ``(1 - eps) * -log p_t + eps * mean_j(-log p_j)``. Rows whose target is ``ignore_index`` add nothing;
"mean" divides by the number of counted rows and is 0 (not NaN) when none is counted. Targets outside ``[0, V)``
(other than ``ignore_index``) raise ``IndexOutOfRangeError`` before anything reads the logits: the check runs on the
host, one small reduction and one device-to-host copy per call (a kernel would read out of bounds otherwise; the
kernel also guards itself, giving NaN rather than reading outside the row).

How the gradient is made: when the logits need a gradient, the forward computes it too, for an upstream gradient of
1, in the same pass over the logits (on the GPU one kernel reads each row once for its max and sum and writes
``softmax - q`` on a second, L2-resident pass); the backward only scales it by the upstream gradient (a kernel that
skips rows whose factor is exactly 1: for the usual ``loss.backward()`` this op's backward moves no memory).
``inplace_backward=True`` writes that gradient over the logits' own memory during the forward (saving one [N, V]
buffer; do not read the logits afterwards; not allowed inside a checkpoint region, whose backward recomputes the
forward from those logits). The saved gradient is handed out once: a second backward through the same loss raises.

The loss is f32 for f16/bf16/f32 logits (a bf16 loss of ~12 would be rounded by up to 0.03) and f64 for f64. Under
``tessera_cp.precision(compute=f64)`` inputs are upcast first (the stable variants honour ``compute``); under
``precision(accumulate=f64)`` the reference runs in f64. The CUDA path runs for CuPy f32/f16/bf16 logits accumulated
in f32, unless ``TESSERA_REFERENCE=1``; everything else runs the array-module reference below.
"""

import numpy

from .. import autograd, backend, dtypes
from ..autograd import Function
from ..errors import DeviceError, DTypeError, IndexOutOfRangeError, ShapeError, TesseraError
from ..functions.matmul import matmul
from ..precision import accumulate_storage, compute_dtype
from ..tensor import Tensor, tensor

REDUCTIONS = ("mean", "sum", "none")
MAX_THREADS = 1024       # loss.cu's MAX_THREADS (its __launch_bounds__)
LOADS_IN_FLIGHT = 4      # loss.cu's LOADS_IN_FLIGHT: packs of 16 bytes a thread loads per step
SCALE_THREADS = 256
CHUNK_BYTES = 256 << 20  # fused linear cross-entropy: the largest slice of logits it holds at once
_NO_IGNORE = int(numpy.iinfo(numpy.int64).min)  # no valid target equals it (negatives are rejected)
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


def _kernel(name, dtype):
    from ..cuda import runtime
    return runtime, runtime.get_kernel("loss.cu", f"{name}<{_CTYPES[numpy.dtype(dtype)]}>")


def _grid(rows):
    """One block per row: the grid's x dimension holds at most 2^31 - 1."""
    if rows >= 2 ** 31:
        raise ShapeError(f"the CUDA loss kernels take at most 2^31 - 1 rows, got {rows}")
    return (int(rows),)


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


def _rows_forward_kernel(x, targets, ignore_index, smoothing, grad, grad_scale, out=None):
    """The CUDA path of _rows_forward; ``out`` (three f32 [N] arrays) lets tests hand in NaN-poisoned outputs."""
    xp = backend.array_module(x)
    n, v = x.shape
    loss, m, log_s = out if out is not None else (xp.empty(n, dtype=numpy.float32) for _ in range(3))
    if n:
        runtime, kernel = _kernel("cross_entropy_fwd", x.dtype)
        runtime.launch(kernel, _grid(n), (_threads(v, x.itemsize),),
                       (x, targets, loss, m, log_s, x if grad is None else grad, numpy.int64(n), numpy.int64(v),
                        numpy.int64(ignore_index), numpy.float32(smoothing), numpy.float32(grad_scale),
                        numpy.int32(grad is not None)))
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
        runtime, kernel = _kernel("cross_entropy_bwd", x.dtype)
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
        factor = xp.ascontiguousarray(g.reshape(-1), dtype=numpy.float32)
        runtime, kernel = _kernel("scale_rows", x.dtype)
        runtime.launch(kernel, _grid(x.shape[0]), (SCALE_THREADS,),
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


def _count_targets(flat, n_classes, ignore, shape, name):
    """The number of counted (not ignored) targets; IndexOutOfRangeError for any other outside [0, n_classes).

    One reduction and one device-to-host copy; the offending entry is looked up only when there is one."""
    xp = backend.array_module(flat)
    counted = flat != ignore
    bad = counted & ((flat < 0) | (flat >= n_classes))
    count, n_bad = (int(v) for v in backend.to_device(xp.stack([counted.sum(), bad.sum()]), "cpu"))
    if n_bad:
        first = int(xp.argmax(bad))
        where = numpy.unravel_index(first, shape) if shape else ()
        allowed = f"[0, {n_classes})" + ("" if ignore == _NO_IGNORE else f" or ignore_index={ignore}")
        raise IndexOutOfRangeError(f"{name}: {n_bad} target(s) outside {allowed}; the first is {int(flat[first])} "
                                   f"at position {tuple(int(i) for i in where)}")
    return count


# ----------------------------------------------------------------------------------------------- cross-entropy
class CrossEntropy(Function):
    """Cross-entropy of logits [..., V] against int64 targets (flattened), with the gradient made in forward."""

    def forward(self, logits, targets, target_shape=(), count=0, ignore_index=_NO_IGNORE, smoothing=0.0,
                reduction="mean", need_grad=False, inplace=False):
        xp = backend.array_module(logits)
        self.shape, self.reduction, self.done = logits.shape, reduction, False
        x = xp.ascontiguousarray(logits.reshape(-1, logits.shape[-1]))  # a view of the logits when contiguous
        scale = 1.0 / count if reduction == "mean" and count else 1.0
        grad = None
        if need_grad:
            grad = x if inplace else xp.empty(x.shape, dtype=x.dtype)
        loss, _, _ = _rows_forward(x, targets, ignore_index, smoothing, grad, scale)
        self.save(grad)
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
    target_array = _index_array(targets, logits.device, "targets")
    if tuple(target_array.shape) != logits.shape[:-1]:
        raise ShapeError(f"targets must have the logits' shape without the class axis, {logits.shape[:-1]}, "
                         f"got {tuple(target_array.shape)}")
    _check_reduction(reduction)
    smoothing = _check_smoothing(label_smoothing)
    ignore = _ignore_value(ignore_index)
    logits = _upcast(logits)
    flat = target_array.reshape(-1).astype(numpy.int64)
    count = _count_targets(flat, logits.shape[-1], ignore, target_array.shape, "stable_cross_entropy")
    need_grad = autograd.is_grad_enabled() and logits.requires_grad
    if inplace_backward and need_grad and getattr(autograd._state, "region", None) is not None:
        # A checkpoint region recomputes this forward during backward, from the logits it would have overwritten.
        raise TesseraError("stable_cross_entropy(inplace_backward=True) inside a checkpoint region: the recomputed "
                           "forward would read logits already overwritten by the gradient")
    return CrossEntropy.apply(logits, flat, target_shape=tuple(target_array.shape), count=count,
                              ignore_index=ignore, smoothing=smoothing, reduction=reduction, need_grad=need_grad,
                              inplace=bool(inplace_backward))


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


def _vocab_sweep(h, weight, bias, targets, m, log_s, ignore, smoothing, cols, base_scale, row_scale,
                 need_weight, need_bias):
    """Weight and bias gradients, a vocabulary slice at a time: each slice's logits for all N rows are recomputed,
    turned into their gradient from the saved (m, log_s), and multiplied by h in one GEMM over all N (no partial
    sums across chunks, so the result is rounded once, as the unfused path's)."""
    xp = backend.array_module(h)
    vocab = weight.shape[0]
    grad_w = xp.empty(weight.shape, dtype=weight.dtype) if need_weight else None
    grad_b = xp.empty(bias.shape, dtype=bias.dtype) if need_bias else None
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        logits = _slice_logits(h, weight, bias, v0, v1)
        _rows_backward(logits, targets, m, log_s, v0, vocab, ignore, smoothing, logits, base_scale, row_scale)
        if need_weight:
            grad_w[v0:v1] = matmul(logits.T, h)
        if need_bias:
            grad_b[v0:v1] = logits.sum(axis=0, dtype=accumulate_storage(logits.dtype))
        del logits
    return grad_w, grad_b


def _hidden_sweep(h, weight, bias, targets, m, log_s, ignore, smoothing, rows, row_scale):
    """The hidden gradient for a per-row upstream gradient, a chunk of rows at a time (logits recomputed)."""
    xp = backend.array_module(h)
    grad_h = xp.empty(h.shape, dtype=h.dtype)
    for r0 in range(0, h.shape[0], rows):
        r1 = min(h.shape[0], r0 + rows)
        logits = _slice_logits(h[r0:r1], weight, bias, 0, weight.shape[0])
        _rows_backward(logits, targets[r0:r1], m[r0:r1], log_s[r0:r1], 0, weight.shape[0], ignore, smoothing,
                       logits, 1.0, row_scale[r0:r1])
        grad_h[r0:r1] = matmul(logits, weight)
        del logits
    return grad_h


class FusedLinearCrossEntropy(Function):
    """cross_entropy(hidden @ weight.T + bias, targets) without the [N, V] logits.

    Forward: chunks of ``rows`` rows: their logits [rows, V], the fused cross-entropy kernel (loss, row stats and, for
    "mean"/"sum", the gradient in place), then grad_hidden for those rows = dlogits @ weight (one GEMM over all V).
    The weight/bias gradients come from a second sweep over vocabulary slices of ``cols`` columns (see
    _vocab_sweep). For "none" the upstream gradient differs per row, so both sweeps wait for the backward.
    """

    def forward(self, hidden, weight, bias, targets, target_shape=(), count=0, ignore_index=_NO_IGNORE,
                smoothing=0.0, reduction="mean", rows=1024, cols=16384, need=(False, False, False)):
        xp = backend.array_module(hidden)
        h = xp.ascontiguousarray(hidden.reshape(-1, hidden.shape[-1]))
        n, vocab = h.shape[0], weight.shape[0]
        acc = accumulate_storage(h.dtype)
        loss, m, log_s = (xp.empty(n, dtype=acc) for _ in range(3))
        need_h, need_w, need_b = need
        grads_now = any(need) and reduction != "none"
        scale = 1.0 / count if reduction == "mean" and count else 1.0
        grad_h = xp.empty(h.shape, dtype=h.dtype) if grads_now and need_h else None
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            logits = _slice_logits(h[r0:r1], weight, bias, 0, vocab)
            rows_loss, rows_m, rows_log_s = _rows_forward(logits, targets[r0:r1], ignore_index, smoothing,
                                                          logits if grads_now else None, scale)
            loss[r0:r1], m[r0:r1], log_s[r0:r1] = rows_loss, rows_m, rows_log_s
            if grad_h is not None:
                grad_h[r0:r1] = matmul(logits, weight)
            del logits
        grad_w = grad_b = None
        if grads_now and (need_w or need_b):
            grad_w, grad_b = _vocab_sweep(h, weight, bias, targets, m, log_s, ignore_index, smoothing, cols, scale,
                                          None, need_w, need_b)
        self.hidden_shape, self.reduction, self.need, self.done = hidden.shape, reduction, need, False
        self.config = (ignore_index, smoothing, rows, cols)
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
        need_h, need_w, need_b = self.need
        if self.reduction == "none":
            h, weight, bias, targets, m, log_s = saved
            ignore, smoothing, rows, cols = self.config
            row_scale = g.reshape(-1)
            grad_h = (_hidden_sweep(h, weight, bias, targets, m, log_s, ignore, smoothing, rows, row_scale)
                      if need_h else None)
            grad_w, grad_b = (_vocab_sweep(h, weight, bias, targets, m, log_s, ignore, smoothing, cols, 1.0,
                                           row_scale, need_w, need_b) if need_w or need_b else (None, None))
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
                               reduction="mean", chunk_size=None, vocab_chunk_size=None):
    """``stable_cross_entropy(hidden @ weight.T + bias, targets, ...)`` without materialising the logits.

    hidden [..., D], weight [V, D] (the LM-head layout), bias [V] or None, targets [...] (hidden's shape without D).
    The loss comes a chunk of ``chunk_size`` rows at a time (logits [chunk, V]); the hidden gradient too, and the
    weight/bias gradients from vocabulary slices of ``vocab_chunk_size`` columns (logits [N, slice], recomputed:
    this costs a third more GEMM work than the unfused path, and gives gradients rounded exactly once, as it does).
    Both sizes default to slices of about CHUNK_BYTES (256 MiB). Peak extra memory: one slice of logits plus the
    gradients themselves. Same arguments and loss dtype as ``stable_cross_entropy``; the loss back-propagates once.
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
    target_array = _index_array(targets, hidden.device, "targets")
    if tuple(target_array.shape) != hidden.shape[:-1]:
        raise ShapeError(f"targets must have hidden's shape without D, {hidden.shape[:-1]}, "
                         f"got {tuple(target_array.shape)}")
    _check_reduction(reduction)
    smoothing = _check_smoothing(label_smoothing)
    ignore = _ignore_value(ignore_index)
    for name, size in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if size is not None and (not isinstance(size, (int, numpy.integer)) or size < 1):
            raise TesseraError(f"{name} must be a positive int or None, got {size!r}")
    hidden, weight = _upcast(hidden), _upcast(weight)
    bias = _upcast(bias) if bias is not None else None
    n, vocab = int(numpy.prod(hidden.shape[:-1], dtype=numpy.int64)), weight.shape[0]
    itemsize = hidden.dtype.itemsize
    rows = int(chunk_size) if chunk_size else _default_chunk(CHUNK_BYTES, vocab, itemsize, n)
    cols = int(vocab_chunk_size) if vocab_chunk_size else _default_chunk(CHUNK_BYTES, n, itemsize, vocab)
    flat = target_array.reshape(-1).astype(numpy.int64)
    count = _count_targets(flat, vocab, ignore, target_array.shape, "fused_linear_cross_entropy")
    grad_on = autograd.is_grad_enabled()
    need = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, flat, target_shape=tuple(target_array.shape),
                                         count=count, ignore_index=ignore, smoothing=smoothing, reduction=reduction,
                                         rows=rows, cols=cols, need=need)
