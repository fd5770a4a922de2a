"""The Tensor on device='cuda' (CuPy), every test marked gpu: the op battery against float64 NumPy in f32 and bf16
at sizes that are not multiples of anything, bf16 batched matmul, GPU gradients against CPU gradients, zero-copy
exchange with CuPy and PyTorch, seeded randomness, and bounds checks before any read."""
import ml_dtypes
import numpy
import pytest

import tessera_cp as tc
from tessera_cp import backend
from tessera_cp.errors import DeviceError, IndexOutOfRangeError
from tessera_cp.testing import assert_low_precision_close

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
SIZES_1D = [1, 17, 1000, 4097]
SIZES_2D = [(1, 4097), (17, 33), (1000, 3)]


@pytest.fixture
def cupy():
    cp = pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("CuPy sees no GPU")
    return cp


def host64(t):
    assert t.device == "cuda"
    return numpy.asarray(t.numpy()).astype(numpy.float64)


def on_gpu(a, dtype=None):
    return tc.tensor(a, dtype=dtype, device="cuda")


def assert_f32(result, exact, rtol=1e-5, atol=1e-6):
    assert result.dtype is tc.f32 and result.device == "cuda"
    numpy.testing.assert_allclose(host64(result), exact, rtol=rtol, atol=atol)


def assert_bf16_within_one_ulp(result, exact):
    """Each element within one bf16 step of the exact value (a correctly rounded result is within half)."""
    assert result.dtype is tc.bf16 and result.device == "cuda"
    got = host64(result)
    bound = 2.0 ** -7 * numpy.abs(exact) + 1e-30
    bad = numpy.abs(got - exact) > bound
    assert not bad.any(), f"{bad.sum()} elements off by more than one bf16 step: {got[bad][:3]} vs {exact[bad][:3]}"


def bf16_plain(values64):
    """A same-precision reference: the float64 result rounded to bf16 once (NumPy + ml_dtypes, no tessera_cp)."""
    return numpy.asarray(values64).astype(BF16).astype(numpy.float64)


# ------------------------------------------------------------------------------------------------------------
# elementwise
# ------------------------------------------------------------------------------------------------------------

UNARY = {
    "exp": (numpy.exp, lambda x: x), "log": (numpy.log, lambda x: numpy.abs(x) + 0.1),
    "sqrt": (numpy.sqrt, numpy.abs), "rsqrt": (lambda x: 1 / numpy.sqrt(x), lambda x: numpy.abs(x) + 0.1),
    "sin": (numpy.sin, lambda x: x), "cos": (numpy.cos, lambda x: x), "tanh": (numpy.tanh, lambda x: x),
    "sigmoid": (lambda x: 1 / (1 + numpy.exp(-x)), lambda x: x), "relu": (lambda x: numpy.maximum(x, 0), lambda x: x),
    "abs": (numpy.abs, lambda x: x), "square": (numpy.square, lambda x: x), "neg": (numpy.negative, lambda x: x),
}


def apply_unary(t, name):
    return -t if name == "neg" else getattr(t, name)()


@pytest.mark.parametrize("n", SIZES_1D)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_f32_and_bf16(cupy, name, n, rng):
    formula, domain = UNARY[name]
    x = domain(rng.standard_normal(n) * 2)
    x32 = x.astype(numpy.float32)
    assert_f32(apply_unary(on_gpu(x32), name), formula(x32.astype(numpy.float64)), rtol=4e-6, atol=1e-7)
    xb = x.astype(BF16)
    assert_bf16_within_one_ulp(apply_unary(on_gpu(xb), name), formula(xb.astype(numpy.float64)))


@pytest.mark.parametrize("shape", SIZES_2D)
@pytest.mark.parametrize("op", ["+", "-", "*", "/", "maximum", "minimum", "pow"])
def test_binary_broadcast_f32_and_bf16(cupy, op, shape, rng):
    a = rng.standard_normal(shape)
    b = rng.standard_normal(shape[-1:])  # broadcast along rows
    if op == "/":
        b = numpy.abs(b) + 0.5
    if op == "pow":
        a, b = numpy.abs(a) + 0.5, b.clip(-2, 2)
    formulas = {"+": numpy.add, "-": numpy.subtract, "*": numpy.multiply, "/": numpy.divide,
                "maximum": numpy.maximum, "minimum": numpy.minimum, "pow": numpy.power}

    def run(x, y):
        return {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y, "/": lambda: x / y,
                "maximum": lambda: x.maximum(y), "minimum": lambda: x.minimum(y), "pow": lambda: x ** y}[op]()

    for np_dtype in (numpy.float32, BF16):
        av, bv = a.astype(np_dtype), b.astype(np_dtype)
        exact = formulas[op](av.astype(numpy.float64), bv.astype(numpy.float64))
        result = run(on_gpu(av), on_gpu(bv))
        assert result.shape == shape
        if np_dtype is BF16:
            assert_bf16_within_one_ulp(result, exact)
        else:
            assert_f32(result, exact, rtol=2e-6 if op != "pow" else 1e-5)
    # Python scalars keep the dtype
    xb = on_gpu(a.astype(BF16))
    assert (xb * 2.0).dtype is tc.bf16 and (2 - xb).dtype is tc.bf16
    numpy.testing.assert_array_equal(host64(xb * 2.0), a.astype(BF16).astype(numpy.float64) * 2)


def test_comparisons_where_masked_fill(cupy, rng):
    x = rng.standard_normal((17, 33)).astype(numpy.float32)
    y = rng.standard_normal(33).astype(numpy.float32)
    tx, ty = on_gpu(x), on_gpu(y)
    for got, expected in [(tx > ty, x > y), (tx <= 0.5, x <= 0.5), (tx == tx, x == x), (tx != ty, x != y)]:
        assert got.dtype is tc.bool_ and got.device == "cuda"
        numpy.testing.assert_array_equal(got.numpy(), expected)
    numpy.testing.assert_array_equal(tc.where(tx > 0, tx, ty).numpy(), numpy.where(x > 0, x, y))
    numpy.testing.assert_array_equal(tx.masked_fill(tx < 0, -numpy.inf).numpy(), numpy.where(x < 0, -numpy.inf, x))
    with pytest.raises(DeviceError):
        tx + tc.tensor(y)  # cpu and cuda operands
    with pytest.raises(DeviceError):
        tc.cat([tx, tc.tensor(x)])
    with pytest.raises(DeviceError):
        tx[0] = tc.tensor(y)  # a host value into a device tensor
    x64 = x.astype(numpy.float64)
    numpy.testing.assert_array_equal(host64(tx.clamp(-0.5, 0.5)), numpy.clip(x64, -0.5, 0.5))
    numpy.testing.assert_array_equal(host64(tx.clamp(min=0.1)), numpy.maximum(x64, numpy.float32(0.1)))
    numpy.testing.assert_array_equal(host64(tx.clamp(max=0.2)), numpy.minimum(x64, numpy.float32(0.2)))


# ------------------------------------------------------------------------------------------------------------
# reductions
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SIZES_2D)
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_reductions_f32(cupy, shape, dim, rng):
    x = rng.standard_normal(shape).astype(numpy.float32)
    t = on_gpu(x)
    x64 = x.astype(numpy.float64)
    scale = numpy.abs(x64).sum(axis=dim) * 1e-6 + 1e-6  # an f32 sum's error grows with the sum of |x|
    numpy.testing.assert_allclose(host64(t.sum(dim)), x64.sum(axis=dim), rtol=1e-6, atol=float(numpy.max(scale)))
    numpy.testing.assert_allclose(host64(t.mean(dim)), x64.mean(axis=dim), rtol=1e-5, atol=1e-6)
    n = x.size if dim is None else x.shape[dim]
    if n > 1:
        numpy.testing.assert_allclose(host64(t.var(dim)), x64.var(axis=dim, ddof=1), rtol=1e-5)
        numpy.testing.assert_allclose(host64(t.std(dim)), x64.std(axis=dim, ddof=1), rtol=1e-5)
    peak = x64.max(axis=dim, keepdims=True)
    lse = (numpy.log(numpy.exp(x64 - peak).sum(axis=dim, keepdims=True)) + peak)
    numpy.testing.assert_allclose(host64(t.logsumexp(dim)), lse.reshape(x64.sum(axis=dim).shape), rtol=1e-6,
                                  atol=1e-6)
    if dim is None:
        assert t.max().item() == x.max() and t.min().item() == x.min()
        assert t.argmax().item() == int(numpy.argmax(x))
    else:
        m = t.max(dim=dim)
        numpy.testing.assert_array_equal(m.values.numpy(), x.max(axis=dim))
        numpy.testing.assert_array_equal(m.indices.numpy(), numpy.argmax(x, axis=dim))
        numpy.testing.assert_array_equal(t.min(dim, keepdim=True).values.numpy(), x.min(axis=dim, keepdims=True))
        e = numpy.exp(x64 - x64.max(axis=dim, keepdims=True))
        numpy.testing.assert_allclose(host64(t.softmax(dim)), e / e.sum(axis=dim, keepdims=True), rtol=1e-5,
                                      atol=1e-7)


@pytest.mark.parametrize("shape", SIZES_2D)
def test_reductions_bf16(cupy, shape, rng):
    x = rng.standard_normal(shape).astype(BF16)
    t = on_gpu(x)
    x64 = x.astype(numpy.float64)
    for name, exact in [("sum", x64.sum(axis=-1)), ("mean", x64.mean(axis=-1)),
                        ("logsumexp", numpy.log(numpy.exp(x64).sum(axis=-1)))]:
        result = getattr(t, name)(dim=-1)
        assert result.dtype is tc.bf16
        assert_low_precision_close(host64(result), exact, bf16_plain(exact), atol=1e-6)
    assert t.max().item() == float(x64.max())
    e = numpy.exp(x64 - x64.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    assert_low_precision_close(host64(t.softmax(-1)), probs, bf16_plain(probs), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sa,sb", [((17, 33), (33, 9)), ((1, 4097), (4097, 3)), ((5, 17, 33), (33, 9)),
                                   ((33,), (33, 9)), ((3, 17, 33), (3, 33, 9)), ((2, 3, 17, 33), (2, 3, 33, 9)),
                                   ((2, 1, 17, 33), (3, 33, 9))])
def test_matmul_f32_and_bf16(cupy, sa, sb, rng):
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    a32, b32 = a.astype(numpy.float32), b.astype(numpy.float32)
    exact32 = numpy.matmul(a32.astype(numpy.float64), b32.astype(numpy.float64))
    scale = numpy.matmul(numpy.abs(a32.astype(numpy.float64)), numpy.abs(b32.astype(numpy.float64)))
    got = on_gpu(a32) @ on_gpu(b32)
    assert got.shape == exact32.shape and got.dtype is tc.f32
    # TF32 would be off by ~1e-3 relative: this bound (f32 accumulation) would catch it
    assert (numpy.abs(host64(got) - exact32) <= 1e-5 * scale + 1e-6).all()
    ab, bb = a.astype(BF16), b.astype(BF16)  # bf16, ranks 3 and 4 included (CuPy's batched bf16 GEMM fails)
    exact = numpy.matmul(ab.astype(numpy.float64), bb.astype(numpy.float64))
    got = on_gpu(ab) @ on_gpu(bb)
    assert got.dtype is tc.bf16 and got.shape == exact.shape
    assert_low_precision_close(host64(got), exact, bf16_plain(exact), atol=1e-3)


# ------------------------------------------------------------------------------------------------------------
# shape ops, indexing, casts
# ------------------------------------------------------------------------------------------------------------

def test_shape_ops_match_numpy(cupy, rng):
    x = rng.standard_normal((17, 6, 5)).astype(numpy.float32)
    t = on_gpu(x)
    cases = [(t.reshape(17, -1), x.reshape(17, -1)), (t.transpose(0, 2), x.transpose(2, 1, 0)),
             (t.permute(1, 2, 0), x.transpose(1, 2, 0)), (t.mT, numpy.swapaxes(x, -1, -2)),
             (t.unsqueeze(1), x[:, None]), (t[:, :1].squeeze(1), x[:, 0]), (t[:, :1].expand(17, 4, 5),
                                                                            numpy.broadcast_to(x[:, :1], (17, 4, 5))),
             (t.flatten(1), x.reshape(17, 30)), (tc.cat(t.chunk(4, dim=1), dim=1), x),
             (tc.cat([t, t[:3]]), numpy.concatenate([x, x[:3]])), (tc.stack([t, t], dim=2), numpy.stack([x, x], 2)),
             (t.split([2, 4], dim=1)[1], x[:, 2:])]
    for got, expected in cases:
        assert got.device == "cuda"
        numpy.testing.assert_array_equal(got.numpy(), expected)


def test_indexing_and_setitem(cupy, rng):
    x = rng.standard_normal((17, 33)).astype(numpy.float32)
    t = on_gpu(x)
    mask = x > 0.5
    for key in [5, -1, (slice(2, 15, 3), slice(None, None, -2)), (Ellipsis, 7), (None, 3), [0, 16, 16, -17],
                (slice(None), numpy.array([32, 0, 0])), ([1, 2], [3, -33])]:
        numpy.testing.assert_array_equal(t[key].numpy(), x[key if not isinstance(key, list) else numpy.array(key)])
    numpy.testing.assert_array_equal(t[on_gpu(mask)].numpy(), x[mask])
    numpy.testing.assert_array_equal(t[mask].numpy(), x[mask])  # a host mask moves to the device
    numpy.testing.assert_array_equal(t[tc.tensor([3, 1])].numpy(), x[[3, 1]])  # a host index tensor too
    y = x.copy()
    t[0] = 1.0
    y[0] = 1.0
    t[t < -1] = 0.0
    y[y < -1] = 0.0
    t[[2, 4], 1:3] = on_gpu(numpy.array([5.0, 6.0], dtype=numpy.float32))
    y[[2, 4], 1:3] = [5.0, 6.0]
    numpy.testing.assert_array_equal(t.numpy(), y)


def test_gather_scatter(cupy, rng):
    x = rng.standard_normal((17, 33)).astype(numpy.float32)
    idx = rng.integers(-33, 33, size=(17, 40))
    numpy.testing.assert_array_equal(on_gpu(x).gather(1, on_gpu(idx)).numpy(), numpy.take_along_axis(x, idx, 1))
    s = tc.zeros(17, 33, device="cuda")
    targets = numpy.stack([rng.permutation(33)[:5] for _ in range(17)])
    src = rng.standard_normal((17, 5)).astype(numpy.float32)
    s.scatter_(1, on_gpu(targets), on_gpu(src))
    expected = numpy.zeros((17, 33), dtype=numpy.float32)
    numpy.put_along_axis(expected, targets, src, axis=1)
    numpy.testing.assert_array_equal(s.numpy(), expected)


@pytest.mark.parametrize("key", [17, -18, (0, 33), [0, 17], ([0], [40]), (slice(None), [33]), (Ellipsis, -34)])
def test_index_out_of_range_raises_before_reading(cupy, key):
    t = tc.zeros(17, 33, device="cuda")
    with pytest.raises(IndexOutOfRangeError):
        t[key]
    with pytest.raises(IndexOutOfRangeError):
        t[on_gpu(numpy.asarray(key))] if isinstance(key, list) else t[key]
    with pytest.raises(IndexOutOfRangeError):
        t[key] = 1.0
    assert not t.numpy().any()  # nothing was written anywhere
    with pytest.raises(IndexOutOfRangeError):
        t.gather(1, on_gpu(numpy.array([[33]] * 17)))
    with pytest.raises(IndexOutOfRangeError):
        t.scatter(0, on_gpu(numpy.array([[17]])), 1.0)


def test_casts_and_device_moves(cupy, rng):
    x = rng.standard_normal(4097) * 100
    t = on_gpu(x, dtype=tc.f64)
    for method, np_dtype in [("float", numpy.float32), ("half", numpy.float16), ("bfloat16", BF16)]:
        c = getattr(t, method)()
        assert c.device == "cuda" and c.data.dtype == np_dtype
        numpy.testing.assert_array_equal(c.numpy(), x.astype(np_dtype))  # round to nearest even
    back = t.bfloat16().cpu()
    assert back.device == "cpu" and back.dtype is tc.bf16
    numpy.testing.assert_array_equal(back.numpy(), x.astype(BF16))
    q = tc.tensor(x.clip(-400, 400).astype(ml_dtypes.float8_e4m3fn))  # fp8 bits travel unchanged
    qg = q.to("cuda")
    assert qg.dtype is tc.fp8_e4m3 and qg.device == "cuda"
    numpy.testing.assert_array_equal(qg.data.get(), q.data)
    numpy.testing.assert_array_equal(qg[5:9].cpu().data, q.data[5:9])
    assert "device='cuda'" in repr(t[:3])


# ------------------------------------------------------------------------------------------------------------
# gradients: GPU against CPU
# ------------------------------------------------------------------------------------------------------------

def _graph(x, w, b, e, device):
    """A function that touches most differentiable ops; returns a scalar."""
    rows = tc.tensor([0, 2, 2, 5, 0], device=device)
    h = (x @ w + b).sigmoid() * (x @ w).tanh()                       # (B, 17, 9)
    h = tc.cat([h, h[:, :3].exp()], dim=1).permute(0, 2, 1)        # (B, 9, 20)
    s = h.softmax(-1) * h.log_softmax(dim=1) + h.logsumexp(dim=-1, keepdim=True)
    g = s.reshape(-1, 20)[rows]                                     # repeated advanced index
    g = g.gather(1, tc.tensor([[1, 1, 19], [0, 3, 3], [2, 2, 2], [5, 4, 3], [0, 0, 1]], device=device))
    y = s.var(dim=1) + s.max(dim=1).values - s.mean()                 # (B, 20)
    y = y.clone()
    y[:, 0] = g.sum(1)[:y.shape[0]].clamp(-2.0, 2.0)                # setitem on a non-leaf
    z = tc.where(y > 0, (y.abs() + 0.5) ** e, -y) + tc.stack([y, y * 0.5], dim=-1).sum(-1)
    return z.expand(3, *z.shape).mean() + (x.abs() + 1).log().sum() * 0.01


def test_gradients_on_gpu_equal_cpu_gradients(cupy, rng):
    values = [rng.standard_normal((4, 17, 33)), rng.standard_normal((33, 9)) * 0.2, rng.standard_normal(9),
              numpy.abs(rng.standard_normal(20)) + 0.5]
    grads = {}
    for device in ("cpu", "cuda"):
        leaves = [tc.tensor(v, dtype=tc.f32, device=device, requires_grad=True) for v in values]
        _graph(*leaves, device).backward()
        grads[device] = [leaf.grad for leaf in leaves]
    for cpu_grad, gpu_grad in zip(grads["cpu"], grads["cuda"]):
        assert gpu_grad.device == "cuda" and gpu_grad.dtype is tc.f32
        reference = cpu_grad.numpy().astype(numpy.float64)
        numpy.testing.assert_allclose(host64(gpu_grad), reference, rtol=1e-4,
                                      atol=1e-5 * float(numpy.abs(reference).max()))


def test_gradient_flows_across_devices(cupy, rng):
    x0 = rng.standard_normal(17).astype(numpy.float32)
    x = tc.tensor(x0, requires_grad=True)  # on the CPU
    (x.cuda().exp() * 2).sum().backward()
    assert x.grad.device == "cpu"
    numpy.testing.assert_allclose(x.grad.numpy(), 2 * numpy.exp(x0.astype(numpy.float64)), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# zero-copy exchange and randomness
# ------------------------------------------------------------------------------------------------------------

def test_dlpack_and_cuda_array_interface_with_cupy(cupy, rng):
    t = on_gpu(rng.standard_normal((17, 33)).astype(numpy.float32))
    ptr = t.data.data.ptr
    c = cupy.from_dlpack(t)
    assert c.data.ptr == ptr and c.shape == (17, 33) and c.dtype == numpy.float32
    assert t.__cuda_array_interface__["data"][0] == ptr
    assert cupy.asarray(t).data.ptr == ptr  # through __cuda_array_interface__
    c[0, 0] = 123.0
    assert t[0, 0].item() == 123.0
    back = tc.Tensor(cupy.from_dlpack(c))  # in, without a copy
    assert back.data.data.ptr == ptr and back.device == "cuda"
    b = on_gpu(rng.standard_normal(17).astype(BF16))
    assert cupy.from_dlpack(b).data.ptr == b.data.data.ptr and cupy.from_dlpack(b).dtype == BF16


def test_dlpack_and_cuda_array_interface_with_torch(cupy, rng):
    torch = pytest.importorskip("torch")
    t = on_gpu(rng.standard_normal((17, 33)).astype(numpy.float32))
    ptr = t.data.data.ptr
    tt = torch.from_dlpack(t)
    assert tt.is_cuda and tt.data_ptr() == ptr and tt.dtype == torch.float32 and tuple(tt.shape) == (17, 33)
    tt[1, 2] = -7.0
    torch.cuda.synchronize()
    assert t[1, 2].item() == -7.0
    ta = torch.as_tensor(t, device="cuda")  # through __cuda_array_interface__
    assert ta.data_ptr() == ptr
    b = on_gpu(rng.standard_normal((5, 3)).astype(BF16))
    tb = torch.from_dlpack(b)  # bf16 goes through DLPack (its array interface typestr is opaque)
    assert tb.dtype == torch.bfloat16 and tb.data_ptr() == b.data.data.ptr
    numpy.testing.assert_array_equal(tb.float().cpu().numpy(), b.numpy().astype(numpy.float32))
    src = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    into = tc.Tensor(cupy.from_dlpack(src))  # torch -> tessera_cp without a copy
    assert into.data.data.ptr == src.data_ptr() and into.dtype is tc.f32
    numpy.testing.assert_array_equal(into.numpy(), numpy.arange(12, dtype=numpy.float32).reshape(3, 4))


def test_randn_reproducible_on_gpu(cupy):
    a = tc.Generator(11).randn(4097, device="cuda")
    b = tc.Generator(11).randn(4097, device="cuda")
    assert a.device == "cuda" and a.dtype is tc.f32
    numpy.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not numpy.array_equal(tc.Generator(12).randn(4097, device="cuda").numpy(), a.numpy())
    g = tc.Generator(11)
    first = g.randn(4097, device="cuda").numpy()
    assert not numpy.array_equal(g.randn(4097, device="cuda").numpy(), first)  # the stream advances
    big = tc.Generator(3).randn(100000, device="cuda").numpy().astype(numpy.float64)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02
    tc.manual_seed(5)
    x = tc.randn(33, device="cuda", dtype=tc.bf16)
    tc.manual_seed(5)
    numpy.testing.assert_array_equal(tc.randn(33, device="cuda", dtype=tc.bf16).numpy(), x.numpy())
    u = tc.Generator(4).rand(10000, device="cuda").numpy()
    assert u.min() >= 0 and u.max() < 1
    i = tc.Generator(4).randint(2, 7, (10000,), device="cuda")
    assert i.device == "cuda" and i.numpy().min() == 2 and i.numpy().max() == 6


@pytest.mark.gpu
def test_from_dlpack_takes_a_torch_cuda_tensor_zero_copy():
    torch = pytest.importorskip("torch")
    source = torch.arange(10, dtype=torch.bfloat16, device="cuda")
    t = tc.from_dlpack(source)
    assert t.device == "cuda" and t.dtype is tc.bf16
    assert t.data.data.ptr == source.data_ptr()
    source[3] = 100
    assert float(t[3].item()) == 100.0
