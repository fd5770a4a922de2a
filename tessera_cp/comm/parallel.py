"""Model parallelism on a mesh: distributed RMSNorm (hidden dimension sharded), ring attention (sequence sharded)
and column/row-parallel Linear (weights sharded over the "model" axis).

Each equals its single-process op on the gathered tensors, forward and backward, for any shard sizes.
"""
import math

import numpy

from .. import backend, dtypes
from ..precision import accumulate_storage
from ..autograd import Function
from ..errors import DTypeError, ShapeError, TesseraError
from ..nn.layers import Linear, linear
from ..nn.module import Module, Parameter
from ..tensor import Tensor
from .collectives import all_reduce
from .mesh import Mesh, MeshTensor, agree, current_mesh, shard_bounds


def _mesh_of(mesh, *values, what):
    for v in values:
        if isinstance(v, MeshTensor):
            mesh = v.mesh if mesh is None else mesh
    mesh = mesh if mesh is not None else current_mesh()
    if not isinstance(mesh, Mesh):
        raise TesseraError(f"{what}: no mesh; pass mesh=..., MeshTensors, or call inside `with mesh:` / @on_mesh")
    return mesh


def _local(v):
    return v.local if isinstance(v, MeshTensor) else v


def _agree_on(mesh, group, check, timeout):
    """Run a local argument check; with the mesh's checks on, every rank of the group raises if any rank fails
    (else a rank with bad arguments raises alone and the others hang in the next collective)."""
    try:
        check()
        error = None
    except TesseraError as e:
        error = e
    if mesh.check_shapes:
        agree(group.comm, error, group.members, timeout)
    elif error is not None:
        raise error


# ----------------------------------------------------------------------------------------------- RMSNorm
def distributed_rms_norm(x, weight=None, mesh=None, eps=1e-6, axis="model", *, timeout=None):
    """RMSNorm over a hidden dimension split across ``axis``: x / sqrt(sum(x^2) / D + eps) * weight.

    The sum of squares of each shard is all-reduced and divided by the GLOBAL D (the seed's mean of per-shard
    means is wrong for unequal shards). ``x`` is the local shard [..., D_local] (or a MeshTensor); ``weight`` is
    this rank's [D_local] piece or the full [D] vector (its piece is taken). Differentiable: the gradient flows
    through the all-reduce's Function.
    """
    mesh = _mesh_of(mesh, x, weight, what="distributed_rms_norm")
    layout = x if isinstance(x, MeshTensor) else None
    x, weight = _local(x), _local(weight)
    group = mesh.group(axis)
    timeout = mesh.timeout if timeout is None else timeout
    if not isinstance(x, Tensor) or x.ndim == 0:
        raise ShapeError(f"distributed_rms_norm: x must be a Tensor of rank >= 1, got {getattr(x, 'shape', x)!r}")
    sizes = [int(n) for n in group.allgather_ints([x.shape[-1]], timeout)[:, 0]]
    d_global, offset, d_local = sum(sizes), sum(sizes[:group.rank]), x.shape[-1]

    def check():
        if not x.dtype.is_floating or x.dtype.is_fp8:
            raise DTypeError(f"distributed_rms_norm: x must be f16/bf16/f32/f64, got {x.dtype.name}")
        if weight is not None and (weight.ndim != 1 or weight.shape[0] not in (d_local, d_global)):
            raise ShapeError(f"distributed_rms_norm: weight has shape {weight.shape}; expected ({d_local},) (this "
                             f"rank's piece of the hidden dim) or ({d_global},) (all of it)")
    _agree_on(mesh, group, check, timeout)
    accumulate = dtypes.as_dtype(accumulate_storage(x.dtype.storage))
    xf = x.astype(accumulate)
    total = all_reduce((xf * xf).sum(-1, keepdim=True), axis, "sum", mesh=mesh, timeout=timeout)
    y = (xf * (total * (1.0 / d_global) + eps).rsqrt()).astype(x.dtype)
    if weight is not None:
        if weight.shape[0] != d_local:  # the full vector: this rank's piece
            weight = weight[offset:offset + d_local]
        y = y * weight
    return layout.with_local(y) if layout is not None else y


# ----------------------------------------------------------------------------------------------- ring attention
def _block_scores(xp, qg, kb, scale, q0, k0, causal):
    """Scores of grouped queries qg [B,Hk,G,Sq,D] against a key block kb [B,Hk,Sk,D] at global offsets q0, k0;
    causal positions (key after query) are -inf."""
    s = (qg @ xp.swapaxes(kb, -1, -2)[:, :, None]) * scale
    sq, sk = qg.shape[-2], kb.shape[-2]
    if causal and k0 + sk - 1 > q0:  # some key of the block lies after some query
        after = (k0 + xp.arange(sk))[None, :] > (q0 + xp.arange(sq))[:, None]
        s = xp.where(after, -numpy.inf, s)
    return s


def _skipped(causal, q0, sq, k0, sk):
    """A block contributes nothing: empty, or (causal) every key lies after every query."""
    return sq == 0 or sk == 0 or (causal and k0 > q0 + sq - 1)


def attention_block_lse(xp, qg, kb, vb, scale, q0, k0, causal):
    """Attention of grouped queries over one K/V block: (out [B,Hk,G,Sq,Dv] normalised within the block,
    lse [B,Hk,G,Sq] its log-sum-exp; -inf and zeros for rows with no visible key). Reference formula, any xp."""
    s = _block_scores(xp, qg, kb, scale, q0, k0, causal)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isneginf(m), 0.0, m)  # rows with no visible key: avoid -inf - -inf
    p = xp.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    empty = l == 0
    l_safe = xp.where(empty, 1.0, l)
    out = (p @ vb[:, :, None]) / l_safe
    lse = xp.where(empty, -numpy.inf, m + xp.log(l_safe))[..., 0]
    return out, lse


def _flash_block(q, k, v, causal, q0, k0, backward=False):
    """(nn.attention module, the block's causal flag) when the flash kernel can compute this block, else None:
    CuPy half inputs it supports, and a block that is fully visible or the aligned diagonal (the kernel's causal
    mask is relative to the block's own corner)."""
    if not backend.is_cupy_array(q):
        return None
    try:
        from ..nn import attention as flash
        ready = flash._kernel_ready(q, k, v, None, None, 0.0) and (not backward or q.shape[-1] in flash._DQ_TILES)
    except (ImportError, AttributeError):  # pragma: no cover - an nn.attention without these
        return None
    sq, sk = q.shape[2], k.shape[2]
    if not ready:
        return None
    if not causal or k0 + sk - 1 <= q0:
        return flash, False
    if q0 == k0 and sq == sk:
        return flash, True
    return None


def merge_lse(xp, out, lse, block_out, block_lse):
    """Combine two partial softmax results by their log-sum-exps (the seed's plain sum is wrong)."""
    new = xp.logaddexp(lse, block_lse)
    base = xp.where(xp.isneginf(new), 0.0, new)
    a, b = xp.exp(lse - base)[..., None], xp.exp(block_lse - base)[..., None]
    return out * a + block_out * b, new


class _RingAttention(Function):
    """Forward: K/V blocks travel the ring (rank i holds block i - s at step s) while the local block is
    computed; partial outputs merge by LSE. Backward: the same ring, recomputing each block's probabilities from
    the saved global LSE; dK/dV accumulators travel with their blocks and arrive home after n hops."""

    def forward(self, q, k, v, *, group, lengths, causal, scale, timeout):
        self.group, self.lengths, self.causal, self.scale, self.timeout = group, lengths, causal, scale, timeout
        xp = backend.array_module(q)
        acc = accumulate_storage(q.dtype)
        n, i = group.size, group.rank
        offsets = numpy.concatenate([[0], numpy.cumsum(lengths)]).tolist()
        B, H, Sq, _ = q.shape
        Hk, Dv = k.shape[1], v.shape[-1]
        qg = q.astype(acc).reshape(B, Hk, H // Hk, Sq, q.shape[-1])
        out = xp.zeros(qg.shape[:-1] + (Dv,), dtype=acc)
        lse = xp.full(qg.shape[:-1], -numpy.inf, dtype=acc)
        transport = group.transport(q)
        kb, vb = k, v
        for s in range(n):
            j = (i - s) % n
            if s < n - 1:  # start moving the next block before computing on this one
                src = (i - s - 1) % n
                pending = [transport.ring_start(kb, 1, kb.shape[:2] + (lengths[src], kb.shape[3]), timeout),
                           transport.ring_start(vb, 1, vb.shape[:2] + (lengths[src], vb.shape[3]), timeout)]
            if not _skipped(causal, offsets[i], Sq, offsets[j], lengths[j]):
                flash = _flash_block(q, kb, vb, causal, offsets[i], offsets[j])
                if flash is not None:  # the flash kernel: out in q's dtype, lse in f32
                    block_out, block_lse = flash[0]._forward_kernel(q, kb, vb, None, None, scale, flash[1])
                    block_out, block_lse = block_out.astype(acc).reshape(out.shape), block_lse.reshape(lse.shape)
                else:
                    block_out, block_lse = attention_block_lse(xp, qg, kb.astype(acc), vb.astype(acc), scale,
                                                               offsets[i], offsets[j], causal)
                out, lse = merge_lse(xp, out, lse, block_out, block_lse)
            if s < n - 1:
                kb, vb = (p.wait() for p in pending)
        self.save(q, k, v, out, lse)
        return out.reshape(B, H, Sq, Dv).astype(q.dtype)

    def backward(self, grad):
        q, k, v, out, lse = self.saved
        group, lengths, causal, scale, timeout = self.group, self.lengths, self.causal, self.scale, self.timeout
        xp = backend.array_module(q)
        acc = out.dtype
        n, i = group.size, group.rank
        offsets = numpy.concatenate([[0], numpy.cumsum(lengths)]).tolist()
        B, H, Sq, D = q.shape
        Hk = k.shape[1]
        qg = q.astype(acc).reshape(B, Hk, H // Hk, Sq, D)
        do = grad.astype(acc).reshape(out.shape)
        delta = (do * out).sum(axis=-1)  # rowsum(dO * O) = sum_k P dP
        lse_safe = xp.where(xp.isneginf(lse), numpy.inf, lse)[..., None]  # rows that saw no key get P = 0
        dqg = xp.zeros_like(qg)
        transport = group.transport(q)
        kb, vb = k, v
        carry = None  # the dK/dV accumulators of the block arriving from the previous rank
        out_q = grad_q = lse_flat = None  # what the flash backward reads, made on first use
        for s in range(n):
            j = (i - s) % n
            if s < n - 1:
                src = (i - s - 1) % n
                pending = [transport.ring_start(kb, 1, kb.shape[:2] + (lengths[src], kb.shape[3]), timeout),
                           transport.ring_start(vb, 1, vb.shape[:2] + (lengths[src], vb.shape[3]), timeout)]
            kf, vf = kb.astype(acc), vb.astype(acc)
            dk, dv = xp.zeros_like(kf), xp.zeros_like(vf)
            skip = _skipped(causal, offsets[i], Sq, offsets[j], lengths[j])
            flash = None if skip else _flash_block(q, kb, vb, causal, offsets[i], offsets[j], backward=True)
            if flash is not None:  # the flash backward, fed the GLOBAL out and lse: exactly this block's share
                if out_q is None:
                    out_q = out.reshape(B, H, Sq, -1).astype(q.dtype)
                    grad_q = grad.astype(q.dtype)
                    lse_flat = lse.reshape(B, H, Sq).astype(numpy.float32)
                dq_b, dk_b, dv_b = flash[0]._backward_kernel(grad_q, q, kb, vb, out_q, lse_flat, None, None, scale,
                                                             flash[1])
                dqg += dq_b.astype(acc).reshape(dqg.shape)
                dk, dv = dk_b.astype(acc), dv_b.astype(acc)
            elif not skip:
                p = xp.exp(_block_scores(xp, qg, kf, scale, offsets[i], offsets[j], causal) - lse_safe)
                dv = (xp.swapaxes(p, -1, -2) @ do).sum(axis=2)
                ds = p * (do @ xp.swapaxes(vf, -1, -2)[:, :, None] - delta[..., None])
                dqg += (ds @ kf[:, :, None]) * scale
                dk = (xp.swapaxes(ds, -1, -2) @ qg).sum(axis=2) * scale
            if carry is not None:
                got_dk, got_dv = (c.wait() for c in carry)
                dk, dv = dk + got_dk, dv + got_dv
            if n == 1:
                break
            # Pass this block's accumulators on; receive those of the block we process next (or, after the
            # last step, our own block's, now holding every rank's contribution).
            nxt = (i - s - 1) % n
            carry = [transport.ring_start(dk, 1, dk.shape[:2] + (lengths[nxt], dk.shape[3]), timeout),
                     transport.ring_start(dv, 1, dv.shape[:2] + (lengths[nxt], dv.shape[3]), timeout)]
            if s < n - 1:
                kb, vb = (p.wait() for p in pending)
        if n > 1:
            dk, dv = (c.wait() for c in carry)
        return (dqg.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))


def ring_attention(q, k, v, mesh=None, axis=None, is_causal=False, *, scale=None, timeout=None):
    """Attention over a sequence split across ``axis`` (rank r of the axis holds the r-th piece, any sizes).

    q [B, H, S_r, D], k [B, Hkv, S_r, D], v [B, Hkv, S_r, Dv] (Hkv divides H: grouped-query attention); returns
    this rank's [B, H, S_r, Dv] of softmax(q k^T * scale) v over the WHOLE sequence, causal by global position
    when ``is_causal``. Blocks that are fully masked are skipped (their K/V still travel the ring).
    """
    mesh = _mesh_of(mesh, q, k, v, what="ring_attention")
    layout = q if isinstance(q, MeshTensor) else None
    q, k, v = _local(q), _local(k), _local(v)
    group = mesh.group(axis)

    def check():
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.ndim != 4:
                raise ShapeError(f"ring_attention: {name} must be a [B, H, S, D] Tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            if not t.dtype.is_floating or t.dtype.is_fp8 or t.dtype is not q.dtype:
                raise DTypeError(f"ring_attention: q, k, v must share one of f16/bf16/f32/f64, got "
                                 f"{q.dtype.name}, {k.dtype.name}, {v.dtype.name}")
        if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
            raise ShapeError(f"ring_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit [B,H,S,D], "
                             "[B,Hkv,S,D], [B,Hkv,S,Dv]")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ShapeError(f"ring_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
        if q.shape[2] != k.shape[2]:
            raise ShapeError(f"ring_attention: this rank holds {q.shape[2]} query positions but {k.shape[2]} "
                             "key positions; each rank must hold the same piece of q, k and v")
    timeout = mesh.timeout if timeout is None else timeout
    _agree_on(mesh, group, check, timeout)
    if mesh.check_shapes:
        lengths = [int(n) for n in group.check("ring_attention q", q.dtype, q.shape, free_dim=2, timeout=timeout)[:, 2]]
        group.check("ring_attention k", k.dtype, k.shape, free_dim=2, timeout=timeout)
        group.check("ring_attention v", v.dtype, v.shape, free_dim=2, timeout=timeout)
    else:
        lengths = [int(n) for n in group.allgather_ints([q.shape[2]], timeout)[:, 0]]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = _RingAttention.apply(q, k, v, group=group, lengths=lengths, causal=bool(is_causal), scale=scale,
                               timeout=timeout)
    return layout.with_local(out) if layout is not None else out


# ----------------------------------------------------------------------------------------------- tensor parallel
# Megatron's conjugate pairs. A value every rank of the axis holds identically is ONE logical value: its
# gradient is the sum of the ranks' partial gradients where it fans out (copy), and passes straight through where
# partial sums are reduced into it (reduce).
class _CopyToAxis(Function):
    def forward(self, x, *, group, timeout):
        self.group, self.timeout = group, timeout
        return x

    def backward(self, grad):
        return (self.group.transport(grad).all_reduce(grad, "sum", self.timeout),)


class _ReduceFromAxis(Function):
    def forward(self, x, *, group, timeout):
        return group.transport(x).all_reduce(x, "sum", timeout)

    def backward(self, grad):
        return (grad,)


class _GatherFromAxis(Function):
    """Last-dim pieces gathered into the replicated whole; the gradient of my piece is my slice."""

    def forward(self, x, *, group, sizes, timeout):
        self.start = sum(sizes[:group.rank])
        self.stop = self.start + sizes[group.rank]
        xp = backend.array_module(x)
        whole = group.transport(x).all_gather(xp.ascontiguousarray(xp.moveaxis(x, -1, 0)), sizes, timeout)
        return xp.ascontiguousarray(xp.moveaxis(whole, 0, -1))

    def backward(self, grad):
        return (grad[..., self.start:self.stop],)


class _ScatterToAxis(Function):
    """My last-dim slice of a replicated value; the gradient of the whole is the gathered slices' gradients."""

    def forward(self, x, *, group, sizes, timeout):
        self.group, self.sizes, self.timeout = group, sizes, timeout
        start = sum(sizes[:group.rank])
        return x[..., start:start + sizes[group.rank]]

    def backward(self, grad):
        xp = backend.array_module(grad)
        whole = self.group.transport(grad).all_gather(xp.ascontiguousarray(xp.moveaxis(grad, -1, 0)), self.sizes,
                                                      self.timeout)
        return (xp.ascontiguousarray(xp.moveaxis(whole, 0, -1)),)


class _ParallelLinear(Module):
    def _place(self, mesh, axis, features, timeout):
        if not isinstance(mesh, Mesh):
            raise TesseraError(f"{type(self).__name__}: mesh must be a Mesh, got {type(mesh).__name__}")
        self.mesh, self.axis, self.timeout = mesh, axis, mesh.timeout if timeout is None else timeout
        self.group = mesh.group(axis)
        self.sizes = [b - a for a, b in (shard_bounds(features, self.group.size, r) for r in range(self.group.size))]
        self.start, self.stop = shard_bounds(features, self.group.size, self.group.rank)

    def _check(self, x, features, sharded_input=False):
        # The feature count goes into the header, so a rank with the wrong one fails everywhere, not alone.
        excess = x.shape[-1] - features
        if self.mesh.check_shapes:  # every rank must bring the same batch (its own piece of the features)
            self.group.check(type(self).__name__, x.dtype, x.shape, [("x features minus expected", excess, None)],
                             free_dim=x.ndim - 1 if sharded_input else None, timeout=self.timeout)
        if excess:
            raise ShapeError(f"{type(self).__name__}: x has {x.shape[-1]} features, expected {features}")

    @staticmethod
    def _copy(t):
        return Parameter(Tensor(t.data.copy(), t.dtype))


class ColumnParallelLinear(_ParallelLinear):
    """y = x @ W.T + b with W's rows (output features) split over ``axis``: this rank holds rows [start, stop).

    ``x`` is the same on every rank of the axis; the output is this rank's features [..., stop - start], or all
    of them (gathered) with ``gather_output=True``. Initialised as ``nn.Linear`` would be from ``generator``: pass
    the same seeded generator on every rank (or build from a loaded Linear with ``from_linear``).
    """

    def __init__(self, in_features, out_features, mesh, axis="model", bias=True, gather_output=False, dtype=None,
                 device=None, generator=None, timeout=None):
        self._build(Linear(in_features, out_features, bias, dtype, device, generator), mesh, axis, gather_output,
                    timeout)

    @classmethod
    def from_linear(cls, layer, mesh, axis="model", gather_output=False, timeout=None):
        """This rank's piece of a full ``nn.Linear`` (same on every rank)."""
        self = cls.__new__(cls)
        self._build(layer, mesh, axis, gather_output, timeout)
        return self

    def _build(self, layer, mesh, axis, gather_output, timeout):
        super().__init__()
        self.in_features, self.out_features, self.gather_output = layer.in_features, layer.out_features, gather_output
        self._place(mesh, axis, layer.out_features, timeout)
        self.weight = self._copy(layer.weight[self.start:self.stop])
        self.bias = None if layer.bias is None else self._copy(layer.bias[self.start:self.stop])

    def forward(self, x):
        self._check(x, self.in_features)
        x = _CopyToAxis.apply(x, group=self.group, timeout=self.timeout)
        y = linear(x, self.weight, self.bias)
        if self.gather_output:
            y = _GatherFromAxis.apply(y, group=self.group, sizes=self.sizes, timeout=self.timeout)
        return y

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features} (rows {self.start}:{self.stop} here), "
                f"axis={self.axis!r}, gather_output={self.gather_output}")


class RowParallelLinear(_ParallelLinear):
    """y = x @ W.T + b with W's columns (input features) split over ``axis``; the partial products are
    all-reduced, then the (replicated) bias added. ``x`` is this rank's input features [..., stop - start]
    (``input_is_parallel=True``, what a ColumnParallelLinear without gathering hands on) or the whole input."""

    def __init__(self, in_features, out_features, mesh, axis="model", bias=True, input_is_parallel=True,
                 dtype=None, device=None, generator=None, timeout=None):
        self._build(Linear(in_features, out_features, bias, dtype, device, generator), mesh, axis,
                    input_is_parallel, timeout)

    @classmethod
    def from_linear(cls, layer, mesh, axis="model", input_is_parallel=True, timeout=None):
        """This rank's piece of a full ``nn.Linear`` (same on every rank)."""
        self = cls.__new__(cls)
        self._build(layer, mesh, axis, input_is_parallel, timeout)
        return self

    def _build(self, layer, mesh, axis, input_is_parallel, timeout):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.input_is_parallel = input_is_parallel
        self._place(mesh, axis, layer.in_features, timeout)
        self.weight = self._copy(layer.weight[:, self.start:self.stop])
        self.bias = None if layer.bias is None else self._copy(layer.bias)

    def forward(self, x):
        if self.input_is_parallel:
            self._check(x, self.stop - self.start, sharded_input=True)
        else:
            self._check(x, self.in_features)
            x = _ScatterToAxis.apply(x, group=self.group, sizes=self.sizes, timeout=self.timeout)
        y = _ReduceFromAxis.apply(linear(x, self.weight), group=self.group, timeout=self.timeout)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self):
        return (f"{self.in_features} (columns {self.start}:{self.stop} here), {self.out_features}, "
                f"axis={self.axis!r}, input_is_parallel={self.input_is_parallel}")
