"""swish/silu, gelu and SwiGLU: references against float64 formulas written here, finite-difference gradients, the
chunked SwiGLU's result and memory; on the GPU, the activation.cu kernels against float64."""
import math
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import tessera_cp as tc
from tessera_cp import dtypes
from tessera_cp.errors import DTypeError, ShapeError, TesseraError
from tessera_cp.nn import activation as act
from tessera_cp.nn.activation import (SwiGLU, gelu, silu, swiglu, swiglu_activation, swiglu_fused,
                                      swiglu_memory_efficient, swish)
from tessera_cp.testing import assert_low_precision_close, gradcheck

LOW = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "f32": np.float32}


def swish64(x, beta=1.0):
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):   # exp(-beta x) = inf gives the exact limit 0
        return x / (1 + np.exp(-beta * x))


def swiglu64(x, wg, wu, wd, beta=1.0):
    """The seed's formula in float64."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    return (swish64(x @ wg, beta) * (x @ wu)) @ wd


def swiglu_elementwise_grads64(gate, up, dout, beta):
    """d/dgate and d/dup of sum(dout * swish(gate) * up), by hand: swish'(g) = s + beta g s (1 - s)."""
    g, u, d = (np.asarray(a, np.float64) for a in (gate, up, dout))
    s = 1 / (1 + np.exp(-beta * g))
    return d * u * (s + beta * g * s * (1 - s)), d * g * s


def make(rng, shape, storage, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(storage)


def ulp_bound(storage, expected, ulps, z=0.0):
    """ulps units in the last place of ``expected``; computed in its own precision (f32, f64), swish(z) also
    inherits exp's conditioning: rounding z costs |z| ulps of sigmoid(z)."""
    eps = float(ml_dtypes.finfo(storage).eps)
    conditioning = 0.0 if np.dtype(storage).itemsize < 4 else np.abs(z)
    return (ulps + conditioning) * eps * np.abs(expected) + float(ml_dtypes.finfo(storage).tiny)


# ------------------------------------------------------------------------------------------ swish / silu / gelu
@pytest.mark.parametrize("name", ["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("beta", [1.0, 1.7])
def test_swish_matches_float64(rng, name, beta):
    storage = {"f64": np.float64, **LOW}[name]
    x = make(rng, (7, 33), storage, 4.0)
    x[0, :4] = [-100, 100, 0, -1e4]   # the tails: no overflow, exact limits
    y = swish(tc.tensor(x), beta=beta)
    assert y.dtype is dtypes.as_dtype(storage)
    expected = swish64(x, beta)
    ulps = 1 if name in ("f16", "bf16") else 4
    bound = ulp_bound(storage, expected, ulps, beta * x.astype(np.float64))
    assert (np.abs(y.numpy().astype(np.float64) - expected) <= bound).all()


def test_silu_is_swish_with_beta_one(rng):
    x = make(rng, 50, np.float64)
    np.testing.assert_allclose(silu(tc.tensor(x)).numpy(), x / (1 + np.exp(-x)), rtol=1e-15)


def test_swish_gradcheck(rng):
    assert gradcheck(lambda t: swish(t, beta=1.3), [tc.tensor(make(rng, (3, 4), np.float64, 3), requires_grad=True)])


def test_gelu_known_values_and_tanh_form():
    y = gelu(tc.tensor(np.array([-1.0, 0.0, 1.0, 3.0])))
    np.testing.assert_allclose(y.numpy(), [-0.15865525393145707, 0.0, 0.8413447460685429, 2.9959503059051097],
                               rtol=1e-14)
    x = np.linspace(-5, 5, 41)
    tanh_form = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(gelu(tc.tensor(x), approximate="tanh").numpy(), tanh_form, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradcheck(rng, approximate):
    x = tc.tensor(make(rng, (2, 5), np.float64, 2), requires_grad=True)
    assert gradcheck(lambda t: gelu(t, approximate=approximate), [x])


def test_gelu_bad_mode():
    with pytest.raises(TesseraError):
        gelu(tc.ones(3), approximate="fast")


# ------------------------------------------------------------------------------------------ swiglu_activation
@pytest.mark.parametrize("name", ["f64", "f32", "bf16"])
@pytest.mark.parametrize("packed", [False, True])
def test_swiglu_activation_matches_float64(rng, name, packed):
    storage = {"f64": np.float64, **LOW}[name]
    gate, up = make(rng, (3, 5, 17), storage, 3), make(rng, (3, 5, 17), storage)
    if packed:
        y = swiglu_activation(tc.tensor(np.concatenate([gate, up], axis=-1)), beta=1.5)
    else:
        y = swiglu_activation(tc.tensor(gate), tc.tensor(up), beta=1.5)
    expected = swish64(gate, 1.5) * up.astype(np.float64)
    ulps = 1 if name == "bf16" else 4
    assert y.shape == (3, 5, 17)
    bound = ulp_bound(storage, expected, ulps, 1.5 * gate.astype(np.float64))
    assert (np.abs(y.numpy().astype(np.float64) - expected) <= bound).all()


def test_swiglu_activation_gradcheck(rng):
    gate = tc.tensor(make(rng, (2, 3, 4), np.float64), requires_grad=True)
    up = tc.tensor(make(rng, (2, 3, 4), np.float64), requires_grad=True)
    assert gradcheck(lambda g, u: swiglu_activation(g, u, beta=0.8), [gate, up])
    packed = tc.tensor(make(rng, (3, 6), np.float64), requires_grad=True)
    assert gradcheck(lambda h: swiglu_activation(h, beta=1.2), [packed])


def test_swiglu_activation_bad_arguments():
    with pytest.raises(ShapeError):
        swiglu_activation(tc.ones(3, 5))
    with pytest.raises(ShapeError):
        swiglu_activation(tc.ones(3, 4), tc.ones(3, 5))
    with pytest.raises(DTypeError):
        swiglu_activation(tc.ones(3, 4), tc.ones(3, 4, dtype="f16"))


# ------------------------------------------------------------------------------------------ swiglu
def weights(rng, D, F, D_out, storage=np.float64):
    return (make(rng, (D, F), storage, D ** -0.5), make(rng, (D, F), storage, D ** -0.5),
            make(rng, (F, D_out), storage, F ** -0.5))


@pytest.mark.parametrize("D_out", [4, 3])
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_swiglu_matches_the_seed_formula(rng, D_out, beta):
    x = make(rng, (2, 3, 4), np.float64)
    wg, wu, wd = weights(rng, 4, 5, D_out)
    y = swiglu(tc.tensor(x), tc.tensor(wg), tc.tensor(wu), tc.tensor(wd), beta=beta)
    assert y.shape == (2, 3, D_out)
    np.testing.assert_allclose(y.numpy(), swiglu64(x, wg, wu, wd, beta), rtol=1e-13, atol=1e-15)


def test_swiglu_gradcheck_all_inputs(rng):
    x = tc.tensor(make(rng, (2, 3, 4), np.float64), requires_grad=True)
    ws = [tc.tensor(w, requires_grad=True) for w in weights(rng, 4, 5, 4)]
    assert gradcheck(lambda *a: swiglu(*a, beta=1.1), [x, *ws])


def test_swiglu_bf16_within_twice_the_unfused_error(rng):
    x = make(rng, (9, 64), ml_dtypes.bfloat16)
    wg, wu, wd = weights(rng, 64, 96, 64, ml_dtypes.bfloat16)
    y = swiglu(*(tc.tensor(a) for a in (x, wg, wu, wd)))
    assert y.dtype is dtypes.bf16
    b16 = ml_dtypes.bfloat16
    rnd = lambda a: np.asarray(a, np.float32).astype(b16)   # noqa: E731  (every step rounded, as eager bf16 does)
    f32 = lambda a: a.astype(np.float32)                   # noqa: E731
    gate, up = rnd(f32(x) @ f32(wg)), rnd(f32(x) @ f32(wu))
    unfused = rnd(f32(rnd(f32(rnd(swish64(gate))) * f32(up))) @ f32(wd))
    assert_low_precision_close(y.numpy(), swiglu64(x, wg, wu, wd), unfused)


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 512])
def test_memory_efficient_equals_plain_values_and_gradients(rng, chunk):
    x_np = make(rng, (2, 3, 4), np.float64)
    w_np = weights(rng, 4, 5, 4)
    runs = []
    for fn in (lambda *a: swiglu(*a, beta=1.3),
               lambda *a: swiglu_memory_efficient(*a, chunk_size=chunk, beta=1.3)):
        x = tc.tensor(x_np, requires_grad=True)
        ws = [tc.tensor(w, requires_grad=True) for w in w_np]
        y = fn(x, *ws)
        y.backward(tc.tensor(np.linspace(-1, 1, y.numel()).reshape(y.shape)))
        runs.append([y.numpy(), x.grad.numpy()] + [w.grad.numpy() for w in ws])
    for plain, chunked in zip(*runs):
        np.testing.assert_allclose(chunked, plain, rtol=1e-13, atol=1e-15)


def test_memory_efficient_gradcheck(rng):
    x = tc.tensor(make(rng, (3, 4), np.float64), requires_grad=True)
    ws = [tc.tensor(w, requires_grad=True) for w in weights(rng, 4, 5, 3)]
    assert gradcheck(lambda *a: swiglu_memory_efficient(*a, chunk_size=2), [x, *ws])


def test_memory_efficient_gradient_of_x_only(rng):
    x = tc.tensor(make(rng, (3, 4), np.float64), requires_grad=True)
    ws = [tc.tensor(w) for w in weights(rng, 4, 5, 4)]
    swiglu_memory_efficient(x, *ws, chunk_size=3).sum().backward()
    expected = tc.tensor(x.numpy(), requires_grad=True)
    swiglu(expected, *ws).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), expected.grad.numpy(), rtol=1e-13)
    assert all(w.grad is None for w in ws)


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_efficient_peak_memory_is_lower_on_the_cpu(rng):
    # NumPy reports its buffers to tracemalloc: forward + backward peak of each path, beyond the inputs.
    N, D, F = 512, 16, 2048
    x = tc.tensor(make(rng, (N, D), np.float64), requires_grad=True)
    ws = [tc.tensor(w, requires_grad=True) for w in weights(rng, D, F, D)]

    def run(fn):
        def go():
            fn(x, *ws).sum().backward()
        return go
    plain = _peak_bytes(run(swiglu))
    chunked = _peak_bytes(run(lambda *a: swiglu_memory_efficient(*a, chunk_size=128)))
    intermediates = N * 3 * F * 8   # [N, 2F] + [N, F] float64 kept by the plain path
    assert plain > intermediates
    assert chunked < plain / 2


@pytest.mark.parametrize("bad, error", [
    (lambda: swiglu(tc.ones(2, 4), tc.ones(3, 5), tc.ones(4, 5), tc.ones(5, 4)), ShapeError),
    (lambda: swiglu(tc.ones(2, 4), tc.ones(4, 5), tc.ones(4, 6), tc.ones(5, 4)), ShapeError),
    (lambda: swiglu(tc.ones(2, 4), tc.ones(4, 5), tc.ones(4, 5), tc.ones(6, 4)), ShapeError),
    (lambda: swiglu(tc.ones(2, 4), tc.ones(4, 5, dtype="f64"), tc.ones(4, 5), tc.ones(5, 4)), DTypeError),
    (lambda: swiglu_fused(tc.ones(2, 4), tc.ones(4, 7), tc.ones(3, 4)), ShapeError),
    (lambda: swiglu_fused(tc.ones(2, 4), tc.ones(4, 6), tc.ones(4, 4)), ShapeError),
    (lambda: swiglu_memory_efficient(tc.ones(2, 4), tc.ones(4, 5), tc.ones(4, 5), tc.ones(5, 4), 0), TesseraError),
])
def test_swiglu_bad_arguments(bad, error):
    with pytest.raises(error):
        bad()


# ------------------------------------------------------------------------------------------ module
def test_module_holds_the_concatenated_weight_and_matches_swiglu(rng):
    tc.manual_seed(3)
    m = SwiGLU(8, 12, beta=1.0, dtype="f64")
    assert [n for n, _ in m.named_parameters()] == ["w_gate_up", "w_down"]
    assert m.w_gate_up.shape == (8, 24) and m.w_down.shape == (12, 8)
    x = make(rng, (2, 5, 8), np.float64)
    wgu, wd = m.w_gate_up.numpy(), m.w_down.numpy()
    np.testing.assert_allclose(m(tc.tensor(x)).numpy(), swiglu64(x, wgu[:, :12], wgu[:, 12:], wd), rtol=1e-13)
    m.chunk_size = 5
    np.testing.assert_allclose(m(tc.tensor(x)).numpy(), swiglu64(x, wgu[:, :12], wgu[:, 12:], wd), rtol=1e-13)
    m(tc.tensor(x)).sum().backward()
    assert m.w_gate_up.grad.shape == (8, 24) and m.w_down.grad.shape == (12, 8)


def test_module_from_weights(rng):
    wg, wu, wd = weights(rng, 4, 6, 4)
    m = SwiGLU.from_weights(tc.tensor(wg), tc.tensor(wu), tc.tensor(wd), beta=0.9)
    x = make(rng, (3, 4), np.float64)
    np.testing.assert_allclose(m(tc.tensor(x)).numpy(), swiglu64(x, wg, wu, wd, 0.9), rtol=1e-13)
    with pytest.raises(ShapeError):
        SwiGLU.from_weights(tc.tensor(wg), tc.tensor(wu[:, :5]), tc.tensor(wd))


# ------------------------------------------------------------------------------------------ GPU
def _gpu():
    cp = pytest.importorskip("cupy")
    if not tc.backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cp


ODD = [(1, 1), (17, 17), (1000, 1000), (5, 4097), (3, 14336), (129, 24)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rows, cols", ODD)
def test_gpu_elementwise_forward_against_float64(rng, name, packed, rows, cols):
    cp = _gpu()
    storage = LOW[name]
    gate, up = make(rng, (rows, cols), storage, 3), make(rng, (rows, cols), storage)
    if packed:   # the halves of one GEMM output, read in place (row stride 2 cols)
        h = cp.asarray(np.concatenate([gate, up], axis=1))
        gd, ud = h[:, :cols], h[:, cols:]
    else:
        gd, ud = cp.asarray(gate), cp.asarray(up)
    out = cp.full((rows, cols), np.nan, dtype=storage)
    act._launch_swiglu_forward(gd, ud, 1.25, out=out)
    assert_low_precision_close(cp.asnumpy(out), swish64(gate, 1.25) * up.astype(np.float64),
                               cp.asnumpy(act._swiglu_reference(gd, ud, 1.25)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("rows, cols", ODD)
def test_gpu_elementwise_backward_against_float64(rng, name, rows, cols):
    cp = _gpu()
    storage = LOW[name]
    gate, up, dout = make(rng, (rows, cols), storage, 3), make(rng, (rows, cols), storage), \
        make(rng, (rows, cols), storage)
    h = cp.asarray(np.concatenate([gate, up], axis=1))
    dh = cp.full((rows, 2 * cols), np.nan, dtype=storage)   # written in two halves, like the fused backward
    act._launch_swiglu_backward(h[:, :cols], h[:, cols:], cp.asarray(dout), 0.9, dh[:, :cols], dh[:, cols:])
    dg64, du64 = swiglu_elementwise_grads64(gate, up, dout, 0.9)
    ref_dg, ref_du = act._swiglu_reference_backward(h[:, :cols], h[:, cols:], cp.asarray(dout), 0.9)
    assert_low_precision_close(cp.asnumpy(dh[:, :cols]), dg64, cp.asnumpy(ref_dg))
    assert_low_precision_close(cp.asnumpy(dh[:, cols:]), du64, cp.asnumpy(ref_du))


@pytest.mark.gpu
@pytest.mark.parametrize("fn", ["swiglu", "memory_efficient"])
def test_gpu_swiglu_forward_and_gradients_against_float64(rng, fn):
    _gpu()
    b16 = ml_dtypes.bfloat16
    x, (wg, wu, wd) = make(rng, (3, 17, 256), b16), weights(rng, 256, 1000, 256, b16)
    g = make(rng, (3, 17, 256), b16)
    tensors = [tc.tensor(a, device="cuda", requires_grad=True) for a in (x, wg, wu, wd)]
    run = swiglu if fn == "swiglu" else (lambda *a: swiglu_memory_efficient(*a, chunk_size=384))
    y = run(*tensors)
    y.backward(tc.tensor(g, device="cuda"))
    # float64 truth, by the chain rule written out here
    x64, wg64, wu64, wd64, g64 = (a.astype(np.float64).reshape(-1, a.shape[-1]) for a in (x, wg, wu, wd, g))
    gate, up = x64 @ wg64, x64 @ wu64
    hidden = swish64(gate) * up
    dhidden = g64 @ wd64.T
    dgate, dup = swiglu_elementwise_grads64(gate, up, dhidden, 1.0)
    truth = {"y": hidden @ wd64, "x": dgate @ wg64.T + dup @ wu64.T, "wg": x64.T @ dgate, "wu": x64.T @ dup,
             "wd": hidden.T @ g64}
    # same-precision reference: the unfused formula in bf16 on the GPU, each op rounding (PyTorch eager's numerics)
    with tc.no_grad():
        xs = [tc.tensor(a, device="cuda") for a in (x, wg, wu, wd)]
        x2 = xs[0].reshape(-1, 256)
        gate_b, up_b = x2 @ xs[1], x2 @ xs[2]
        hidden_b = swish(gate_b) * up_b
        y_b = hidden_b @ xs[3]
        g_b = tc.tensor(g, device="cuda").reshape(-1, 256)
        dhidden_b = g_b @ xs[3].T
        dg_b = tc.Tensor(act._swiglu_reference_backward(gate_b.data, up_b.data, dhidden_b.data, 1.0)[0])
        du_b = dhidden_b * swish(gate_b)
        same = {"y": y_b, "x": dg_b @ xs[1].T + du_b @ xs[2].T, "wg": x2.T @ dg_b, "wu": x2.T @ du_b,
                "wd": hidden_b.T @ g_b}
    ours = {"y": y, "x": tensors[0].grad, "wg": tensors[1].grad, "wu": tensors[2].grad, "wd": tensors[3].grad}
    for key in truth:
        scale = np.abs(truth[key]).max()
        assert_low_precision_close(ours[key].float().numpy().reshape(truth[key].shape), truth[key],
                                   same[key].float().numpy().reshape(truth[key].shape), atol=1e-3 * scale)


@pytest.mark.gpu
def test_gpu_memory_efficient_peak_memory_is_lower(rng):
    cp = _gpu()
    N, D, F = 4096, 256, 8192
    b16 = ml_dtypes.bfloat16
    x = tc.tensor(make(rng, (N, D), b16), device="cuda", requires_grad=True)
    ws = [tc.tensor(w, device="cuda", requires_grad=True) for w in weights(rng, D, F, D, b16)]
    g = tc.tensor(make(rng, (N, D), b16), device="cuda")

    def peak(fn):
        pool = cp.cuda.MemoryPool()   # a fresh pool: it holds what the run needed at its peak
        cp.cuda.set_allocator(pool.malloc)
        try:
            fn(x, *ws).backward(g)
            cp.cuda.get_current_stream().synchronize()
            return pool.total_bytes()
        finally:
            cp.cuda.set_allocator(cp.get_default_memory_pool().malloc)
            for t in (x, *ws):
                t.grad = None
    plain = peak(swiglu)
    chunked = peak(lambda *a: swiglu_memory_efficient(*a, chunk_size=512))
    assert plain >= N * 3 * F * 2        # [N, 2F] + [N, F] bf16 intermediates
    assert chunked < plain / 2, (chunked, plain)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_elementwise_more_than_2_to_the_31_elements(rng):
    cp = _gpu()
    rows, cols = 131073, 16384                      # 2^31 + 16384 outputs; the packed input holds twice that
    h = cp.random.standard_normal((rows, 2 * cols), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    out = act._launch_swiglu_forward(h[:, :cols], h[:, cols:], 1.0)
    dh = cp.empty_like(h)
    act._launch_swiglu_backward(h[:, :cols], h[:, cols:], out, 1.0, dh[:, :cols], dh[:, cols:])
    picked = [0, 1, rows // 2, rows - 2, rows - 1]
    gate, up, dout = (cp.asnumpy(a[picked]) for a in (h[:, :cols], h[:, cols:], out))
    gd, ud = h[picked, :cols], h[picked, cols:]
    assert_low_precision_close(cp.asnumpy(out[picked]), swish64(gate) * up.astype(np.float64),
                               cp.asnumpy(act._swiglu_reference(gd, ud, 1.0)))
    dg64, du64 = swiglu_elementwise_grads64(gate, up, dout, 1.0)
    ref_dg, ref_du = act._swiglu_reference_backward(gd, ud, out[picked], 1.0)
    assert_low_precision_close(cp.asnumpy(dh[picked, :cols]), dg64, cp.asnumpy(ref_dg))
    assert_low_precision_close(cp.asnumpy(dh[picked, cols:]), du64, cp.asnumpy(ref_du))
