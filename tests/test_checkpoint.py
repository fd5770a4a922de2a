"""Activation checkpointing: the three spellings give gradients bit-identical to the plain run (CPU), the graph keeps
only the region's inputs (CPU, measured with tracemalloc), and on the GPU a chunked SwiGLU-like stack holds
measurably less memory after forward (CuPy's memory pool)."""
import gc
import tracemalloc

import numpy
import pytest

import tessera_cp as tc
from tessera_cp import backend
from tessera_cp.testing import gradcheck


def make_params(rng, d=6, d_ff=12, n=5, dtype=tc.f64, device="cpu"):
    """x, Wg, Wu, Wd as leaves that require grad, plus a fixed cotangent for the output."""
    def leaf(*shape, scale=1.0):
        return tc.tensor(rng.standard_normal(shape) * scale, dtype=dtype, device=device, requires_grad=True)
    return (leaf(n, d), leaf(d, d_ff, scale=d ** -0.5), leaf(d, d_ff, scale=d ** -0.5),
            leaf(d_ff, d, scale=d_ff ** -0.5), tc.tensor(rng.standard_normal((n, d)), dtype=dtype, device=device))


def swiglu_chunk(x, wg, wu, wd, i, j):
    g = x @ wg[:, i:j]
    return (g * g.sigmoid() * (x @ wu[:, i:j])) @ wd[i:j]


def chunked_stack(x, wg, wu, wd, chunk, mode):
    """sum over ff chunks of silu(x Wg[:, c]) * (x Wu[:, c]) @ Wd[c]; ``mode`` picks how each chunk is run."""
    out = None
    for i in range(0, wg.shape[1], chunk):
        j = min(i + chunk, wg.shape[1])
        if mode == "plain":
            part = swiglu_chunk(x, wg, wu, wd, i, j)
        elif mode == "call":
            part = tc.checkpoint(swiglu_chunk, x, wg, wu, wd, i, j)
        elif mode == "decorator":
            part = tc.checkpoint(swiglu_chunk)(x, wg, wu, wd, i, j)
        else:
            with tc.checkpoint_region():
                part = swiglu_chunk(x, wg, wu, wd, i, j)
        out = part if out is None else out + part
    return out


def grads_of(params, loss_fn):
    for p in params:
        p.grad = None
    loss_fn().backward()
    return [p.grad.numpy().copy() for p in params]


def independent_swiglu_grads(x, wg, wu, wd, cot):
    """The gradients of sum(cot * silu(x Wg) * (x Wu) @ Wd), worked out by hand in float64 NumPy."""
    g, u = x @ wg, x @ wu
    s = 1 / (1 + numpy.exp(-g))
    silu = g * s
    h = silu * u
    dh = cot @ wd.T
    dwd = h.T @ cot
    du = dh * silu
    dg = dh * u * (s + g * s * (1 - s))
    return [dg @ wg.T + du @ wu.T, x.T @ dg, x.T @ du, dwd]


@pytest.mark.parametrize("mode", ["call", "decorator", "region"])
def test_chunked_swiglu_gradients_bit_identical(mode, rng):
    x, wg, wu, wd, cot = make_params(rng)
    params = [x, wg, wu, wd]
    plain = grads_of(params, lambda: (chunked_stack(x, wg, wu, wd, 4, "plain") * cot).sum())
    checkpointed = grads_of(params, lambda: (chunked_stack(x, wg, wu, wd, 4, mode) * cot).sum())
    for p, q in zip(plain, checkpointed):
        numpy.testing.assert_array_equal(q, p)  # bit-identical
    # and both are right: against the hand-derived formula
    exact = independent_swiglu_grads(*(t.numpy() for t in (x, wg, wu, wd, cot)))
    for q, e in zip(checkpointed, exact):
        numpy.testing.assert_allclose(q, e, rtol=1e-10, atol=1e-12)


def test_parameters_captured_by_closure(rng):
    x, wg, wu, wd, cot = make_params(rng)

    @tc.checkpoint
    def block(h):
        g = h @ wg  # wg, wu, wd come from the closure, not the arguments
        return (g.sigmoid() * g * (h @ wu)) @ wd

    def plain(h):
        g = h @ wg
        return (g.sigmoid() * g * (h @ wu)) @ wd

    params = [x, wg, wu, wd]
    expected = grads_of(params, lambda: (plain(plain(x).tanh()) * cot).sum())
    got = grads_of(params, lambda: (block(block(x).tanh()) * cot).sum())
    for e, g in zip(expected, got):
        numpy.testing.assert_array_equal(g, e)
    assert block.__name__ == "block"  # functools.wraps


def test_checkpoint_passes_kwargs_and_multiple_outputs(rng):
    x = tc.tensor(rng.standard_normal((3, 4)), dtype=tc.f64, requires_grad=True)

    def two(a, scale=1.0):
        return (a * scale).exp(), a.softmax(dim=-1) * scale

    def loss(fn):
        p, q = fn(x)
        return (p * q).sum() + p[0].sum()

    expected = grads_of([x], lambda: loss(lambda a: two(a, scale=0.5)))
    got = grads_of([x], lambda: loss(lambda a: tc.checkpoint(two, a, scale=0.5)))
    numpy.testing.assert_array_equal(got[0], expected[0])
    assert gradcheck(lambda a: tc.checkpoint(two, a, scale=0.5)[1], [x])


def test_region_with_indexing_setitem_and_constants(rng):
    x = tc.tensor(rng.standard_normal((4, 5)), dtype=tc.f64, requires_grad=True)
    const = tc.tensor(rng.standard_normal(5), dtype=tc.f64)
    index = tc.tensor([3, 0, 0, 2])

    def body(a):
        y = a[index] * const + a[:, 1:2]
        y[1] = a[2].exp()
        return y.gather(1, tc.tensor([[0, 4], [1, 1], [2, 3], [4, 0]])).logsumexp(dim=1)

    def with_region(a):
        with tc.checkpoint_region():
            return body(a)

    expected = grads_of([x], lambda: body(x).sum())
    got = grads_of([x], lambda: with_region(x).sum())
    numpy.testing.assert_array_equal(got[0], expected[0])
    assert gradcheck(with_region, [x])


def test_nested_regions_and_backward_twice(rng):
    x = tc.tensor(rng.standard_normal(6), dtype=tc.f64, requires_grad=True)

    def inner(a):
        return a.sin() * a

    def outer(a):
        with tc.checkpoint_region():
            b = inner(a).exp()
            with tc.checkpoint_region():
                c = inner(b)
            return c + b

    def plain(a):
        b = inner(a).exp()
        return inner(b) + b

    def backward_twice(fn):
        x.grad = None
        out = fn(x).sum()
        out.backward()
        once = x.grad.numpy().copy()
        out.backward()  # a second backward (recomputing again when checkpointed) accumulates
        return once, x.grad.numpy().copy()

    expected_once, expected_twice = backward_twice(plain)
    once, twice = backward_twice(outer)
    numpy.testing.assert_array_equal(once, expected_once)
    numpy.testing.assert_array_equal(twice, expected_twice)
    numpy.testing.assert_allclose(twice, 2 * once, rtol=1e-14)


def test_recompute_uses_the_precision_of_the_forward():
    # the f32 sum of 2^25 and 4096 ones depends on the accumulation dtype (off by 16 in f32), and the gradient
    # of sum(s * x) with s = x.sum() carries s: a recompute in another precision would change the gradient
    data = numpy.array([[2.0 ** 25] + [1.0] * 4096], dtype=numpy.float32)

    def f(a):
        return (a.sum(dim=1, keepdim=True) * a).sum()

    def grad(checkpointed, accumulate):
        x = tc.tensor(data, requires_grad=True)
        with tc.precision(accumulate=accumulate):
            loss = tc.checkpoint(f, x) if checkpointed else f(x)
        loss.backward()  # outside the precision context
        return x.grad.numpy()

    wide = grad(False, tc.f64)
    assert not numpy.array_equal(wide, grad(False, tc.f32))  # the setting matters here
    numpy.testing.assert_array_equal(grad(True, tc.f64), wide)
    numpy.testing.assert_array_equal(grad(True, tc.f32), grad(False, tc.f32))


def test_no_grad_inside_checkpoint_records_nothing(rng):
    x = tc.tensor(rng.standard_normal(3), dtype=tc.f64, requires_grad=True)
    with tc.no_grad():
        y = tc.checkpoint(lambda a: a * 2, x)
    assert not y.requires_grad


def _retained_bytes(mode, rng):
    """Bytes still held (by the graph) after forward and after dropping every Python name but the loss."""
    x, wg, wu, wd, cot = make_params(rng, d=64, d_ff=512, n=256, dtype=tc.f32)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loss = (chunked_stack(x, wg, wu, wd, 128, mode) * cot).sum()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    loss.backward()
    return held, [p.grad.numpy() for p in (x, wg, wu, wd)]


def test_checkpoint_keeps_less_memory_after_forward_cpu():
    held_plain, grads_plain = _retained_bytes("plain", numpy.random.default_rng(5))
    held_ckpt, grads_ckpt = _retained_bytes("region", numpy.random.default_rng(5))
    # plain: each of 4 chunks keeps g, sigmoid(g), g*sigmoid, u, h (256 x 128 f32 = 128 KiB each) = ~2.5 MiB;
    # checkpointed: the chunk outputs and running sums only (a few x 64 KiB).
    chunk_bytes = 256 * 128 * 4
    assert held_plain > 4 * 4 * chunk_bytes
    assert held_ckpt < held_plain / 4, (held_ckpt, held_plain)
    for a, b in zip(grads_plain, grads_ckpt):
        numpy.testing.assert_array_equal(b, a)


@pytest.mark.gpu
def test_checkpoint_lowers_gpu_memory_of_chunked_swiglu():
    cupy = pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("no usable GPU")
    n, d, d_ff, chunk = 8192, 1024, 8192, 1024
    pool = cupy.get_default_memory_pool()

    def run(mode):
        g = tc.Generator(0)
        x = g.randn(n, d, device="cuda", requires_grad=True)
        wg = (g.randn(d, d_ff, device="cuda") * d ** -0.5).detach().requires_grad_()
        wu = (g.randn(d, d_ff, device="cuda") * d ** -0.5).detach().requires_grad_()
        wd = (g.randn(d_ff, d, device="cuda") * d_ff ** -0.5).detach().requires_grad_()
        cot = g.randn(n, d, device="cuda")
        cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        before = pool.used_bytes()
        loss = (chunked_stack(x, wg, wu, wd, chunk, mode) * cot).sum()
        cupy.cuda.Device().synchronize()
        live = pool.used_bytes() - before  # the intermediates the graph keeps for backward
        loss.backward()
        grads = [p.grad.numpy() for p in (x, wg, wu, wd)]
        del x, wg, wu, wd, cot, loss
        gc.collect()
        pool.free_all_blocks()
        return live, grads

    live_plain, grads_plain = run("plain")
    live_ckpt, grads_ckpt = run("call")
    chunk_bytes = n * chunk * 4  # one (N, chunk) f32 intermediate: 32 MiB
    print(f"\nlive after forward: plain {live_plain / 2**20:.0f} MiB, checkpoint {live_ckpt / 2**20:.0f} MiB")
    # plain keeps ~4 chunk-sized intermediates for each of 8 chunks; checkpointing keeps a few (N, D) outputs
    assert live_plain > 8 * 3 * chunk_bytes
    assert live_ckpt < live_plain / 4
    for a, b in zip(grads_plain, grads_ckpt):
        numpy.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(numpy.abs(a).max()))
