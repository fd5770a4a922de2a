"""The decode-step operations of tessera_cp/models/gemv.py: their references against NumPy float64 formulas (CPU),
and the cuda/gemv.cu kernels against float64 on the GPU (the low-precision rule, NaN-poisoned outputs, sizes that
fit no tile, bitwise batching invariance, and capture in a CUDA graph)."""
import math

import ml_dtypes
import numpy
import pytest

from tessera_cp import backend
from tessera_cp.models import gemv
from tessera_cp.testing import assert_low_precision_close

BF16 = ml_dtypes.bfloat16


def _silu(z):
    return z / (1 + numpy.exp(-z))


def _expected_linear(x, w, scale=None, bias=None, norm=None, eps=1e-6, swiglu=False, residual=None):
    x, w = x.astype(numpy.float64), w.astype(numpy.float64)
    if swiglu:
        K = x.shape[1] // 2
        x = _silu(x[:, :K]) * x[:, K:]
    if norm is not None:
        x = x / numpy.sqrt((x ** 2).mean(axis=1, keepdims=True) + eps) * norm.astype(numpy.float64)
    y = numpy.einsum("bk,nk->bn", x, w)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias.astype(numpy.float64)
    if residual is not None:
        y = y + residual.astype(numpy.float64)
    return y


def _inputs(rng, B, N, K, int8=False, swiglu=False, dtype=numpy.float32):
    x = rng.standard_normal((B, 2 * K if swiglu else K)).astype(dtype)
    if int8:
        w = rng.integers(-127, 128, size=(N, K)).astype(numpy.int8)
        scale = (rng.random(N) * 0.02 + 0.001).astype(numpy.float32)
    else:
        w, scale = (rng.standard_normal((N, K)) / math.sqrt(K)).astype(dtype), None
    return x, w, scale, (1 + 0.1 * rng.standard_normal(K)).astype(dtype), rng.standard_normal(N).astype(dtype), \
        rng.standard_normal((B, N)).astype(dtype)


# ------------------------------------------------------------------------------------------------ CPU references
@pytest.mark.parametrize("prologue", ["plain", "norm", "swiglu"])
@pytest.mark.parametrize("int8", [False, True])
def test_rows_linear_reference(rng, prologue, int8):
    x, w, scale, g, bias, res = _inputs(rng, 3, 7, 32, int8, prologue == "swiglu", numpy.float64)
    kw = dict(scale=scale, bias=bias, residual=res, norm=g if prologue == "norm" else None,
              swiglu=prologue == "swiglu", eps=1e-5)
    out = gemv.rows_linear(x, w, **kw)
    numpy.testing.assert_allclose(out, _expected_linear(x, w, **kw), rtol=1e-12, atol=1e-12)
    alias = res.copy()   # residual and out may be one array (x += proj(...))
    gemv.rows_linear(x, w, **dict(kw, residual=alias), out=alias)
    numpy.testing.assert_array_equal(alias, out)


def _expected_rope_append(qkv, cos, sin, pos, table, kc, vc, Hq, Hkv):
    B, D = qkv.shape[0], kc.shape[-1]
    half, bs = D // 2, kc.shape[2]
    heads = qkv.reshape(B, Hq + 2 * Hkv, D).astype(numpy.float64)
    q = numpy.empty((B, Hq, D))
    for b in range(B):
        p = int(pos[b])
        c, s = cos[p].astype(numpy.float64), sin[p].astype(numpy.float64)
        rot = numpy.concatenate([heads[b, :, :half] * c - heads[b, :, half:] * s,
                                 heads[b, :, half:] * c + heads[b, :, :half] * s], axis=-1)
        q[b] = rot[:Hq]
        blk, off = table[b, p // bs], p % bs
        kc[blk, :, off] = rot[Hq:Hq + Hkv]
        vc[blk, :, off] = heads[b, Hq + Hkv:]
    return q


def test_rope_append_reference(rng):
    B, Hq, Hkv, D, bs = 3, 4, 2, 8, 4
    qkv = rng.standard_normal((B, (Hq + 2 * Hkv) * D))
    cos, sin = rng.standard_normal((20, D // 2)), rng.standard_normal((20, D // 2))
    pos = numpy.asarray([0, 5, 13], dtype=numpy.int32)
    table = numpy.asarray([[3, 0, 0, 0], [1, 6, 0, 0], [2, 4, 7, 5]], dtype=numpy.int32)
    kc, vc = rng.standard_normal((8, Hkv, bs, D)), rng.standard_normal((8, Hkv, bs, D))
    kc2, vc2 = kc.copy(), vc.copy()
    q, lens = numpy.empty((B, Hq, D)), numpy.zeros(B, dtype=numpy.int32)
    gemv.rope_append(qkv, cos, sin, pos, table, kc, vc, Hq, Hkv, q, lens)
    expected_q = _expected_rope_append(qkv, cos, sin, pos, table, kc2, vc2, Hq, Hkv)
    numpy.testing.assert_allclose(q, expected_q, rtol=1e-13, atol=1e-13)
    numpy.testing.assert_allclose(kc, kc2, rtol=1e-13, atol=1e-13)
    numpy.testing.assert_array_equal(vc, vc2)
    assert lens.tolist() == [1, 6, 14]


def test_argmax_and_embed_reference():
    logits = numpy.asarray([[0.0, 3.0, 3.0, -1.0], [-5.0, -6.0, -7.0, -5.0]], dtype=numpy.float32)
    out = numpy.zeros(2, dtype=numpy.int32)
    assert gemv.argmax_rows(logits, out).tolist() == [1, 0]
    table = numpy.arange(12.0).reshape(4, 3)
    rows = numpy.zeros((2, 3))
    gemv.embed_rows(table, numpy.asarray([3, 1], dtype=numpy.int32), rows)
    numpy.testing.assert_array_equal(rows, [[9, 10, 11], [3, 4, 5]])


def test_every_gemv_instantiation_compiles():
    """The gemv_rows (ROWS table) and gemv_mma instantiations the launchers ask for are listed in gemv.cu, so
    compiled on the CPU by tests/cuda/test_compile_all.py and built up front on the GPU."""
    from tessera_cp.cuda import runtime
    listed = set(runtime.parse_instantiations((runtime.SOURCE_DIR / "gemv.cu").read_text()))
    for (kind, maxb), rows in gemv._GEMV_ROWS.items():
        wt = "signed char" if kind == "int8" else "__nv_bfloat16"
        for pro in (0, 1, 2):
            assert f"gemv_rows<{wt}, __nv_bfloat16, {pro}, {maxb}, {rows}>" in listed
        if kind == "bf16":
            assert f"gemv_rows<{wt}, float, 1, {maxb}, {rows}>" in listed
    for wt in ("signed char", "__nv_bfloat16"):
        for pro in (0, 1, 2):
            assert f"gemv_mma<{wt}, __nv_bfloat16, __nv_bfloat16, {pro}>" in listed
    assert "gemv_mma<__nv_bfloat16, __nv_bfloat16, float, 1>" in listed      # the LM head's f32 logits
    assert "gemv_mma<signed char, __half, __half, 0>" in listed              # CastedLinear with f16 activations


@pytest.mark.parametrize("n, k", [(1, 16), (1, 5632), (300, 512), (2560, 2048), (8192, 8192), (28672, 8192),
                                  (32000, 2048), (4097, 4112)])
@pytest.mark.parametrize("itemsize", [1, 2])
@pytest.mark.parametrize("prologue", [0, 1, 2])
def test_gemv_split_plan(n, k, itemsize, prologue):
    """Every K slice is a whole number of main-loop iterations no longer than the prologue allows (its staged x
    fits in shared memory for 16 rows), the S slices cover K with none empty, and K is split no further than the
    grid needs to reach GEMV_BLOCKS_PER_SM blocks per SM."""
    casted = gemv.casted
    ks, s = casted.gemv_plan(n, k, itemsize, prologue, sms=132)
    assert ks % casted.GEMV_ITER_K[itemsize] == 0 and ks <= casted.GEMV_SPLIT_MAX[prologue]
    assert (s - 1) * ks < k <= s * ks
    assert casted.gemv_shared_bytes(2, casted.GEMV_MAX_ROWS, ks, prologue) <= 227 * 1024
    groups = -(-n // casted.GEMV_BLOCK_ROWS)
    assert s <= max(-(-k // casted.GEMV_SPLIT_MAX[prologue]), -(-casted.GEMV_BLOCKS_PER_SM * 132 // groups))


# ------------------------------------------------------------------------------------------------ GPU kernels
def _cupy():
    cupy = pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("needs a GPU")
    return cupy


@pytest.fixture(params=["rows", "mma"])
def decode_kernel(request, monkeypatch):
    """Run a test with the decode step's products on gemv_rows and on gemv_mma."""
    monkeypatch.setattr(gemv, "DECODE_KERNEL", {"bf16": request.param, "int8": request.param})
    return request.param


def _nan(cupy, shape, dtype):
    """An output poisoned with NaN, so that an element no kernel writes shows."""
    return cupy.full(shape, numpy.nan, dtype=numpy.float32).astype(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("B, N, K", [(1, 1, 256), (1, 17, 5632), (3, 1000, 1008), (16, 4097, 256), (4, 33, 4112)])
@pytest.mark.parametrize("prologue", ["plain", "norm", "swiglu"])
@pytest.mark.parametrize("int8", [False, True])
def test_gemv_kernel_low_precision_rule(B, N, K, prologue, int8, decode_kernel):
    cupy = _cupy()
    rng = numpy.random.default_rng(B * 7 + N + K)
    x, w, scale, g, bias, res = _inputs(rng, B, N, K, int8, prologue == "swiglu")
    x, g, bias, res = (a.astype(BF16) for a in (x, g, bias, res))
    w = w if int8 else w.astype(BF16)
    kw = dict(scale=scale, bias=bias, residual=res, norm=g if prologue == "norm" else None,
              swiglu=prologue == "swiglu", eps=1e-5)
    dev = {k: (cupy.asarray(v) if isinstance(v, numpy.ndarray) else v) for k, v in kw.items()}
    out = _nan(cupy, (B, N), BF16)
    got = gemv.rows_linear(cupy.asarray(x), cupy.asarray(w), **dev, out=out)
    assert got is out
    plain = gemv.rows_linear(x, w, **kw)                          # the reference, NumPy, bf16 output
    assert_low_precision_close(cupy.asnumpy(out).astype(numpy.float64), _expected_linear(x, w, **kw), plain,
                               atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True])
def test_gemv_kernel_float_logits_and_batch_invariance(int8, decode_kernel):
    """f32 output (the LM head) against float64; and every row of a batch of B equals the row computed alone, bit
    for bit, for B = 3 and 16 (the kernels' reduction order does not depend on B)."""
    cupy = _cupy()
    rng = numpy.random.default_rng(11)
    B, N, K = 16, 4097, 1024
    x, w, scale, g, _, _ = _inputs(rng, B, N, K, int8)
    x, g = x.astype(BF16), g.astype(BF16)
    w = w if int8 else w.astype(BF16)
    dx, dw, dg = cupy.asarray(x), cupy.asarray(w), cupy.asarray(g)
    ds = None if scale is None else cupy.asarray(scale)
    if not int8:
        out = _nan(cupy, (B, N), numpy.float32)
        gemv.rows_linear(dx, dw, norm=dg, out=out)
        ref = _expected_linear(x, w, norm=g)
        err = numpy.abs(cupy.asnumpy(out) - ref).max()
        assert err <= 1e-5 * numpy.abs(ref).max()
    for batch in (3, 16):
        together = cupy.asnumpy(gemv.rows_linear(dx[:batch], dw, scale=ds, norm=dg))
        for b in range(batch):
            alone = cupy.asnumpy(gemv.rows_linear(dx[b:b + 1], dw, scale=ds, norm=dg))
            numpy.testing.assert_array_equal(together[b:b + 1].view(numpy.uint16), alone.view(numpy.uint16))


@pytest.mark.gpu
def test_rope_append_kernel():
    cupy = _cupy()
    rng = numpy.random.default_rng(3)
    B, Hq, Hkv, D, bs, blocks = 5, 8, 2, 64, 16, 40
    qkv = rng.standard_normal((B, (Hq + 2 * Hkv) * D)).astype(BF16)
    angles = numpy.arange(100)[:, None] / 10000 ** (numpy.arange(0, D, 2) / D)
    cos, sin = numpy.cos(angles).astype(numpy.float32), numpy.sin(angles).astype(numpy.float32)
    pos = numpy.asarray([0, 15, 16, 47, 99], dtype=numpy.int32)
    table = rng.permutation(blocks)[:B * 7].reshape(B, 7).astype(numpy.int32)
    kc = rng.standard_normal((blocks, Hkv, bs, D)).astype(BF16)
    vc = rng.standard_normal((blocks, Hkv, bs, D)).astype(BF16)
    dkc, dvc = cupy.asarray(kc), cupy.asarray(vc)
    q, lens = _nan(cupy, (B, Hq, D), BF16), cupy.zeros(B, dtype=numpy.int32)
    gemv.rope_append(cupy.asarray(qkv), cupy.asarray(cos), cupy.asarray(sin), cupy.asarray(pos),
                     cupy.asarray(table), dkc, dvc, Hq, Hkv, q, lens)
    kc64, vc64 = kc.astype(numpy.float64), vc.astype(numpy.float64)
    q64 = _expected_rope_append(qkv, cos, sin, pos, table, kc64, vc64, Hq, Hkv)
    q_plain, lens_plain = numpy.empty((B, Hq, D), BF16), numpy.zeros(B, numpy.int32)
    kc_plain, vc_plain = kc.copy(), vc.copy()
    gemv.rope_append(qkv, cos, sin, pos, table, kc_plain, vc_plain, Hq, Hkv, q_plain, lens_plain)
    assert_low_precision_close(cupy.asnumpy(q).astype(numpy.float64), q64, q_plain, atol=1e-6)
    assert_low_precision_close(cupy.asnumpy(dkc).astype(numpy.float64), kc64, kc_plain, atol=1e-6)
    numpy.testing.assert_array_equal(cupy.asnumpy(dvc).view(numpy.uint16), vc_plain.view(numpy.uint16))
    assert cupy.asnumpy(lens).tolist() == (pos + 1).tolist()


@pytest.mark.gpu
def test_argmax_and_embed_kernels():
    cupy = _cupy()
    rng = numpy.random.default_rng(4)
    logits = rng.standard_normal((6, 32001)).astype(numpy.float32)
    logits[1, [5, 30000]] = 100.0            # a tie: the first index wins
    logits[2, :] = numpy.nan
    logits[3, 7] = numpy.nan                 # NaN is skipped
    out = cupy.full(6, -1, dtype=numpy.int32)
    got = cupy.asnumpy(gemv.argmax_rows(cupy.asarray(logits), out))
    expected = numpy.nanargmax(numpy.where(numpy.isnan(logits), -numpy.inf, logits), axis=1)
    expected[2] = 0
    assert got.tolist() == expected.tolist() and got[1] == 5
    table = rng.standard_normal((1000, 264)).astype(BF16)
    tokens = numpy.asarray([999, 0, 17], dtype=numpy.int32)
    rows = _nan(cupy, (3, 264), BF16)
    gemv.embed_rows(cupy.asarray(table), cupy.asarray(tokens), rows)
    numpy.testing.assert_array_equal(cupy.asnumpy(rows).view(numpy.uint16), table[tokens].view(numpy.uint16))


@pytest.mark.gpu
def test_kernels_replay_in_a_cuda_graph(decode_kernel):
    """The kernels launch inside a stream capture (no cuBLAS, no host synchronisation) and the replay computes
    what the eager launches did."""
    cupy = _cupy()
    rng = numpy.random.default_rng(5)
    x, w, scale, g, _, _ = _inputs(rng, 2, 300, 512, int8=True)
    dx, dw, ds, dg = cupy.asarray(x.astype(BF16)), cupy.asarray(w), cupy.asarray(scale), cupy.asarray(g.astype(BF16))
    wb = cupy.asarray((rng.standard_normal((300, 512)) / 20).astype(BF16))
    h, logits, tokens = cupy.zeros((2, 300), BF16), cupy.zeros((2, 300), numpy.float32), cupy.zeros(2, numpy.int32)

    def step():
        gemv.rows_linear(dx, dw, scale=ds, norm=dg, out=h)
        gemv.rows_linear(dx, wb, norm=dg, out=logits)
        gemv.argmax_rows(logits, tokens)

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        step()
        eager = [cupy.asnumpy(a) for a in (h, logits, tokens)]
        stream.begin_capture()
        step()
        graph = stream.end_capture()
        for a in (h, logits, tokens):
            a[...] = 0
        graph.launch(stream)
        stream.synchronize()
        replayed = [cupy.asnumpy(a) for a in (h, logits, tokens)]
    for a, b in zip(eager, replayed):
        numpy.testing.assert_array_equal(a.view(numpy.uint8), b.view(numpy.uint8))
