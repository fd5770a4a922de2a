"""Multi-latent attention: the module against a float64 formula written here head by head (keys and values rebuilt
explicitly, RoPE and RMSNorm by their formulas), prefill against decode (the weight-absorbed path) over contiguous
and paged latent caches, gradients of the prefill by finite differences, the absorbed decode op against explicit
keys and values, and the cache-size report (the seed's "93%" recomputed by hand). GPU tests (marked gpu): the
bf16 module's flash prefill and kernel decode against the float64 formula."""
import math

import numpy
import pytest

import tessera_cp as tc
from tessera_cp.errors import ShapeError, TesseraError
from tessera_cp.nn.kv_cache import PagedKVCache
from tessera_cp.nn.mla import LatentCache, MultiLatentAttention, mla_cache_report, mla_decode_attention
from tessera_cp.testing import gradcheck


# ---------------------------------------------------------------------------------------- independent formula
def rms(x, w, eps):
    return x / numpy.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def rope(x, positions, base):
    """Half-split RoPE of rows x [T, d] at positions [T]: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-numpy.arange(0, d, 2, dtype=numpy.float64) / d)
    ang = numpy.asarray(positions, dtype=numpy.float64)[:, None] * inv[None, :]
    x1, x2 = x[:, :half], x[:, half:]
    return numpy.concatenate([x1 * numpy.cos(ang) - x2 * numpy.sin(ang), x2 * numpy.cos(ang) + x1 * numpy.sin(ang)],
                             axis=1)


def weights(m):
    return {name: p.numpy().astype(numpy.float64) for name, p in m.named_parameters()}


def mla_reference(m, x, positions=None):
    """Causal MLA over whole sequences x [B, T, model_dim] in float64: output [B, T, model_dim]."""
    W = weights(m)
    x = numpy.asarray(x, dtype=numpy.float64)
    B, T, _ = x.shape
    H, Hkv, dn, dr, dv, C = m.num_q_heads, m.num_kv_heads, m.head_dim, m.rope_dim, m.v_head_dim, m.latent_dim
    eps = m.kv_a_layernorm.eps
    scale = 1.0 / math.sqrt(dn + dr)
    wkvb = W["kv_b_proj.weight"].reshape(Hkv, dn + dv, C)
    out = numpy.zeros((B, T, m.model_dim))
    for b in range(B):
        pos = numpy.arange(T) if positions is None else positions[b]
        X = x[b]
        if m.q_latent_dim is None:
            q = X @ W["q_proj.weight"].T
        else:
            q = rms(X @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], eps) @ W["q_b_proj.weight"].T
        q = q.reshape(T, H, dn + dr)
        kv = X @ W["kv_a_proj_with_mqa.weight"].T
        c = rms(kv[:, :C], W["kv_a_layernorm.weight"], eps)
        kpe = rope(kv[:, C:], pos, m.rope_base) if dr else kv[:, C:]
        heads = numpy.zeros((T, H, dv))
        for h in range(H):
            g = h // (H // Hkv)
            keys = numpy.concatenate([c @ wkvb[g, :dn].T, kpe], axis=1)        # [T, dn + dr]
            values = c @ wkvb[g, dn:].T                                       # [T, dv]
            qh = numpy.concatenate([q[:, h, :dn], rope(q[:, h, dn:], pos, m.rope_base) if dr else q[:, h, dn:]],
                                   axis=1)
            for i in range(T):
                s = keys[:i + 1] @ qh[i] * scale
                w = numpy.exp(s - s.max())
                heads[i, h] = (w / w.sum()) @ values[:i + 1]
        out[b] = heads.reshape(T, H * dv) @ W["o_proj.weight"].T
    return out


CONFIGS = {  # keyword arguments of MultiLatentAttention (tiny, float64)
    "plain": dict(model_dim=16, latent_dim=8, num_q_heads=4, head_dim=4, rope_dim=4),
    "gqa_vdim": dict(model_dim=16, latent_dim=6, num_q_heads=4, num_kv_heads=2, head_dim=4, rope_dim=2, v_head_dim=6),
    "q_latent": dict(model_dim=12, latent_dim=8, num_q_heads=3, head_dim=4, rope_dim=4, q_latent_dim=5),
    "no_rope": dict(model_dim=8, latent_dim=4, num_q_heads=2, head_dim=4, rope_dim=0),
}


def make(name, seed=0, **extra):
    tc.manual_seed(seed)
    m = MultiLatentAttention(**CONFIGS[name], **extra, dtype=tc.f64)
    # RMSNorm weights start at one; make them count.
    for norm in ("kv_a_layernorm", "q_a_layernorm"):
        if hasattr(m, norm) and norm in m._modules:
            getattr(m, norm).weight.data[...] = numpy.random.default_rng(seed).uniform(0.5, 1.5, m._modules[norm].dim)
    return m


def rand(rng, *shape, requires_grad=False):
    return tc.tensor(rng.standard_normal(shape), requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_matches_formula(rng, name):
    m = make(name)
    x = rand(rng, 2, 7, m.model_dim)
    out, cache = m(x)
    assert out.shape == (2, 7, m.model_dim) and out.dtype is tc.f64
    numpy.testing.assert_allclose(out.numpy(), mla_reference(m, x.numpy()), rtol=1e-10, atol=1e-12)
    assert isinstance(cache, LatentCache) and cache.length == 7
    assert cache.rows.shape == (2, 7, m.latent_dim + m.rope_dim)


def test_cache_rows_are_the_normalised_latent_and_the_rotated_key(rng):
    m = make("plain")
    x = rand(rng, 1, 5, m.model_dim)
    _, cache = m(x)
    W = weights(m)
    kv = x.numpy()[0] @ W["kv_a_proj_with_mqa.weight"].T
    numpy.testing.assert_allclose(cache.latent.numpy()[0], rms(kv[:, :8], W["kv_a_layernorm.weight"], 1e-6),
                                  rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(cache.rope_key.numpy()[0], rope(kv[:, 8:], numpy.arange(5), 10000.0),
                                  rtol=1e-12, atol=1e-12)
    assert cache.bytes_per_token == 12 * 8


def test_explicit_position_ids(rng):
    m = make("plain")
    x = rand(rng, 2, 4, m.model_dim)
    positions = numpy.asarray([[3, 4, 5, 6], [10, 11, 12, 13]])
    out, _ = m(x, position_ids=positions)
    numpy.testing.assert_allclose(out.numpy(), mla_reference(m, x.numpy(), positions), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["plain", "q_latent"])
def test_prefill_gradients(rng, name):
    m = make(name)
    x = rand(rng, 1, 3, m.model_dim, requires_grad=True)
    params = list(m.parameters())
    assert gradcheck(lambda x, *ps: m(x)[0], [x, *params])


# ---------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_steps_match_prefill_and_formula(rng, name):
    m = make(name)
    x = rand(rng, 2, 9, m.model_dim)
    expected = mla_reference(m, x.numpy())
    out, cache = m(x[:, :5])                        # prefill 5, then 4 absorbed decode steps
    numpy.testing.assert_allclose(out.numpy(), expected[:, :5], rtol=1e-10, atol=1e-12)
    for t in range(5, 9):
        step, cache = m(x[:, t:t + 1], kv_cache=cache)
        assert step.shape == (2, 1, m.model_dim) and cache.length == t + 1
        numpy.testing.assert_allclose(step.numpy(), expected[:, t:t + 1], rtol=1e-10, atol=1e-12)


def test_prefill_continuation_with_a_latent_cache(rng):
    m = make("gqa_vdim")
    x = rand(rng, 2, 8, m.model_dim)
    _, cache = m(x[:, :3])
    out, cache = m(x[:, 3:8], kv_cache=cache)       # S > 1 after a past: rebuilt K/V, bottom-right causal
    numpy.testing.assert_allclose(out.numpy(), mla_reference(m, x.numpy())[:, 3:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["plain", "gqa_vdim", "q_latent"])
def test_paged_cache_sequences_of_different_lengths(rng, name):
    m = make(name)
    prompts = [5, 1, 8]
    total = 11
    xs = [rand(rng, 1, total, m.model_dim) for _ in prompts]
    expected = [mla_reference(m, x.numpy())[0] for x in xs]
    cache = PagedKVCache(30, 4, latent_dim=m.latent_dim, rope_dim=m.rope_dim, dtype=tc.f64)
    ids = []
    for x, n in zip(xs, prompts):
        sid = cache.add_sequence()
        ids.append(sid)
        out, same = m(x[:, :n], kv_cache=cache, seq_ids=[sid])
        assert same is cache and cache.length(sid) == n
        numpy.testing.assert_allclose(out.numpy()[0], expected[len(ids) - 1][:n], rtol=1e-10, atol=1e-12)
    # Batched decode: every sequence at its own position.
    lengths = list(prompts)
    while min(lengths) < total:
        live = [i for i, n in enumerate(lengths) if n < total]
        step = tc.cat([xs[i][:, lengths[i]:lengths[i] + 1] for i in live], dim=0)
        out, _ = m(step, kv_cache=cache, seq_ids=[ids[i] for i in live])
        for row, i in enumerate(live):
            numpy.testing.assert_allclose(out.numpy()[row, 0], expected[i][lengths[i]], rtol=1e-10, atol=1e-12)
            lengths[i] += 1
    # A chunk of several tokens after a past (per-sequence prefill continuation).
    more = rand(rng, 2, 3, m.model_dim)
    full = [numpy.concatenate([xs[i].numpy(), more.numpy()[j:j + 1]], axis=1) for j, i in enumerate((0, 2))]
    out, _ = m(more, kv_cache=cache, seq_ids=[ids[0], ids[2]])
    for j, f in enumerate(full):
        numpy.testing.assert_allclose(out.numpy()[j], mla_reference(m, f)[0, total:], rtol=1e-10, atol=1e-12)


def test_forked_sequences_decode_independently(rng):
    m = make("plain")
    x = rand(rng, 1, 6, m.model_dim)
    cache = PagedKVCache(8, 4, latent_dim=8, rope_dim=4, dtype=tc.f64)
    a = cache.add_sequence()
    m(x[:, :5], kv_cache=cache, seq_ids=[a])
    b = cache.fork(a)
    ya, yb = rand(rng, 1, 1, 16), rand(rng, 1, 1, 16)
    out, _ = m(tc.cat([ya, yb], dim=0), kv_cache=cache, seq_ids=[a, b])
    for row, y in enumerate((ya, yb)):
        full = numpy.concatenate([x.numpy()[:, :5], y.numpy()], axis=1)
        numpy.testing.assert_allclose(out.numpy()[row, 0], mla_reference(m, full)[0, 5], rtol=1e-10, atol=1e-12)


def test_multi_layer_paged_cache_with_slots(rng):
    tc.manual_seed(3)
    layers = [MultiLatentAttention(**CONFIGS["plain"], dtype=tc.f64) for _ in range(2)]
    cache = PagedKVCache(10, 4, latent_dim=8, rope_dim=4, num_layers=2, dtype=tc.f64)
    sid = cache.add_sequence()
    x = rand(rng, 1, 6, 16)
    # Reference: the two layers applied in sequence over the whole input.
    h = x.numpy()
    for layer in layers:
        h = mla_reference(layer, h)
    slots = cache.reserve(sid, 4)
    y = x[:, :4]
    for i, layer in enumerate(layers):
        y, _ = layer(y, kv_cache=cache, seq_ids=[sid], slots=slots, layer=i)
    numpy.testing.assert_allclose(y.numpy(), h[:, :4], rtol=1e-10, atol=1e-12)
    for t in (4, 5):
        slots = cache.reserve(sid, 1)
        y = x[:, t:t + 1]
        for i, layer in enumerate(layers):
            y, _ = layer(y, kv_cache=cache, seq_ids=[sid], slots=slots, layer=i)
        numpy.testing.assert_allclose(y.numpy(), h[:, t:t + 1], rtol=1e-10, atol=1e-12)


def test_absorbed_decode_op_equals_explicit_keys_and_values(rng):
    """W_uv (attention over latents with the query W_uk^T q) = attention over K = W_uk c, V = W_uv c."""
    H, C, R, dn, dv, L = 3, 6, 2, 4, 5, 9
    w_uk, w_uv = rng.standard_normal((H, dn, C)), rng.standard_normal((H, dv, C))
    c, kpe = rng.standard_normal((L, C)), rng.standard_normal((L, R))
    q_nope, q_pe = rng.standard_normal((H, dn)), rng.standard_normal((H, R))
    scale = 1.0 / math.sqrt(dn + R)
    q_abs = numpy.concatenate([numpy.einsum("hn,hnc->hc", q_nope, w_uk), q_pe], axis=1)[None]
    rows = numpy.concatenate([c, kpe], axis=1)
    for latents, tables, lens in ((rows[None], None, None),                          # contiguous
                                  (numpy.stack([rows[4:8], rows[:4], rows[8:].repeat(4, 0)]), [[1, 0, 2]], [L])):
        o_lat = mla_decode_attention(tc.tensor(q_abs), tc.tensor(latents), lens, tables, value_dim=C, scale=scale)
        got = numpy.einsum("hc,hvc->hv", o_lat.numpy()[0], w_uv)
        for h in range(H):
            keys = numpy.concatenate([c @ w_uk[h].T, kpe], axis=1)
            s = keys @ numpy.concatenate([q_nope[h], q_pe[h]]) * scale
            w = numpy.exp(s - s.max())
            numpy.testing.assert_allclose(got[h], (w / w.sum()) @ (c @ w_uv[h].T), rtol=1e-11, atol=1e-12)


def test_mla_decode_attention_errors(rng):
    q = tc.tensor(rng.standard_normal((2, 3, 8)))
    rows = tc.tensor(rng.standard_normal((2, 5, 8)))
    with pytest.raises(ShapeError, match="value_dim"):
        mla_decode_attention(q, rows, value_dim=9, scale=1.0)
    with pytest.raises(ShapeError, match="seq_lens"):
        mla_decode_attention(q, rows, [6, 1], value_dim=6, scale=1.0)
    with pytest.raises(ShapeError, match="need seq_lens"):
        mla_decode_attention(q, rows, None, [[0], [1]], value_dim=6, scale=1.0)
    with pytest.raises(ShapeError, match="outside the pool"):
        mla_decode_attention(q, rows, [5, 1], [[0], [2]], value_dim=6, scale=1.0)
    with pytest.raises(ShapeError, match="same D"):
        mla_decode_attention(q, tc.tensor(rng.standard_normal((2, 5, 7))), value_dim=6, scale=1.0)


# ---------------------------------------------------------------------------------------- the cache report
def test_cache_report_checks_the_seed_claim():
    report = mla_cache_report(model_dim=4096, num_q_heads=32, latent_dim=512, rope_dim=64)
    # Worked by hand: MLA caches 512 + 64 = 576 values per token and layer; MHA with 32 heads of 128 caches K and
    # V, 2 * 32 * 128 = 8192. 1 - 576 / 8192 = 0.9296875, which the seed rounds to 93%.
    assert report["mla_values_per_token"] == 576 and report["mla_bytes_per_token"] == 1152
    assert report["mha_values_per_token"] == 8192 and report["mha_bytes_per_token"] == 16384
    assert report["reduction_vs_mha"] == pytest.approx(0.9296875, abs=1e-15)
    assert report["reduction_without_rope_key"] == pytest.approx(0.9375, abs=1e-15)
    assert report["claim_holds"]
    assert "92.97%" in report["text"] and "93%" in report["text"]
    gqa = mla_cache_report(num_kv_heads=8)
    assert gqa["gqa_values_per_token"] == 2048 and gqa["reduction_vs_gqa"] == pytest.approx(1 - 576 / 2048)
    assert not mla_cache_report(claimed_reduction=0.97)["claim_holds"]
    f32 = mla_cache_report(dtype=tc.f32)
    assert f32["mla_bytes_per_token"] == 2304 and f32["reduction_vs_mha"] == report["reduction_vs_mha"]


def test_module_cache_report_matches_its_cache():
    m = MultiLatentAttention(model_dim=64, latent_dim=16, num_q_heads=4, rope_dim=8, dtype=tc.f32)
    report = m.cache_report()
    assert report["mla_bytes_per_token"] == (16 + 8) * 4 and report["mha_values_per_token"] == 2 * 4 * 16
    _, cache = m(tc.randn(1, 3, 64))
    assert cache.bytes_per_token == report["mla_bytes_per_token"]


# ---------------------------------------------------------------------------------------- parameters and errors
def test_parameter_names_and_shapes_follow_deepseek():
    m = MultiLatentAttention(model_dim=32, latent_dim=8, num_q_heads=4, num_kv_heads=2, head_dim=6, rope_dim=4,
                             v_head_dim=5, q_latent_dim=12, dtype=tc.f32)
    shapes = {n: p.shape for n, p in m.named_parameters()}
    assert shapes == {"q_a_proj.weight": (12, 32), "q_a_layernorm.weight": (12,), "q_b_proj.weight": (4 * 10, 12),
                      "kv_a_proj_with_mqa.weight": (8 + 4, 32), "kv_a_layernorm.weight": (8,),
                      "kv_b_proj.weight": (2 * (6 + 5), 8), "o_proj.weight": (32, 4 * 5)}
    assert m.scale == pytest.approx(1 / math.sqrt(10))
    seed = MultiLatentAttention(model_dim=4096, latent_dim=512, num_q_heads=32, num_kv_heads=32, dtype=tc.bf16)
    assert seed.head_dim == 128 and seed.rope_dim == 64 and seed.kv_b_proj.weight.shape == (32 * 256, 512)


def test_errors(rng):
    with pytest.raises(ShapeError, match="multiple"):
        MultiLatentAttention(model_dim=16, latent_dim=4, num_q_heads=4, num_kv_heads=3)
    with pytest.raises(ShapeError, match="head_dim"):
        MultiLatentAttention(model_dim=10, latent_dim=4, num_q_heads=4)
    with pytest.raises(ShapeError, match="rope_dim"):
        MultiLatentAttention(model_dim=16, latent_dim=4, num_q_heads=4, rope_dim=3)
    m = make("plain")
    with pytest.raises(ShapeError, match="hidden_states"):
        m(rand(rng, 2, 3, 15))
    _, cache = m(rand(rng, 2, 3, 16))
    with pytest.raises(ShapeError, match="does not fit"):
        m(rand(rng, 3, 1, 16), kv_cache=cache)
    paged = PagedKVCache(4, 4, latent_dim=8, rope_dim=4, dtype=tc.f64)
    with pytest.raises(TesseraError, match="seq_ids"):
        m(rand(rng, 1, 1, 16), kv_cache=paged)
    with pytest.raises(ShapeError, match="latent_dim=8"):
        m(rand(rng, 1, 1, 16), kv_cache=PagedKVCache(4, 4, latent_dim=6, rope_dim=4, dtype=tc.f64), seq_ids=[0])
    with pytest.raises(ShapeError, match="latent_dim=8"):
        m(rand(rng, 1, 1, 16), kv_cache=PagedKVCache(4, 4, num_kv_heads=1, head_dim=2, dtype=tc.f64), seq_ids=[0])
    with pytest.raises(TesseraError, match="kv_cache must be"):
        m(rand(rng, 1, 1, 16), kv_cache={"k": 1})
    sid = paged.add_sequence()
    with pytest.raises(TesseraError, match="free blocks"):
        m(rand(rng, 1, 17, 16), kv_cache=paged, seq_ids=[sid])
    assert paged.length(sid) == 0


# ---------------------------------------------------------------------------------------- GPU
def _cupy():
    cupy = pytest.importorskip("cupy")
    if not tc.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cupy


GPU_CONFIG = dict(model_dim=1024, latent_dim=512, num_q_heads=8, head_dim=128, rope_dim=64)   # kernel shapes


def _err(cupy, out, ref):
    out = cupy.asnumpy(out.data.astype(cupy.float32)).astype(numpy.float64)
    assert numpy.isfinite(out).all()
    return float(numpy.abs(out - ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_bf16_prefill_and_decode_against_float64(monkeypatch, paged):
    """Prefill (flash kernel, head dims padded 192/128 -> 256) must be within twice the error of the same module
    run by the references in bf16; each absorbed decode step (latent kernel) within twice the error of the flash
    prefill at the same positions; both plus 1e-4 of the largest value. Errors are against the float64 formula."""
    cupy = _cupy()
    from tessera_cp.nn import kv_cache as K
    tc.manual_seed(0)
    m = MultiLatentAttention(**GPU_CONFIG, dtype=tc.bf16, device="cuda")
    prompt, steps = 37, 3
    x = (tc.randn(2, prompt + steps, 1024, dtype=tc.f32, device="cuda") * 4.0).astype(tc.bf16)
    ref = mla_reference(m, cupy.asnumpy(x.data.astype(cupy.float32)))
    full, _ = m(x)                                     # flash prefill over everything
    monkeypatch.setenv("TESSERA_REFERENCE", "1")
    plain, _ = m(x)                                    # the references, in bf16
    monkeypatch.delenv("TESSERA_REFERENCE")
    err_full, err_plain = _err(cupy, full, ref), _err(cupy, plain, ref)
    print(f"prefill err {err_full:.3g}, bf16 reference err {err_plain:.3g}")
    assert err_full <= 2 * err_plain + 1e-4 * float(numpy.abs(ref).max())

    def refuse(*args, **kwargs):
        raise AssertionError("the decode reference ran where the kernel should have")
    monkeypatch.setattr(K, "_decode_reference", refuse)
    if paged:
        cache = PagedKVCache(64, 16, latent_dim=512, rope_dim=64, dtype=tc.bf16, device="cuda")
        ids = [cache.add_sequence(), cache.add_sequence()]
        _, _ = m(x[:, :prompt], kv_cache=cache, seq_ids=ids)
    else:
        _, cache = m(x[:, :prompt])
    for t in range(prompt, prompt + steps):
        if paged:
            step, _ = m(x[:, t:t + 1], kv_cache=cache, seq_ids=ids)
        else:
            step, cache = m(x[:, t:t + 1], kv_cache=cache)
        err_step = _err(cupy, step, ref[:, t:t + 1])
        err_flash = _err(cupy, full[:, t:t + 1], ref[:, t:t + 1])
        print(f"decode step {t}: err {err_step:.3g}, flash prefill err {err_flash:.3g}")
        assert err_step <= 2 * err_flash + 1e-4 * float(numpy.abs(ref).max())
