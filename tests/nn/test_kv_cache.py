"""PagedKVCache and decode attention over pages.

CPU: the block manager against a plain Python model of the sequences (random append/fork/free sequences on small
pools, both the MHA/GQA and the MLA layouts), copy-on-write, exhaustion errors that change nothing, and the decode
reference against a float64 formula that walks the block tables itself. GPU (marked gpu): the paged decode kernel
and the MLA latent kernel against float64, held to the flash-attention rule (error at most twice that of a plain
implementation in the same precision, plus a small absolute term), outputs poisoned with NaN, lengths 0, 1, 17,
1000, 4097, GQA and head groups, forced split counts, paged against contiguous, offsets past 2^31 elements.
"""
import math
import pathlib

import numpy
import pytest

import tessera_cp as tc
from tessera_cp.cuda import runtime
from tessera_cp.errors import DTypeError, ShapeError, TesseraError
from tessera_cp.nn import kv_cache as K
from tessera_cp.nn.kv_cache import KVCacheFullError, PagedKVCache


# ---------------------------------------------------------------------------------------- independent formula
def naive_decode(q, keys, values, scale=None):
    """q [Hq, D] of one sequence over its keys [Hkv, L, D] and values [Hkv, L, Dv] in float64, one head at a time;
    query head h reads KV head h // (Hq // Hkv); no keys gives zeros."""
    q = numpy.asarray(q, dtype=numpy.float64)
    keys, values = numpy.asarray(keys, dtype=numpy.float64), numpy.asarray(values, dtype=numpy.float64)
    Hq, D = q.shape
    Hkv, L = keys.shape[:2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = numpy.zeros((Hq, values.shape[-1]))
    for h in range(Hq):
        if L == 0:
            continue
        kh = h // (Hq // Hkv)
        s = keys[kh] @ q[h] * scale
        w = numpy.exp(s - s.max())
        out[h] = (w / w.sum()) @ values[kh]
    return out


def walk_table(pool, table_row, length, block_size):
    """Rows 0..length-1 of one sequence read position by position through its block table: [Hkv, L, D]."""
    rows = [pool[table_row[j // block_size], :, j % block_size] for j in range(length)]
    return numpy.stack(rows, axis=1) if rows else numpy.zeros((pool.shape[1], 0, pool.shape[3]))


def random_paged(rng, lens, Hkv, D, block_size, spare=3, Dv=None):
    """A shuffled pool and block tables holding sequences of the given lengths (blocks in random order)."""
    per = [-(-n // block_size) for n in lens]
    nb = sum(per) + spare
    order = rng.permutation(nb)
    k = rng.standard_normal((nb, Hkv, block_size, D))
    v = rng.standard_normal((nb, Hkv, block_size, Dv or D))
    width = max(per + [1])
    table = numpy.zeros((len(lens), width), dtype=numpy.int32)
    at = 0
    for b, n in enumerate(per):
        table[b, :n] = order[at:at + n]
        at += n
    return k, v, table


# ---------------------------------------------------------------------------------------- decode reference
@pytest.mark.parametrize("case", [  # lens, Hq, Hkv, D, block_size
    ([5], 1, 1, 8, 4),
    ([1, 7, 16, 0], 4, 2, 8, 4),       # a length of 0: zeros
    ([33, 2, 17], 8, 1, 16, 16),       # MQA
    ([9, 12], 6, 3, 4, 1),             # block size 1
    ([40, 3], 4, 4, 8, 8),
])
def test_paged_decode_matches_formula(rng, case):
    lens, Hq, Hkv, D, bs = case
    k, v, table = random_paged(rng, lens, Hkv, D, bs)
    q = rng.standard_normal((len(lens), Hq, D))
    out = K.paged_decode_attention(tc.tensor(q), tc.tensor(k), tc.tensor(v), tc.tensor(table),
                                   tc.tensor(numpy.asarray(lens, dtype=numpy.int32)))
    assert out.shape == (len(lens), Hq, D) and out.dtype is tc.f64
    for b, n in enumerate(lens):
        expected = naive_decode(q[b], walk_table(k, table[b], n, bs), walk_table(v, table[b], n, bs))
        numpy.testing.assert_allclose(out.numpy()[b], expected, rtol=1e-12, atol=1e-12)
    if 0 in lens:
        assert (out.numpy()[lens.index(0)] == 0).all()


def test_paged_decode_custom_scale_and_lists(rng):
    k, v, table = random_paged(rng, [6, 3], 2, 8, 4)
    q = rng.standard_normal((2, 2, 8))
    out = K.paged_decode_attention(q, k, v, table.tolist(), [6, 3], scale=0.3).numpy()
    for b, n in enumerate([6, 3]):
        expected = naive_decode(q[b], walk_table(k, table[b], n, 4), walk_table(v, table[b], n, 4), scale=0.3)
        numpy.testing.assert_allclose(out[b], expected, rtol=1e-12, atol=1e-12)


def test_contiguous_decode_matches_formula(rng):
    B, Hq, Hkv, S, D = 3, 6, 2, 11, 8
    q, k, v = rng.standard_normal((B, Hq, D)), rng.standard_normal((B, Hkv, S, D)), rng.standard_normal((B, Hkv, S, D))
    lens = [11, 1, 0]
    out = K.decode_attention(tc.tensor(q), tc.tensor(k), tc.tensor(v), lens).numpy()
    for b in range(B):
        numpy.testing.assert_allclose(out[b], naive_decode(q[b], k[b, :, :lens[b]], v[b, :, :lens[b]]),
                                      rtol=1e-12, atol=1e-12)
    full = K.decode_attention(tc.tensor(q), tc.tensor(k), tc.tensor(v)).numpy()
    numpy.testing.assert_allclose(full[1], naive_decode(q[1], k[1], v[1]), rtol=1e-12, atol=1e-12)


def test_decode_errors(rng):
    k, v, table = random_paged(rng, [5, 3], 2, 8, 4)
    q = tc.tensor(rng.standard_normal((2, 4, 8)))
    kt, vt = tc.tensor(k), tc.tensor(v)
    with pytest.raises(ShapeError, match="block_tables"):
        bad = table.copy()
        bad[0, 0] = k.shape[0]          # one past the pool, inside the sequence
        K.paged_decode_attention(q, kt, vt, bad, [5, 3])
    bad = table.copy()
    bad[1, 1] = 10 ** 6                  # past the sequence's end: never read, so accepted
    K.paged_decode_attention(q, kt, vt, bad, [5, 3])
    with pytest.raises(ShapeError, match="seq_lens"):
        K.paged_decode_attention(q, kt, vt, table, [5, table.shape[1] * 4 + 1])
    with pytest.raises(ShapeError, match="seq_lens"):
        K.paged_decode_attention(q, kt, vt, table, [-1, 3])
    with pytest.raises(ShapeError, match="multiple"):
        K.paged_decode_attention(tc.tensor(rng.standard_normal((2, 3, 8))), kt, vt, table, [5, 3])
    with pytest.raises(DTypeError, match="share a dtype"):
        K.paged_decode_attention(q.astype(tc.f32), kt, vt, table, [5, 3])
    with pytest.raises(DTypeError, match="integers"):
        K.paged_decode_attention(q, kt, vt, table.astype(numpy.float32), [5, 3])
    with pytest.raises(ShapeError, match="B = 2"):
        K.paged_decode_attention(q, kt, vt, table[:1], [5])
    with pytest.raises(ShapeError):
        K.paged_decode_attention(q, kt, tc.tensor(v[:, :1]), table, [5, 3])
    with pytest.raises(TesseraError, match="scale"):
        K.paged_decode_attention(q, kt, vt, table, [5, 3], scale=float("nan"))
    with pytest.raises(ShapeError, match="seq_lens"):
        kk = tc.tensor(rng.standard_normal((2, 2, 4, 8)))
        K.decode_attention(q, kk, kk, [5, 1])


def test_split_sizes_cover_every_key():
    for max_len in (1, 63, 64, 65, 1000, 4097, 8192, 10 ** 6):
        for n in (1, 2, 7, 16, 300):
            for bn in (32, 64):
                count, per = K._split_sizes(max_len, n, bn)
                assert per % bn == 0 and count * per >= max_len and (count - 1) * per < max_len
                assert 1 <= count <= min(n, K._MAX_SPLITS)


def test_shared_memory_layout_and_occupancy():
    # Sums written out by hand from paged_attention.cu's Layout (rows padded by 8 elements, S rows by 4 floats).
    assert K._smem_bytes(2, 128, 128, 1, 64, 4, 2, False) == 16 * 136 * 2 + 2 * 2 * 64 * 136 * 2 + 16 * 68 * 4 + \
        16 * 72 * 2 + 3 * 16 * 4
    assert K._smem_bytes(2, 576, 512, 2, 32, 8, 3, True) == 32 * 584 * 2 + 3 * 32 * 584 * 2 + 2 * 32 * 36 * 4 + \
        32 * 40 * 2 + 3 * 32 * 4
    for (dk, dv, shared), (mt, bn, nw, st, per_sm) in K._CONFIGS.items():
        smem = K._smem_bytes(2, dk, dv, mt, bn, nw, st, shared)
        assert per_sm * (smem + 1024) <= 228 * 1024, (dk, dv)   # H100: 228 KiB per SM, 1 KiB reserved per block
        assert smem <= 163 * 1024                                # and it fits an A100 block too


def test_kernel_sources_list_the_instantiations_dispatch_asks_for():
    source = (pathlib.Path(runtime.SOURCE_DIR) / "paged_attention.cu").read_text()
    listed = set(runtime.parse_instantiations(source))
    for ctype in ("__nv_bfloat16", "__half"):
        assert f"paged_decode_combine<{ctype}>" in listed
        for (dk, dv, shared), (mt, bn, nw, st, _) in K._CONFIGS.items():
            for paged in ("true", "false"):
                name = (f"paged_decode<{ctype}, {dk}, {dv}, {mt}, {bn}, {nw}, {st}, "
                        f"{'true' if shared else 'false'}, {paged}>")
                assert name in listed, name


# ---------------------------------------------------------------------------------------- the block manager
def test_reserve_takes_blocks_in_order_and_gives_slots():
    c = PagedKVCache(6, 4, num_kv_heads=1, head_dim=2, dtype=tc.f64)
    a = c.add_sequence()
    assert c.reserve(a, 3).tolist() == [0, 1, 2] and c.blocks(a) == [0]
    assert c.reserve(a, 3).tolist() == [3, 4, 5] and c.blocks(a) == [0, 1]
    b = c.add_sequence()
    assert c.reserve([a, b], [1, 5]).tolist() == [6, 8, 9, 10, 11, 12]
    assert c.blocks(b) == [2, 3] and c.length(a) == 7 and c.length(b) == 5
    assert c.num_free_blocks == 2 and c.num_used_blocks == 4
    assert c.reserve(a, 0).tolist() == []
    assert c.bytes_per_token == 2 * 1 * 2 * 8


def test_append_write_and_gather_round_trip(rng):
    c = PagedKVCache(8, 3, num_kv_heads=2, head_dim=4, dtype=tc.f64)
    s = c.add_sequence()
    k1, v1 = rng.standard_normal((5, 2, 4)), rng.standard_normal((5, 2, 4))
    k2, v2 = rng.standard_normal((2, 2, 4)), rng.standard_normal((2, 2, 4))
    c.append(s, k1, v1)
    c.append(s, k2, v2)
    k, v = c.gather(s)
    numpy.testing.assert_array_equal(k.numpy(), numpy.concatenate([k1, k2]).transpose(1, 0, 2))
    numpy.testing.assert_array_equal(v.numpy(), numpy.concatenate([v1, v2]).transpose(1, 0, 2))
    # The pools hold them where the block table says.
    pool = c.key_cache().numpy()
    table = c.blocks(s)
    numpy.testing.assert_array_equal(pool[table[2], :, 0], k2[1])        # position 6: block 6 // 3, offset 0
    numpy.testing.assert_array_equal(walk_table(pool, table, 7, 3), k.numpy())


def test_fork_shares_blocks_and_copies_on_write(rng):
    c = PagedKVCache(8, 4, num_kv_heads=1, head_dim=2, dtype=tc.f64)
    a = c.add_sequence()
    base = rng.standard_normal((6, 1, 2))
    c.append(a, base, base + 1)
    b = c.fork(a)
    assert c.blocks(b) == c.blocks(a) == [0, 1]
    assert c.block_refcount(0) == 2 and c.block_refcount(1) == 2 and c.num_used_blocks == 2
    # b writes into the shared, half-full block 1: it gets a copy; a's tokens are untouched.
    tok = rng.standard_normal((1, 1, 2))
    c.append(b, tok, tok)
    assert c.blocks(b) == [0, 2] and c.blocks(a) == [0, 1]
    assert c.block_refcount(1) == 1 and c.block_refcount(2) == 1 and c.block_refcount(0) == 2
    numpy.testing.assert_array_equal(c.gather(a)[0].numpy()[0], base[:, 0])
    numpy.testing.assert_array_equal(c.gather(b)[0].numpy()[0], numpy.concatenate([base, tok])[:, 0])
    # a is now the only owner of block 1: it writes in place.
    c.append(a, tok + 5, tok)
    assert c.blocks(a) == [0, 1]
    # Freeing a returns block 1 only (block 0 is still b's).
    free_before = c.num_free_blocks
    c.free(a)
    assert c.num_free_blocks == free_before + 1 and c.block_refcount(0) == 1
    c.free(b)
    assert c.num_free_blocks == 8 and c.sequences == []


def test_fork_of_a_full_block_needs_no_copy():
    c = PagedKVCache(4, 2, num_kv_heads=1, head_dim=1, dtype=tc.f64)
    a = c.add_sequence()
    c.append(a, numpy.ones((4, 1, 1)), numpy.ones((4, 1, 1)))
    b = c.fork(a)
    c.append(b, numpy.zeros((1, 1, 1)), numpy.zeros((1, 1, 1)))
    assert c.blocks(b) == [0, 1, 2] and c.blocks(a) == [0, 1]


def test_siblings_appended_in_one_call_copy_only_once():
    c = PagedKVCache(3, 4, num_kv_heads=1, head_dim=1, dtype=tc.f64)
    a = c.add_sequence()
    c.append(a, numpy.ones((2, 1, 1)), numpy.ones((2, 1, 1)))
    b = c.fork(a)
    # One free block is taken by the first sibling's copy; the second then owns the original alone.
    c.reserve([a, b], 1)
    assert sorted(c.blocks(a) + c.blocks(b)) == [0, 1] and c.num_free_blocks == 1


def test_exhaustion_raises_and_changes_nothing(rng):
    c = PagedKVCache(3, 4, num_kv_heads=1, head_dim=2, dtype=tc.f64)
    a = c.add_sequence()
    k = rng.standard_normal((10, 1, 2))
    c.append(a, k, k)
    before = (c.blocks(a), c.length(a), c.num_free_blocks, c.gather(a)[0].numpy().copy())
    with pytest.raises(KVCacheFullError, match="free blocks"):
        c.append(a, rng.standard_normal((3, 1, 2)), rng.standard_normal((3, 1, 2)))
    b = c.add_sequence()
    with pytest.raises(KVCacheFullError):
        c.reserve([a, b], [2, 4])          # a fits in its block, b would need 1 more than is free: all refused
    assert (c.blocks(a), c.length(a), c.num_free_blocks) == before[:3] and c.length(b) == 0
    numpy.testing.assert_array_equal(c.gather(a)[0].numpy(), before[3])
    c.append(a, k[:2], k[:2])              # exactly fills the pool
    assert c.num_free_blocks == 0 and c.length(a) == 12


def test_multi_layer_reserve_once_write_each_layer(rng):
    c = PagedKVCache(6, 4, num_kv_heads=2, head_dim=3, num_layers=3, dtype=tc.f64)
    s = c.add_sequence()
    slots = c.reserve(s, 5)
    data = rng.standard_normal((3, 2, 5, 2, 3))
    for layer in range(3):
        c.write(slots, data[layer, 0], data[layer, 1], layer=layer)
    for layer in range(3):
        k, v = c.gather(s, layer)
        numpy.testing.assert_array_equal(k.numpy(), data[layer, 0].transpose(1, 0, 2))
        numpy.testing.assert_array_equal(v.numpy(), data[layer, 1].transpose(1, 0, 2))
    with pytest.raises(TesseraError, match="layers"):
        c.append(s, data[0, 0], data[0, 1])
    with pytest.raises(TesseraError, match="layer"):
        c.write(slots, data[0, 0], data[0, 1], layer=3)
    # copy-on-write copies every layer
    t = c.fork(s)
    slot = c.reserve(t, 1)
    for layer in range(3):
        c.write(slot, data[layer, 0, :1], data[layer, 1, :1], layer=layer)
        numpy.testing.assert_array_equal(c.gather(t, layer)[0].numpy()[:, :5], data[layer, 0].transpose(1, 0, 2))


def test_mla_layout_write_and_gather(rng):
    c = PagedKVCache(5, 4, latent_dim=6, rope_dim=2, dtype=tc.f64)
    s = c.add_sequence(7)
    lat, rope = rng.standard_normal((9, 6)), rng.standard_normal((9, 2))
    c.append(s, lat, rope)
    got_lat, got_rope = c.gather(7)
    numpy.testing.assert_array_equal(got_lat.numpy(), lat)
    numpy.testing.assert_array_equal(got_rope.numpy(), rope)
    rows = c.latent_cache().numpy()
    numpy.testing.assert_array_equal(rows[c.blocks(7)[2], 0], numpy.concatenate([lat[8], rope[8]]))
    assert c.bytes_per_token == (6 + 2) * 8
    with pytest.raises(TesseraError, match="MLA cache"):
        c.key_cache()
    no_rope = PagedKVCache(2, 2, latent_dim=3, dtype=tc.f64)
    t = no_rope.add_sequence()
    with pytest.raises(ShapeError, match="rope_dim 0"):
        no_rope.append(t, numpy.ones((1, 3)), numpy.ones((1, 1)))
    assert no_rope.length(t) == 0 and no_rope.num_free_blocks == 2


def test_cache_errors(rng):
    with pytest.raises(TesseraError, match="not both or neither"):
        PagedKVCache(4, 4)
    with pytest.raises(TesseraError, match="not both or neither"):
        PagedKVCache(4, 4, num_kv_heads=1, head_dim=2, latent_dim=3)
    with pytest.raises(TesseraError, match="num_blocks"):
        PagedKVCache(0, 4, num_kv_heads=1, head_dim=2)
    with pytest.raises(DTypeError):
        PagedKVCache(4, 4, num_kv_heads=1, head_dim=2, dtype=tc.int32)
    c = PagedKVCache(4, 4, num_kv_heads=2, head_dim=2, dtype=tc.f64)
    s = c.add_sequence()
    with pytest.raises(TesseraError, match="exists"):
        c.add_sequence(s)
    with pytest.raises(TesseraError, match="no sequence"):
        c.reserve(99, 1)
    with pytest.raises(TesseraError, match="twice"):
        c.reserve([s, s], 1)
    with pytest.raises(TesseraError, match="num_tokens"):
        c.reserve(s, -1)
    with pytest.raises(ShapeError, match=r"\[T, 2, 2\]"):
        c.append(s, numpy.ones((1, 3, 2)), numpy.ones((1, 3, 2)))
    with pytest.raises(ShapeError, match="value"):
        c.append(s, numpy.ones((1, 2, 2)), numpy.ones((2, 2, 2)))
    assert c.length(s) == 0 and c.num_free_blocks == 4          # the failed appends left nothing behind
    with pytest.raises(ShapeError, match="slots"):
        c.write(numpy.asarray([16]), numpy.ones((1, 2, 2)), numpy.ones((1, 2, 2)))
    with pytest.raises(ShapeError, match="required"):
        c.write(c.reserve(s, 1), numpy.ones((1, 2, 2)))
    with pytest.raises(TesseraError, match="no sequence"):
        c.free(12345)


# ---------------------------------------------------------------------------------------- random operations
class Model:
    """The cache as a plain Python dict: sequence id -> list of token rows."""

    def __init__(self):
        self.seqs = {}


def check_against_model(cache, model, width):
    assert sorted(cache.sequences) == sorted(model.seqs)
    counts = numpy.zeros(cache.num_blocks, dtype=int)
    for sid, tokens in model.seqs.items():
        assert cache.length(sid) == len(tokens)
        blocks = cache.blocks(sid)
        assert len(blocks) == -(-len(tokens) // cache.block_size)
        for blk in blocks:
            counts[blk] += 1
        got = cache.gather(sid)
        if cache.kind == "mha":
            got = numpy.concatenate([got[0].numpy(), got[1].numpy()], axis=-1).transpose(1, 0, 2)
        else:
            got = numpy.concatenate([got[0].numpy(), got[1].numpy()], axis=-1)
        expected = numpy.asarray(tokens).reshape((len(tokens),) + got.shape[1:]) if tokens else got[:0]
        numpy.testing.assert_array_equal(got, expected)
    assert [cache.block_refcount(b) for b in range(cache.num_blocks)] == counts.tolist()
    assert cache.num_free_blocks == int((counts == 0).sum())
    assert sorted(cache._free) == [b for b in range(cache.num_blocks) if counts[b] == 0]


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_random_operations_match_a_python_model(kind, block_size, seed):
    rng = numpy.random.default_rng(seed)
    if kind == "mha":
        cache = PagedKVCache(10, block_size, num_kv_heads=2, head_dim=2, dtype=tc.f64)
        width = 8   # key and value of two heads of 2
    else:
        cache = PagedKVCache(10, block_size, latent_dim=3, rope_dim=2, dtype=tc.f64)
        width = 5
    model = Model()
    full_seen = 0
    for step in range(120):
        op = rng.choice(["add", "append", "append", "append", "fork", "free", "batch"])
        live = list(model.seqs)
        if op == "add" or not live:
            sid = cache.add_sequence()
            model.seqs[sid] = []
        elif op == "append":
            sid = live[rng.integers(len(live))]
            n = int(rng.integers(0, 2 * block_size + 2))
            rows = rng.standard_normal((n, width))
            try:
                if kind == "mha":
                    kv = rows.reshape(n, 2, 2, 2)       # [T, Hkv, K|V, D] -> key and value halves
                    cache.append(sid, kv[:, :, 0], kv[:, :, 1])
                    model.seqs[sid] += [numpy.concatenate([kv[t, :, 0], kv[t, :, 1]], axis=-1) for t in range(n)]
                else:
                    cache.append(sid, rows[:, :3], rows[:, 3:])
                    model.seqs[sid] += list(rows)
            except KVCacheFullError:
                full_seen += 1
        elif op == "batch":                              # one reserve for several sequences, then one write
            ids = [live[i] for i in rng.permutation(len(live))[:3]]
            counts = [int(rng.integers(0, block_size + 2)) for _ in ids]
            rows = rng.standard_normal((sum(counts), width))
            try:
                slots = cache.reserve(ids, counts)
            except KVCacheFullError:
                full_seen += 1
                continue
            if kind == "mha":
                kv = rows.reshape(-1, 2, 2, 2)
                cache.write(slots, kv[:, :, 0], kv[:, :, 1])
                new = [numpy.concatenate([kv[t, :, 0], kv[t, :, 1]], axis=-1) for t in range(len(rows))]
            else:
                cache.write(slots, rows[:, :3], rows[:, 3:])
                new = list(rows)
            at = 0
            for sid, n in zip(ids, counts):
                model.seqs[sid] += new[at:at + n]
                at += n
        elif op == "fork":
            sid = live[rng.integers(len(live))]
            child = cache.fork(sid)
            model.seqs[child] = list(model.seqs[sid])
        else:
            sid = live[rng.integers(len(live))]
            cache.free(sid)
            del model.seqs[sid]
        check_against_model(cache, model, width)
    assert full_seen > 0   # the pool ran out at least once and was left consistent


def test_attend_matches_formula_over_forked_sequences(rng):
    c = PagedKVCache(12, 4, num_kv_heads=2, head_dim=8, dtype=tc.f64)
    a = c.add_sequence()
    c.append(a, rng.standard_normal((6, 2, 8)), rng.standard_normal((6, 2, 8)))
    b = c.fork(a)
    c.append(b, rng.standard_normal((5, 2, 8)), rng.standard_normal((5, 2, 8)))
    e = c.add_sequence()                             # an empty sequence: zeros
    q = rng.standard_normal((3, 4, 8))
    out = c.attend(q, [a, b, e]).numpy()
    for i, sid in enumerate([a, b]):
        k, v = (t.numpy() for t in c.gather(sid))
        numpy.testing.assert_allclose(out[i], naive_decode(q[i], k, v), rtol=1e-12, atol=1e-12)
    assert (out[2] == 0).all()
    with pytest.raises(ShapeError):
        c.attend(rng.standard_normal((2, 4, 8)), [a, b, e])
    with pytest.raises(DTypeError):
        c.attend(q.astype(numpy.float32), [a, b, e])


def test_attend_over_mla_latents(rng):
    c = PagedKVCache(10, 4, latent_dim=6, rope_dim=2, dtype=tc.f64)
    ids = [c.add_sequence() for _ in range(2)]
    for sid, n in zip(ids, (9, 2)):
        c.append(sid, rng.standard_normal((n, 6)), rng.standard_normal((n, 2)))
    q = rng.standard_normal((2, 3, 8))
    out = c.attend(q, ids, scale=0.4).numpy()
    assert out.shape == (2, 3, 6)
    for i, sid in enumerate(ids):
        lat, rope = (t.numpy() for t in c.gather(sid))
        rows = numpy.concatenate([lat, rope], axis=1)[None]
        numpy.testing.assert_allclose(out[i], naive_decode(q[i], rows, lat[None], scale=0.4), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- GPU
def _cupy():
    cupy = pytest.importorskip("cupy")
    if not tc.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cupy


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs start as NaN, and the reference may not run: a result must come from the kernels."""
    cupy = _cupy()
    monkeypatch.setattr(K, "_alloc", lambda xp, shape, dtype: cupy.full(shape, numpy.nan, dtype=cupy.float32)
                        .astype(dtype))

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran where the kernel should have")
    monkeypatch.setattr(K, "_decode_reference", refuse)


def _ref_decode_gpu(q, keys, values, lens, scale, lowp=None):
    """Decode attention on the GPU from gathered keys [B, Hkv, L, D] and values, written independently of the
    module: KV heads expanded, explicit masked softmax. lowp=None: float64. lowp=dtype: a plain implementation in
    that precision (scores, probabilities and output rounded to it, f32 sums)."""
    cupy = _cupy()
    work = cupy.float64 if lowp is None else cupy.float32

    def rnd(x):
        return x if lowp is None else x.astype(lowp).astype(work)

    B, Hq, D = q.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    idx = cupy.arange(Hq) // (Hq // Hkv)
    ke, ve = keys.astype(work)[:, idx], values.astype(work)[:, idx]             # [B, Hq, L, D]
    s = rnd(rnd(cupy.einsum("bhd,bhld->bhl", q.astype(work), ke)) * scale)
    seen = cupy.arange(L)[None, None, :] < cupy.asarray(lens)[:, None, None]
    s = cupy.where(seen, s, -cupy.inf)
    m = s.max(-1, keepdims=True)
    m = cupy.where(cupy.isfinite(m), m, 0)
    e = cupy.where(seen, cupy.exp(s - m), 0)
    tot = e.sum(-1, keepdims=True)
    p = rnd(e / cupy.where(tot > 0, tot, 1))
    return rnd(cupy.einsum("bhl,bhld->bhd", p, ve))


def _gather_gpu(pool, table, L, bs):
    """[B, Hkv, L, D] read through the block tables by plain indexing (positions past a length are garbage,
    masked by the reference)."""
    cupy = _cupy()
    pos = cupy.arange(L)
    blocks = cupy.asarray(table)[:, pos // bs]
    return cupy.swapaxes(pool[blocks, :, (pos % bs)[None, :], :], 1, 2)


def _check(cupy, out, ref, plain, what):
    """The flash-attention rule, with the absolute term the attention tests use (1e-4 of the largest value)."""
    out, ref, plain = (cupy.asnumpy(x.astype(cupy.float64)) for x in (out, ref, plain))
    assert numpy.isfinite(out).all(), f"{what}: NaN or inf (an element no kernel wrote?)"
    atol = 1e-4 * float(numpy.abs(ref).max()) + 1e-6
    print(f"{what}: kernel err {numpy.abs(out - ref).max():.3g}, plain err {numpy.abs(plain - ref).max():.3g}")
    tc.testing.assert_low_precision_close(out, ref, plain, atol=atol)


def _paged_inputs(cupy, lens, Hq, Hkv, D, bs, dtype, seed, Dv=None):
    rng = numpy.random.default_rng(seed)
    k, v, table = random_paged(rng, lens, Hkv, D, bs, spare=2, Dv=Dv)
    st = getattr(tc, dtype).storage
    kc, vc = cupy.asarray(k).astype(st), cupy.asarray(v).astype(st)
    q = cupy.asarray(rng.standard_normal((len(lens), Hq, D))).astype(st)
    return q, kc, vc, table


GPU_CASES = [  # lens, Hq, Hkv, D, block_size, num_splits
    ([1], 1, 1, 64, 16, None),
    ([17, 1000, 4097], 8, 2, 128, 16, None),
    ([0, 1, 4097, 300], 32, 8, 128, 16, None),      # an empty sequence among long ones (split + combine)
    ([1000, 33], 12, 4, 64, 32, 1),                 # one split: the block writes the output itself
    ([4097, 17], 8, 8, 128, 16, 40),                # many splits, most of them empty for the short sequence
    ([5000, 17], 32, 1, 128, 16, None),             # MQA, 32 heads per KV head: two head groups
    ([1000, 2], 40, 2, 64, 16, None),               # 20 heads per KV head: a full and a partial head group
    ([4097], 4, 4, 128, 1, None),                   # block size 1: every key in its own block
    ([1000, 4097, 3], 16, 2, 64, 64, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", [(c, "bf16") for c in GPU_CASES] + [(c, "f16") for c in GPU_CASES[:4]])
def test_gpu_paged_decode(poison, case, dtype):
    cupy = _cupy()
    lens, Hq, Hkv, D, bs, splits = case
    q, k, v, table = _paged_inputs(cupy, lens, Hq, Hkv, D, bs, dtype, seed=len(lens) * 31 + Hq)
    dt = getattr(tc, dtype)
    out = K.paged_decode_attention(tc.Tensor(q, dt), tc.Tensor(k, dt), tc.Tensor(v, dt), tc.Tensor(cupy.asarray(table)),
                                   tc.Tensor(cupy.asarray(lens, dtype=cupy.int32)), num_splits=splits)
    L = table.shape[1] * bs
    keys, values = _gather_gpu(k, table, L, bs), _gather_gpu(v, table, L, bs)
    scale = 1.0 / math.sqrt(D)
    ref = _ref_decode_gpu(q, keys, values, lens, scale)
    plain = _ref_decode_gpu(q, keys, values, lens, scale, lowp=dt.storage)
    _check(cupy, out.data, ref, plain, f"paged {case} {dtype}")
    if 0 in lens:
        assert (cupy.asnumpy(out.data[lens.index(0)].astype(cupy.float32)) == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_gpu_paged_equals_contiguous_bit_for_bit(poison, splits):
    """The same kernel reading the same rows through a block table or from a contiguous cache: identical bits."""
    cupy = _cupy()
    lens, Hq, Hkv, D, bs = [4097, 1, 1000, 333], 32, 8, 128, 16
    q, k, v, table = _paged_inputs(cupy, lens, Hq, Hkv, D, bs, "bf16", seed=7)
    S = max(lens)
    kc = cupy.ascontiguousarray(_gather_gpu(k, table, S, bs))
    vc = cupy.ascontiguousarray(_gather_gpu(v, table, S, bs))
    bf = tc.bf16
    lens_t = tc.Tensor(cupy.asarray(lens, dtype=cupy.int32))
    paged = K.paged_decode_attention(tc.Tensor(q, bf), tc.Tensor(k, bf), tc.Tensor(v, bf),
                                     tc.Tensor(cupy.asarray(table)), lens_t, num_splits=splits)
    contiguous = K.decode_attention(tc.Tensor(q, bf), tc.Tensor(kc, bf), tc.Tensor(vc, bf), lens_t, num_splits=splits)
    assert numpy.isfinite(cupy.asnumpy(paged.data.astype(cupy.float32))).all()
    assert (cupy.asnumpy(paged.data.view(cupy.uint16)) == cupy.asnumpy(contiguous.data.view(cupy.uint16))).all()


@pytest.mark.gpu
def test_gpu_contiguous_decode(poison):
    cupy = _cupy()
    rng = numpy.random.default_rng(3)
    B, Hq, Hkv, S, D = 3, 16, 4, 1000, 128
    q = cupy.asarray(rng.standard_normal((B, Hq, D))).astype(tc.bf16.storage)
    k = cupy.asarray(rng.standard_normal((B, Hkv, S, D))).astype(tc.bf16.storage)
    v = cupy.asarray(rng.standard_normal((B, Hkv, S, D))).astype(tc.bf16.storage)
    lens = [1000, 17, 1]
    bf = tc.bf16
    out = K.decode_attention(tc.Tensor(q, bf), tc.Tensor(k, bf), tc.Tensor(v, bf), lens)
    scale = 1.0 / math.sqrt(D)
    ref = _ref_decode_gpu(q, k, v, lens, scale)
    plain = _ref_decode_gpu(q, k, v, lens, scale, lowp=bf.storage)
    _check(cupy, out.data, ref, plain, "contiguous")


MLA_CASES = [  # lens, H, paged, block_size, num_splits
    ([1, 17, 1000, 4097], 32, True, 16, None),
    ([4097, 2], 16, True, 16, None),          # 16 heads: half the rows of the block are padding
    ([1000, 1], 48, True, 64, 3),             # 48 heads: a full and a half head group
    ([4097], 32, True, 16, 1),
    ([300, 1000, 17], 32, False, None, None),  # contiguous latents
]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", [(c, "bf16") for c in MLA_CASES] + [(MLA_CASES[0], "f16")])
def test_gpu_mla_latent_decode(poison, case, dtype):
    from tessera_cp.nn.mla import mla_decode_attention
    cupy = _cupy()
    lens, H, paged, bs, splits = case
    C, R = 512, 64
    dt = getattr(tc, dtype)
    rng = numpy.random.default_rng(sum(lens) + H)
    q = cupy.asarray(rng.standard_normal((len(lens), H, C + R))).astype(dt.storage)
    scale = 1.0 / math.sqrt(128 + 64)
    if paged:
        pool, _, table = random_paged(rng, lens, 1, C + R, bs, spare=2)
        pool = cupy.asarray(pool).astype(dt.storage)                 # [N, 1, bs, C + R]
        out = mla_decode_attention(tc.Tensor(q, dt), tc.Tensor(pool[:, 0], dt),
                                   tc.Tensor(cupy.asarray(lens, dtype=cupy.int32)), tc.Tensor(cupy.asarray(table)),
                                   value_dim=C, scale=scale, num_splits=splits)
        rows = _gather_gpu(pool, table, table.shape[1] * bs, bs)      # [B, 1, L, C + R]
    else:
        rows = cupy.asarray(rng.standard_normal((len(lens), 1, max(lens), C + R))).astype(dt.storage)
        out = mla_decode_attention(tc.Tensor(q, dt), tc.Tensor(rows[:, 0], dt), lens, value_dim=C, scale=scale,
                                   num_splits=splits)
    ref = _ref_decode_gpu(q, rows, rows[..., :C], lens, scale)
    plain = _ref_decode_gpu(q, rows, rows[..., :C], lens, scale, lowp=dt.storage)
    _check(cupy, out.data, ref, plain, f"mla {case} {dtype}")


@pytest.mark.gpu
def test_gpu_offsets_past_two_to_the_31_elements(poison):
    """A pool of more than 2^31 elements, the sequences in its last blocks: 64-bit row offsets."""
    cupy = _cupy()
    D, bs, Hkv = 128, 16, 1
    nb = 2 ** 31 // (Hkv * bs * D) + 64
    k = cupy.zeros((nb, Hkv, bs, D), dtype=tc.bf16.storage)
    v = cupy.zeros((nb, Hkv, bs, D), dtype=tc.bf16.storage)
    rng = numpy.random.default_rng(11)
    lens = [1000, 17]
    table = numpy.zeros((2, 63), dtype=numpy.int32)
    table[0, :63] = nb - 1 - numpy.arange(63)
    table[1, :2] = [nb - 64, 5]
    for b, n in enumerate(lens):
        for j in range(-(-n // bs)):
            blk = int(table[b, j])
            k[blk] = cupy.asarray(rng.standard_normal((Hkv, bs, D))).astype(k.dtype)
            v[blk] = cupy.asarray(rng.standard_normal((Hkv, bs, D))).astype(v.dtype)
    q = cupy.asarray(rng.standard_normal((2, 4, D))).astype(k.dtype)
    bf = tc.bf16
    out = K.paged_decode_attention(tc.Tensor(q, bf), tc.Tensor(k, bf), tc.Tensor(v, bf), tc.Tensor(cupy.asarray(table)),
                                   tc.Tensor(cupy.asarray(lens, dtype=cupy.int32)))
    keys, values = _gather_gpu(k, table, 63 * bs, bs), _gather_gpu(v, table, 63 * bs, bs)
    scale = 1.0 / math.sqrt(D)
    _check(cupy, out.data, _ref_decode_gpu(q, keys, values, lens, scale),
           _ref_decode_gpu(q, keys, values, lens, scale, lowp=bf.storage), "offsets > 2^31")
    del k, v


@pytest.mark.gpu
def test_gpu_cache_attend_runs_the_kernel(poison):
    cupy = _cupy()
    rng = numpy.random.default_rng(5)
    c = PagedKVCache(200, 16, num_kv_heads=2, head_dim=128, dtype=tc.bf16, device="cuda")
    ids = [c.add_sequence() for _ in range(3)]
    for sid, n in zip(ids, (1000, 1, 77)):
        c.append(sid, tc.randn(n, 2, 128, dtype=tc.bf16, device="cuda"), tc.randn(n, 2, 128, dtype=tc.bf16,
                                                                                   device="cuda"))
    fork = c.fork(ids[2])
    c.append(fork, tc.randn(5, 2, 128, dtype=tc.bf16, device="cuda"), tc.randn(5, 2, 128, dtype=tc.bf16,
                                                                               device="cuda"))
    ids.append(fork)
    q = cupy.asarray(rng.standard_normal((4, 8, 128))).astype(tc.bf16.storage)
    out = c.attend(tc.Tensor(q, tc.bf16), ids)
    L = max(c.length(s) for s in ids)
    keys = cupy.zeros((4, 2, L, 128), dtype=tc.bf16.storage)
    values = cupy.zeros_like(keys)
    for i, sid in enumerate(ids):
        kk, vv = c.gather(sid)
        keys[i, :, :kk.shape[1]], values[i, :, :vv.shape[1]] = kk.data, vv.data
    lens = [c.length(s) for s in ids]
    scale = 1.0 / math.sqrt(128)
    _check(cupy, out.data, _ref_decode_gpu(q, keys, values, lens, scale),
           _ref_decode_gpu(q, keys, values, lens, scale, lowp=tc.bf16.storage), "cache.attend")
