"""Rotary position embedding (RoPE) in the half-split layout Hugging Face Llama uses, its scaled variants, and the
sinusoidal cos/sin tables.

For a head vector x = [x1 | x2] (two halves of D/2) at position p, with angles p * inv_freq[i]:
``out1 = x1 cos - x2 sin``, ``out2 = x2 cos + x1 sin`` (``x * cos + rotate_half(x) * sin`` with the tables
duplicated over both halves). The fused CUDA path (``cuda/rope.cu``) reads f32 cos/sin tables [positions, D/2] at
any position ids and rotates q and k in one launch, in place or out of place, in the [B, S, H, D] layout of the
seeds or the [B, H, S, D] layout attention kernels use (strided views work). Its backward is the inverse rotation.

Frequency scaling (``rope_frequencies``): "linear" (positions divided by the factor), "ntk" (the base raised by
factor^(D/(D-2))), "yarn" (YaRN, Peng et al. 2023: per-frequency blend of interpolation and extrapolation between
the beta_fast and beta_slow rotation counts, plus the attention temperature 0.1 ln(factor) + 1 folded into
cos/sin) and "llama3" (Llama 3.1's low/high frequency bands).
"""
import functools
import math

import numpy

from .. import backend, dtypes
from ..autograd import Function, is_grad_enabled
from ..cuda import runtime
from ..errors import DeviceError, DTypeError, IndexOutOfRangeError, ShapeError, TesseraError
from ..tensor import Tensor, tensor
from .module import Buffer, Module
from .norm import _as_tensor, _kernel_type, _use_kernel, _vector_width

BLOCK_THREADS = 256
MAX_GRID = 2 ** 31 - 1
LAYOUTS = ("BSHD", "BHSD")
SCALING_TYPES = (None, "linear", "ntk", "yarn", "llama3")


# ------------------------------------------------------------------------------------------ frequencies and tables
def rope_frequencies(dim, base=10000.0, scaling_type=None, factor=1.0, original_max_position=None,
                     beta_fast=32.0, beta_slow=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     attention_factor=None):
    """(inv_freq, attention_factor): the D/2 rotation frequencies (float64 NumPy) and the factor cos/sin are scaled by.

    scaling_type None: ``base ** (-2i/D)``. "linear": divided by ``factor``. "ntk": base -> base * factor^(D/(D-2)).
    "yarn": frequency i keeps its value where the original context ``original_max_position`` holds more than
    ``beta_fast`` of its rotations, is divided by ``factor`` where it holds fewer than ``beta_slow``, and blends
    linearly (over the dimension index, as the YaRN reference code and Hugging Face do) in between; attention_factor
    defaults to 0.1 ln(factor) + 1. "llama3": wavelengths above original_max_position / low_freq_factor are divided
    by ``factor``, those below original_max_position / high_freq_factor kept, and the band between blended.
    """
    if int(dim) != dim or dim < 2 or dim % 2:
        raise ShapeError(f"rope_frequencies: dim must be an even int >= 2, got {dim}")
    if scaling_type not in SCALING_TYPES:
        raise TesseraError(f"rope_frequencies: scaling_type must be one of {SCALING_TYPES}, got {scaling_type!r}")
    if not base > 1:
        raise TesseraError(f"rope_frequencies: base must be > 1, got {base}")
    factor = float(factor)
    if scaling_type is not None and not factor > 0:
        raise TesseraError(f"rope_frequencies: factor must be > 0, got {factor}")
    exponents = numpy.arange(0, dim, 2, dtype=numpy.float64) / dim
    inv_freq = 1.0 / base ** exponents
    scale = 1.0
    if scaling_type == "linear":
        inv_freq = inv_freq / factor
    elif scaling_type == "ntk":
        inv_freq = 1.0 / (base * factor ** (dim / (dim - 2))) ** exponents
    elif scaling_type in ("yarn", "llama3"):
        if original_max_position is None or original_max_position < 1:
            raise TesseraError(f"rope_frequencies: {scaling_type} needs original_max_position (the context length "
                               f"the model was trained on), got {original_max_position!r}")
        L = float(original_max_position)
        if scaling_type == "yarn":
            def index_of(rotations):  # the (fractional) dimension index whose frequency turns `rotations` times in L
                return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))
            low = max(math.floor(index_of(beta_fast)), 0)
            high = min(math.ceil(index_of(beta_slow)), dim - 1)
            if high == low:
                high += 0.001  # avoid 0/0: a step
            ramp = numpy.clip((numpy.arange(dim // 2) - low) / (high - low), 0.0, 1.0)  # 0: extrapolate, 1: interpolate
            inv_freq = inv_freq * (1 - ramp) + inv_freq / factor * ramp
            scale = (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0
        else:
            if not high_freq_factor > low_freq_factor:
                raise TesseraError(f"rope_frequencies: llama3 needs high_freq_factor > low_freq_factor, got "
                                   f"{high_freq_factor} and {low_freq_factor}")
            wavelength = 2 * math.pi / inv_freq
            smooth = numpy.clip((L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor), 0.0, 1.0)
            inv_freq = inv_freq / factor * (1 - smooth) + inv_freq * smooth
    if attention_factor is not None:
        scale = float(attention_factor)
    return inv_freq, scale


def _table_arrays(length, dim, base, scaling, storage):
    """cos and sin [length, dim/2] as NumPy arrays of ``storage``, computed in float64."""
    inv_freq, scale = rope_frequencies(dim, base, **dict(scaling))
    angles = numpy.outer(numpy.arange(length, dtype=numpy.float64), inv_freq)
    return (numpy.cos(angles) * scale).astype(storage), (numpy.sin(angles) * scale).astype(storage)


@functools.lru_cache(maxsize=32)
def _cached_tables(length, dim, base, scaling, dtype_name, device, device_id):
    storage = dtypes.as_dtype(dtype_name).storage
    cos, sin = _table_arrays(length, dim, base, scaling, storage)
    return tensor(cos, device=device), tensor(sin, device=device)


def rope_cache(max_position, dim, base=10000.0, dtype=None, device=None, **scaling):
    """(cos, sin) tables [max_position, dim/2] for ``apply_rope`` (f32 by default, computed in f64; YaRN's
    attention factor folded in). ``scaling``: the keyword arguments of ``rope_frequencies``. Kept in a small
    cache per (length, dim, base, scaling, dtype, device): do not modify them in place."""
    if int(max_position) < 1:
        raise ShapeError(f"rope_cache: max_position must be >= 1, got {max_position}")
    dtype = dtypes.f32 if dtype is None else dtypes.as_dtype(dtype)
    if dtype not in (dtypes.f32, dtypes.f64):
        raise DTypeError(f"rope_cache: tables are f32 or f64, got {dtype.name}")
    device = backend.check_device(device)
    device_id = backend.xp_for(device).cuda.Device().id if device == "cuda" else None   # one cache per GPU
    return _cached_tables(int(max_position), int(dim), float(base), tuple(sorted(scaling.items())), dtype.name,
                          device, device_id)


def cos_sin_embedding(seq_len, dim, base=10000.0, dtype=None, device=None):
    """Sinusoidal tables from "Attention Is All You Need", as the seeds lay them out: (cos, sin), each [seq_len, dim],
    with column pairs (2i, 2i+1) both holding cos (resp. sin) of ``pos / base**(2i/dim)``. The transformer's
    encoding PE is sin in the even columns and cos in the odd ones: ``where(even, sin, cos)``."""
    if int(seq_len) < 0 or int(dim) < 2 or int(dim) % 2:
        raise ShapeError(f"cos_sin_embedding: needs seq_len >= 0 and an even dim >= 2, got {seq_len} and {dim}")
    dtype = dtypes.f32 if dtype is None else dtypes.as_dtype(dtype)
    if not dtype.is_floating or dtype.is_fp8:
        raise DTypeError(f"cos_sin_embedding: dtype must be f16, bf16, f32 or f64, got {dtype.name}")
    angles = numpy.outer(numpy.arange(int(seq_len), dtype=numpy.float64),
                         numpy.exp(numpy.arange(0, dim, 2, dtype=numpy.float64) * -(math.log(base) / dim)))
    cos, sin = numpy.repeat(numpy.cos(angles), 2, axis=1), numpy.repeat(numpy.sin(angles), 2, axis=1)
    return (tensor(cos.astype(dtype.storage), device=device), tensor(sin.astype(dtype.storage), device=device))


# ------------------------------------------------------------------------------------------ the rotation
def _compute_storage(x_dtype, table_dtype):
    x_dtype = numpy.dtype(x_dtype)
    base = numpy.dtype(numpy.float32) if x_dtype.itemsize < 4 else x_dtype
    return numpy.promote_types(base, table_dtype)


def _heads_and_strides(a, layout):
    """(heads, (batch, seq, head) element strides) of a 4-D array in ``layout``; size-1 dims get stride 0."""
    st = [s // a.dtype.itemsize if n > 1 else 0 for s, n in zip(a.strides, a.shape)]
    if layout == "BSHD":
        return a.shape[2], (st[0], st[1], st[2])
    return a.shape[1], (st[0], st[2], st[1])


_rope_launches = runtime.LaunchPlans()   # see _launch_rope


def _launch_rope(xs, outs, cos, sin, pos, layout, sign):
    """Rotate the 4-D arrays ``xs`` (q, and k when two) into ``outs`` (which may be ``xs``) in one launch. The
    launch (kernel, grid, block, every scalar argument) is kept per shapes, strides, dtype, pointer alignment and
    device in a runtime.LaunchPlans."""
    q, qo = xs[0], outs[0]
    k, ko = (xs[1], outs[1]) if len(xs) > 1 else (q, qo)
    align = (q.data.ptr | qo.data.ptr | k.data.ptr | ko.data.ptr | cos.data.ptr | sin.data.ptr) & 15
    key = (len(xs), q.shape, q.strides, qo.strides, k.shape, k.strides, ko.strides, q.dtype, cos.shape,
           pos.shape, pos.strides, layout, sign, align, backend.array_module(q).cuda.runtime.getDevice())
    plan = _rope_launches.get(key, lambda: _rope_launch(xs, outs, cos, sin, layout, pos, sign))
    if plan:
        kernel, grid, block, (s_q, s_qo, s_k, s_ko, s_rest) = plan
        runtime.launch_planned(kernel, grid, block,
                               (q, *s_q, qo, *s_qo, k, *s_k, ko, *s_ko, cos, sin, pos, *s_rest))


def _rope_launch(xs, outs, cos, sin, layout, pos, sign):
    """(kernel, grid, block, scalar arguments between the arrays) of _launch_rope; () when there is nothing to do."""
    q, qo = xs[0], outs[0]
    k, ko = (xs[1], outs[1]) if len(xs) > 1 else (q, qo)
    B, S = q.shape[0], (q.shape[1] if layout == "BSHD" else q.shape[2])
    half = q.shape[3] // 2
    hq, q_st = _heads_and_strides(q, layout)
    _, qo_st = _heads_and_strides(qo, layout)
    hk, k_st = _heads_and_strides(k, layout) if len(xs) > 1 else (0, (0, 0, 0))
    _, ko_st = _heads_and_strides(ko, layout) if len(xs) > 1 else (0, (0, 0, 0))
    if B * S == 0 or hq + hk == 0 or half == 0:
        return ()
    pos_sb = pos.strides[0] // pos.dtype.itemsize if pos.shape[0] > 1 else 0
    pos_ss = pos.strides[1] // pos.dtype.itemsize
    vec = _vector_width(q.dtype.itemsize, half, (q, qo, k, ko, cos, sin), q_st + qo_st + k_st + ko_st)
    lanes, block = _rope_tiling(half // vec, hq + hk)
    grid = min(-(-(B * S) // block[1]), MAX_GRID)
    kernel = runtime.get_kernel("rope.cu", f"rope_apply<{_kernel_type(q.dtype)}, {vec}>")
    i64 = numpy.int64
    scalars = (tuple(map(i64, q_st)), tuple(map(i64, qo_st)) + (numpy.int32(hq),), tuple(map(i64, k_st)),
               tuple(map(i64, ko_st)) + (numpy.int32(hk),),
               (i64(pos_sb), i64(pos_ss), i64(B), i64(S), numpy.int32(half), numpy.int32(lanes), numpy.float32(sign)))
    return kernel, (grid, 1, 1), (*block, 1), scalars


def _rope_tiling(nv, heads):
    """(lanes, block) for rope.cu: ``lanes`` threads cover a head's nv vector chunks (all of them up to
    BLOCK_THREADS), head slots fill the rest of BLOCK_THREADS threads (a thread rotates heads slot, slot + slots, ...
    of its token, reusing its chunk's cos/sin), and the block's second dimension stacks tokens."""
    lanes = min(nv, BLOCK_THREADS)
    slots = max(1, min(heads, BLOCK_THREADS // lanes))
    return lanes, (lanes * slots, max(1, BLOCK_THREADS // (lanes * slots)))


def _rotate_reference(x, cos, sin, pos, layout, sign, out=None):
    xp = backend.array_module(x)
    half = x.shape[-1] // 2
    c, s = cos[pos], sin[pos]                       # [B or 1, S, half]
    index = (slice(None), slice(None), None) if layout == "BSHD" else (slice(None), None, slice(None))
    ct = _compute_storage(x.dtype, cos.dtype)
    c, s = c[index].astype(ct), s[index].astype(ct) * sign
    x1, x2 = x[..., :half].astype(ct), x[..., half:].astype(ct)
    result = xp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
    if out is None:
        return result
    out[...] = result
    return out


def _rotate(xs, cos, sin, pos, layout, sign, inplace=False):
    """Rotated copies of the arrays ``xs`` (or ``xs`` themselves, rotated in place): one kernel launch for all."""
    xp = backend.array_module(xs[0])
    fast = _use_kernel(*xs) and cos.dtype == numpy.float32 and sin.dtype == numpy.float32 and \
        all(x.strides[-1] == x.dtype.itemsize for x in xs)
    outs = list(xs) if inplace else [xp.empty(x.shape, dtype=x.dtype) for x in xs]
    if fast:
        _launch_rope(xs, outs, xp.ascontiguousarray(cos), xp.ascontiguousarray(sin), pos, layout, sign)
        return outs
    return [_rotate_reference(x, cos, sin, pos, layout, sign, out) for x, out in zip(xs, outs)]


class RotaryFunction(Function):
    """Rotation of one tensor by cached tables at given positions; the tables and positions get no gradient."""

    def forward(self, x, cos, sin, pos, layout="BSHD"):
        self.save(cos, sin, pos)
        self.layout = layout
        return _rotate([x], cos, sin, pos, layout, 1.0)[0]

    def backward(self, g):
        cos, sin, pos = self.saved
        xp = backend.array_module(g)
        return _rotate([xp.ascontiguousarray(g)], cos, sin, pos, self.layout, -1.0)[0], None, None, None


def _check_x(x, what, layout):
    x = _as_tensor(x, what)
    if not x.dtype.is_floating or x.dtype.is_fp8:
        raise DTypeError(f"{what}: expected f16, bf16, f32 or f64, got {x.dtype.name}")
    if x.ndim != 4:
        raise ShapeError(f"{what}: expected a 4-D [{', '.join(layout)}] tensor, got shape {x.shape}")
    if x.shape[-1] % 2:
        raise ShapeError(f"{what}: the head dimension must be even (two halves), got {x.shape[-1]}")
    return x


def _positions(position_ids, batch, seq, n_positions, device, what):
    """position ids as an int64 array [B or 1, S] on ``device``, each checked to lie in [0, n_positions)."""
    xp = backend.xp_for(device)
    if position_ids is None:
        if seq > n_positions:
            raise IndexOutOfRangeError(f"{what}: sequence of {seq} positions, but the tables hold {n_positions}")
        return _arange_positions(seq, device, xp.cuda.runtime.getDevice() if device == "cuda" else None)
    if not isinstance(position_ids, Tensor):
        position_ids = tensor(numpy.asarray(position_ids) if not backend.is_cupy_array(position_ids)
                              else position_ids, device=device)
    if position_ids.dtype.kind != "int":
        raise DTypeError(f"{what}: position_ids must be integers, got {position_ids.dtype.name}")
    if position_ids.device != device:
        raise DeviceError(f"{what}: position_ids are on {position_ids.device}, x on {device}")
    pos = position_ids.data.astype(numpy.int64)
    if pos.ndim == 1:
        pos = pos[None, :]
    if pos.ndim != 2 or pos.shape[1] != seq or pos.shape[0] not in (1, batch):
        raise ShapeError(f"{what}: position_ids must be [B, S] = [{batch}, {seq}], [1, {seq}] or [{seq}], "
                         f"got {tuple(position_ids.shape)}")
    if pos.size:
        lo, hi = (int(v) for v in backend.to_device(xp.stack([pos.min(), pos.max()]), "cpu"))
        if lo < 0 or hi >= n_positions:
            raise IndexOutOfRangeError(f"{what}: position ids span [{lo}, {hi}], the tables hold positions "
                                       f"[0, {n_positions})")
    return xp.ascontiguousarray(pos)


@functools.lru_cache(maxsize=16)
def _arange_positions(seq, device, device_id):
    """[[0, 1, ..., seq-1]] (int64) on ``device``: kept, so a call without position ids allocates and launches
    nothing for them. Only kernels and references read it."""
    return backend.xp_for(device).arange(seq, dtype=numpy.int64)[None, :]


def apply_rope(q, k=None, cos=None, sin=None, position_ids=None, *, layout="BSHD", inplace=False):
    """Rotate q (and k) by the tables ``cos``/``sin`` [positions, D/2] at ``position_ids`` ([B, S], [1, S], [S]
    or None for 0..S-1). q: [B, S, Hq, D] (``layout="BSHD"``) or [B, Hq, S, D] ("BHSD"); k the same with its own
    head count. Returns the rotated q, or (q, k). With f32 tables on the GPU one kernel launch rotates both.
    ``inplace=True`` writes into q and k and returns them (not with tensors that require grad).
    """
    if layout not in LAYOUTS:
        raise TesseraError(f"apply_rope: layout must be one of {LAYOUTS}, got {layout!r}")
    q = _check_x(q, "apply_rope(q)", layout)
    xs = [q] if k is None else [q, _check_x(k, "apply_rope(k)", layout)]
    B, S, D = q.shape[0], q.shape[1 if layout == "BSHD" else 2], q.shape[3]
    if k is not None:
        kk = xs[1]
        if (kk.shape[0], kk.shape[1 if layout == "BSHD" else 2], kk.shape[3]) != (B, S, D):
            raise ShapeError(f"apply_rope: q {q.shape} and k {kk.shape} must share batch, sequence and head size "
                             f"({layout})")
        if kk.dtype is not q.dtype or kk.device != q.device:
            raise DTypeError(f"apply_rope: q is {q.dtype.name} on {q.device}, k {kk.dtype.name} on {kk.device}")
    if cos is None or sin is None:
        raise TesseraError("apply_rope: cos and sin tables are required (see rope_cache)")
    cos, sin = _as_tensor(cos, "apply_rope(cos)"), _as_tensor(sin, "apply_rope(sin)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.ndim != 2 or t.shape[1] != D // 2 or t.shape != cos.shape:
            raise ShapeError(f"apply_rope: {name} must be [positions, D/2 = {D // 2}] like cos, got {t.shape}")
        if t.dtype not in (dtypes.f32, dtypes.f64):
            raise DTypeError(f"apply_rope: {name} must be f32 (or f64), got {t.dtype.name}")
        if t.device != q.device:
            raise DeviceError(f"apply_rope: {name} is on {t.device}, q on {q.device}")
    pos = _positions(position_ids, B, S, cos.shape[0], q.device, "apply_rope")
    needs_grad = is_grad_enabled() and any(x.requires_grad for x in xs)
    if inplace:
        if needs_grad:
            raise TesseraError("apply_rope: inplace=True on tensors that require grad; rotate out of place")
        if any(x.data.strides[-1] != x.dtype.itemsize for x in xs):
            raise ShapeError("apply_rope: inplace=True needs the head dimension contiguous")
        _rotate([x.data for x in xs], cos.data, sin.data, pos, layout, 1.0, inplace=True)
        out = xs
    elif needs_grad:
        out = [RotaryFunction.apply(x, cos.data, sin.data, pos, layout=layout) for x in xs]
    else:
        out = [Tensor(a, x.dtype) for a, x in zip(_rotate([x.data for x in xs], cos.data, sin.data, pos, layout, 1.0),
                                                  xs)]
    return out[0] if k is None else tuple(out)


def _max_length(position_ids, seq):
    """Positions the tables must hold: S without ids, else max id + 1 (a device sync on the GPU)."""
    if position_ids is None:
        return seq
    ids = position_ids.data if isinstance(position_ids, Tensor) else position_ids
    ids = ids if hasattr(ids, "max") and hasattr(ids, "dtype") else numpy.asarray(ids)
    return (int(ids.max()) + 1) if ids.size else 1


def _table_length(n):
    """Tables are built for a power of two of positions, so calls of nearby lengths share them."""
    return 1 << max(0, int(n) - 1).bit_length()


def rotary_embedding(x, position_ids=None, base=10000.0, scaling_factor=1.0):
    """RoPE on x [B, S, H, D] at ``position_ids`` [B, S] (default 0..S-1), in the half-split layout.

    ``scaling_factor`` is linear position interpolation as Hugging Face's "linear" rope_scaling: position p is
    rotated as p / scaling_factor (2.0 stretches the trained context twice).
    """
    x = _check_x(x, "rotary_embedding(x)", "BSHD")
    if not scaling_factor > 0:
        raise TesseraError(f"rotary_embedding: scaling_factor must be > 0, got {scaling_factor}")
    scaling = {} if scaling_factor == 1 else {"scaling_type": "linear", "factor": float(scaling_factor)}
    return _rope_with_tables(x, position_ids, base, scaling, "rotary_embedding")


def _rope_with_tables(x, position_ids, base, scaling, what):
    length = _max_length(position_ids, x.shape[1])
    if length < 1:
        raise IndexOutOfRangeError(f"{what}: position ids must be >= 0")
    table_dtype = dtypes.f64 if x.dtype is dtypes.f64 else dtypes.f32
    cos, sin = rope_cache(_table_length(length), x.shape[-1], base, table_dtype, x.device, **scaling)
    return apply_rope(x, None, cos, sin, position_ids)


def dynamic_rope(x, position_ids=None, base=10000.0, max_position=2048, scaling_type="linear", factor=None,
                 **scaling):
    """RoPE with frequency scaling for sequences beyond the trained length ``max_position``.

    ``factor=None`` (dynamic): the factor is (max position id + 1) / max_position, and sequences within
    max_position get plain RoPE. A given ``factor`` applies always (static scaling, as in Hugging Face configs).
    ``scaling_type``: "linear", "ntk", "yarn" or "llama3" (see ``rope_frequencies``; its other keyword arguments,
    such as beta_fast or low_freq_factor, pass through; original_max_position defaults to max_position).
    """
    x = _check_x(x, "dynamic_rope(x)", "BSHD")
    if scaling_type not in SCALING_TYPES[1:]:
        raise TesseraError(f"dynamic_rope: scaling_type must be one of {SCALING_TYPES[1:]}, got {scaling_type!r}")
    if int(max_position) < 1:
        raise TesseraError(f"dynamic_rope: max_position must be >= 1, got {max_position}")
    if factor is None:
        factor = _max_length(position_ids, x.shape[1]) / max_position
        if factor <= 1:
            return _rope_with_tables(x, position_ids, base, {}, "dynamic_rope")
    scaling = dict(scaling, scaling_type=scaling_type, factor=float(factor))
    if scaling_type in ("yarn", "llama3"):
        scaling.setdefault("original_max_position", int(max_position))
    return _rope_with_tables(x, position_ids, base, scaling, "dynamic_rope")


# ------------------------------------------------------------------------------------------ apply_rotary_pos_emb
class RotaryPosEmb(Function):
    """x * C + rotate_half(x) * S with broadcast cos/sin of last dim D (C, S) or D/2 (duplicated over both halves)."""

    def forward(self, x, cos, sin):
        xp = backend.array_module(x)
        self.half_tables = cos.shape[-1] != x.shape[-1]
        ct = _compute_storage(x.dtype, numpy.promote_types(cos.dtype, sin.dtype))
        xc, c, s = x.astype(ct), self._full(xp, cos).astype(ct), self._full(xp, sin).astype(ct)
        self.save(xc, c, s)
        self.dtypes = (x.dtype, cos.dtype, sin.dtype)
        return (xc * c + _rotate_half(xp, xc) * s).astype(x.dtype)

    def _full(self, xp, t):
        return xp.concatenate([t, t], axis=-1) if self.half_tables else t

    def _fold(self, g):
        if not self.half_tables:
            return g
        half = g.shape[-1] // 2
        return g[..., :half] + g[..., half:]

    def backward(self, g):
        xc, c, s = self.saved
        xp = backend.array_module(xc)
        gc = g.astype(xc.dtype)
        dx = gc * c + _rotate_half_transposed(xp, gc * s)
        dcos = self._fold(gc * xc).astype(self.dtypes[1]) if self.inputs[1] is not None else None
        dsin = self._fold(gc * _rotate_half(xp, xc)).astype(self.dtypes[2]) if self.inputs[2] is not None else None
        return dx.astype(self.dtypes[0]), dcos, dsin


def _rotate_half(xp, x):
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotate_half_transposed(xp, y):
    half = y.shape[-1] // 2
    return xp.concatenate([y[..., half:], -y[..., :half]], axis=-1)


def apply_rotary_pos_emb(x, cos, sin):
    """Rotate x [..., D] by cos/sin that broadcast against it, of last dimension D/2 (the seeds' [B, S, 1, D/2]) or
    D (Hugging Face's tables, both halves equal). Differentiable in x, cos and sin; array-module code (no kernel:
    the fused path is ``apply_rope`` / ``rotary_embedding``)."""
    x = _as_tensor(x, "apply_rotary_pos_emb(x)")
    cos, sin = _as_tensor(cos, "apply_rotary_pos_emb(cos)"), _as_tensor(sin, "apply_rotary_pos_emb(sin)")
    for t, name in ((x, "x"), (cos, "cos"), (sin, "sin")):
        if not t.dtype.is_floating or t.dtype.is_fp8:
            raise DTypeError(f"apply_rotary_pos_emb: {name} must be f16, bf16, f32 or f64, got {t.dtype.name}")
        if t.device != x.device:
            raise DeviceError(f"apply_rotary_pos_emb: {name} is on {t.device}, x on {x.device}")
    D = x.shape[-1] if x.ndim else 0
    if D % 2 or D == 0:
        raise ShapeError(f"apply_rotary_pos_emb: x's last dimension must be even and > 0, got shape {x.shape}")
    if cos.shape != sin.shape or cos.ndim == 0 or cos.shape[-1] not in (D, D // 2):
        raise ShapeError(f"apply_rotary_pos_emb: cos and sin must have one shape with last dimension {D} or "
                         f"{D // 2}, got {cos.shape} and {sin.shape}")
    try:
        numpy.broadcast_shapes(x.shape[:-1], cos.shape[:-1])
    except ValueError:
        raise ShapeError(f"apply_rotary_pos_emb: cos/sin {cos.shape} do not broadcast against x {x.shape}") from None
    if numpy.broadcast_shapes(x.shape[:-1], cos.shape[:-1]) != x.shape[:-1]:
        raise ShapeError(f"apply_rotary_pos_emb: cos/sin {cos.shape} would enlarge x {x.shape}")
    return RotaryPosEmb.apply(x, cos, sin)


# ------------------------------------------------------------------------------------------ module
class RotaryEmbedding(Module):
    """The rope cache as a module: f32 cos/sin tables for ``max_position`` positions (non-persistent buffers) and
    ``forward(q, k=None, position_ids=None, layout="BSHD", inplace=False)`` = ``apply_rope`` with them."""

    def __init__(self, dim, max_position, base=10000.0, device=None, **scaling):
        super().__init__()
        self.dim, self.max_position, self.base, self.scaling = int(dim), int(max_position), float(base), scaling
        cos, sin = _table_arrays(self.max_position, self.dim, self.base, tuple(sorted(scaling.items())),
                                 numpy.float32)
        self.cos = Buffer(tensor(cos, device=device), persistent=False)
        self.sin = Buffer(tensor(sin, device=device), persistent=False)

    def forward(self, q, k=None, position_ids=None, layout="BSHD", inplace=False):
        return apply_rope(q, k, self.cos, self.sin, position_ids, layout=layout, inplace=inplace)

    def extra_repr(self):
        extra = "".join(f", {key}={value}" for key, value in sorted(self.scaling.items()))
        return f"{self.dim}, max_position={self.max_position}, base={self.base}{extra}"


__all__ = ["rope_frequencies", "rope_cache", "cos_sin_embedding", "apply_rope", "rotary_embedding", "dynamic_rope",
           "apply_rotary_pos_emb", "RotaryEmbedding"]
