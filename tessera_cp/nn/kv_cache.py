"""A paged KV cache (fixed-size blocks from a preallocated pool, block tables, fork with copy-on-write) and decode
attention that reads keys and values through the block table.

``PagedKVCache(num_blocks, block_size=16, num_kv_heads=..., head_dim=...)`` holds keys and values of multi-head or
grouped-query attention, laid out ``[num_layers, num_blocks, Hkv, block_size, D]`` (the keys of one head in one
block are contiguous: what the decode kernel reads); ``PagedKVCache(..., latent_dim=..., rope_dim=...)`` holds the
rows ``[latent | rope key]`` of multi-latent attention, ``[num_layers, num_blocks, block_size, latent + rope]``.
Every sequence owns a block table (a list of block ids). ``reserve`` lengthens sequences and returns the slots
(``block * block_size + offset``) their new tokens go to, taking blocks from the pool; ``write`` stores the tokens of
one layer there; ``fork`` makes a sequence that shares all blocks of another (reference counts), and the first
write into a shared, partly filled last block copies it first (copy-on-write); ``free`` returns the blocks whose
count drops to zero. A request the pool cannot serve raises ``KVCacheFullError`` before anything changes.

``paged_decode_attention(q, key_cache, value_cache, block_tables, seq_lens)``: one query token per sequence
(``q`` [B, Hq, D]) over a batch of sequences of different lengths, GQA (query head h reads KV head
``h // (Hq // Hkv)``). ``decode_attention`` does the same over contiguous caches [B, Hkv, S, D] with per-sequence
lengths. The CUDA path (``cuda/paged_attention.cu``) runs for CuPy bf16/f16 inputs with D = 64 or 128 (and the MLA
shape 576/512) unless ``TESSERA_REFERENCE=1``: one block per (KV head, sequence, split of the keys), the query
heads of a group share every K/V byte read, long sequences are split over keys and merged by log-sum-exp. The
reference (array-module generic) computes in f32 for half inputs. Decode is inference: no gradients.
"""
import math

import numpy

from .. import backend, dtypes
from ..errors import DeviceError, DTypeError, ShapeError, TesseraError
from ..precision import accumulate_storage
from ..tensor import Tensor, tensor

__all__ = ["PagedKVCache", "KVCacheFullError", "paged_decode_attention", "decode_attention"]


class KVCacheFullError(TesseraError, MemoryError):
    """The block pool has too few free blocks for a request (nothing was changed)."""


# ------------------------------------------------------------------------------------------------ kernel configs
_KERNEL_TYPES = {numpy.dtype(numpy.float16): "__half", dtypes.bf16.storage: "__nv_bfloat16"}
# (DK, DV, values are the first DV columns of the key rows) -> (MT, BN, NWARPS, STAGES, blocks per SM): a block owns
# 16 * MT query heads, walks tiles of BN keys with NWARPS warps and STAGES cp.async buffers; "blocks per SM" is what
# its shared memory allows, used to size the split over keys. paged_attention.cu lists these instantiations.
_CONFIGS = {(64, 64, False): (1, 64, 4, 2, 2), (128, 128, False): (1, 64, 4, 2, 2),
            (576, 512, True): (2, 32, 8, 3, 1)}
_SPLIT_KEYS = 512       # a split covers at most about this many keys, so sequences of mixed lengths balance
_MAX_SPLITS = 256       # paged_attention.cu's MAX_SPLITS
_PAD, _SPAD = 8, 4      # shared-row padding (elements, floats), as in the kernel
_COMBINE_WARPS = 8


def _smem_bytes(item, dk, dv, mt, bn, nwarps, stages, shared_kv):
    """The kernel's shared-memory layout (paged_attention.cu's Layout), in bytes."""
    r = 16 * mt
    units = mt * (bn // 16)
    ksplit = 1 if units >= nwarps else nwarps // units
    q = r * (dk + _PAD) * item
    k = stages * bn * (dk + _PAD) * item
    v = 0 if shared_kv else stages * bn * (dv + _PAD) * item
    s = ksplit * r * (bn + _SPAD) * 4
    p = r * (bn + _PAD) * item
    return q + k + v + s + p + 3 * r * 4


def _alloc(xp, shape, dtype):
    """Kernel outputs (tests replace this with a NaN-filled allocation to catch elements no kernel wrote)."""
    return xp.empty(shape, dtype=dtype)


def _rows_ok(a):
    """Rows of a 4-D cache the kernel can read: unit stride along D, 16-byte aligned row starts."""
    item = a.dtype.itemsize
    return a.strides[-1] == item and all(s % 16 == 0 and s >= 0 for s in a.strides[:3]) and a.data.ptr % 16 == 0


def _kernel_config(q, k, v, value_dim, block_size):
    if backend.reference_forced() or not backend.is_cupy_array(q):
        return None
    if q.dtype not in _KERNEL_TYPES or k.dtype != q.dtype or (v is not None and v.dtype != q.dtype):
        return None
    config = _CONFIGS.get((k.shape[-1], value_dim, v is None))
    if config is None or not _rows_ok(k) or (v is not None and not _rows_ok(v)):
        return None
    if block_size is not None and block_size & (block_size - 1):
        return None
    return config


def _num_splits(xp, work_blocks, max_len, bn, blocks_per_sm):
    """Splits over keys: enough blocks to fill the GPU once, and no split much longer than _SPLIT_KEYS keys (so a
    batch of mixed lengths balances); returns (n_splits, keys per split, a multiple of bn)."""
    max_len = max(int(max_len), 1)
    from ..cuda import runtime
    slots = runtime.device_attribute(runtime.SM_COUNT) * blocks_per_sm
    fill = max(1, slots // work_blocks)
    n = max(fill, -(-max_len // _SPLIT_KEYS))
    return _split_sizes(max_len, n, bn)


def _split_sizes(max_len, n, bn):
    n = max(1, min(int(n), -(-max_len // bn), _MAX_SPLITS))
    per = -(-max_len // n)
    per = -(-per // bn) * bn
    return -(-max_len // per), per


# ------------------------------------------------------------------------------------------------ reference
def _decode_reference(q, k, v, table, lens, value_dim, scale, block_size):
    """softmax(scale q K^T) V per sequence over its first lens[b] keys; k, v [N, Hkv, P, D] read through ``table``
    (paged) or directly (contiguous, N = B); v None: values are k[..., :value_dim]. Empty sequences give zeros."""
    xp = backend.array_module(q, k)
    acc = accumulate_storage(q.dtype)
    B, Hq, dk = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if table is not None:
        L = table.shape[1] * block_size
        pos = xp.arange(L)
        blocks = table[:, pos // block_size]                         # [B, L]
        blocks = xp.where(pos[None, :] < lens[:, None], blocks, 0)    # entries past a length may be anything
        offs = (pos % block_size)[None, :]
        keys = xp.swapaxes(k[blocks, :, offs, :], 1, 2)               # [B, Hkv, L, D]
        values = keys[..., :value_dim] if v is None else xp.swapaxes(v[blocks, :, offs, :], 1, 2)
    else:
        L = k.shape[2]
        keys, values = k, (k[..., :value_dim] if v is None else v)
    s = xp.matmul(q.astype(acc).reshape(B, Hkv, G, dk), xp.swapaxes(keys.astype(acc), -1, -2)) * acc.type(scale)
    seen = (xp.arange(L)[None, :] < lens.astype(xp.int64)[:, None])[:, None, None, :]
    s = xp.where(seen, s, -xp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    p = xp.exp(s - m)
    total = p.sum(axis=-1, keepdims=True)
    p = p / xp.where(total > 0, total, 1)
    out = xp.matmul(p, values.astype(acc))                            # [B, Hkv, G, DV]
    return out.reshape(B, Hq, value_dim).astype(q.dtype)


# ------------------------------------------------------------------------------------------------ the CUDA path
def _plan_decode(q, k, v, table, lens, value_dim, scale, block_size, max_len, num_splits=None):
    """Everything a kernel decode needs (outputs allocated, arguments built), returned as ``run()`` which launches
    the kernels and returns the output array: a decode loop (or a benchmark) pays the preparation once."""
    from ..cuda import runtime
    config = _kernel_config(q, k, v, value_dim, block_size if table is not None else None)
    if config is None:
        raise TesseraError("paged decode: these inputs do not suit the kernel (dtype, head size or layout)")
    xp = backend.array_module(q)
    i32, i64 = numpy.int32, numpy.int64
    mt, bn, nwarps, stages, per_sm = config
    B, Hq, dk = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    head_groups = -(-G // (16 * mt))
    q = xp.ascontiguousarray(q)
    lens = xp.ascontiguousarray(lens, dtype=xp.int32)
    item = q.dtype.itemsize
    if num_splits is None:
        n_splits, per_split = _num_splits(xp, B * Hkv * head_groups, max_len, bn, per_sm)
    else:
        n_splits, per_split = _split_sizes(max(int(max_len), 1), num_splits, bn)
    out = _alloc(xp, (B, Hq, value_dim), q.dtype)
    if n_splits > 1:
        o_part = _alloc(xp, (n_splits, B, Hq, value_dim), xp.float32)
        lse_part = _alloc(xp, (n_splits, B, Hq), xp.float32)
    else:
        o_part = lse_part = out   # never touched with one split
    paged = table is not None
    if paged:
        table = xp.ascontiguousarray(table, dtype=xp.int32)
    vv = k if v is None else v
    ks = tuple(i64(s // item) for s in k.strides[:3])
    vs = tuple(i64(s // item) for s in vv.strides[:3])
    shared = v is None
    ctype = _KERNEL_TYPES[q.dtype]
    name = (f"paged_decode<{ctype}, {dk}, {value_dim}, {mt}, {bn}, {nwarps}, {stages}, "
            f"{'true' if shared else 'false'}, {'true' if paged else 'false'}>")
    kernel = runtime.get_kernel("paged_attention.cu", name)
    smem = _smem_bytes(item, dk, value_dim, mt, bn, nwarps, stages, shared)
    args = (q, k, vv, table if paged else lens, lens, out, o_part, lse_part, i32(Hq), i32(Hkv), i32(head_groups),
            i64(table.shape[1] if paged else 0), i32(block_size.bit_length() - 1 if paged else 0), *ks, *vs,
            numpy.float32(scale * math.log2(math.e)), i32(per_split), i32(n_splits))
    grid = (n_splits, Hkv * head_groups, B)
    if n_splits > 1:
        combine = runtime.get_kernel("paged_attention.cu", f"paged_decode_combine<{ctype}>")
        rows = B * Hq
        combine_grid = (-(-rows // _COMBINE_WARPS),)
        combine_args = (o_part, lse_part, lens, out, i32(B), i32(Hq), i32(value_dim), i32(per_split), i32(n_splits))

    def run():
        runtime.launch(kernel, grid, (32 * nwarps,), args, shared_mem=smem)
        if n_splits > 1:
            runtime.launch(combine, combine_grid, (32 * _COMBINE_WARPS,), combine_args)
        return out
    return run


def _decode(q, k, v, table, lens, value_dim, scale, block_size, max_len, num_splits=None):
    """Raw-array decode attention (inputs already checked): the kernel when it applies, else the reference."""
    if q.shape[0] == 0:
        return backend.array_module(q).zeros((0, q.shape[1], value_dim), dtype=q.dtype)
    if _kernel_config(q, k, v, value_dim, block_size if table is not None else None) is not None:
        return _plan_decode(q, k, v, table, lens, value_dim, scale, block_size, max_len, num_splits)()
    return _decode_reference(q, k, v, table, lens, value_dim, scale, block_size)


# ------------------------------------------------------------------------------------------------ public ops
def _as_tensor(x, what, device=None):
    if isinstance(x, Tensor):
        return x
    try:
        return tensor(x, device=device)
    except Exception as e:  # noqa: BLE001 - re-raised as ours, naming the argument
        raise TesseraError(f"{what}: expected a Tensor or array-like, got {type(x).__name__}") from e


def _check_float(t, what):
    if not t.dtype.is_floating or t.dtype.is_fp8:
        raise DTypeError(f"{what} must be f16, bf16, f32 or f64, got {t.dtype.name}")


def _int_array(x, what, device, ndim):
    """An int32 array of the device from a Tensor, array or list; plus its host copy (for checks and sizes)."""
    if isinstance(x, Tensor):
        if x.dtype.kind != "int":
            raise DTypeError(f"{what} must be integers, got {x.dtype.name}")
        if x.device != device:
            raise DeviceError(f"{what} is on {x.device}, q on {device}")
        arr = x.data
    else:
        arr = numpy.asarray(x) if not backend.is_cupy_array(x) else x
        if arr.dtype.kind not in "iu":
            raise DTypeError(f"{what} must be integers, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ShapeError(f"{what} must have rank {ndim}, got shape {tuple(arr.shape)}")
    host = backend.to_device(arr, "cpu").astype(numpy.int64)
    dev = backend.to_device(arr, device)
    return backend.array_module(dev).ascontiguousarray(dev, dtype=numpy.int32), host


def _check_scale(scale, dk):
    if scale is None:
        return 1.0 / math.sqrt(dk)
    scale = float(scale)
    if not math.isfinite(scale):
        raise TesseraError(f"decode attention: scale must be a finite number, got {scale}")
    return scale


def _decode_operands(q, key, value, names, cache_layout, what):
    """q [B, Hq, D] and the two caches (rank 4, ``cache_layout``) as float Tensors of one dtype on q's device."""
    q = _as_tensor(q, f"{what}(q)")
    k = _as_tensor(key, f"{what}({names[0]})", q.device)
    v = _as_tensor(value, f"{what}({names[1]})", q.device)
    for name, t in zip(("q",) + names, (q, k, v)):
        _check_float(t, f"{what}: {name}")
    if q.ndim != 3 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"{what}: q must be [B, Hq, D] and {names[0]}/{names[1]} {cache_layout}, got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if not (q.dtype is k.dtype is v.dtype):
        raise DTypeError(f"{what}: q, {names[0]}, {names[1]} must share a dtype, got {q.dtype.name}, "
                         f"{k.dtype.name}, {v.dtype.name}")
    if k.device != q.device or v.device != q.device:
        raise DeviceError(f"{what}: q on {q.device}, {names[0]} on {k.device}, {names[1]} on {v.device}")
    return q, k, v


def paged_decode_attention(q, key_cache, value_cache, block_tables, seq_lens, *, scale=None, num_splits=None):
    """Attention of one query token per sequence over keys and values read through block tables.

    q [B, Hq, D]; key_cache and value_cache [num_blocks, Hkv, block_size, D] (``PagedKVCache.key_cache(layer)``);
    block_tables [B, max_blocks] integers (row b lists the blocks of sequence b in order; entries past its length
    are not read); seq_lens [B] (0 gives a zero row). Returns [B, Hq, D] in q's dtype. ``scale`` defaults to
    1/sqrt(D); ``num_splits`` fixes the split over keys (default: chosen from the GPU and the lengths). The block
    tables are checked against the pool (one small device-to-host copy); ``PagedKVCache.attend`` skips that.
    """
    q, k, v = _decode_operands(q, key_cache, value_cache, ("key_cache", "value_cache"),
                               "[num_blocks, Hkv, block_size, D]", "paged_decode_attention")
    B, Hq, dk = q.shape
    nb, Hkv, bs, dkk = k.shape
    if dkk != dk or v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"paged_decode_attention: key_cache {k.shape} must be [num_blocks, Hkv, block_size, {dk}] "
                         f"and value_cache {v.shape} must agree with it in the first three dims")
    if 0 in (Hq, dk, nb, Hkv, bs):
        raise ShapeError(f"paged_decode_attention: empty q {q.shape} or caches {k.shape}")
    if Hq % Hkv:
        raise ShapeError(f"paged_decode_attention: query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    table, table_host = _int_array(block_tables, "paged_decode_attention(block_tables)", q.device, 2)
    lens, lens_host = _int_array(seq_lens, "paged_decode_attention(seq_lens)", q.device, 1)
    if table_host.shape[0] != B or lens_host.shape[0] != B:
        raise ShapeError(f"paged_decode_attention: block_tables {table_host.shape} and seq_lens {lens_host.shape} "
                         f"must have B = {B} rows")
    capacity = table_host.shape[1] * bs
    if B and (lens_host.min() < 0 or lens_host.max() > capacity):
        raise ShapeError(f"paged_decode_attention: seq_lens must lie in [0, {capacity}] (max_blocks "
                         f"{table_host.shape[1]} x block_size {bs}), got [{lens_host.min()}, {lens_host.max()}]")
    used = numpy.arange(table_host.shape[1])[None, :] * bs < lens_host[:, None]
    bad = used & ((table_host < 0) | (table_host >= nb))
    if bad.any():
        b, j = numpy.argwhere(bad)[0]
        raise ShapeError(f"paged_decode_attention: block_tables[{b}, {j}] = {table_host[b, j]} is outside the pool "
                         f"of {nb} blocks")
    scale = _check_scale(scale, dk)
    max_len = int(lens_host.max()) if B else 0
    out = _decode(q.data, k.data, v.data, table, lens, v.shape[-1], scale, bs, max_len, num_splits)
    return Tensor(out, q.dtype)


def decode_attention(q, key, value, seq_lens=None, *, scale=None, num_splits=None):
    """Attention of one query token per sequence over contiguous caches with per-sequence lengths.

    q [B, Hq, D]; key and value [B, Hkv, S, D] (sequence b uses its first seq_lens[b] positions; default all S).
    The same kernel as ``paged_decode_attention`` with row j of sequence b at key[b, :, j]. Returns [B, Hq, D].
    """
    q, k, v = _decode_operands(q, key, value, ("key", "value"), "[B, Hkv, S, D]", "decode_attention")
    B, Hq, dk = q.shape
    if k.shape[0] != B or k.shape[-1] != dk or v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"decode_attention: key {k.shape} must be [B={B}, Hkv, S, {dk}] and value {v.shape} agree "
                         f"with it in the first three dims")
    if 0 in (Hq, dk, k.shape[1]):
        raise ShapeError(f"decode_attention: empty q {q.shape} or key {k.shape}")
    if Hq % k.shape[1]:
        raise ShapeError(f"decode_attention: query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]})")
    S = k.shape[2]
    if seq_lens is None:
        seq_lens = numpy.full(B, S, dtype=numpy.int32)
    lens, lens_host = _int_array(seq_lens, "decode_attention(seq_lens)", q.device, 1)
    if lens_host.shape[0] != B or (B and (lens_host.min() < 0 or lens_host.max() > S)):
        raise ShapeError(f"decode_attention: seq_lens must be [B={B}] values in [0, {S}], got "
                         f"{lens_host.tolist()[:8]}")
    scale = _check_scale(scale, dk)
    out = _decode(q.data, k.data, v.data, None, lens, v.shape[-1], scale, None, int(lens_host.max()) if B else 0,
                  num_splits)
    return Tensor(out, q.dtype)


# ------------------------------------------------------------------------------------------------ the cache
class _Sequence:
    __slots__ = ("blocks", "length")

    def __init__(self, blocks, length):
        self.blocks, self.length = blocks, length


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
        raise TesseraError(f"PagedKVCache: {what} must be a positive int, got {value!r}")
    return int(value)


class PagedKVCache:
    """Keys and values (or MLA latent rows) of many sequences in fixed-size blocks of one preallocated pool.

    MHA/GQA: ``PagedKVCache(num_blocks, block_size, num_kv_heads=Hkv, head_dim=D)``; MLA:
    ``PagedKVCache(num_blocks, block_size, latent_dim=C, rope_dim=R)``. ``num_layers`` pools share one block table
    per sequence (a model reserves a step's slots once and every layer writes there). Blocks start zeroed.
    """

    def __init__(self, num_blocks, block_size=16, *, num_kv_heads=None, head_dim=None, latent_dim=None, rope_dim=0,
                 num_layers=1, dtype=None, device=None):
        self.num_blocks = _positive_int(num_blocks, "num_blocks")
        self.block_size = _positive_int(block_size, "block_size")
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.dtype = dtypes.bf16 if dtype is None else dtypes.as_dtype(dtype)
        if not self.dtype.is_floating or self.dtype.is_fp8:
            raise DTypeError(f"PagedKVCache: dtype must be f16, bf16, f32 or f64, got {self.dtype.name}")
        self.device = backend.check_device(device)
        xp = backend.xp_for(self.device)
        if (num_kv_heads is None) == (latent_dim is None):
            raise TesseraError("PagedKVCache: give num_kv_heads and head_dim (MHA/GQA keys and values) or latent_dim "
                               "and rope_dim (MLA latents), not both or neither")
        if num_kv_heads is not None:
            self.kind = "mha"
            self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
            self.head_dim = _positive_int(head_dim, "head_dim")
            shape = (self.num_layers, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)
            self._k = xp.zeros(shape, dtype=self.dtype.storage)
            self._v = xp.zeros(shape, dtype=self.dtype.storage)
        else:
            self.kind = "mla"
            self.latent_dim = _positive_int(latent_dim, "latent_dim")
            if isinstance(rope_dim, bool) or not isinstance(rope_dim, (int, numpy.integer)) or rope_dim < 0:
                raise TesseraError(f"PagedKVCache: rope_dim must be an int >= 0, got {rope_dim!r}")
            self.rope_dim = int(rope_dim)
            self._kv = xp.zeros((self.num_layers, self.num_blocks, self.block_size,
                                 self.latent_dim + self.rope_dim), dtype=self.dtype.storage)
        self._free = list(range(self.num_blocks - 1, -1, -1))   # a stack: block 0 is handed out first
        self._refs = [0] * self.num_blocks
        self._seqs = {}
        self._next_id = 0

    # ------------------------------------------------------------- sizes
    @property
    def row_bytes(self):
        """Bytes one token takes in one layer."""
        per = 2 * self.num_kv_heads * self.head_dim if self.kind == "mha" else self.latent_dim + self.rope_dim
        return per * self.dtype.itemsize

    @property
    def bytes_per_token(self):
        """Bytes one token takes over all layers."""
        return self.row_bytes * self.num_layers

    @property
    def num_free_blocks(self):
        return len(self._free)

    @property
    def num_used_blocks(self):
        return self.num_blocks - len(self._free)

    def block_refcount(self, block):
        return self._refs[block]

    @property
    def sequences(self):
        return list(self._seqs)

    def length(self, seq_id):
        return self._seq(seq_id).length

    def blocks(self, seq_id):
        """The block table of a sequence (a copy)."""
        return list(self._seq(seq_id).blocks)

    # ------------------------------------------------------------- the pools
    def key_cache(self, layer=0):
        self._need("mha", "key_cache")
        return Tensor(self._k[self._layer(layer)], self.dtype)

    def value_cache(self, layer=0):
        self._need("mha", "value_cache")
        return Tensor(self._v[self._layer(layer)], self.dtype)

    def latent_cache(self, layer=0):
        """[num_blocks, block_size, latent_dim + rope_dim]: latent then RoPE key, per token."""
        self._need("mla", "latent_cache")
        return Tensor(self._kv[self._layer(layer)], self.dtype)

    # ------------------------------------------------------------- sequences
    def add_sequence(self, seq_id=None):
        """Start an empty sequence (no blocks yet); returns its id (a fresh int when None)."""
        if seq_id is None:
            while self._next_id in self._seqs:
                self._next_id += 1
            seq_id = self._next_id
        if seq_id in self._seqs:
            raise TesseraError(f"PagedKVCache: sequence {seq_id!r} exists already")
        self._seqs[seq_id] = _Sequence([], 0)
        return seq_id

    def fork(self, seq_id, new_id=None):
        """A new sequence sharing every block (and the length) of ``seq_id``; later writes copy a shared block."""
        parent = self._seq(seq_id)
        new_id = self.add_sequence(new_id)
        self._seqs[new_id] = _Sequence(list(parent.blocks), parent.length)
        for blk in parent.blocks:
            self._refs[blk] += 1
        return new_id

    def free(self, seq_id):
        """Drop a sequence; blocks no other sequence shares go back to the pool."""
        seq = self._seq(seq_id)
        for blk in seq.blocks:
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                self._free.append(blk)
        del self._seqs[seq_id]

    def reserve(self, seq_ids, num_tokens=1):
        """Lengthen each sequence of ``seq_ids`` (an id or a list) by ``num_tokens`` (an int or one per sequence)
        and return the slots of the new tokens (NumPy int64, sequence by sequence, ``block * block_size +
        offset``). A partly filled last block shared with another sequence is copied first. Raises
        KVCacheFullError, changing nothing, when the free blocks do not suffice."""
        ids = [seq_ids] if not isinstance(seq_ids, (list, tuple)) else list(seq_ids)
        counts = [num_tokens] * len(ids) if isinstance(num_tokens, (int, numpy.integer)) else list(num_tokens)
        if len(counts) != len(ids) or any(isinstance(c, bool) or int(c) != c or c < 0 for c in counts):
            raise TesseraError(f"PagedKVCache.reserve: num_tokens must be an int >= 0 or one per sequence, got "
                               f"{num_tokens!r} for {len(ids)} sequences")
        if len(set(ids)) != len(ids):
            raise TesseraError(f"PagedKVCache.reserve: a sequence is listed twice in {ids}")
        bs = self.block_size
        need, released = 0, {}   # released: copies made earlier in this call drop a shared block's count
        for sid, n in zip(ids, counts):
            seq = self._seq(sid)
            need += -(-(seq.length + n) // bs) - len(seq.blocks)
            if n > 0 and seq.length % bs:
                tail = seq.blocks[-1]
                if self._refs[tail] - released.get(tail, 0) > 1:
                    need += 1
                    released[tail] = released.get(tail, 0) + 1
        if need > len(self._free):
            raise KVCacheFullError(f"PagedKVCache: {need} free blocks needed for {sum(counts)} tokens, "
                                   f"{len(self._free)} of {self.num_blocks} free (block_size {bs}); free finished "
                                   f"sequences or make the pool larger")
        slots = []
        for sid, n in zip(ids, map(int, counts)):
            seq = self._seqs[sid]
            if n and self._shared_tail(seq):
                self._copy_on_write(seq)
            while len(seq.blocks) * bs < seq.length + n:
                blk = self._free.pop()
                self._refs[blk] = 1
                seq.blocks.append(blk)
            pos = numpy.arange(seq.length, seq.length + n)
            slots.append(numpy.asarray(seq.blocks, dtype=numpy.int64)[pos // bs] * bs + pos % bs)
            seq.length += n
        return numpy.concatenate(slots) if slots else numpy.zeros(0, dtype=numpy.int64)

    def _shared_tail(self, seq):
        return seq.length % self.block_size != 0 and self._refs[seq.blocks[-1]] > 1

    def _copy_on_write(self, seq):
        old = seq.blocks[-1]
        new = self._free.pop()
        for pool in self._pools():
            pool[:, new] = pool[:, old]
        self._refs[old] -= 1
        self._refs[new] = 1
        seq.blocks[-1] = new

    def write(self, slots, key, value=None, layer=0):
        """Store tokens of one layer at ``slots`` (from ``reserve``). MHA/GQA: key and value [N, Hkv, D]. MLA:
        ``key`` is the latent [N, latent_dim] and ``value`` the RoPE key [N, rope_dim] (None when rope_dim = 0)."""
        layer = self._layer(layer)
        slots = numpy.asarray(backend.to_device(slots.data if isinstance(slots, Tensor) else slots, "cpu"))
        if slots.ndim != 1 or slots.dtype.kind not in "iu":
            raise ShapeError(f"PagedKVCache.write: slots must be a 1-D integer array, got {slots.dtype} "
                             f"{slots.shape}")
        if slots.size and (slots.min() < 0 or slots.max() >= self.num_blocks * self.block_size):
            raise ShapeError(f"PagedKVCache.write: slots must lie in [0, {self.num_blocks * self.block_size}), got "
                             f"[{slots.min()}, {slots.max()}]")
        n = slots.shape[0]
        xp = backend.xp_for(self.device)
        blk = xp.asarray(slots // self.block_size)
        off = xp.asarray(slots % self.block_size)
        if self.kind == "mha":
            shape = (n, self.num_kv_heads, self.head_dim)
            k = self._values(key, shape, "key")
            v = self._values(value, shape, "value")
            self._k[layer][blk, :, off, :] = k
            self._v[layer][blk, :, off, :] = v
        else:
            c = self._values(key, (n, self.latent_dim), "latent")
            if not self.rope_dim and value is not None:
                raise ShapeError("PagedKVCache.write: this cache has rope_dim 0; pass no RoPE key")
            r = self._values(value, (n, self.rope_dim), "rope key") if self.rope_dim else None
            self._kv[layer][blk, off, :self.latent_dim] = c
            if r is not None:
                self._kv[layer][blk, off, self.latent_dim:] = r

    def append(self, seq_id, key, value=None):
        """reserve + write for a single-layer cache: key/value [T, Hkv, D] (MLA: latent [T, C], rope key
        [T, R]). Returns the slots."""
        if self.num_layers != 1:
            raise TesseraError(f"PagedKVCache.append: this cache has {self.num_layers} layers; reserve the slots "
                               "once and write each layer")
        k = _as_tensor(key, "PagedKVCache.append(key)", self.device)
        if k.ndim < 1:
            raise ShapeError("PagedKVCache.append: key must have a leading token dimension")
        expected = (self.num_kv_heads, self.head_dim) if self.kind == "mha" else (self.latent_dim,)
        if k.shape[1:] != expected:   # checked before reserving, so a bad call changes nothing
            raise ShapeError(f"PagedKVCache.append: key must be [T, {', '.join(map(str, expected))}], got {k.shape}")
        slots = self.reserve([seq_id], k.shape[0])
        try:
            self.write(slots, k, value)
        except TesseraError:
            self._truncate(seq_id, k.shape[0])
            raise
        return slots

    def _truncate(self, seq_id, n):
        """Undo the last reserve of n tokens of a sequence (blocks it took go back)."""
        seq = self._seqs[seq_id]
        seq.length -= n
        while len(seq.blocks) * self.block_size - seq.length >= self.block_size and seq.blocks:
            blk = seq.blocks.pop()
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                self._free.append(blk)

    def _values(self, x, shape, what):
        if x is None:
            raise ShapeError(f"PagedKVCache.write: {what} is required, expected shape {shape}")
        x = _as_tensor(x, f"PagedKVCache.write({what})", self.device)
        if x.device != self.device:
            raise DeviceError(f"PagedKVCache.write: {what} is on {x.device}, the cache on {self.device}")
        if not x.dtype.is_floating or x.dtype.is_fp8:
            raise DTypeError(f"PagedKVCache.write: {what} must be floating, got {x.dtype.name}")
        if x.shape != shape:
            raise ShapeError(f"PagedKVCache.write: {what} must have shape {shape}, got {x.shape}")
        return x.data.astype(self.dtype.storage, copy=False)

    # ------------------------------------------------------------- reading
    def gather(self, seq_id, layer=0):
        """A sequence's tokens read back through its block table: MHA/GQA (K, V) each [Hkv, L, D]; MLA (latent
        [L, latent_dim], rope key [L, rope_dim])."""
        seq = self._seq(seq_id)
        layer = self._layer(layer)
        xp = backend.xp_for(self.device)
        pos = numpy.arange(seq.length)
        blk = xp.asarray(numpy.asarray(seq.blocks, dtype=numpy.int64)[pos // self.block_size])
        off = xp.asarray(pos % self.block_size)
        if self.kind == "mha":
            k = xp.swapaxes(self._k[layer][blk, :, off, :], 0, 1)
            v = xp.swapaxes(self._v[layer][blk, :, off, :], 0, 1)
            return Tensor(xp.ascontiguousarray(k), self.dtype), Tensor(xp.ascontiguousarray(v), self.dtype)
        rows = self._kv[layer][blk, off]
        return (Tensor(xp.ascontiguousarray(rows[:, :self.latent_dim]), self.dtype),
                Tensor(xp.ascontiguousarray(rows[:, self.latent_dim:]), self.dtype))

    def block_table(self, seq_ids, width=None):
        """int32 [B, width] block ids of the sequences (padded with 0, never read), on the cache's device."""
        seqs = [self._seq(s) for s in seq_ids]
        width = max([len(s.blocks) for s in seqs] + [1]) if width is None else int(width)
        table = numpy.zeros((len(seqs), width), dtype=numpy.int32)
        for i, s in enumerate(seqs):
            if len(s.blocks) > width:
                raise ShapeError(f"PagedKVCache.block_table: a sequence has {len(s.blocks)} blocks, width {width}")
            table[i, :len(s.blocks)] = s.blocks
        return Tensor(backend.to_device(table, self.device))

    def seq_lens(self, seq_ids):
        lens = numpy.asarray([self._seq(s).length for s in seq_ids], dtype=numpy.int32)
        return Tensor(backend.to_device(lens, self.device))

    def attend(self, q, seq_ids, layer=0, *, scale=None, value_dim=None, num_splits=None):
        """Decode attention of q [B, Hq, Dq] (one token per sequence of ``seq_ids``) over the cached tokens.

        MHA/GQA: q [B, Hq, D] over the keys and values of layer ``layer``. MLA: q is the weight-absorbed query
        [B, H, latent_dim + rope_dim] over the latent rows, whose first ``value_dim`` (default latent_dim) columns
        are the values; returns [B, H, value_dim]. Runs the paged kernel on the GPU (tables built here are valid
        by construction and are not re-checked)."""
        q = _as_tensor(q, "PagedKVCache.attend(q)", self.device)
        _check_float(q, "PagedKVCache.attend: q")
        layer = self._layer(layer)
        seq_ids = list(seq_ids)
        seqs = [self._seq(s) for s in seq_ids]
        if self.kind == "mha":
            k, v, dv = self._k[layer], self._v[layer], self.head_dim
            dk = self.head_dim
            if q.ndim != 3 or q.shape[0] != len(seqs) or q.shape[2] != dk or q.shape[1] % self.num_kv_heads:
                raise ShapeError(f"PagedKVCache.attend: q must be [B={len(seqs)}, Hq (a multiple of "
                                 f"{self.num_kv_heads}), {dk}], got {q.shape}")
        else:
            k, v = self._kv[layer][:, None], None          # [num_blocks, 1, block_size, C + R]
            dk = self.latent_dim + self.rope_dim
            dv = self.latent_dim if value_dim is None else int(value_dim)
            if q.ndim != 3 or q.shape[0] != len(seqs) or q.shape[2] != dk or not 0 < dv <= dk:
                raise ShapeError(f"PagedKVCache.attend: q must be [B={len(seqs)}, H, {dk}] and 0 < value_dim <= "
                                 f"{dk}, got {q.shape} and {dv}")
        if q.dtype is not self.dtype:
            raise DTypeError(f"PagedKVCache.attend: q is {q.dtype.name}, the cache {self.dtype.name}")
        table = self.block_table(seq_ids).data
        lens_host = numpy.asarray([s.length for s in seqs], dtype=numpy.int32)
        lens = backend.to_device(lens_host, self.device)
        out = _decode(q.data, k, v, table, lens, dv, _check_scale(scale, dk), self.block_size,
                      int(lens_host.max()) if len(seqs) else 0, num_splits)
        return Tensor(out, q.dtype)

    # ------------------------------------------------------------- helpers
    def _seq(self, seq_id):
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise TesseraError(f"PagedKVCache: no sequence {seq_id!r} (there are {len(self._seqs)})") from None

    def _layer(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, (int, numpy.integer)) or \
                not 0 <= layer < self.num_layers:
            raise TesseraError(f"PagedKVCache: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def _need(self, kind, what):
        if self.kind != kind:
            raise TesseraError(f"PagedKVCache.{what}: this is an {self.kind.upper()} cache")

    def _pools(self):
        return (self._k, self._v) if self.kind == "mha" else (self._kv,)

    def __repr__(self):
        what = (f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}" if self.kind == "mha" else
                f"latent_dim={self.latent_dim}, rope_dim={self.rope_dim}")
        return (f"PagedKVCache({self.num_blocks} blocks of {self.block_size}, {what}, layers={self.num_layers}, "
                f"{self.dtype.name}, {self.device}; {len(self._seqs)} sequences, {self.num_free_blocks} free)")
