"""rms_norm, stable_rms_norm and RMSNorm: the reference against float64 formulas written here, gradients by finite
differences, the stable variant at extreme magnitudes; on the GPU, the norm.cu kernels against float64."""
import types

import ml_dtypes
import numpy as np
import pytest

import tessera_cp as tc
from tessera_cp import dtypes
from tessera_cp.errors import DTypeError, ShapeError, TesseraError
from tessera_cp.nn import norm
from tessera_cp.nn.norm import RMSNorm, rms_norm, stable_rms_norm
from tessera_cp.testing import assert_low_precision_close, gradcheck

LOW = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "f32": np.float32}


def rms_norm64(x, w, eps):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rms_norm64_grads(x, w, g, eps):
    """d/dx and d/dw of sum(g * rms_norm(x, w)), derived by hand: y = x r w with r = (mean(x^2) + eps)^-1/2, so
    dy_j/dx_i = r w_j [i == j] - x_j w_j r^3 x_i / D."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    D = x.shape[-1]
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    dx = r * g * w - x * r ** 3 * np.sum(g * w * x, axis=-1, keepdims=True) / D
    dw = np.sum((g * x * r).reshape(-1, D), axis=0)
    return dx, dw


def make(rng, shape, storage, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(storage)


# ------------------------------------------------------------------------------------------ reference on the CPU
@pytest.mark.parametrize("name", ["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("weight_f32", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 1000)])
def test_reference_matches_float64_formula(rng, name, weight_f32, shape):
    storage = {"f64": np.float64, **LOW}[name]
    x = make(rng, shape, storage)
    w = make(rng, shape[-1:], np.float32 if weight_f32 else storage)
    y = rms_norm(tc.tensor(x), tc.tensor(w), eps=1e-5)
    assert y.dtype is dtypes.as_dtype(storage) and y.shape == shape
    expected = rms_norm64(x, w, 1e-5)
    # One rounding to the output type (half types), or a few ulps of accumulated rounding (f32, f64).
    eps = float(ml_dtypes.finfo(storage).eps)
    ulps = 1 if name in ("f16", "bf16") else 8
    error = np.abs(y.numpy().astype(np.float64) - expected)
    assert (error <= ulps * eps * np.abs(expected) + float(ml_dtypes.finfo(storage).smallest_subnormal)).all()


def test_gradcheck_x_and_weight(rng):
    x = tc.tensor(rng.standard_normal((2, 3, 5)), requires_grad=True)
    w = tc.tensor(rng.standard_normal(5), requires_grad=True)
    assert gradcheck(lambda a, b: rms_norm(a, b, eps=1e-3), [x, w])


def test_gradcheck_single_column_rows(rng):
    x = tc.tensor(rng.standard_normal((4, 1)), requires_grad=True)
    w = tc.tensor(rng.standard_normal(1), requires_grad=True)
    assert gradcheck(lambda a, b: rms_norm(a, b, eps=0.5), [x, w])


def test_gradients_match_hand_derived_formula_in_low_precision(rng):
    x, w, g = make(rng, (6, 33), ml_dtypes.bfloat16), make(rng, 33, np.float32), make(rng, (6, 33), np.float32)
    xt, wt = tc.tensor(x, requires_grad=True), tc.tensor(w, requires_grad=True)
    rms_norm(xt, wt).backward(tc.tensor(g.astype(ml_dtypes.bfloat16)))
    dx64, dw64 = rms_norm64_grads(x, w, g.astype(ml_dtypes.bfloat16), 1e-6)
    assert xt.grad.dtype is dtypes.bf16 and wt.grad.dtype is dtypes.f32
    assert np.abs(xt.grad.numpy().astype(np.float64) - dx64).max() <= 2 ** -8 * np.abs(dx64).max()
    np.testing.assert_allclose(wt.grad.numpy(), dw64, rtol=1e-5, atol=1e-5)


def test_weight_gets_no_gradient_when_frozen(rng):
    xt = tc.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    wt = tc.tensor(rng.standard_normal(4))
    rms_norm(xt, wt).sum().backward()
    assert xt.grad is not None and wt.grad is None


def test_empty_rows_give_an_empty_result():
    y = rms_norm(tc.zeros(0, 8), tc.ones(8))
    assert y.shape == (0, 8)


def test_accumulate_f64_rounds_the_exact_result_once(rng):
    x = make(rng, (64, 256), np.float32)
    w = np.ones(256, np.float32)
    exact = rms_norm64(x, w, 1e-6).astype(np.float32)
    with tc.precision(accumulate="f64"):
        y = rms_norm(tc.tensor(x), tc.tensor(w)).numpy()
    assert (y == exact).mean() >= 0.999   # ties broken differently by double rounding: a handful at most


@pytest.mark.parametrize("bad, error", [
    (lambda: rms_norm(tc.ones(2, 4), tc.ones(3)), ShapeError),
    (lambda: rms_norm(tc.ones(2, 4), tc.ones(2, 4)), ShapeError),
    (lambda: rms_norm(tc.tensor(3.0), tc.ones(1)), ShapeError),
    (lambda: rms_norm(tc.ones(2, 4, dtype="bf16"), tc.ones(4, dtype="f16")), DTypeError),
    (lambda: rms_norm(tc.ones(2, 4, dtype="int32"), tc.ones(4)), DTypeError),
    (lambda: rms_norm(tc.ones(2, 4), tc.ones(4), eps=-1.0), TesseraError),
    (lambda: stable_rms_norm(tc.ones(2, 4), tc.ones(5)), ShapeError),
])
def test_bad_arguments_raise(bad, error):
    with pytest.raises(error):
        bad()


# ------------------------------------------------------------------------------------------ stable_rms_norm
@pytest.mark.parametrize("scale, eps", [(1e30, 1e-6), (1e-30, 0.0), (5e37, 0.0), (1.0, 1e-6)])
def test_stable_is_exact_to_rounding_at_extreme_magnitudes(rng, scale, eps):
    x = make(rng, (5, 300), np.float32, scale)
    if scale > 1e37:
        x[:, 0] = 3.3e38   # near f32's max: 2^128 (the next power of two) is not finite in f32
    w = make(rng, 300, np.float32)
    expected = rms_norm64(x, w, eps)
    y = stable_rms_norm(tc.tensor(x), tc.tensor(w), eps=eps).numpy().astype(np.float64)
    assert np.isfinite(y).all()
    assert np.abs(y - expected).max() <= 4 * 2 ** -23 * np.abs(expected).max()


def test_plain_rms_norm_fails_where_stable_does_not(rng):
    # Why stable_rms_norm exists: squares of 1e30 overflow f32 and squares of 1e-30 underflow.
    x = make(rng, (2, 64), np.float32, 1e30)
    w = np.ones(64, np.float32)
    with np.errstate(over="ignore"):
        plain_large = rms_norm(tc.tensor(x), tc.tensor(w)).numpy()
    assert not np.allclose(plain_large, rms_norm64(x, w, 1e-6), rtol=1e-3)
    tiny = make(rng, (2, 64), np.float32, 1e-30)
    with np.errstate(all="ignore"):
        plain = rms_norm(tc.tensor(tiny), tc.tensor(w), eps=0.0).numpy()
    assert not np.isfinite(plain).all()
    np.testing.assert_allclose(stable_rms_norm(tc.tensor(tiny), tc.tensor(w), eps=0.0).numpy(),
                               rms_norm64(tiny, w, 0.0), rtol=1e-6)


def test_stable_mixed_magnitudes_in_one_row():
    x = np.array([[1e30, -3e29, 1.0, 1e-30, 0.0, 7e28]], np.float32)
    w = np.full(6, 2.0, np.float32)
    expected = rms_norm64(x, w, 1e-6)
    y = stable_rms_norm(tc.tensor(x), tc.tensor(w)).numpy()
    np.testing.assert_allclose(y, expected, rtol=4 * 2 ** -23, atol=1e-37)


def test_stable_with_f64_compute_and_accumulation_is_correctly_rounded(rng):
    x = make(rng, (64, 256), np.float32, 1e25)
    w = make(rng, 256, np.float32)
    exact = rms_norm64(x, w, 1e-6).astype(np.float32)
    with tc.precision(compute="f64", accumulate="f64"):
        y = stable_rms_norm(tc.tensor(x), tc.tensor(w)).numpy()
    assert y.dtype == np.float32
    assert (y == exact).mean() >= 0.999
    with tc.precision(accumulate="f64"):   # f32 elementwise math: within two roundings
        y32 = stable_rms_norm(tc.tensor(x), tc.tensor(w)).numpy()
    np.testing.assert_allclose(y32, exact, rtol=3 * 2 ** -23, atol=0)


def test_stable_gradcheck(rng):
    x = tc.tensor(rng.standard_normal((3, 7)) * 5, requires_grad=True)
    w = tc.tensor(rng.standard_normal(7), requires_grad=True)
    assert gradcheck(lambda a, b: stable_rms_norm(a, b, eps=1e-3), [x, w])


def test_stable_gradients_at_1e30_match_the_formula(rng):
    x, w, g = make(rng, (4, 50), np.float32, 1e30), make(rng, 50, np.float32), make(rng, (4, 50), np.float32)
    xt, wt = tc.tensor(x, requires_grad=True), tc.tensor(w, requires_grad=True)
    stable_rms_norm(xt, wt).backward(tc.tensor(g))
    dx64, dw64 = rms_norm64_grads(x, w, g, 1e-6)
    assert np.isfinite(xt.grad.numpy()).all()
    np.testing.assert_allclose(xt.grad.numpy(), dx64, rtol=1e-5, atol=1e-5 * np.abs(dx64).max())
    np.testing.assert_allclose(wt.grad.numpy(), dw64, rtol=1e-5, atol=1e-5 * np.abs(dw64).max())


# ------------------------------------------------------------------------------------------ module
def test_module_holds_a_ones_weight_and_normalizes(rng):
    m = RMSNorm(6, eps=1e-4)
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    assert m.weight.dtype is dtypes.f32 and m.weight.requires_grad and (m.weight.numpy() == 1).all()
    x = make(rng, (2, 3, 6), ml_dtypes.bfloat16)
    y = m(tc.tensor(x))
    assert y.dtype is dtypes.bf16
    assert np.abs(y.numpy().astype(np.float64) - rms_norm64(x, np.ones(6), 1e-4)).max() <= 2 ** -8 * 4
    y.float().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.shape == (6,)


def test_stable_module(rng):
    m = RMSNorm(8, stable=True)
    x = make(rng, (3, 8), np.float32, 1e33)
    np.testing.assert_allclose(m(tc.tensor(x)).numpy(), rms_norm64(x, np.ones(8), 1e-6), rtol=4 * 2 ** -23)


# ------------------------------------------------------------------------------------------ dispatch helpers
def fake(ptr, itemsize):
    return types.SimpleNamespace(data=types.SimpleNamespace(ptr=ptr), dtype=types.SimpleNamespace(itemsize=itemsize))


@pytest.mark.parametrize("itemsize, n, arrays, strides, expected", [
    (2, 4096, [fake(256, 2), fake(512, 4)], (), 8),
    (2, 4097, [fake(256, 2)], (), 1),
    (2, 4098, [fake(256, 2)], (), 2),
    (2, 4096, [fake(256 + 4, 2)], (), 2),      # a pointer 4 bytes past alignment
    (2, 4096, [fake(256, 2), fake(256 + 8, 4)], (), 2),   # an f32 weight 8 bytes past: 2 floats
    (4, 4096, [fake(256, 4)], (), 4),
    (2, 64, [fake(256, 2)], (6,), 2),          # a row stride of 6 elements
])
def test_vector_width(itemsize, n, arrays, strides, expected):
    assert norm._vector_width(itemsize, n, arrays, strides) == expected


def test_row_tiling():
    limits = {1: 512, 4: 512}                              # the forward kernels' launch bounds
    assert norm._row_tiling(512, limits) == (1, 512, 1)    # D = 4096 bf16: 512 threads x 1 vector
    assert norm._row_tiling(125, limits) == (1, 128, 1)    # D = 1000 bf16: a block of 128, 3 threads idle
    assert norm._row_tiling(16, limits) == (1, 32, norm.WARP_ROWS_PER_BLOCK)
    assert norm._row_tiling(1024, limits) == (4, 256, 1)   # D = 4096 f32: 256 threads x 4 vectors
    assert norm._row_tiling(513, limits) == (4, 160, 1)
    assert norm._row_tiling(32768, limits) == (4, 512, 1)  # rows beyond the registers are re-read
    assert norm._row_tiling(4096, {1: 512, 4: 256}) == (4, 256, 1)   # the backward's smaller NV-4 blocks
    assert norm._row_tiling(4096, {1: 512, 4: 200}) == (4, 192, 1)   # a register-limited kernel: whole warps


def test_persistent_grid_splits_rows_evenly():
    assert norm._persistent_grid(100, 528) == 100
    assert norm._persistent_grid(16384, 528) == 512        # 32 rows each, not 31 or 32
    assert norm._persistent_grid(1056, 528) == 528
    assert norm._persistent_grid(1057, 528) == 353         # 3 rows each (the last two blocks 2)


def test_reference_runs_on_numpy_arrays():
    assert not norm._use_kernel(np.ones(3, np.float32))


# ------------------------------------------------------------------------------------------ GPU
def _gpu():
    cp = pytest.importorskip("cupy")
    if not tc.backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cp


def _nan(cp, shape, storage):
    return cp.full(shape, np.nan, dtype=storage)


ODD_SHAPES = [(1, 1), (17, 17), (1000, 1000), (3, 4096), (17, 4097), (5, 4098), (2, 32768), (1000, 96), (7, 9000)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("weight_f32", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_gpu_forward_kernel_against_float64(rng, name, weight_f32, shape):
    cp = _gpu()
    storage = LOW[name]
    x, w = make(rng, shape, storage), make(rng, shape[-1:], np.float32 if weight_f32 else storage)
    xd, wd = cp.asarray(x), cp.asarray(w)
    out = _nan(cp, shape, storage)
    norm._launch_forward(xd, wd, 1e-5, out=out)
    same_precision = norm._reference_forward(xd, wd, 1e-5)
    assert_low_precision_close(cp.asnumpy(out), rms_norm64(x, w, 1e-5), cp.asnumpy(same_precision))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("weight_f32", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_gpu_backward_kernel_against_float64(rng, name, weight_f32, shape):
    cp = _gpu()
    storage = LOW[name]
    wstorage = np.float32 if weight_f32 else storage
    x, w, g = make(rng, shape, storage), make(rng, shape[-1:], wstorage), make(rng, shape, storage)
    xd, wd, gd = cp.asarray(x), cp.asarray(w), cp.asarray(g)
    dx, dw = _nan(cp, shape, storage), _nan(cp, shape[-1:], wstorage)
    norm._launch_backward(xd, wd, gd, 1e-5, dx=dx, dw=dw)
    dx64, dw64 = rms_norm64_grads(x, w, g, 1e-5)
    ref_dx, ref_dw = norm._reference_backward(xd, wd, gd, 1e-5)
    assert_low_precision_close(cp.asnumpy(dx), dx64, cp.asnumpy(ref_dx))
    # dw sums `rows` terms: allow f32 summation error on the scale of the result.
    assert_low_precision_close(cp.asnumpy(dw), dw64, cp.asnumpy(ref_dw), atol=1e-5 * max(1.0, np.abs(dw64).max()))


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(rng):
    cp = _gpu()
    x, w, g = (cp.asarray(make(rng, s, ml_dtypes.bfloat16)) for s in [(3000, 1024), (1024,), (3000, 1024)])
    first = norm._launch_backward(x, w, g, 1e-6)
    for _ in range(3):
        again = norm._launch_backward(x, w, g, 1e-6)
        assert all(bool((a.view(cp.uint16) == b.view(cp.uint16)).all()) for a, b in zip(first, again))


@pytest.mark.gpu
def test_gpu_misaligned_and_strided_inputs(rng):
    cp = _gpu()
    buf = cp.asarray(make(rng, 17 * 4096 + 1, ml_dtypes.bfloat16))
    x = buf[1:].reshape(17, 4096)                     # 2 bytes past alignment: scalar accesses
    w = cp.asarray(make(rng, 4096, np.float32))
    out = _nan(cp, x.shape, x.dtype)
    norm._launch_forward(x, w, 1e-6, out=out)
    x64 = cp.asnumpy(x)
    assert_low_precision_close(cp.asnumpy(out), rms_norm64(x64, cp.asnumpy(w), 1e-6),
                               cp.asnumpy(norm._reference_forward(x, w, 1e-6)))
    wide = cp.asarray(make(rng, (9, 200), np.float32))
    y = rms_norm(tc.Tensor(wide[:, 3:103]), tc.tensor(np.ones(100, np.float32), device="cuda"))   # strided rows
    np.testing.assert_allclose(y.numpy(), rms_norm64(cp.asnumpy(wide[:, 3:103]), np.ones(100), 1e-6), rtol=1e-5)


@pytest.mark.gpu
def test_gpu_public_api_uses_the_kernels_and_reference_switch(rng, monkeypatch):
    cp = _gpu()
    x = tc.tensor(make(rng, (4, 33, 320), ml_dtypes.bfloat16), device="cuda", requires_grad=True)
    w = tc.tensor(make(rng, 320, np.float32), device="cuda", requires_grad=True)
    g = make(rng, (4, 33, 320), ml_dtypes.bfloat16)
    y = rms_norm(x, w)
    y.backward(tc.tensor(g, device="cuda"))
    kernel_y = norm._launch_forward(x.data, w.data, 1e-6)
    kernel_dx, kernel_dw = norm._launch_backward(x.data, w.data, cp.asarray(g), 1e-6)
    assert bool((y.data.view(cp.uint16) == kernel_y.view(cp.uint16)).all())
    assert bool((x.grad.data.view(cp.uint16) == kernel_dx.view(cp.uint16)).all())
    assert bool((w.grad.data == kernel_dw).all())
    monkeypatch.setenv("TESSERA_REFERENCE", "1")
    reference = rms_norm(x.detach(), w.detach())
    assert_low_precision_close(y.numpy(), rms_norm64(x.numpy(), w.numpy(), 1e-6), reference.numpy())


@pytest.mark.gpu
def test_gpu_forward_kept_launch_and_sync_path_agree(rng, monkeypatch):
    """The forward's launch is kept per shape and called directly; TESSERA_SYNC routes it through runtime.launch.
    All three give the same bits (fresh inputs, NaN-poisoned outputs)."""
    cp = _gpu()
    monkeypatch.delenv("TESSERA_SYNC", raising=False)
    x = cp.asarray(make(rng, (300, 520), ml_dtypes.bfloat16))
    w = cp.asarray(make(rng, 520, np.float32))
    outs = [_nan(cp, x.shape, x.dtype) for _ in range(3)]
    norm._launch_forward(x, w, 1e-6, out=outs[0])
    norm._launch_forward(x, w, 1e-6, out=outs[1])    # the kept launch
    monkeypatch.setenv("TESSERA_SYNC", "1")
    norm._launch_forward(x, w, 1e-6, out=outs[2])
    bits = [o.view(cp.uint16) for o in outs]
    assert bool((bits[0] == bits[1]).all()) and bool((bits[0] == bits[2]).all())
    assert_low_precision_close(cp.asnumpy(outs[0]), rms_norm64(cp.asnumpy(x), cp.asnumpy(w), 1e-6),
                               cp.asnumpy(norm._reference_forward(x, w, 1e-6)))


@pytest.mark.gpu
def test_gpu_stable_rms_norm_at_1e30(rng):
    _gpu()
    x, w = make(rng, (33, 257), np.float32, 1e30), make(rng, 257, np.float32)
    y = stable_rms_norm(tc.tensor(x, device="cuda"), tc.tensor(w, device="cuda"))
    expected = rms_norm64(x, w, 1e-6)
    assert np.abs(y.numpy() - expected).max() <= 4 * 2 ** -23 * np.abs(expected).max()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_more_than_2_to_the_31_elements(rng):
    cp = _gpu()
    rows, D = 65537, 32768                             # 2^31 + 32768 elements: 64-bit offsets needed
    x = cp.random.standard_normal((rows, D), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    w = cp.asarray(make(rng, D, ml_dtypes.bfloat16))
    y = norm._launch_forward(x, w, 1e-6)
    g = y  # any fresh values serve as the upstream gradient
    dx, dw = norm._launch_backward(x, w, g, 1e-6)
    picked = [0, 1, rows // 2, rows - 2, rows - 1]
    x64, w64, g64 = cp.asnumpy(x[picked]), cp.asnumpy(w), cp.asnumpy(g[picked])
    ref_y = cp.asnumpy(norm._reference_forward(x[picked], w, 1e-6))
    assert_low_precision_close(cp.asnumpy(y[picked]), rms_norm64(x64, w64, 1e-6), ref_y)
    ref_dx, _ = norm._reference_backward(x[picked], w, g[picked], 1e-6)
    assert_low_precision_close(cp.asnumpy(dx[picked]), rms_norm64_grads(x64, w64, g64, 1e-6)[0], cp.asnumpy(ref_dx))
    assert bool(cp.isfinite(dw.astype(cp.float32)).all())
