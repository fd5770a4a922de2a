"""RoPE: rotations against a complex-number formula in float64, the scaled frequencies against their definitions,
gradients by finite differences; on the GPU, rope.cu (q and k in one launch) against float64."""
import math

import ml_dtypes
import numpy as np
import pytest

import tessera_cp as tc
from tessera_cp import dtypes
from tessera_cp.errors import DTypeError, IndexOutOfRangeError, ShapeError, TesseraError
from tessera_cp.nn import rope
from tessera_cp.nn.rope import (RotaryEmbedding, apply_rope, apply_rotary_pos_emb, cos_sin_embedding, dynamic_rope,
                                rope_cache, rope_frequencies, rotary_embedding)
from tessera_cp.testing import assert_low_precision_close, gradcheck

LOW = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "f32": np.float32}


def rotate64(x, positions, inv_freq, layout="BSHD", scale=1.0):
    """x [B, S, H, D] (or [B, H, S, D]) rotated as complex numbers: (x1 + i x2) * scale * e^{i p w}, halves split."""
    x = np.asarray(x, np.float64)
    if layout == "BHSD":
        x = x.transpose(0, 2, 1, 3)
    half = x.shape[-1] // 2
    p = np.broadcast_to(np.asarray(positions, np.float64).reshape(-1, x.shape[1]), x.shape[:2])
    z = (x[..., :half] + 1j * x[..., half:]) * scale * np.exp(1j * p[:, :, None, None] * np.asarray(inv_freq))
    out = np.concatenate([z.real, z.imag], axis=-1)
    return out.transpose(0, 2, 1, 3) if layout == "BHSD" else out


def plain_freqs(dim, base=10000.0):
    return np.array([base ** (-2 * i / dim) for i in range(dim // 2)])


def make(rng, shape, storage, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(storage)


# ------------------------------------------------------------------------------------------ rotary_embedding
def test_rotary_embedding_matches_complex_rotation(rng):
    x = make(rng, (2, 7, 3, 16), np.float64)
    y = rotary_embedding(tc.tensor(x), base=500.0)
    np.testing.assert_allclose(y.numpy(), rotate64(x, np.arange(7), plain_freqs(16, 500.0)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("ids_shape", ["BS", "S", "1S"])
def test_rotary_embedding_any_position_ids(rng, ids_shape):
    x = make(rng, (3, 5, 2, 8), np.float64)
    ids = rng.integers(0, 3000, size=(3, 5))
    if ids_shape != "BS":
        ids = ids[:1] if ids_shape == "1S" else ids[0]
    y = rotary_embedding(tc.tensor(x), tc.tensor(ids))
    np.testing.assert_allclose(y.numpy(), rotate64(x, ids, plain_freqs(8)), rtol=1e-11, atol=1e-11)


def test_scaling_factor_divides_positions(rng):
    x = make(rng, (1, 6, 2, 8), np.float64)
    ids = np.array([[0, 5, 9, 100, 7, 3]])
    y = rotary_embedding(tc.tensor(x), tc.tensor(ids), scaling_factor=4.0)
    np.testing.assert_allclose(y.numpy(), rotate64(x, ids / 4.0, plain_freqs(8)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
def test_low_precision_reference_within_rounding(rng, name):
    storage = LOW[name]
    x = make(rng, (2, 9, 4, 32), storage)
    ids = rng.integers(0, 4096, size=(2, 9))
    y = rotary_embedding(tc.tensor(x), tc.tensor(ids))
    assert y.dtype is dtypes.as_dtype(storage)
    expected = rotate64(x, ids, plain_freqs(32))
    eps = float(ml_dtypes.finfo(storage).eps)
    # half types: one rounding of the output; f32: f32 tables and a few operations (relative to the row's size)
    bound = eps * np.abs(expected) if name != "f32" else 8 * eps * np.abs(x.astype(np.float64)).max()
    assert (np.abs(y.numpy().astype(np.float64) - expected) <= bound + 1e-30).all()


def test_rotation_preserves_norm_and_backward_is_the_inverse(rng):
    x = tc.tensor(make(rng, (2, 4, 3, 10), np.float64), requires_grad=True)
    y = rotary_embedding(x, tc.tensor(rng.integers(0, 50, size=(2, 4))))
    np.testing.assert_allclose(np.linalg.norm(y.numpy(), axis=-1), np.linalg.norm(x.numpy(), axis=-1), rtol=1e-13)
    y.backward(y.detach())        # R^T R x = x
    np.testing.assert_allclose(x.grad.numpy(), x.numpy(), rtol=1e-12, atol=1e-13)


def test_rotary_embedding_gradcheck(rng):
    x = tc.tensor(make(rng, (2, 3, 2, 6), np.float64), requires_grad=True)
    ids = tc.tensor(np.array([[4, 0, 9], [1, 1, 2]]))
    assert gradcheck(lambda t: rotary_embedding(t, ids, base=100.0), [x])


# ------------------------------------------------------------------------------------------ apply_rope
@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
def test_apply_rope_q_and_k_with_different_head_counts(rng, layout):
    B, S, D = 2, 5, 12
    q_shape, k_shape = ((B, S, 4, D), (B, S, 2, D)) if layout == "BSHD" else ((B, 4, S, D), (B, 2, S, D))
    q, k = make(rng, q_shape, np.float64), make(rng, k_shape, np.float64)
    ids = rng.integers(0, 40, size=(B, S))
    cos, sin = rope_cache(64, D, dtype="f64")
    qo, ko = apply_rope(tc.tensor(q), tc.tensor(k), cos, sin, tc.tensor(ids), layout=layout)
    np.testing.assert_allclose(qo.numpy(), rotate64(q, ids, plain_freqs(D), layout), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ko.numpy(), rotate64(k, ids, plain_freqs(D), layout), rtol=1e-12, atol=1e-13)


def test_apply_rope_in_place(rng):
    q, k = make(rng, (1, 6, 2, 8), np.float32), make(rng, (1, 6, 1, 8), np.float32)
    cos, sin = rope_cache(8, 8)
    expected = [t.numpy() for t in apply_rope(tc.tensor(q), tc.tensor(k), cos, sin)]
    qt, kt = tc.tensor(q), tc.tensor(k)
    q_data = qt.data
    qo, ko = apply_rope(qt, kt, cos, sin, inplace=True)
    assert qo is qt and ko is kt and qt.data is q_data
    np.testing.assert_array_equal(qt.numpy(), expected[0])
    np.testing.assert_array_equal(kt.numpy(), expected[1])


def test_apply_rope_gradcheck_q_and_k(rng):
    q = tc.tensor(make(rng, (1, 3, 2, 4), np.float64), requires_grad=True)
    k = tc.tensor(make(rng, (1, 3, 2, 4), np.float64), requires_grad=True)
    cos, sin = rope_cache(16, 4, base=10.0, dtype="f64")
    ids = tc.tensor(np.array([[7, 2, 11]]))

    def both(a, b):
        qo, ko = apply_rope(a, b, cos, sin, ids)
        return qo * 2.0 + ko
    assert gradcheck(both, [q, k])


def test_yarn_tables_carry_the_attention_factor(rng):
    cos, sin = rope_cache(32, 16, scaling_type="yarn", factor=4.0, original_max_position=8)
    np.testing.assert_allclose(cos.numpy() ** 2 + sin.numpy() ** 2, (0.1 * math.log(4) + 1) ** 2, rtol=1e-6)


@pytest.mark.parametrize("bad, error", [
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8), None, c, s, tc.tensor([[0, 1, 2, 16]])), IndexOutOfRangeError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8), None, c, s, tc.tensor([[0, -1, 2, 3]])), IndexOutOfRangeError),
    (lambda c, s: apply_rope(tc.ones(1, 20, 2, 8), None, c, s), IndexOutOfRangeError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8), None, c, s, tc.tensor([[0.0, 1.0, 2.0, 3.0]])), DTypeError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8), None, c, s, tc.tensor([[0, 1, 2]])), ShapeError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 7), None, c, s), ShapeError),
    (lambda c, s: apply_rope(tc.ones(4, 2, 8), None, c, s), ShapeError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8), tc.ones(1, 5, 2, 8), c, s), ShapeError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8), None, c[:, :3], s[:, :3]), ShapeError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8), None, c.astype("bf16"), s.astype("bf16")), DTypeError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8), None, c, s, layout="SBHD"), TesseraError),
    (lambda c, s: apply_rope(tc.ones(1, 4, 2, 8, requires_grad=True), None, c, s, inplace=True), TesseraError),
])
def test_apply_rope_bad_arguments(bad, error):
    cos, sin = rope_cache(16, 8)
    with pytest.raises(error):
        bad(cos, sin)


# ------------------------------------------------------------------------------------------ apply_rotary_pos_emb
def test_apply_rotary_pos_emb_seed_and_hugging_face_tables(rng):
    x = make(rng, (2, 5, 3, 8), np.float64)
    ids = rng.integers(0, 30, size=(2, 5))
    angles = ids[:, :, None, None] * plain_freqs(8)          # [B, S, 1, D/2]
    expected = rotate64(x, ids, plain_freqs(8))
    half = apply_rotary_pos_emb(tc.tensor(x), tc.tensor(np.cos(angles)), tc.tensor(np.sin(angles)))
    np.testing.assert_allclose(half.numpy(), expected, rtol=1e-12, atol=1e-13)
    full = np.concatenate([angles, angles], axis=-1)          # Hugging Face: emb = cat(freqs, freqs)
    hf = apply_rotary_pos_emb(tc.tensor(x), tc.tensor(np.cos(full)), tc.tensor(np.sin(full)))
    np.testing.assert_allclose(hf.numpy(), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("table_dim", [3, 6])
def test_apply_rotary_pos_emb_gradcheck_x_cos_sin(rng, table_dim):
    x = tc.tensor(make(rng, (2, 3, 2, 6), np.float64), requires_grad=True)
    cos = tc.tensor(make(rng, (2, 3, 1, table_dim), np.float64), requires_grad=True)
    sin = tc.tensor(make(rng, (2, 3, 1, table_dim), np.float64), requires_grad=True)
    assert gradcheck(apply_rotary_pos_emb, [x, cos, sin])


def test_apply_rotary_pos_emb_bad_shapes():
    with pytest.raises(ShapeError):
        apply_rotary_pos_emb(tc.ones(2, 3, 1, 8), tc.ones(2, 3, 1, 3), tc.ones(2, 3, 1, 3))
    with pytest.raises(ShapeError):
        apply_rotary_pos_emb(tc.ones(2, 3, 1, 8), tc.ones(2, 3, 5, 4), tc.ones(2, 3, 5, 4))


# ------------------------------------------------------------------------------------------ frequencies
def test_plain_linear_and_ntk_frequencies():
    np.testing.assert_allclose(rope_frequencies(64, 10000.0)[0], plain_freqs(64), rtol=1e-14)
    np.testing.assert_allclose(rope_frequencies(64, scaling_type="linear", factor=3.0)[0], plain_freqs(64) / 3,
                               rtol=1e-14)
    ntk, scale = rope_frequencies(64, 10000.0, "ntk", 8.0)
    # NTK-aware: base * 8^(D/(D-2)) leaves the highest frequency and divides the lowest by exactly the factor.
    assert scale == 1.0 and ntk[0] == 1.0
    np.testing.assert_allclose(ntk[-1], plain_freqs(64)[-1] / 8, rtol=1e-13)
    np.testing.assert_allclose(ntk, plain_freqs(64, 10000.0 * 8 ** (64 / 62)), rtol=1e-13)


def test_yarn_bands_follow_the_paper():
    D, base, L, s = 128, 10000.0, 4096, 4.0
    inv, scale = rope_frequencies(D, base, "yarn", s, L, beta_fast=32, beta_slow=1)
    plain = plain_freqs(D, base)
    rotations = L * plain / (2 * math.pi)                 # r = L / wavelength
    fast, slow = rotations > 32, rotations < 1
    np.testing.assert_allclose(inv[fast], plain[fast], rtol=1e-14)         # extrapolated: unchanged
    np.testing.assert_allclose(inv[slow], plain[slow] / s, rtol=1e-14)     # interpolated: divided by s
    middle = ~fast & ~slow
    ratio = inv[middle] / plain[middle]
    assert ((ratio <= 1) & (ratio >= 1 / s)).all() and (np.diff(ratio) <= 0).all()
    # The ramp over dimension indices: indices 20 (floor) to 46 (ceil) for this configuration, so index 33 is the
    # half-way blend (1 - 0.5) * theta + 0.5 * theta / 4.
    np.testing.assert_allclose(inv[33], 0.625 * plain[33], rtol=1e-14)
    assert inv[20] == pytest.approx(plain[20], rel=1e-14) and inv[46] == pytest.approx(plain[46] / s, rel=1e-14)
    assert inv[21] < plain[21] and inv[45] > plain[45] / s
    assert scale == pytest.approx(0.1 * math.log(4.0) + 1)


def test_llama3_frequencies_follow_llama_3_1():
    D, base, L = 128, 500000.0, 8192
    inv, scale = rope_frequencies(D, base, "llama3", 8.0, L, low_freq_factor=1.0, high_freq_factor=4.0)
    assert scale == 1.0
    for i, theta in enumerate(plain_freqs(D, base)):
        wavelength = 2 * math.pi / theta
        if wavelength < L / 4:
            want = theta
        elif wavelength > L / 1:
            want = theta / 8
        else:
            smooth = (L / wavelength - 1) / (4 - 1)
            want = (1 - smooth) * theta / 8 + smooth * theta
        assert inv[i] == pytest.approx(want, rel=1e-13), i
    assert inv[0] == 1.0 and inv[-1] == pytest.approx(plain_freqs(D, base)[-1] / 8, rel=1e-13)


def test_frequency_arguments_checked():
    with pytest.raises(ShapeError):
        rope_frequencies(7)
    with pytest.raises(TesseraError):
        rope_frequencies(8, scaling_type="yarn", factor=2.0)          # needs original_max_position
    with pytest.raises(TesseraError):
        rope_frequencies(8, scaling_type="dynamic-ntk")


# ------------------------------------------------------------------------------------------ dynamic_rope
def test_dynamic_rope_within_the_trained_length_is_plain(rng):
    x = make(rng, (1, 6, 2, 8), np.float64)
    ids = np.array([[0, 3, 100, 2047, 5, 6]])
    for kind in ("linear", "ntk", "yarn", "llama3"):
        y = dynamic_rope(tc.tensor(x), tc.tensor(ids), max_position=2048, scaling_type=kind)
        np.testing.assert_allclose(y.numpy(), rotate64(x, ids, plain_freqs(8)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn", "llama3"])
def test_dynamic_rope_beyond_the_trained_length(rng, kind):
    x = make(rng, (2, 4, 2, 16), np.float64)
    ids = np.array([[0, 1, 5000, 8191], [3, 4, 5, 6]])
    y = dynamic_rope(tc.tensor(x), tc.tensor(ids), max_position=2048, scaling_type=kind)
    factor = 8192 / 2048
    inv, scale = rope_frequencies(16, 10000.0, kind, factor, 2048)
    if kind == "linear":
        np.testing.assert_allclose(inv, plain_freqs(16) / 4, rtol=1e-14)
    np.testing.assert_allclose(y.numpy(), rotate64(x, ids, inv, scale=scale), rtol=1e-11, atol=1e-12)


def test_dynamic_rope_static_factor(rng):
    x = make(rng, (1, 3, 1, 8), np.float64)
    ids = np.array([[0, 1, 2]])
    y = dynamic_rope(tc.tensor(x), tc.tensor(ids), max_position=2048, scaling_type="linear", factor=2.0)
    np.testing.assert_allclose(y.numpy(), rotate64(x, ids / 2.0, plain_freqs(8)), rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------ tables and module
def test_cos_sin_embedding_layout():
    cos, sin = cos_sin_embedding(11, 6, base=10000.0)
    assert cos.shape == sin.shape == (11, 6) and cos.dtype is dtypes.f32
    for p in (0, 3, 10):
        for i in range(3):
            angle = p / 10000.0 ** (2 * i / 6)
            for col in (2 * i, 2 * i + 1):
                assert cos.numpy()[p, col] == pytest.approx(math.cos(angle), abs=1e-7)
                assert sin.numpy()[p, col] == pytest.approx(math.sin(angle), abs=1e-7)
    half, _ = cos_sin_embedding(4, 8, dtype="f16")
    assert half.dtype is dtypes.f16
    with pytest.raises(ShapeError):
        cos_sin_embedding(4, 5)


def test_rotary_embedding_module(rng):
    m = RotaryEmbedding(8, 64, base=1000.0)
    assert list(m.state_dict()) == [] and m.cos.shape == (64, 4)
    q, k = make(rng, (2, 3, 2, 8), np.float32), make(rng, (2, 3, 1, 8), np.float32)
    ids = rng.integers(0, 64, size=(2, 3))
    qo, ko = m(tc.tensor(q), tc.tensor(k), tc.tensor(ids))
    np.testing.assert_allclose(qo.numpy(), rotate64(q, ids, plain_freqs(8, 1000.0)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ko.numpy(), rotate64(k, ids, plain_freqs(8, 1000.0)), rtol=1e-5, atol=1e-6)


def test_table_length_rounds_up_to_a_power_of_two():
    assert [rope._table_length(n) for n in (1, 2, 3, 5, 1024, 1025)] == [1, 2, 4, 8, 1024, 2048]


@pytest.mark.parametrize("nv, heads, expected", [
    (8, 64, (8, (256, 1))),      # D = 128 bf16, 32 + 32 heads: 32 head slots, two heads a thread
    (8, 4, (8, (32, 8))),        # few heads: 8 tokens a block
    (3, 4, (3, (12, 21))),       # odd chunk counts: blocks need not be whole warps
    (1, 1, (1, (1, 256))),
    (2048, 2, (256, (256, 1))),  # more chunks than threads: each thread walks several
])
def test_rope_tiling(nv, heads, expected):
    lanes, block = rope._rope_tiling(nv, heads)
    assert (lanes, block) == expected
    assert block[0] % lanes == 0 and block[0] * block[1] <= rope.BLOCK_THREADS


# ------------------------------------------------------------------------------------------ GPU
def _gpu():
    cp = pytest.importorskip("cupy")
    if not tc.backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cp


GPU_CASES = [  # B, S, Hq, Hk, D
    (1, 1, 1, 0, 2), (2, 17, 3, 1, 6), (3, 17, 5, 5, 64), (2, 1000, 4, 2, 128), (1, 33, 32, 8, 128), (2, 9, 3, 2, 80)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
@pytest.mark.parametrize("B, S, Hq, Hk, D", GPU_CASES)
@pytest.mark.parametrize("positions", ["arange", "random"])
def test_gpu_kernel_rotates_q_and_k_in_one_launch(rng, monkeypatch, name, layout, B, S, Hq, Hk, D, positions):
    cp = _gpu()
    storage = LOW[name]
    shape = (lambda H: (B, S, H, D)) if layout == "BSHD" else (lambda H: (B, H, S, D))
    q, k = make(rng, shape(Hq), storage), make(rng, shape(Hk), storage)
    ids = np.broadcast_to(np.arange(S), (B, S)) if positions == "arange" else rng.integers(0, 5000, size=(B, S))
    cos, sin = rope_cache(8192, D, device="cuda")
    pos = cp.asarray(np.ascontiguousarray(ids, dtype=np.int64))
    xs = [cp.asarray(q)] + ([cp.asarray(k)] if Hk else [])
    outs = [cp.full(x.shape, np.nan, dtype=storage) for x in xs]
    launches = []
    real_launch = rope.runtime.launch_planned
    monkeypatch.setattr(rope.runtime, "launch_planned", lambda *a: (launches.append(a[0]), real_launch(*a)))
    rope._launch_rope(xs, outs, cos.data, sin.data, pos, layout, 1.0)
    assert len(launches) == 1
    for x, x_np, out in zip(xs, [q, k], outs):
        same = rope._rotate_reference(x, cos.data, sin.data, pos, layout, 1.0)
        assert_low_precision_close(cp.asnumpy(out), rotate64(x_np, ids, plain_freqs(D), layout), cp.asnumpy(same))
    # in place gives the same bits
    rope._launch_rope(xs, xs, cos.data, sin.data, pos, layout, 1.0)
    for x, out in zip(xs, outs):
        assert bool((x.view(cp.uint8) == out.view(cp.uint8)).all())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["f32", "bf16"])
def test_gpu_backward_is_the_inverse_rotation(rng, name):
    cp = _gpu()
    storage = LOW[name]
    q_np, k_np = make(rng, (2, 17, 3, 64), storage), make(rng, (2, 17, 1, 64), storage)
    g_np = make(rng, (2, 17, 3, 64), storage)
    ids = rng.integers(0, 3000, size=(2, 17))
    q, k = (tc.tensor(a, device="cuda", requires_grad=True) for a in (q_np, k_np))
    cos, sin = rope_cache(4096, 64, device="cuda")
    qo, ko = apply_rope(q, k, cos, sin, tc.tensor(ids, device="cuda"))
    (qo * tc.tensor(g_np, device="cuda")).sum().backward()
    # the transpose of rotating by angle a is rotating by -a
    truth = rotate64(g_np, -ids, plain_freqs(64))
    same = rope._rotate_reference(cp.asarray(g_np), cos.data, sin.data, cp.asarray(ids), "BSHD", -1.0)
    assert_low_precision_close(q.grad.numpy(), truth, cp.asnumpy(same))
    assert k.grad is None or not np.asarray(k.grad.numpy(), np.float64).any()


@pytest.mark.gpu
def test_gpu_strided_views_of_a_packed_qkv(rng):
    cp = _gpu()
    qkv_np = make(rng, (2, 33, 3, 4, 128), ml_dtypes.bfloat16)   # [B, S, (q, k, v), H, D]: q and k are strided views
    qkv = tc.tensor(qkv_np, device="cuda")
    ids = rng.integers(0, 2000, size=(2, 33))
    cos, sin = rope_cache(2048, 128, device="cuda")
    qo, ko = apply_rope(qkv[:, :, 0], qkv[:, :, 1], cos, sin, tc.tensor(ids, device="cuda"))
    for out, part in ((qo, 0), (ko, 1)):
        x = np.ascontiguousarray(qkv_np[:, :, part])
        same = rope._rotate_reference(cp.asarray(x), cos.data, sin.data, cp.asarray(ids), "BSHD", 1.0)
        assert_low_precision_close(out.float().numpy(), rotate64(x, ids, plain_freqs(128)), cp.asnumpy(same))
    apply_rope(qkv[:, :, 0], qkv[:, :, 1], cos, sin, tc.tensor(ids, device="cuda"), inplace=True)
    np.testing.assert_array_equal(qkv.numpy()[:, :, 0].view(np.uint16), qo.numpy().view(np.uint16))
    np.testing.assert_array_equal(qkv.numpy()[:, :, 2].view(np.uint16), qkv_np[:, :, 2].view(np.uint16))  # v kept


@pytest.mark.gpu
def test_gpu_rotary_embedding_matches_cpu(rng):
    _gpu()
    x = make(rng, (2, 40, 3, 64), np.float32)
    ids = rng.integers(0, 10000, size=(2, 40))
    gpu = rotary_embedding(tc.tensor(x, device="cuda"), tc.tensor(ids, device="cuda"), scaling_factor=2.0)
    cpu = rotary_embedding(tc.tensor(x), tc.tensor(ids), scaling_factor=2.0)
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_more_than_2_to_the_31_elements(rng):
    cp = _gpu()
    B, S, H, D = 1, 16385, 1024, 128                 # 2^31 + 131072 elements
    q = cp.random.standard_normal((B, S, H, D), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    cos, sin = rope_cache(32768, D, device="cuda")
    pos = cp.arange(S, dtype=cp.int64)[None, :]
    out = cp.full(q.shape, np.nan, dtype=q.dtype)
    rope._launch_rope([q], [out], cos.data, sin.data, pos, "BSHD", 1.0)
    for s in (0, 1, S // 2, S - 1):
        x = cp.asnumpy(q[:, s:s + 1])
        same = rope._rotate_reference(q[:, s:s + 1], cos.data, sin.data, pos[:, s:s + 1], "BSHD", 1.0)
        assert_low_precision_close(cp.asnumpy(out[:, s:s + 1]), rotate64(x, [[s]], plain_freqs(D)), cp.asnumpy(same))
