"""Attention: the reference against an independent float64 formula written row by row here, gradients by finite
differences, dropout statistics, Philox known answers, chunked attention; GPU tests (marked gpu) hold the CUDA
kernels to the flash-attention rule (error against float64 at most twice that of a plain same-precision
implementation, plus a small absolute term) on odd sizes, GQA/MQA, masks, ALiBi, decode and fully masked rows."""
import importlib
import math
import pathlib

import numpy
import pytest

import tessera_cp as tc
from tessera_cp.cuda import runtime
from tessera_cp.errors import DTypeError, ShapeError, TesseraError
from tessera_cp.testing import gradcheck

A = importlib.import_module("tessera_cp.nn.attention")  # the module: tessera_cp.nn.attention is the function

NEG = -numpy.inf


# ---------------------------------------------------------------------------------------- independent formula
def naive(q, k, v, mask=None, causal=False, scale=None, slopes=None, keep=None, p_drop=0.0):
    """Attention one query row at a time in float64 (NumPy), with every convention spelled out:
    query head h reads KV head h // (Hq // Hkv); causal row i sees keys j <= i + Sk - Sq; ALiBi adds
    -slope * |i + Sk - Sq - j|; a bool mask keeps True; a row that sees nothing is zero (lse +inf)."""
    q, k, v = (numpy.asarray(x, dtype=numpy.float64) for x in (q, k, v))
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    full = None if mask is None else numpy.broadcast_to(numpy.asarray(mask), (B, Hq, Sq, Sk))
    out = numpy.zeros((B, Hq, Sq, v.shape[-1]))
    lse = numpy.full((B, Hq, Sq), numpy.inf)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Sq):
                s = k[b, kh] @ q[b, h, i] * scale
                allowed = numpy.ones(Sk, dtype=bool)
                if causal:
                    allowed &= numpy.arange(Sk) <= i + Sk - Sq
                if slopes is not None:
                    slope = numpy.asarray(slopes, dtype=numpy.float64).reshape(-1, Hq)
                    slope = slope[b if slope.shape[0] > 1 else 0, h]
                    s = s - slope * numpy.abs(i + Sk - Sq - numpy.arange(Sk))
                if full is not None:
                    if full.dtype == bool:
                        allowed &= full[b, h, i]
                    else:
                        s = s + full[b, h, i].astype(numpy.float64)
                allowed &= numpy.isfinite(s)
                if not allowed.any():
                    continue
                top = s[allowed].max()
                w = numpy.exp(s[allowed] - top)
                lse[b, h, i] = top + numpy.log(w.sum())
                w = w / w.sum()
                if keep is not None:
                    w = w * keep[b, h, i][allowed] / (1.0 - p_drop)
                out[b, h, i] = w @ v[b, kh][allowed]
    return out, lse


def rand(rng, *shape, requires_grad=False):
    return tc.tensor(rng.standard_normal(shape), requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------- forward vs formula
CASES = [  # B, Hq, Hkv, Sq, Sk, D, Dv
    (1, 1, 1, 1, 1, 8, 8),
    (2, 4, 4, 5, 5, 8, 8),
    (2, 4, 2, 7, 3, 4, 4),      # GQA 2, Sq > Sk
    (1, 8, 1, 3, 11, 8, 8),     # MQA, Sq < Sk
    (1, 6, 3, 17, 17, 16, 16),
    (2, 2, 1, 4, 6, 8, 5),      # v head dim differs from q/k
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_formula(rng, case, causal):
    B, Hq, Hkv, Sq, Sk, D, Dv = case
    q, k, v = rand(rng, B, Hq, Sq, D), rand(rng, B, Hkv, Sk, D), rand(rng, B, Hkv, Sk, Dv)
    out = A.attention(q, k, v, is_causal=causal)
    expected, _ = naive(q.numpy(), k.numpy(), v.numpy(), causal=causal)
    assert out.shape == (B, Hq, Sq, Dv) and out.dtype is tc.f64
    numpy.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_causal_is_bottom_right_aligned(rng):
    # Sq < Sk: the last query sees every key, the first sees Sk - Sq + 1 of them.
    q, k, v = rand(rng, 1, 2, 3, 8), rand(rng, 1, 2, 6, 8), rand(rng, 1, 2, 6, 8)
    out = A.attention(q, k, v, is_causal=True).numpy()
    full = A.attention(q[:, :, 2:], k, v).numpy()
    numpy.testing.assert_allclose(out[:, :, 2:], full, rtol=1e-12, atol=1e-12)
    first = A.attention(q[:, :, :1], k[:, :, :4], v[:, :, :4]).numpy()
    numpy.testing.assert_allclose(out[:, :, :1], first, rtol=1e-12, atol=1e-12)
    # Decoding one token: causal changes nothing.
    one = q[:, :, -1:]
    numpy.testing.assert_allclose(A.attention(one, k, v, is_causal=True).numpy(), A.attention(one, k, v).numpy(),
                                  rtol=1e-12, atol=1e-12)


def test_rows_that_see_nothing_are_zero_not_nan(rng):
    # Sq > Sk under causal: the first Sq - Sk rows see no key.
    q, k, v = rand(rng, 1, 2, 6, 4), rand(rng, 1, 2, 2, 4), rand(rng, 1, 2, 2, 4)
    out = A.attention(q, k, v, is_causal=True).numpy()
    assert numpy.isfinite(out).all()
    assert (out[:, :, :4] == 0).all() and (numpy.abs(out[:, :, 4:]) > 0).all()
    # A boolean mask that hides a whole row, and an additive one that puts -inf on a whole row.
    mask = numpy.ones((6, 2), dtype=bool)
    mask[1] = False
    out = A.attention(q, k, v, mask=tc.tensor(mask)).numpy()
    assert (out[:, :, 1] == 0).all() and numpy.isfinite(out).all()
    add = numpy.zeros((6, 2))
    add[3] = NEG
    out = A.attention(q, k, v, mask=tc.tensor(add)).numpy()
    assert (out[:, :, 3] == 0).all() and numpy.isfinite(out).all()


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (1, 4, 1, 7), (2, 4, 5, 7)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_broadcast(rng, mask_shape, kind):
    q, k, v = rand(rng, 2, 4, 5, 8), rand(rng, 2, 2, 7, 8), rand(rng, 2, 2, 7, 8)
    if kind == "bool":
        mask = rng.random(mask_shape) > 0.3
    else:
        mask = rng.standard_normal(mask_shape)
    out = A.attention(q, k, v, mask=tc.tensor(mask), is_causal=True)
    expected, _ = naive(q.numpy(), k.numpy(), v.numpy(), mask=mask, causal=True)
    numpy.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_custom_scale(rng):
    q, k, v = rand(rng, 1, 2, 4, 8), rand(rng, 1, 2, 4, 8), rand(rng, 1, 2, 4, 8)
    expected, _ = naive(q.numpy(), k.numpy(), v.numpy(), scale=0.7)
    numpy.testing.assert_allclose(A.attention(q, k, v, scale=0.7).numpy(), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- ALiBi
def test_alibi_slopes_follow_the_paper():
    numpy.testing.assert_allclose(A.alibi_slopes(8).numpy(), [2.0 ** -(i + 1) for i in range(8)])
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads (2^-0.5, 2^-1.5).
    expected = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    numpy.testing.assert_allclose(A.alibi_slopes(6).numpy(), expected, rtol=1e-7)
    assert A.alibi_slopes(6).dtype is tc.f32


@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_matches_formula(rng, per_batch):
    q, k, v = rand(rng, 2, 4, 5, 8), rand(rng, 2, 2, 9, 8), rand(rng, 2, 2, 9, 8)
    slopes = rng.random((2, 4) if per_batch else (4,))
    for causal in (False, True):
        out = A.attention(q, k, v, is_causal=causal, alibi_slopes=tc.tensor(slopes))
        expected, _ = naive(q.numpy(), k.numpy(), v.numpy(), causal=causal, slopes=slopes)
        numpy.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- log-sum-exp
def test_saved_lse_matches_formula(rng):
    q, k, v = rand(rng, 1, 4, 6, 8, requires_grad=True), rand(rng, 1, 2, 3, 8), rand(rng, 1, 2, 3, 8)
    out = A.attention(q, k, v, is_causal=True)
    lse = out._node.saved[-1]
    _, expected = naive(q.numpy(), k.numpy(), v.numpy(), causal=True)
    assert numpy.array_equal(numpy.isinf(lse), numpy.isinf(expected))
    finite = numpy.isfinite(expected)
    numpy.testing.assert_allclose(lse[finite], expected[finite], rtol=1e-12)


# ---------------------------------------------------------------------------------------- gradients
def _gc(fn, *tensors):
    assert gradcheck(fn, list(tensors))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_gqa_unequal_lengths(rng, causal):
    q, k, v = rand(rng, 1, 4, 3, 4, requires_grad=True), rand(rng, 1, 2, 5, 4, requires_grad=True), \
        rand(rng, 1, 2, 5, 3, requires_grad=True)
    _gc(lambda q, k, v: A.attention(q, k, v, is_causal=causal), q, k, v)


def test_gradcheck_rows_that_see_nothing(rng):
    q, k, v = rand(rng, 1, 2, 5, 4, requires_grad=True), rand(rng, 1, 1, 3, 4, requires_grad=True), \
        rand(rng, 1, 1, 3, 4, requires_grad=True)
    mask = tc.tensor(numpy.array([[True, True, True], [False, False, False], [True, False, True],
                                  [True, True, False], [True, True, True]]))
    _gc(lambda q, k, v: A.attention(q, k, v, mask=mask, is_causal=True), q, k, v)


def test_gradcheck_additive_mask_and_alibi_get_gradients(rng):
    q, k, v = rand(rng, 2, 2, 3, 4, requires_grad=True), rand(rng, 2, 1, 4, 4, requires_grad=True), \
        rand(rng, 2, 1, 4, 4, requires_grad=True)
    mask = rand(rng, 1, 2, 3, 4, requires_grad=True)   # broadcast over the batch: its gradient sums over it
    slopes = tc.tensor(rng.random(2), requires_grad=True)
    _gc(lambda q, k, v, m, s: A.attention(q, k, v, mask=m, alibi_slopes=s), q, k, v, mask, slopes)
    per_batch = tc.tensor(rng.random((2, 2)), requires_grad=True)
    _gc(lambda q, s: A.attention(q, k, v, alibi_slopes=s, is_causal=True), q, per_batch)


def test_gradcheck_with_dropout(rng):
    q, k, v = rand(rng, 1, 2, 4, 4, requires_grad=True), rand(rng, 1, 2, 5, 4, requires_grad=True), \
        rand(rng, 1, 2, 5, 4, requires_grad=True)
    _gc(lambda q, k, v: A.attention(q, k, v, dropout_p=0.3, dropout_seed=11, is_causal=True), q, k, v)


def test_gqa_gradient_sums_over_the_group(rng):
    # Attention with 2 KV heads shared by 4 query heads equals attention over K/V expanded to 4 heads; the
    # gradient of the shared heads is the sum of the expanded heads' gradients.
    q = rand(rng, 1, 4, 3, 4, requires_grad=True)
    k, v = rand(rng, 1, 2, 5, 4, requires_grad=True), rand(rng, 1, 2, 5, 4, requires_grad=True)
    cot = rng.standard_normal((1, 4, 3, 4))
    (A.attention(q, k, v) * tc.tensor(cot)).sum().backward()
    ke = tc.tensor(numpy.repeat(k.numpy(), 2, axis=1), requires_grad=True)
    ve = tc.tensor(numpy.repeat(v.numpy(), 2, axis=1), requires_grad=True)
    (A.attention(q.detach(), ke, ve) * tc.tensor(cot)).sum().backward()
    numpy.testing.assert_allclose(k.grad.numpy(), ke.grad.numpy().reshape(1, 2, 2, 5, 4).sum(2), rtol=1e-10)
    numpy.testing.assert_allclose(v.grad.numpy(), ve.grad.numpy().reshape(1, 2, 2, 5, 4).sum(2), rtol=1e-10)


# ---------------------------------------------------------------------------------------- dropout
def philox_scalar(counter, key, rounds=10):
    """Philox4x32 on Python ints, written from the paper (Salmon et al. 2011): the oracle for the module's."""
    c, (k0, k1), mask = list(counter), key, 0xFFFFFFFF
    for _ in range(rounds):
        p0, p1 = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57
        c = [((p1 >> 32) ^ c[1] ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c[3] ^ k1) & mask, p0 & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return tuple(c)


# Random123's known-answer vectors for Philox4x32-10 (counter, key, result).
PHILOX_KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
              ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
              ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
               (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


def test_philox_known_answers(rng):
    for counter, key, expected in PHILOX_KAT:
        assert philox_scalar(counter, key) == expected
        assert tuple(int(w) for w in A.philox4x32(counter, key)) == expected
    # The array version on many counters at once, against the scalar one.
    counters = rng.integers(0, 2 ** 32, size=(4, 50), dtype=numpy.uint64)
    key = tuple(int(x) for x in rng.integers(0, 2 ** 32, size=2))
    words = A.philox4x32(tuple(counters), key)
    for n in range(50):
        assert tuple(int(w[n]) for w in words) == philox_scalar(tuple(int(c[n]) for c in counters), key)


def expected_keep(shape, p, seed, offset):
    """The documented rule, element by element with the scalar Philox."""
    B, H, Sq, Sk = shape
    threshold = min(int(p * 65536 + 0.5), 65535)
    keep = numpy.zeros(shape, dtype=bool)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    for b, h, i, j in numpy.ndindex(*shape):
        words = philox_scalar((4 * (j // 16) + (j % 8) // 2, 8 * (i // 16) + i % 8, b * H + h, offset), key)
        bits = (words[2 * ((i // 8) % 2) + (j // 8) % 2] >> (16 * (j % 2))) & 0xFFFF
        keep[b, h, i, j] = bits >= threshold
    return keep


def test_keep_mask_layout():
    seed, offset, p = (7 << 32) | 3, 5, 0.25
    shape = (2, 3, 37, 29)  # rows and keys cross several 16-blocks, neither a multiple of 8
    numpy.testing.assert_array_equal(A.dropout_keep_mask(shape, p, seed, offset), expected_keep(shape, p, seed, offset))


def test_dropout_threshold_rounding():
    # 16 random bits an element: p is rounded to a multiple of 2^-16, and the scale uses the rounded value.
    assert A._drop_threshold(0.3) == 19661 and A._drop_threshold(1e-6) == 0 and A._drop_threshold(0.99999999) == 65535
    assert A._drop_scale(19661) == pytest.approx(1 / (1 - 19661 / 65536), rel=1e-15)
    keep = A.dropout_keep_mask((1, 1, 64, 64), 1e-6, 3)
    assert keep.all()


def test_dropout_kept_fraction_reproducibility_and_formula(rng):
    q, k, v = rand(rng, 2, 4, 64, 8), rand(rng, 2, 4, 64, 8), rand(rng, 2, 4, 64, 8)
    p = 0.3
    keep = A.dropout_keep_mask((2, 4, 64, 64), p, 1234)
    fraction = keep.mean()
    assert abs(fraction - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.size)
    out = A.attention(q, k, v, dropout_p=p, dropout_seed=1234)
    expected, _ = naive(q.numpy(), k.numpy(), v.numpy(), keep=keep, p_drop=A._drop_threshold(p) / 65536)
    numpy.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    again = A.attention(q, k, v, dropout_p=p, dropout_seed=1234)
    assert numpy.array_equal(out.numpy(), again.numpy())
    assert not numpy.allclose(out.numpy(), A.attention(q, k, v, dropout_p=p, dropout_seed=1235).numpy())
    shifted = A.attention(q, k, v, dropout_p=p, dropout_seed=1234, dropout_offset=1)
    assert not numpy.allclose(out.numpy(), shifted.numpy())
    # Different seeds and offsets give different masks (not shifted copies of one another).
    other = A.dropout_keep_mask((2, 4, 64, 64), p, 1234, 1)
    assert 0.3 < (keep != other).mean() < 0.5
    tc.manual_seed(5)
    a = A.attention(q, k, v, dropout_p=p).numpy()
    tc.manual_seed(5)
    assert numpy.array_equal(a, A.attention(q, k, v, dropout_p=p).numpy())
    # A Generator as the seed: drawn from it, reproducible by seeding it.
    a = A.attention(q, k, v, dropout_p=p, dropout_seed=tc.Generator(9)).numpy()
    assert numpy.array_equal(a, A.attention(q, k, v, dropout_p=p, dropout_seed=tc.Generator(9)).numpy())
    with pytest.raises(TesseraError, match="dropout_offset"):
        A.attention(q, k, v, dropout_p=p, dropout_seed=1, dropout_offset=2 ** 32)


def test_dropout_preserves_the_expectation(rng):
    q, k, v = rand(rng, 1, 2, 3, 4), rand(rng, 1, 2, 6, 4), rand(rng, 1, 2, 6, 4)
    exact = A.attention(q, k, v).numpy()
    runs = numpy.stack([A.attention(q, k, v, dropout_p=0.4, dropout_seed=s).numpy() for s in range(400)])
    z = (runs.mean(0) - exact) / (runs.std(0, ddof=1) / math.sqrt(len(runs)))
    assert numpy.abs(z).max() < 5.5


# ---------------------------------------------------------------------------------------- chunked attention
@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
@pytest.mark.parametrize("shape", [(1, 2, 2, 7, 7), (2, 4, 2, 9, 5), (1, 2, 1, 4, 10)])
def test_chunked_matches_formula(rng, chunk, shape):
    B, Hq, Hkv, Sq, Sk = shape
    q, k, v = rand(rng, B, Hq, Sq, 4), rand(rng, B, Hkv, Sk, 4), rand(rng, B, Hkv, Sk, 4)
    for causal in (False, True):
        out = A.chunked_attention(q, k, v, chunk_size=chunk, is_causal=causal)
        expected, _ = naive(q.numpy(), k.numpy(), v.numpy(), causal=causal)
        numpy.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_chunked_rescales_large_logits(rng):
    # Logits that grow from chunk to chunk: without rescaling the partial sums overflow or are wrong.
    q = tc.tensor(numpy.full((1, 1, 2, 2), 10.0))
    k = tc.tensor(numpy.arange(12, dtype=numpy.float64).reshape(1, 1, 6, 2) * 3.0)
    v = rand(rng, 1, 1, 6, 3)
    out = A.chunked_attention(q, k, v, chunk_size=2, scale=1.0)
    expected, _ = naive(q.numpy(), k.numpy(), v.numpy(), scale=1.0)
    numpy.testing.assert_allclose(out.numpy(), expected, rtol=1e-10)


def test_chunked_gradients(rng):
    q, k, v = rand(rng, 1, 2, 5, 3, requires_grad=True), rand(rng, 1, 1, 4, 3, requires_grad=True), \
        rand(rng, 1, 1, 4, 3, requires_grad=True)
    _gc(lambda q, k, v: A.chunked_attention(q, k, v, chunk_size=2, is_causal=True), q, k, v)


def test_chunked_keeps_bf16(rng):
    q = tc.tensor(rng.standard_normal((1, 2, 5, 8)), dtype=tc.bf16)
    out = A.chunked_attention(q, q, q, chunk_size=2)
    assert out.dtype is tc.bf16


# ---------------------------------------------------------------------------------------- wrappers, dtypes, errors
def test_gqa_and_mqa_wrappers(rng):
    q, k, v = rand(rng, 1, 4, 5, 8), rand(rng, 1, 5, 8), rand(rng, 1, 5, 8)
    out = A.multi_query_attention(q, k, v)
    expected, _ = naive(q.numpy(), k.numpy()[:, None], v.numpy()[:, None], causal=True)
    numpy.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    k2, v2 = rand(rng, 1, 2, 5, 8), rand(rng, 1, 2, 5, 8)
    expected, _ = naive(q.numpy(), k2.numpy(), v2.numpy(), causal=True)
    numpy.testing.assert_allclose(A.grouped_query_attention(q, k2, v2).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert A.flash_attention is A.attention


@pytest.mark.parametrize("dtype", [tc.bf16, tc.f16, tc.f32])
def test_low_precision_inputs_on_the_cpu(rng, dtype):
    q, k, v = (tc.tensor(rng.standard_normal((1, 2, 9, 16)), dtype=dtype) for _ in range(3))
    out = A.attention(q, k, v, is_causal=True)
    assert out.dtype is dtype
    expected, _ = naive(q.astype(tc.f64).numpy(), k.astype(tc.f64).numpy(), v.astype(tc.f64).numpy(), causal=True)
    bound = {tc.bf16: 2 ** -8, tc.f16: 2 ** -11, tc.f32: 1e-6}[dtype]
    assert numpy.abs(out.astype(tc.f64).numpy() - expected).max() <= bound * numpy.abs(expected).max()


def test_errors(rng):
    q, k = rand(rng, 1, 4, 3, 8), rand(rng, 1, 2, 5, 8)
    with pytest.raises(ShapeError, match=r"q must be \[B, H, S, D\]"):
        A.attention(rand(rng, 4, 3, 8), k, k)
    with pytest.raises(ShapeError, match="multiple"):
        A.attention(rand(rng, 1, 3, 3, 8), k, k)
    with pytest.raises(ShapeError, match="head dims"):
        A.attention(rand(rng, 1, 4, 3, 4), k, k)
    with pytest.raises(ShapeError, match="batch"):
        A.attention(q, rand(rng, 2, 2, 5, 8), rand(rng, 2, 2, 5, 8))
    with pytest.raises(ShapeError, match="agree"):
        A.attention(q, k, rand(rng, 1, 2, 6, 8))
    with pytest.raises(ShapeError, match="broadcast"):
        A.attention(q, k, k, mask=tc.tensor(numpy.ones((3, 4), dtype=bool)))
    with pytest.raises(DTypeError, match="mask"):
        A.attention(q, k, k, mask=tc.tensor(numpy.ones((3, 5), dtype=numpy.int32)))
    with pytest.raises(DTypeError, match="share a dtype"):
        A.attention(q.astype(tc.f32), k, k)
    with pytest.raises(DTypeError):
        A.attention(tc.tensor(numpy.ones((1, 4, 3, 8), dtype=numpy.int32)), k, k)
    with pytest.raises(ShapeError, match="alibi_slopes"):
        A.attention(q, k, k, alibi_slopes=tc.tensor(numpy.ones(3)))
    with pytest.raises(TesseraError, match="dropout_p"):
        A.attention(q, k, k, dropout_p=1.0)
    with pytest.raises(ShapeError, match="empty"):
        A.attention(rand(rng, 1, 4, 0, 8), k, k)
    with pytest.raises(ShapeError, match="chunk_size"):
        A.chunked_attention(q, k, k, chunk_size=0)
    with pytest.raises(ShapeError, match="multi_query_attention"):
        A.multi_query_attention(q, k, k)


def test_kernel_sources_list_the_instantiations_dispatch_asks_for():
    cuda = pathlib.Path(A.__file__).resolve().parent.parent / "cuda"
    fwd, bwd = (cuda / "attention.cu").read_text(), (cuda / "attention_bwd.cu").read_text()
    for t in ("__nv_bfloat16", "__half"):
        for d in (64, 128):
            # Unmasked attention runs _FWD_TILES, masks/ALiBi _MASKED_TILES, decode _DECODE_TILES (either).
            for table, extras in ((A._FWD_TILES, ("false",)), (A._MASKED_TILES, ("true",)),
                                  (A._DECODE_TILES, ("false", "true"))):
                w, mt, bn, minb, stages = table[d]
                for extra in extras:
                    assert f"attn_fwd<{t}, {d}, {w}, {mt}, {bn}, {minb}, {stages}, {extra}>" in fwd
            for extra in ("false", "true"):
                w, mt, bn = A._DQ_TILES[d]
                assert f"attn_bwd_dq<{t}, {d}, {w}, {mt}, {bn}, {extra}>" in bwd
                w, bmq = A._DKDV_TILES[d]
                assert f"attn_bwd_dkdv<{t}, {d}, {w}, {bmq}, {extra}>" in bwd
            assert f"attn_bwd_dot<{t}, {d}>" in bwd
            # Dropout: the masked variants with DROP.
            w, mt, bn, minb, stages = A._DROP_TILES[d]
            assert f"attn_fwd<{t}, {d}, {w}, {mt}, {bn}, {minb}, {stages}, true, true>" in fwd
            w, mt, bn = A._DROP_DQ_TILES[d]
            assert f"attn_bwd_dq<{t}, {d}, {w}, {mt}, {bn}, true, true>" in bwd
            w, bmq = A._DROP_DKDV_TILES[d]
            assert f"attn_bwd_dkdv<{t}, {d}, {w}, {bmq}, true, true>" in bwd


def test_hopper_kernel_is_listed_and_fits():
    cuda = pathlib.Path(A.__file__).resolve().parent.parent / "cuda"
    src = (cuda / "attention_sm90.cu").read_text()
    for t in ("__nv_bfloat16", "__half"):
        for d in A._SM90_DIMS:
            for causal in ("false", "true"):
                assert f"attn_fwd_sm90<{t}, {d}, {causal}>" in src
    assert A._sm90_smem(128) == 128 * 128 * 2 * 6 + 80 + 1024 <= 227 * 1024


def test_tile_tables_fit_the_kernels():
    # Shared memory per block (the H100 allows 227 KiB) and the shapes the kernels' static_asserts accept.
    for table in (A._FWD_TILES, A._MASKED_TILES, A._DECODE_TILES, A._DROP_TILES):
        for d, (w, mt, bn, minb, stages) in table.items():
            assert d % 32 == 0 and bn % 16 == 0 and stages >= 2 and minb >= 1
            assert (16 * mt * w + 2 * stages * bn) * (d + 8) * 2 <= 227 * 1024
    for d, (w, mt, bn) in [*A._DQ_TILES.items(), *A._DROP_DQ_TILES.items()]:
        assert d <= 128 and bn % 16 == 0 and (2 * 16 * mt * w + 4 * bn) * (d + 8) * 2 <= 227 * 1024
    for d, (w, bmq) in [*A._DKDV_TILES.items(), *A._DROP_DKDV_TILES.items()]:
        assert d <= 128 and bmq % 16 == 0 and bmq // 2 <= 32 * w
        assert (2 * 16 * w + 4 * bmq) * (d + 8) * 2 + 16 * bmq <= 227 * 1024
    assert set(A._DROP_TILES) == set(A._DROP_DQ_TILES) == set(A._DROP_DKDV_TILES) <= set(A._DQ_TILES)


def test_launcher_argument_block():
    # The short path's argument block: pointers first (filled per call), then the plan's arguments, each in its
    # C type, read back through the void* array the driver would get.
    import ctypes

    class Pointer:  # stands for a device array: only .data.ptr is read
        def __init__(self, ptr):
            self.data = type("Mem", (), {"ptr": ptr})()

    kernel = type("Kernel", (), {"ptr": 1234})()
    tail = (Pointer(0xABC0), numpy.int32(-7), numpy.int64(1 << 40), numpy.uint32(0xFFFFFFF0), numpy.float32(0.125))
    launcher = A._Launcher(kernel, (3, 2), (128,), 4096, 2, tail)
    seen = []
    launcher((0x1000, 0x2000), 77, lambda *args: seen.append(args))
    fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra = seen[0]
    assert (fn, gx, gy, gz, bx, by, bz, smem, stream, extra) == (1234, 3, 2, 1, 128, 1, 1, 4096, 77, 0)
    slots = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
    read = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32,
            ctypes.c_float]
    values = [ctypes.cast(slots[i], ctypes.POINTER(t)).contents.value for i, t in enumerate(read)]
    assert values == [0x1000, 0x2000, 0xABC0, -7, 1 << 40, 0xFFFFFFF0, 0.125]
    launcher((0x3000, 0x4000), 0, lambda *args: seen.append(args))
    assert ctypes.cast(slots[1], ctypes.POINTER(ctypes.c_uint64)).contents.value == 0x4000


# ======================================================================================== GPU: the kernels
def _cupy():
    cupy = pytest.importorskip("cupy")
    if not tc.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cupy


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs start as NaN, so an element no kernel wrote fails the comparison."""
    cupy = _cupy()
    monkeypatch.setattr(A, "_alloc",
                        lambda xp, shape, dtype: cupy.full(shape, numpy.nan, dtype=cupy.float32).astype(dtype))


def _ref_gpu(q, k, v, mask=None, causal=False, scale=None, slopes=None, dout=None, lowp=None, keep=None):
    """Forward (and with dout, the gradients) on the GPU, written independently of the module: K/V expanded to
    the query heads, explicit softmax. lowp=None: float64 throughout. lowp=dtype: a plain implementation in that
    precision: scores, probabilities, products and gradients rounded to it after each step (f32 sums).
    keep: dropout's mask times 1 / (1 - p) ([B, Hq, Sq, Sk]), applied to the normalised probabilities."""
    cupy = _cupy()
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    work = cupy.float64 if lowp is None else cupy.float32

    def rnd(x):
        return x if lowp is None else x.astype(lowp).astype(work)

    qf, kf, vf = (x.astype(work) for x in (q, k, v))
    idx = cupy.arange(Hq) // G
    ke, ve = kf[:, idx], vf[:, idx]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = rnd(rnd(qf @ ke.swapaxes(-1, -2)) * scale)
    i = cupy.arange(Sq)[:, None] + (Sk - Sq)
    j = cupy.arange(Sk)[None, :]
    if slopes is not None:
        s = s - slopes.astype(work).reshape(-1, Hq, 1, 1) * cupy.abs(i - j)
    if mask is not None:
        s = cupy.where(mask, s, -cupy.inf) if mask.dtype == cupy.bool_ else s + mask.astype(work)
    if causal:
        s = cupy.where(j <= i, s, -cupy.inf)
    m = s.max(-1, keepdims=True)
    m = cupy.where(cupy.isfinite(m), m, 0)
    e = cupy.exp(s - m)
    tot = e.sum(-1, keepdims=True)
    p = e / cupy.where(tot > 0, tot, 1)
    pr = rnd(p if keep is None else p * keep)
    out = rnd(pr @ ve)
    if dout is None:
        return out
    do = dout.astype(work)
    dve = rnd(pr.swapaxes(-1, -2) @ do)
    dp = rnd(do @ ve.swapaxes(-1, -2))
    if keep is not None:
        dp = dp * keep
    ds = rnd(p * (dp - (do * out).sum(-1, keepdims=True)))
    dq = rnd(ds @ ke * scale)
    dke = rnd(ds.swapaxes(-1, -2) @ qf * scale)
    dk = dke.reshape(B, Hkv, G, Sk, D).sum(2)
    dv = dve.reshape(B, Hkv, G, Sk, -1).sum(2)
    return out, dq, dk, dv


def _close(cupy, result, ref64, plain, what, atol):
    result, ref64, plain = (cupy.asnumpy(x.astype(cupy.float64)) for x in (result, ref64, plain))
    assert numpy.isfinite(result).all(), f"{what}: NaN or inf (an element no kernel wrote?)"
    err = numpy.abs(result - ref64).max()
    plain_err = numpy.abs(plain - ref64).max()
    print(f"{what}: kernel err {err:.3g}, plain err {plain_err:.3g}")
    tc.testing.assert_low_precision_close(result, ref64, plain, atol=atol)


def _check_forward_backward(cupy, out, q, k, v, dout, causal, what):
    """out and the gradients q, k, v hold after out.backward(dout), against the float64 reference."""
    ref = _ref_gpu(q.data, k.data, v.data, causal=causal, dout=dout.data)
    plain = _ref_gpu(q.data, k.data, v.data, causal=causal, dout=dout.data, lowp=q.dtype.storage)
    for name, got, r64, lp in zip(("out", "dq", "dk", "dv"), (out.data, q.grad.data, k.grad.data, v.grad.data),
                                  ref, plain):
        _close(cupy, got, r64, lp, f"{what} {name}", atol=1e-4 * float(abs(r64).max()) + 1e-6)


GPU_CASES = [  # B, Hq, Hkv, Sq, Sk, D, causal
    (1, 2, 2, 1, 1, 64, False),
    (2, 3, 3, 17, 17, 64, True),
    (1, 4, 1, 1000, 1000, 128, True),      # MQA
    (1, 8, 2, 4097, 4097, 128, True),      # GQA 4
    (2, 8, 1, 17, 1000, 128, True),        # MQA, Sq < Sk (prefill against a cache)
    (1, 8, 8, 1000, 17, 64, True),         # Sq > Sk: rows that see nothing
    (1, 16, 2, 300, 257, 128, False),      # GQA 8
    (1, 32, 8, 1, 4097, 128, False),       # decode: packed groups, split keys
    (2, 32, 8, 16, 4097, 128, True),       # decode, 16 queries
    (1, 4, 4, 333, 333, 32, True),
    (1, 4, 2, 333, 200, 96, True),
    (2, 4, 2, 512, 512, 128, True),        # lengths that are multiples of every tile: no tail tiles
    (1, 4, 4, 256, 384, 64, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", [(c, "bf16") for c in GPU_CASES] +
                         [(c, "f16") for c in GPU_CASES if c[5] in (64, 128)])
def test_gpu_forward_backward(poison, case, dtype):
    cupy = _cupy()
    B, Hq, Hkv, Sq, Sk, D, causal = case
    dt = tc.bf16 if dtype == "bf16" else tc.f16
    q = tc.randn(B, Hq, Sq, D, dtype=dt, device="cuda", requires_grad=True)
    k = tc.randn(B, Hkv, Sk, D, dtype=dt, device="cuda", requires_grad=True)
    v = tc.randn(B, Hkv, Sk, D, dtype=dt, device="cuda", requires_grad=True)
    out = A.attention(q, k, v, is_causal=causal)
    assert out.dtype is dt and out._node.used_kernel
    dout = tc.randn(B, Hq, Sq, D, dtype=dt, device="cuda")
    out.backward(dout)
    _check_forward_backward(cupy, out, q, k, v, dout, causal, f"{case} {dtype}")


# The sm_90 kernel (attention_sm90.cu) takes D 64 / 128 without mask, ALiBi or dropout when the call has at least
# as many 128-row blocks as the GPU has SMs (132 on the H100): these cases have that many.
HOPPER_CASES = [  # B, Hq, Hkv, Sq, Sk, D, causal
    (2, 16, 4, 1000, 1037, 128, True),     # GQA 4, tails in rows and keys
    (2, 16, 4, 1000, 1037, 128, False),
    (3, 48, 8, 259, 259, 64, True),
    (1, 132, 132, 77, 200, 64, False),     # one partial row block a head
    (2, 66, 66, 300, 100, 128, True),      # Sq > Sk: rows (and whole blocks) that see nothing
    (2, 64, 8, 200, 1000, 128, True),      # Sq < Sk
    (1, 66, 1, 512, 512, 64, True),        # MQA, lengths multiples of the tile
    (1, 8, 2, 4097, 4097, 128, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", [(c, "bf16") for c in HOPPER_CASES] + [(c, "f16") for c in HOPPER_CASES[::2]])
def test_gpu_hopper_forward(poison, monkeypatch, case, dtype):
    """The sm_90 forward is chosen, matches the float64 reference (out), agrees with the mma.sync kernel's LSE,
    and its out and LSE drive the backward to the reference gradients."""
    cupy = _cupy()
    if runtime.compute_capability() != 90:
        pytest.skip("the wgmma kernel needs compute capability 9.0")
    B, Hq, Hkv, Sq, Sk, D, causal = case
    dt = tc.bf16 if dtype == "bf16" else tc.f16
    q = tc.randn(B, Hq, Sq, D, dtype=dt, device="cuda", requires_grad=True)
    k = tc.randn(B, Hkv, Sk, D, dtype=dt, device="cuda", requires_grad=True)
    v = tc.randn(B, Hkv, Sk, D, dtype=dt, device="cuda", requires_grad=True)
    scale = 1.0 / math.sqrt(D)
    assert A._use_sm90(q.data, scale)
    _, lse = A._forward_kernel(q.data, k.data, v.data, None, None, scale, causal)
    monkeypatch.setenv("TESSERA_ATTN_SM90", "0")
    assert not A._use_sm90(q.data, scale)
    _, lse_sm80 = A._forward_kernel(q.data, k.data, v.data, None, None, scale, causal)
    monkeypatch.delenv("TESSERA_ATTN_SM90")
    lse, lse_sm80 = cupy.asnumpy(lse), cupy.asnumpy(lse_sm80)
    assert numpy.array_equal(numpy.isinf(lse), numpy.isinf(lse_sm80)) and not numpy.isnan(lse).any()
    finite = numpy.isfinite(lse)
    numpy.testing.assert_allclose(lse[finite], lse_sm80[finite], rtol=0, atol=2e-4)
    out = A.attention(q, k, v, is_causal=causal)
    dout = tc.randn(B, Hq, Sq, D, dtype=dt, device="cuda")
    out.backward(dout)
    _check_forward_backward(cupy, out, q, k, v, dout, causal, f"{case} {dtype}")


@pytest.mark.gpu
def test_gpu_hopper_forward_strided_q(poison):
    """q as a [B, S, H, D] buffer viewed [B, H, S, D]: the tensor map takes its strides, no copy."""
    cupy = _cupy()
    if runtime.compute_capability() != 90:
        pytest.skip("the wgmma kernel needs compute capability 9.0")
    base = tc.randn(2, 300, 66, 64, dtype=tc.bf16, device="cuda")
    q = tc.Tensor(base.data.transpose(0, 2, 1, 3))
    k = tc.randn(2, 22, 333, 64, dtype=tc.bf16, device="cuda")
    v = tc.randn(2, 22, 333, 64, dtype=tc.bf16, device="cuda")
    assert A._use_sm90(q.data, 0.125) and A._rows_ready(q.data)[0] is q.data
    out = A.attention(q, k, v, is_causal=True)
    ref = _ref_gpu(q.data, k.data, v.data, causal=True)
    plain = _ref_gpu(q.data, k.data, v.data, causal=True, lowp=tc.bf16.storage)
    _close(cupy, out.data, ref, plain, "strided q (sm90)", atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [256])
def test_gpu_forward_head_dim_256(poison, D):
    cupy = _cupy()
    q = tc.randn(2, 4, 333, D, dtype=tc.bf16, device="cuda")
    k = tc.randn(2, 2, 517, D, dtype=tc.bf16, device="cuda")
    v = tc.randn(2, 2, 517, D, dtype=tc.bf16, device="cuda")
    out = A.attention(q, k, v, is_causal=True)
    ref = _ref_gpu(q.data, k.data, v.data, causal=True)
    plain = _ref_gpu(q.data, k.data, v.data, causal=True, lowp=tc.bf16.storage)
    _close(cupy, out.data, ref, plain, "D256 out", atol=1e-5)


MASK_CASES = [  # mask kind, mask shape (None: no mask), alibi slopes shape, causal
    ("bool", (2, 1, 300, 257), None, False),
    ("bool", (300, 257), (4,), True),
    ("float", (1, 4, 1, 257), None, True),
    ("float", (2, 4, 300, 257), (2, 4), False),
    (None, None, (4,), True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("mcase", MASK_CASES)
def test_gpu_masks_and_alibi(poison, mcase):
    cupy = _cupy()
    kind, mshape, sshape, causal = mcase
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 300, 257, 128
    q = tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    k = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    v = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    rng = cupy.random.default_rng()
    mask = None
    if kind == "bool":
        mask = rng.random(mshape) > 0.4
        mask[..., 5, :] = False              # a row that sees nothing
    elif kind == "float":
        mask = rng.standard_normal(mshape).astype(cupy.float32)
        if mshape[-2] > 1:
            mask[..., 7, :] = -cupy.inf      # an additive mask that hides a whole row
    slopes = None if sshape is None else rng.random(sshape).astype(cupy.float32)
    out = A.attention(q, k, v, mask=None if mask is None else tc.Tensor(mask), is_causal=causal,
                      alibi_slopes=None if slopes is None else tc.Tensor(slopes))
    assert out._node.used_kernel
    dout = tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda")
    out.backward(dout)
    ref = _ref_gpu(q.data, k.data, v.data, mask=mask, causal=causal, slopes=slopes, dout=dout.data)
    plain = _ref_gpu(q.data, k.data, v.data, mask=mask, causal=causal, slopes=slopes, dout=dout.data,
                     lowp=tc.bf16.storage)
    for name, got, r64, lp in zip(("out", "dq", "dk", "dv"), (out.data, q.grad.data, k.grad.data, v.grad.data),
                                  ref, plain):
        _close(cupy, got, r64, lp, f"{mcase} {name}", atol=1e-4 * float(abs(r64).max()) + 1e-6)
    if kind is not None and mshape[-2] > 1:
        rows = 5 if kind == "bool" else 7
        assert float(abs(out.data[..., rows, :].astype(cupy.float32)).max()) == 0.0


@pytest.mark.gpu
def test_gpu_large_logits(poison):
    cupy = _cupy()
    # Scores near 1e4: the online softmax must rescale exactly (a plain bf16 softmax of such scores is poor).
    q = (tc.randn(1, 2, 200, 64, dtype=tc.f32, device="cuda") * 12.0).astype(tc.bf16)
    k = (tc.randn(1, 2, 300, 64, dtype=tc.f32, device="cuda") * 12.0).astype(tc.bf16)
    v = tc.randn(1, 2, 300, 64, dtype=tc.bf16, device="cuda")
    out = A.attention(q, k, v, scale=1.0)
    ref = _ref_gpu(q.data, k.data, v.data, scale=1.0)
    plain = _ref_gpu(q.data, k.data, v.data, scale=1.0, lowp=tc.bf16.storage)
    assert float(abs(q.data.astype(cupy.float32) @ k.data[0, 0].astype(cupy.float32).T).max()) > 3000
    _close(cupy, out.data, ref, plain, "large logits out", atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [-0.05, 0.0])
def test_gpu_non_positive_scale(poison, scale):
    cupy = _cupy()
    # The unmasked fast path takes the row max of the raw scores, which needs scale > 0; others take the masked path.
    q = tc.randn(1, 4, 300, 128, dtype=tc.bf16, device="cuda", requires_grad=True)
    k = tc.randn(1, 2, 300, 128, dtype=tc.bf16, device="cuda", requires_grad=True)
    v = tc.randn(1, 2, 300, 128, dtype=tc.bf16, device="cuda", requires_grad=True)
    out = A.attention(q, k, v, is_causal=True, scale=scale)
    dout = tc.randn(1, 4, 300, 128, dtype=tc.bf16, device="cuda")
    out.backward(dout)
    ref = _ref_gpu(q.data, k.data, v.data, causal=True, scale=scale, dout=dout.data)
    plain = _ref_gpu(q.data, k.data, v.data, causal=True, scale=scale, dout=dout.data, lowp=tc.bf16.storage)
    for name, got, r64, lp in zip(("out", "dq", "dk", "dv"), (out.data, q.grad.data, k.grad.data, v.grad.data),
                                  ref, plain):
        _close(cupy, got, r64, lp, f"scale {scale} {name}", atol=1e-4 * float(abs(r64).max()) + 1e-6)


@pytest.mark.gpu
def test_gpu_strided_inputs_and_reference_agreement(poison):
    cupy = _cupy()
    # q from a [B, S, H, D] buffer viewed as [B, H, S, D] (no copy needed by the kernel).
    base = tc.randn(2, 77, 4, 64, dtype=tc.bf16, device="cuda")
    q = tc.Tensor(base.data.transpose(0, 2, 1, 3))
    k = tc.randn(2, 2, 90, 64, dtype=tc.bf16, device="cuda")
    v = tc.randn(2, 2, 90, 64, dtype=tc.bf16, device="cuda")
    out = A.attention(q, k, v, is_causal=True)
    ref = _ref_gpu(q.data, k.data, v.data, causal=True)
    plain = _ref_gpu(q.data, k.data, v.data, causal=True, lowp=tc.bf16.storage)
    _close(cupy, out.data, ref, plain, "strided q", atol=1e-5)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    cupy = _cupy()
    q = tc.randn(1, 8, 700, 128, dtype=tc.bf16, device="cuda", requires_grad=True)
    k = tc.randn(1, 2, 700, 128, dtype=tc.bf16, device="cuda", requires_grad=True)
    v = tc.randn(1, 2, 700, 128, dtype=tc.bf16, device="cuda", requires_grad=True)
    dout = tc.randn(1, 8, 700, 128, dtype=tc.bf16, device="cuda")
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        A.attention(q, k, v, is_causal=True).backward(dout)
        grads.append([cupy.asnumpy(t.grad.data.view(cupy.uint16)) for t in (q, k, v)])
    for a, b in zip(*grads):
        assert numpy.array_equal(a, b)


@pytest.mark.gpu
def test_gpu_long_sequence_forward_memory_is_linear():
    cupy = _cupy()
    S = 65536
    q = tc.randn(1, 1, S, 128, dtype=tc.bf16, device="cuda")
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    before = pool.used_bytes()
    out = A.attention(q, q, q, is_causal=True)
    cupy.cuda.Device().synchronize()
    extra = pool.used_bytes() - before
    assert extra < 16 * S * 128 * 2   # O(S): an S x S f32 buffer would be 16 GiB
    assert bool(cupy.isfinite(out.data.astype(cupy.float32)).all())


# ---------------------------------------------------------------------------------------- GPU: dropout
DROP_CASES = [  # B, Hq, Hkv, Sq, Sk, D, causal, p, dtype
    (2, 3, 3, 17, 17, 64, True, 0.2, "bf16"),
    (1, 4, 1, 1000, 1000, 128, True, 0.1, "bf16"),      # MQA
    (2, 8, 1, 17, 1000, 128, True, 0.3, "bf16"),        # Sq < Sk
    (1, 8, 8, 1000, 17, 64, True, 0.5, "bf16"),         # Sq > Sk: rows that see nothing
    (1, 16, 2, 300, 257, 128, False, 0.25, "f16"),      # GQA 8
    (1, 32, 8, 1, 4097, 128, False, 0.1, "bf16"),       # decode shape: split keys (no packing with dropout)
    (1, 4, 2, 4097, 4097, 64, True, 0.15, "f16"),       # GQA 2, 4097
]


def _keep_scaled(cupy, shape, p, seed, offset):
    keep = A.dropout_keep_mask(shape, p, seed, offset, xp=cupy)
    return keep.astype(cupy.float64) * A._drop_scale(A._drop_threshold(p))


@pytest.mark.gpu
@pytest.mark.parametrize("case", DROP_CASES)
def test_gpu_dropout_forward_backward(poison, case):
    # The kernels' dropout against float64 attention with the reference's mask: one mask, forward and backward.
    cupy = _cupy()
    B, Hq, Hkv, Sq, Sk, D, causal, p, dtype = case
    dt = tc.bf16 if dtype == "bf16" else tc.f16
    q = tc.randn(B, Hq, Sq, D, dtype=dt, device="cuda", requires_grad=True)
    k = tc.randn(B, Hkv, Sk, D, dtype=dt, device="cuda", requires_grad=True)
    v = tc.randn(B, Hkv, Sk, D, dtype=dt, device="cuda", requires_grad=True)
    seed, offset = int(numpy.random.default_rng().integers(0, 2 ** 63)), 3
    out = A.attention(q, k, v, is_causal=causal, dropout_p=p, dropout_seed=seed, dropout_offset=offset)
    assert out._node.used_kernel
    dout = tc.randn(B, Hq, Sq, D, dtype=dt, device="cuda")
    out.backward(dout)
    keep = _keep_scaled(cupy, (B, Hq, Sq, Sk), p, seed, offset)
    ref = _ref_gpu(q.data, k.data, v.data, causal=causal, dout=dout.data, keep=keep)
    plain = _ref_gpu(q.data, k.data, v.data, causal=causal, dout=dout.data, lowp=dt.storage, keep=keep)
    for name, got, r64, lp in zip(("out", "dq", "dk", "dv"), (out.data, q.grad.data, k.grad.data, v.grad.data),
                                  ref, plain):
        _close(cupy, got, r64, lp, f"dropout {case} {name}", atol=1e-4 * float(abs(r64).max()) + 1e-6)


@pytest.mark.gpu
def test_gpu_dropout_with_mask_and_alibi(poison):
    cupy = _cupy()
    B, Hq, Hkv, Sq, Sk, D, p = 2, 4, 2, 300, 257, 128, 0.2
    q = tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    k = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    v = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    rng = cupy.random.default_rng()
    mask = rng.random((2, 1, Sq, Sk)) > 0.4
    mask[..., 5, :] = False
    slopes = rng.random(Hq).astype(cupy.float32)
    out = A.attention(q, k, v, mask=tc.Tensor(mask), is_causal=True, alibi_slopes=tc.Tensor(slopes), dropout_p=p,
                      dropout_seed=77)
    assert out._node.used_kernel
    dout = tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda")
    out.backward(dout)
    keep = _keep_scaled(cupy, (B, Hq, Sq, Sk), p, 77, 0)
    ref = _ref_gpu(q.data, k.data, v.data, mask=mask, causal=True, slopes=slopes, dout=dout.data, keep=keep)
    plain = _ref_gpu(q.data, k.data, v.data, mask=mask, causal=True, slopes=slopes, dout=dout.data,
                     lowp=tc.bf16.storage, keep=keep)
    for name, got, r64, lp in zip(("out", "dq", "dk", "dv"), (out.data, q.grad.data, k.grad.data, v.grad.data),
                                  ref, plain):
        _close(cupy, got, r64, lp, f"dropout+mask+alibi {name}", atol=1e-4 * float(abs(r64).max()) + 1e-6)
    assert float(abs(out.data[..., 5, :].astype(cupy.float32)).max()) == 0.0


MASK_ID_CASES = [  # B, H, Sq, Sk, D, causal, dtype (Sk <= D: V is the identity)
    (2, 3, 61, 64, 64, False, "bf16"),
    (1, 4, 50, 128, 128, True, "f16"),
    (1, 4, 16, 128, 128, False, "bf16"),   # few rows: keys split across blocks, partials merged
    (2, 2, 333, 64, 64, True, "bf16"),     # Sq > D: forward only
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", MASK_ID_CASES)
def test_gpu_dropout_mask_is_the_reference_mask(poison, case):
    # With V = I, out[i, j] = P[i, j] keep[i, j] / (1 - p): its nonzero pattern is the forward kernel's mask. With
    # dO[i] = e_i, dV[j, i] = P[i, j] keep[i, j] / (1 - p): the dK/dV kernel's mask. Both must be the reference's
    # exactly (P > 0 wherever causality allows).
    cupy = _cupy()
    B, H, Sq, Sk, D, causal, dtype = case
    dt = tc.bf16 if dtype == "bf16" else tc.f16
    p, seed, offset = 0.3, int(numpy.random.default_rng().integers(0, 2 ** 63)), 12345
    q = tc.randn(B, H, Sq, D, dtype=dt, device="cuda", requires_grad=True)
    k = tc.randn(B, H, Sk, D, dtype=dt, device="cuda", requires_grad=True)
    v = tc.Tensor(cupy.broadcast_to(cupy.eye(Sk, D, dtype=dt.storage), (B, H, Sk, D)).copy(), requires_grad=True)
    out = A.attention(q, k, v, is_causal=causal, dropout_p=p, dropout_seed=seed, dropout_offset=offset)
    assert out._node.used_kernel
    allowed = cupy.arange(Sk)[None, :] <= cupy.arange(Sq)[:, None] + (Sk - Sq) if causal else True
    expected = A.dropout_keep_mask((B, H, Sq, Sk), p, seed, offset, xp=cupy) & allowed
    o = out.data.astype(cupy.float32)
    assert bool(cupy.isfinite(o).all())
    assert bool((o[..., Sk:] == 0).all())
    assert bool(((o[..., :Sk] != 0) == expected).all()), "forward mask differs from the reference's"
    seen = allowed if causal else cupy.ones((Sq, Sk), dtype=bool)
    fraction = float(expected.sum() / (B * H * seen.sum()))
    assert abs(fraction - (1 - p)) < 5 * math.sqrt(p * (1 - p) / float(B * H * seen.sum()))
    if Sq <= D:
        dout = tc.Tensor(cupy.broadcast_to(cupy.eye(Sq, D, dtype=dt.storage), (B, H, Sq, D)).copy())
        out.backward(dout)
        dv = v.grad.data.astype(cupy.float32)[..., :Sq].swapaxes(-1, -2)   # [B, H, Sq, Sk]
        assert bool(cupy.isfinite(dv).all())
        assert bool(((dv != 0) == expected).all()), "dK/dV kernel's mask differs from the reference's"


@pytest.mark.gpu
def test_gpu_philox_known_answers_on_device():
    # The kernels' Philox (attention.cu) on the device against Random123's vectors and the array version.
    cupy = _cupy()
    from tessera_cp.cuda import runtime
    code = """#include "attention.cu"
extern "C" __global__ void philox_kat(const unsigned *c, unsigned *out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint4 r = tessera_attn::philox4x32_10(make_uint4(c[6 * i], c[6 * i + 1], c[6 * i + 2], c[6 * i + 3]),
                                                c[6 * i + 4], c[6 * i + 5]);
    out[4 * i] = r.x, out[4 * i + 1] = r.y, out[4 * i + 2] = r.z, out[4 * i + 3] = r.w;
}
"""
    kernel = runtime.compile_source(code, "philox_kat", filename="philox_kat.cu")
    rng = numpy.random.default_rng()
    rows = [list(c) + list(key) for c, key, _ in PHILOX_KAT] + rng.integers(0, 2 ** 32, size=(61, 6)).tolist()
    c = cupy.asarray(numpy.array(rows, dtype=numpy.uint32))
    out = cupy.zeros((len(rows), 4), dtype=cupy.uint32)
    runtime.launch(kernel, 1, 64, (c, out, numpy.int32(len(rows))))
    got = [tuple(int(x) for x in row) for row in cupy.asnumpy(out)]
    assert got[:3] == [expected for _, _, expected in PHILOX_KAT]
    for row, result in zip(rows[3:], got[3:]):
        assert result == philox_scalar(tuple(row[:4]), tuple(row[4:]))


# ---------------------------------------------------------------------------------------- GPU: the short path
@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 32, 8, 1, 4097, 128, False), (2, 4, 2, 300, 257, 64, True)])
def test_gpu_short_path(poison, monkeypatch, case):
    # Calls that record no graph take the short path; its results are bitwise those of the general path (the same
    # kernel and plan), fresh outputs every call, on any stream, and the checks still run for new shapes.
    cupy = _cupy()
    B, Hq, Hkv, Sq, Sk, D, causal = case
    q, q2 = (tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda") for _ in range(2))
    k = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda")
    v = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda")

    def general(qt):
        return A._Attention.apply(qt, k, v, None, None, scale=1 / math.sqrt(D), causal=causal, drop_threshold=0,
                                  seed=0, offset=0).data

    def same(a, b):
        return bool((a.view(cupy.uint16) == b.view(cupy.uint16)).all())

    A._short.clear()
    first = A.attention(q, k, v, is_causal=causal)    # makes the plan; first launch through the runtime
    second = A.attention(q, k, v, is_causal=causal)   # through the driver
    third = A.attention(q2, k, v, is_causal=causal)
    assert len(A._short) == 1 and first._node is None and first.dtype is tc.bf16
    want, want2 = general(q), general(q2)
    assert same(first.data, want) and same(second.data, want) and same(third.data, want2)
    assert first.data.data.ptr != second.data.data.ptr != third.data.data.ptr
    ref = _ref_gpu(q.data, k.data, v.data, causal=causal)
    plain = _ref_gpu(q.data, k.data, v.data, causal=causal, lowp=tc.bf16.storage)
    _close(cupy, second.data, ref, plain, f"short path {case}", atol=1e-5)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        other = A.attention(q2, k, v, is_causal=causal)
        stream.synchronize()
    assert same(other.data, want2)
    import threading
    box = []  # another thread (its first launch goes through CuPy, which makes the context current there)
    worker = threading.Thread(target=lambda: box.append(A.attention(q2, k, v, is_causal=causal).data))
    worker.start()
    worker.join()
    cupy.cuda.Device().synchronize()
    assert same(box[0], want2)
    monkeypatch.setenv("TESSERA_SYNC", "1")
    assert same(A.attention(q, k, v, is_causal=causal).data, want)
    monkeypatch.delenv("TESSERA_SYNC")
    # A tape needs the general path; under no_grad the short one serves.
    qg = tc.Tensor(q.data, requires_grad=True)
    assert A.attention(qg, k, v, is_causal=causal)._node is not None
    with tc.no_grad():
        assert A.attention(qg, k, v, is_causal=causal)._node is None
    monkeypatch.setenv("TESSERA_REFERENCE", "1")
    _close(cupy, A.attention(q, k, v, is_causal=causal).data, ref, plain, "forced reference", atol=1e-5)
    monkeypatch.delenv("TESSERA_REFERENCE")
    with pytest.raises(ShapeError, match="head dims"):
        A.attention(q, tc.randn(B, Hkv, Sk, D // 2, dtype=tc.bf16, device="cuda"), v)
