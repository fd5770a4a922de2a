"""The Tensor on the CPU backend: creation, operators and their dtype rules, reductions, shape ops, indexing,
casts, conversion and repr. Every expected value comes from NumPy in float64 (or exact integer/bit arithmetic),
never from tessera_cp itself."""
import ml_dtypes
import numpy
import pytest

import tessera_cp as tc
from tessera_cp.errors import DeviceError, DTypeError, IndexOutOfRangeError, ShapeError, TesseraError

BF16 = ml_dtypes.bfloat16


def f64(t):
    """A tensor's values as float64 NumPy (exact for every dtype up to f64)."""
    return numpy.asarray(t.numpy()).astype(numpy.float64)


def rand64(rng, *shape):
    return rng.standard_normal(shape)


def close32(result, expected, rtol=2e-6, atol=1e-6):
    """An f32 result against the float64 formula: a few f32 ulps."""
    assert result.dtype is tc.f32
    numpy.testing.assert_allclose(f64(result), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------------------
# creation
# ------------------------------------------------------------------------------------------------------------

def test_tensor_from_lists_and_scalars():
    t = tc.tensor([[1.5, -2.0], [3.0, 4.25]])
    assert t.dtype is tc.f32 and t.shape == (2, 2) and t.ndim == 2 and t.device == "cpu"
    assert f64(t).tolist() == [[1.5, -2.0], [3.0, 4.25]]
    assert tc.tensor([1, 2, 3]).dtype is tc.int64
    assert tc.tensor([True, False]).dtype is tc.bool_
    assert tc.tensor([1, 2.5]).dtype is tc.f32  # mixed Python numbers: float wins, as f32
    s = tc.tensor(3.5)
    assert s.shape == () and s.item() == 3.5 and float(s) == 3.5
    assert tc.tensor(7).item() == 7 and isinstance(tc.tensor(7).item(), int)
    assert tc.tensor([[1, 2]], dtype=tc.f16).dtype is tc.f16
    assert tc.tensor([0.1], dtype="f64").numpy()[0] == 0.1  # an asked dtype rounds once, from the Python float
    assert tc.tensor(0.1, dtype=tc.bf16).numpy() == numpy.float64(0.1).astype(BF16)


def test_tensor_from_numpy_copies_and_keeps_dtype(rng):
    for dtype, expect in [(numpy.float32, tc.f32), (numpy.float64, tc.f64), (numpy.float16, tc.f16),
                          (numpy.int8, tc.int8), (numpy.int32, tc.int32), (numpy.int64, tc.int64),
                          (numpy.uint8, tc.uint8), (numpy.bool_, tc.bool_), (BF16, tc.bf16)]:
        a = (rng.standard_normal((3, 4)) * 10).astype(dtype)
        t = tc.tensor(a)
        assert t.dtype is expect
        numpy.testing.assert_array_equal(t.numpy(), a)
        a.flat[0] = 1  # tensor() copies
        assert not numpy.shares_memory(t.numpy(), a)
    # Tensor(array) wraps without copying
    a = numpy.zeros(3, dtype=numpy.float32)
    w = tc.Tensor(a)
    a[1] = 5
    assert w.numpy()[1] == 5


def test_tensor_from_ml_dtypes_bf16_and_float8():
    values = numpy.array([0.0, 1.0, -2.5, 448.0, 0.015625], dtype=numpy.float64)
    b = tc.tensor(values.astype(BF16))
    assert b.dtype is tc.bf16 and b.data.dtype == BF16
    numpy.testing.assert_array_equal(f64(b), values)
    for ml, dt in [(ml_dtypes.float8_e4m3fn, tc.fp8_e4m3), (ml_dtypes.float8_e5m2, tc.fp8_e5m2)]:
        src = values.astype(ml)
        t = tc.tensor(src)
        assert t.dtype is dt
        assert t.data.dtype == numpy.uint8  # fp8 lives in uint8 bits
        numpy.testing.assert_array_equal(t.data, src.view(numpy.uint8))
        assert t.numpy().dtype == ml
        numpy.testing.assert_array_equal(t.numpy().view(numpy.uint8), src.view(numpy.uint8))
    with pytest.raises(DTypeError):  # uint8 storage cannot claim to be f32
        tc.Tensor(numpy.zeros(2, dtype=numpy.uint8), dtype=tc.f32)


def test_zeros_ones_full_empty():
    z = tc.zeros(2, 3)
    assert z.shape == (2, 3) and z.dtype is tc.f32 and not f64(z).any()
    assert tc.zeros((4,)).shape == (4,) and tc.zeros([2, 2]).shape == (2, 2)
    o = tc.ones(3, dtype=tc.bf16)
    assert o.dtype is tc.bf16 and f64(o).tolist() == [1.0, 1.0, 1.0]
    f = tc.full((2, 2), 7, dtype=tc.int32)
    assert f.dtype is tc.int32 and f.numpy().tolist() == [[7, 7], [7, 7]]
    assert f64(tc.full(3, -1.5)).tolist() == [-1.5] * 3
    e = tc.empty(2, 5, dtype=tc.f16)
    assert e.shape == (2, 5) and e.dtype is tc.f16
    assert tc.zeros(2, requires_grad=True).requires_grad
    with pytest.raises(ShapeError):
        tc.zeros("a", 2)


def test_arange_eye():
    a = tc.arange(5)
    assert a.dtype is tc.int64 and a.numpy().tolist() == [0, 1, 2, 3, 4]
    assert tc.arange(2, 11, 3).numpy().tolist() == [2, 5, 8]
    r = tc.arange(0, 1, 0.25)
    assert r.dtype is tc.f32 and f64(r).tolist() == [0, 0.25, 0.5, 0.75]
    assert tc.arange(3, dtype=tc.f16).dtype is tc.f16
    assert f64(tc.eye(3)).tolist() == numpy.eye(3).tolist()
    assert f64(tc.eye(2, 3)).tolist() == [[1, 0, 0], [0, 1, 0]]


def test_like_functions_keep_shape_dtype_device():
    base = tc.ones(2, 3, dtype=tc.f16)
    for fn, fill in [(tc.zeros_like, 0), (tc.ones_like, 1)]:
        t = fn(base)
        assert t.shape == (2, 3) and t.dtype is tc.f16 and (f64(t) == fill).all()
    t = tc.full_like(base, 2.5, dtype=tc.f32)
    assert t.dtype is tc.f32 and (f64(t) == 2.5).all()
    assert tc.empty_like(base).shape == (2, 3)
    assert tc.randn_like(base).dtype is tc.f16 and tc.rand_like(base).shape == (2, 3)
    assert tc.zeros_like(tc.arange(4)).dtype is tc.int64


def test_random_creation_and_seeds():
    g1, g2 = tc.Generator(42), tc.Generator(42)
    a, b = g1.randn(64, 3), g2.randn(64, 3)
    numpy.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not numpy.array_equal(g1.randn(64, 3).numpy(), a.numpy())  # the stream advances
    assert not numpy.array_equal(tc.Generator(43).randn(64, 3).numpy(), a.numpy())
    g1.manual_seed(42)
    numpy.testing.assert_array_equal(g1.randn(64, 3).numpy(), a.numpy())
    # randn is standard normal; rand uniform [0, 1); randint within [low, high)
    big = tc.randn(20000, generator=tc.Generator(0))
    assert abs(f64(big).mean()) < 0.05 and abs(f64(big).std() - 1) < 0.05
    u = f64(tc.rand(20000, generator=tc.Generator(1)))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    i = tc.randint(3, 9, (1000,), generator=tc.Generator(2))
    assert i.dtype is tc.int64 and i.numpy().min() == 3 and i.numpy().max() == 8
    assert tc.randint(5, size=4).numpy().max() < 5
    assert tc.randn(3, dtype=tc.bf16).dtype is tc.bf16 and tc.rand(2, dtype="f64").dtype is tc.f64
    assert tc.randn(2, 2, requires_grad=True).requires_grad
    # manual_seed drives the default generator
    tc.manual_seed(7)
    x = tc.randn(5)
    tc.manual_seed(7)
    numpy.testing.assert_array_equal(tc.randn(5).numpy(), x.numpy())
    tc.manual_seed(7)
    numpy.testing.assert_array_equal(tc.randn_like(x).numpy(), x.numpy())


# ------------------------------------------------------------------------------------------------------------
# operators, broadcasting, dtype rules
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["+", "-", "*", "/", "**"])
def test_binary_ops_broadcast(op, rng):
    a = rand64(rng, 4, 1, 3)
    b = rand64(rng, 5, 1)
    if op == "**":
        a = numpy.abs(a) + 0.5
    ops = {"+": numpy.add, "-": numpy.subtract, "*": numpy.multiply, "/": numpy.divide, "**": numpy.power}
    ta, tb = tc.tensor(a.astype(numpy.float32)), tc.tensor(b.astype(numpy.float32))
    expected = ops[op](a.astype(numpy.float32).astype(numpy.float64), b.astype(numpy.float32).astype(numpy.float64))
    result = {"+": lambda: ta + tb, "-": lambda: ta - tb, "*": lambda: ta * tb, "/": lambda: ta / tb,
              "**": lambda: ta ** tb}[op]()
    assert result.shape == (4, 5, 3)
    close32(result, expected, rtol=1e-5 if op == "**" else 2e-6)


def test_python_scalars_both_sides(rng):
    a = rand64(rng, 3, 2).astype(numpy.float32)
    t = tc.tensor(a)
    x = a.astype(numpy.float64)
    close32(t + 2, x + 2)
    close32(2 + t, x + 2)
    close32(t - 1.5, x - 1.5)
    close32(1.5 - t, 1.5 - x)
    close32(t * 3, x * 3)
    close32(3 * t, x * 3)
    close32(t / 4, x / 4)
    close32(1 / (t + 10), 1 / (x + 10))
    close32(t ** 2, x ** 2)
    close32(2 ** t, 2 ** x)
    close32(-t, -x)
    close32(abs(t), numpy.abs(x))
    assert (+t) is t


def test_scalar_dtype_rules():
    b = tc.tensor([1.5, 2.0], dtype=tc.bf16)
    assert (b * 2.0).dtype is tc.bf16 and f64(b * 2.0).tolist() == [3.0, 4.0]
    assert (2.0 * b).dtype is tc.bf16 and (b + 1).dtype is tc.bf16
    assert (tc.ones(2, dtype=tc.f16) * 3).dtype is tc.f16
    i = tc.tensor([1, 2, 3])
    assert (i * 0.5).dtype is tc.f32 and f64(i * 0.5).tolist() == [0.5, 1.0, 1.5]
    assert (i * 2).dtype is tc.int64 and (i * 2).numpy().tolist() == [2, 4, 6]
    assert (i / 2).dtype is tc.f32 and f64(i / 2).tolist() == [0.5, 1.0, 1.5]
    assert (i // 2).numpy().tolist() == [0, 1, 1] and (i % 2).numpy().tolist() == [1, 0, 1]
    flags = tc.tensor([True, False])
    assert (flags + 1).dtype is tc.int64 and (flags + 1).numpy().tolist() == [2, 1]
    assert (flags * 2.5).dtype is tc.f32 and f64(flags * 2.5).tolist() == [2.5, 0.0]


def test_tensor_dtype_promotion():
    ones = {d: tc.ones(2, dtype=d) for d in (tc.f16, tc.bf16, tc.f32, tc.f64, tc.int32, tc.int64, tc.int8)}
    assert (ones[tc.bf16] + ones[tc.f16]).dtype is tc.f32
    assert (ones[tc.f16] * ones[tc.bf16]).dtype is tc.f32
    assert (ones[tc.bf16] + ones[tc.f32]).dtype is tc.f32
    assert (ones[tc.f16] + ones[tc.f32]).dtype is tc.f32
    assert (ones[tc.f32] + ones[tc.f64]).dtype is tc.f64
    assert (ones[tc.int32] + ones[tc.int64]).dtype is tc.int64
    assert (ones[tc.int8] + ones[tc.int32]).dtype is tc.int32
    # integer with float: the float's dtype (PyTorch's rule; NumPy would widen int64 + f32 to f64)
    for fl in (tc.f16, tc.bf16, tc.f32, tc.f64):
        assert (ones[tc.int64] + ones[fl]).dtype is fl
        assert (ones[fl] * ones[tc.int32]).dtype is fl
    assert f64(ones[tc.int64] + ones[tc.bf16]).tolist() == [2.0, 2.0]


def test_fp8_arithmetic_is_refused():
    e4 = tc.tensor(numpy.array([1.0, 2.0], dtype=ml_dtypes.float8_e4m3fn))
    e5 = tc.tensor(numpy.array([1.0, 2.0], dtype=ml_dtypes.float8_e5m2))
    f = tc.ones(2)
    for thunk in [lambda: e4 + e4, lambda: e4 * 2.0, lambda: f + e4, lambda: e4 - f, lambda: e4 @ e4,
                  lambda: e4 + e5, lambda: -e4, lambda: e4.exp(), lambda: e4.sum(), lambda: e4.mean(),
                  lambda: e5.softmax(), lambda: e4.max(), lambda: e4 < f, lambda: abs(e4)]:
        with pytest.raises(DTypeError):
            thunk()


def test_comparisons_and_logical(rng):
    a = numpy.array([1.0, 2.0, 3.0, numpy.nan], dtype=numpy.float32)
    b = numpy.array([3.0, 2.0, 1.0, 0.0], dtype=numpy.float32)
    ta, tb = tc.tensor(a), tc.tensor(b)
    for result, expected in [(ta < tb, a < b), (ta <= tb, a <= b), (ta > tb, a > b), (ta >= tb, a >= b),
                             (ta == tb, a == b), (ta != tb, a != b), (ta > 1.5, a > 1.5), (2 < ta, 2 < a)]:
        assert result.dtype is tc.bool_
        assert result.numpy().tolist() == expected.tolist()
    m = tc.tensor([[1.0], [5.0]]) > tc.tensor([0.0, 2.0, 9.0])  # broadcasting
    assert m.numpy().tolist() == [[True, False, False], [True, True, False]]
    p, q = tc.tensor([True, True, False]), tc.tensor([True, False, False])
    assert (p & q).numpy().tolist() == [True, False, False]
    assert (p | q).numpy().tolist() == [True, True, False]
    assert (p ^ q).numpy().tolist() == [False, True, False]
    assert (~p).numpy().tolist() == [False, False, True]
    with pytest.raises(DTypeError):
        ta & tb
    assert ta.isnan().numpy().tolist() == [False, False, False, True]
    assert ta.isfinite().numpy().tolist() == [True, True, True, False]


def test_unknown_operands_and_shapes_that_do_not_broadcast():
    with pytest.raises(DTypeError):
        tc.ones(2) + "text"
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(4,\)"):
        tc.ones(2, 3) + tc.ones(4)
    with pytest.raises(ShapeError):
        tc.ones(2, 3) * numpy.ones((3, 3))
    with pytest.raises(ShapeError):
        tc.ones(2, 3) < tc.ones(2)
    with pytest.raises(ShapeError):
        tc.tensor([True, False]) & tc.tensor([True, False, True])
    with pytest.raises(ShapeError):
        tc.where(tc.tensor([True, False]), tc.ones(2, 3), 0.0)
    with pytest.raises(ShapeError):
        tc.tensor([[1.0, 2.0], [3.0]])  # ragged


# ------------------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sa,sb", [((5,), (5,)), ((3, 5), (5,)), ((5,), (5, 4)), ((3, 5), (5, 4)),
                                   ((2, 3, 5), (5, 4)), ((5,), (2, 5, 4)), ((2, 1, 3, 5), (6, 5, 4)),
                                   ((2, 3, 5), (2, 5, 4)), ((3, 5), (2, 5, 4))])
def test_matmul_shapes(sa, sb, rng):
    a = rand64(rng, *sa).astype(numpy.float32)
    b = rand64(rng, *sb).astype(numpy.float32)
    expected = numpy.matmul(a.astype(numpy.float64), b.astype(numpy.float64))
    result = tc.tensor(a) @ tc.tensor(b)
    assert result.shape == expected.shape
    close32(result, expected, rtol=1e-5, atol=1e-5)
    close32(tc.matmul(a, tc.tensor(b)), expected, rtol=1e-5, atol=1e-5)
    close32(a @ tc.tensor(b), expected, rtol=1e-5, atol=1e-5)  # ndarray @ Tensor defers to the Tensor


def test_matmul_bf16_and_errors(rng):
    a = rand64(rng, 2, 3, 8).astype(BF16)
    b = rand64(rng, 2, 8, 5).astype(BF16)
    r = tc.tensor(a) @ tc.tensor(b)
    assert r.dtype is tc.bf16
    exact = numpy.matmul(a.astype(numpy.float64), b.astype(numpy.float64))
    numpy.testing.assert_allclose(f64(r), exact, rtol=2 ** -7, atol=2 ** -7 * numpy.abs(exact).max())
    with pytest.raises(ShapeError, match="inner"):
        tc.ones(3, 4) @ tc.ones(5, 2)
    with pytest.raises(ShapeError):
        tc.ones(3) @ tc.ones(4)
    with pytest.raises(ShapeError):
        tc.tensor(2.0) @ tc.ones(2)
    with pytest.raises(ShapeError, match="batch"):  # batch dims that do not broadcast
        tc.ones(2, 3, 4) @ tc.ones(3, 4, 5)


# ------------------------------------------------------------------------------------------------------------
# unary math
# ------------------------------------------------------------------------------------------------------------

UNARY = {
    "exp": (numpy.exp, lambda x: x), "log": (numpy.log, lambda x: numpy.abs(x) + 0.1),
    "sqrt": (numpy.sqrt, lambda x: numpy.abs(x)), "rsqrt": (lambda x: 1 / numpy.sqrt(x), lambda x: numpy.abs(x) + 0.1),
    "sin": (numpy.sin, lambda x: x), "cos": (numpy.cos, lambda x: x), "tanh": (numpy.tanh, lambda x: x),
    "sigmoid": (lambda x: 1 / (1 + numpy.exp(-x)), lambda x: x), "relu": (lambda x: numpy.maximum(x, 0), lambda x: x),
    "abs": (numpy.abs, lambda x: x), "square": (numpy.square, lambda x: x),
    "reciprocal": (lambda x: 1 / x, lambda x: numpy.abs(x) + 0.1),
    "sign": (numpy.sign, lambda x: x), "floor": (numpy.floor, lambda x: 3 * x), "ceil": (numpy.ceil, lambda x: 3 * x),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_f32(name, rng):
    formula, domain = UNARY[name]
    x = domain(rand64(rng, 7, 5)).astype(numpy.float32)
    result = getattr(tc.tensor(x), name)()
    close32(result, formula(x.astype(numpy.float64)), rtol=4e-6, atol=1e-6)
    # the module-level function spelling where one exists
    if hasattr(tc, name):
        close32(getattr(tc, name)(tc.tensor(x)), formula(x.astype(numpy.float64)), rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["exp", "sigmoid", "tanh", "sqrt", "relu"])
def test_unary_bf16_rounds_like_the_exact_value(name, rng):
    formula, domain = UNARY[name]
    x = domain(rand64(rng, 64)).astype(BF16)
    result = getattr(tc.tensor(x), name)()
    assert result.dtype is tc.bf16
    exact = formula(x.astype(numpy.float64))
    # within one bf16 ulp of the exact value (2^-7 relative)
    assert (numpy.abs(f64(result) - exact) <= 2 ** -7 * numpy.abs(exact) + 1e-30).all()


def test_unary_on_integers_gives_f32():
    t = tc.tensor([1, 4, 9])
    assert t.sqrt().dtype is tc.f32 and f64(t.sqrt()).tolist() == [1.0, 2.0, 3.0]
    assert t.exp().dtype is tc.f32
    assert abs(tc.tensor([-3, 2])).numpy().tolist() == [3, 2]


def test_sigmoid_does_not_overflow():
    t = tc.tensor([-1000.0, -80.0, 0.0, 80.0, 1000.0])
    s = f64(t.sigmoid())
    assert numpy.isfinite(s).all()
    numpy.testing.assert_allclose(s, [0.0, 1 / (1 + numpy.exp(80.0)), 0.5, 1.0, 1.0], rtol=1e-6, atol=0)


def test_clamp_maximum_minimum_softmax(rng):
    x = rand64(rng, 4, 6).astype(numpy.float32)
    y = rand64(rng, 6).astype(numpy.float32)
    t = tc.tensor(x)
    x64, y64 = x.astype(numpy.float64), y.astype(numpy.float64)
    close32(t.clamp(-0.5, 0.5), numpy.clip(x64, -0.5, 0.5))
    close32(t.clamp(min=0.1), numpy.maximum(x64, 0.1))
    close32(t.clip(max=0.2), numpy.minimum(x64, 0.2))
    with pytest.raises(TesseraError):
        t.clamp()
    close32(t.maximum(tc.tensor(y)), numpy.maximum(x64, y64))
    close32(t.minimum(tc.tensor(y)), numpy.minimum(x64, y64))
    close32(t.maximum(0.0), numpy.maximum(x64, 0))
    for dim in (0, 1, -1):
        e = numpy.exp(x64 - x64.max(axis=dim, keepdims=True))
        sm = e / e.sum(axis=dim, keepdims=True)
        close32(t.softmax(dim), sm)
        close32(t.log_softmax(dim=dim), numpy.log(sm), atol=4e-6)
    big = tc.tensor([1000.0, 0.0, -1000.0])
    numpy.testing.assert_allclose(f64(big.softmax()), [1.0, 0.0, 0.0])
    assert numpy.isfinite(f64(big.log_softmax())).all()


# ------------------------------------------------------------------------------------------------------------
# reductions
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [None, 0, 1, -1, (0, 2), (-1, -3)])
@pytest.mark.parametrize("keepdim", [False, True])
def test_sum_mean_var_std_logsumexp(dim, keepdim, rng):
    x = rand64(rng, 3, 4, 5).astype(numpy.float32)
    t = tc.tensor(x)
    x64 = x.astype(numpy.float64)
    axis = dim
    close32(t.sum(dim=dim, keepdim=keepdim), x64.sum(axis=axis, keepdims=keepdim), atol=4e-6)
    close32(t.sum(axis=dim, keepdim=keepdim), x64.sum(axis=axis, keepdims=keepdim), atol=4e-6)
    close32(t.mean(dim, keepdim), x64.mean(axis=axis, keepdims=keepdim), atol=2e-6)
    close32(t.var(dim, keepdim), x64.var(axis=axis, keepdims=keepdim, ddof=1), rtol=1e-5)
    close32(t.var(dim, keepdim, unbiased=False), x64.var(axis=axis, keepdims=keepdim), rtol=1e-5)
    close32(t.std(dim, keepdim), x64.std(axis=axis, keepdims=keepdim, ddof=1), rtol=1e-5)
    peak = x64.max(axis=axis, keepdims=True)
    lse = numpy.log(numpy.exp(x64 - peak).sum(axis=axis, keepdims=True)) + peak
    if not keepdim:
        lse = lse.reshape(x64.sum(axis=axis).shape)
    close32(t.logsumexp(dim, keepdim), lse, atol=4e-6)


def test_reduction_results_and_errors():
    t = tc.tensor([[1, 2, 3], [4, 5, 6]])
    assert t.sum().dtype is tc.int64 and t.sum().item() == 21
    assert t.mean().dtype is tc.f32 and t.mean().item() == 3.5
    assert tc.tensor([True, True, False]).sum().item() == 2
    assert tc.ones(2, 3).sum(dtype=tc.f64).dtype is tc.f64
    assert tc.sum(t, dim=1).numpy().tolist() == [6, 15]
    assert t.float().logsumexp(dim=1).shape == (2,)
    with pytest.raises(ShapeError):
        t.sum(dim=2)
    with pytest.raises(ShapeError):
        t.float().mean(dim=-3)
    with pytest.raises(TesseraError):
        t.sum(dim=0, axis=0)
    with pytest.raises(ShapeError):
        tc.ones(0).max()
    # one element and unbiased var: NaN, as NumPy and PyTorch
    assert numpy.isnan(tc.tensor([2.0]).var().item())
    assert tc.tensor([-numpy.inf, -numpy.inf]).logsumexp().item() == -numpy.inf


def test_max_min_argmax(rng):
    x = rng.permutation(60).reshape(3, 4, 5).astype(numpy.float32)  # no ties
    t = tc.tensor(x)
    assert t.max().item() == 59 and t.min().item() == 0 and t.max().shape == ()
    for dim in (0, 1, 2, -1):
        for keepdim in (False, True):
            out = t.max(dim=dim, keepdim=keepdim)
            values, indices = out  # a named tuple
            numpy.testing.assert_array_equal(f64(out.values), x.max(axis=dim, keepdims=keepdim))
            numpy.testing.assert_array_equal(out.indices.numpy(), numpy.argmax(x, axis=dim) if not keepdim
                                             else numpy.expand_dims(numpy.argmax(x, axis=dim), dim))
            assert indices.dtype is tc.int64 and values.dtype is tc.f32
            low = t.min(dim, keepdim)
            numpy.testing.assert_array_equal(f64(low.values), x.min(axis=dim, keepdims=keepdim))
            numpy.testing.assert_array_equal(low.indices.numpy(), numpy.argmin(x, axis=dim) if not keepdim
                                             else numpy.expand_dims(numpy.argmin(x, axis=dim), dim))
        numpy.testing.assert_array_equal(t.argmax(dim).numpy(), numpy.argmax(x, axis=dim))
        numpy.testing.assert_array_equal(t.argmin(dim=dim).numpy(), numpy.argmin(x, axis=dim))
    assert t.argmax().item() == int(numpy.argmax(x)) and t.argmin().item() == int(numpy.argmin(x))
    numpy.testing.assert_array_equal(t.max(axis=1).values.numpy(), x.max(axis=1))
    with pytest.raises(ShapeError):  # indices over two dims at once are not one index
        t.max(dim=(0, 1))
    # elementwise form: max(other)
    numpy.testing.assert_array_equal(f64(t.max(tc.tensor(x[::-1].copy()))), numpy.maximum(x, x[::-1]))


def test_bf16_sum_accumulates_in_f32():
    # 4096 ones: a bf16 accumulator stalls at 256 (256 + 1 rounds back to 256); the result 4096 is exact in bf16
    t = tc.ones(4096, dtype=tc.bf16)
    s = t.sum()
    assert s.dtype is tc.bf16 and s.item() == 4096.0
    assert t.mean().item() == 1.0


# ------------------------------------------------------------------------------------------------------------
# shape ops
# ------------------------------------------------------------------------------------------------------------

def test_reshape_view_flatten(rng):
    x = numpy.arange(24, dtype=numpy.float32)
    t = tc.tensor(x)
    assert t.reshape(2, 3, 4).shape == (2, 3, 4)
    assert t.reshape((4, -1)).shape == (4, 6) and t.view(-1, 12).shape == (2, 12)
    numpy.testing.assert_array_equal(t.reshape(2, -1, 4).numpy(), x.reshape(2, 3, 4))
    for bad in [(5, 5), (-1, -1), (7, -1), (0, -1)]:
        with pytest.raises(ShapeError):
            t.reshape(*bad)
    u = t.reshape(2, 3, 4)
    assert u.flatten().shape == (24,) and u.flatten(1).shape == (2, 12) and u.flatten(0, 1).shape == (6, 4)
    assert tc.tensor(3.0).flatten().shape == (1,)
    assert u.flatten(-2).shape == (2, 12) and u.flatten(0, -2).shape == (6, 4)
    for bad in [(3,), (0, 3), (2, 1), (-4,)]:
        with pytest.raises(ShapeError):
            u.flatten(*bad)
    with pytest.raises(ShapeError):
        t.reshape(-2, -12)  # negative sizes other than -1


def test_transpose_permute_T(rng):
    x = rand64(rng, 2, 3, 4).astype(numpy.float32)
    t = tc.tensor(x)
    numpy.testing.assert_array_equal(t.transpose(0, 2).numpy(), numpy.swapaxes(x, 0, 2))
    numpy.testing.assert_array_equal(t.transpose(-1, -2).numpy(), numpy.swapaxes(x, -1, -2))
    numpy.testing.assert_array_equal(t.permute(2, 0, 1).numpy(), x.transpose(2, 0, 1))
    numpy.testing.assert_array_equal(t.permute((1, 2, 0)).numpy(), x.transpose(1, 2, 0))
    numpy.testing.assert_array_equal(t.permute(-1, 0, 1).numpy(), x.transpose(2, 0, 1))
    m = tc.tensor(x[0])
    numpy.testing.assert_array_equal(m.T.numpy(), x[0].T)
    numpy.testing.assert_array_equal(t.mT.numpy(), numpy.swapaxes(x, -1, -2))
    with pytest.raises(ShapeError):
        t.permute(0, 1)
    with pytest.raises(ShapeError):
        t.permute(0, 0, 1)
    for bad in [(0, 1, 3), (0, 1, -4), (3, 4, 5)]:  # out of range, even where it would wrap onto a permutation
        with pytest.raises(ShapeError):
            t.permute(*bad)
    with pytest.raises(ShapeError):
        t.transpose(0, 3)


def test_unsqueeze_squeeze_expand():
    t = tc.tensor(numpy.arange(6, dtype=numpy.float32).reshape(2, 3))
    assert t.unsqueeze(0).shape == (1, 2, 3) and t.unsqueeze(-1).shape == (2, 3, 1)
    assert t.unsqueeze(1).shape == (2, 1, 3) and t.unsqueeze(-3).shape == (1, 2, 3)
    with pytest.raises(ShapeError):
        t.unsqueeze(4)
    s = tc.zeros(1, 2, 1, 3)
    assert s.squeeze().shape == (2, 3) and s.squeeze(0).shape == (2, 1, 3) and s.squeeze(-2).shape == (1, 2, 3)
    assert s.squeeze(1).shape == (1, 2, 1, 3)  # a dim that is not 1 stays
    col = tc.tensor([[1.0], [2.0]])
    e = col.expand(2, 3)
    assert e.numpy().tolist() == [[1, 1, 1], [2, 2, 2]]
    assert col.expand(4, -1, 5).shape == (4, 2, 5)
    assert col.broadcast_to((3, 2, 2)).shape == (3, 2, 2)
    with pytest.raises(ShapeError):
        col.expand(3, 3)
    with pytest.raises(ShapeError):
        col.expand(2)


def test_chunk_split_cat_stack(rng):
    x = rand64(rng, 7, 4).astype(numpy.float32)
    t = tc.tensor(x)
    pieces = t.chunk(3)  # torch.chunk: pieces of ceil(7/3) = 3
    assert [p.shape for p in pieces] == [(3, 4), (3, 4), (1, 4)]
    numpy.testing.assert_array_equal(numpy.concatenate([p.numpy() for p in pieces]), x)
    assert [p.shape for p in t.chunk(2, dim=1)] == [(7, 2), (7, 2)]
    assert [p.shape for p in t.split(2)] == [(2, 4), (2, 4), (2, 4), (1, 4)]
    parts = t.split([1, 3], dim=-1)
    numpy.testing.assert_array_equal(parts[1].numpy(), x[:, 1:])
    with pytest.raises(ShapeError):
        t.split([1, 2], dim=1)
    with pytest.raises(ShapeError):
        t.chunk(0)
    c = tc.cat([t, t[:2]], dim=0)
    numpy.testing.assert_array_equal(c.numpy(), numpy.concatenate([x, x[:2]]))
    numpy.testing.assert_array_equal(tc.cat([t, t], dim=-1).numpy(), numpy.concatenate([x, x], axis=1))
    with pytest.raises(ShapeError):
        tc.cat([t, t[:, :2]], dim=0)
    with pytest.raises(ShapeError):
        tc.cat([])
    assert tc.cat([tc.ones(2, dtype=tc.bf16), tc.ones(3, dtype=tc.f16)]).dtype is tc.f32
    s = tc.stack([t, t * 2], dim=1)
    numpy.testing.assert_array_equal(f64(s), numpy.stack([x, x * 2], axis=1).astype(numpy.float64))
    assert tc.stack([t, t], dim=-1).shape == (7, 4, 2) and tc.stack([t, t], dim=-3).shape == (2, 7, 4)
    numpy.testing.assert_array_equal(tc.stack([t, t * 0], dim=2).numpy(), numpy.stack([x, x * 0], axis=2))
    with pytest.raises(ShapeError):
        tc.stack([t, t[:3]])
    for bad in (3, -4):
        with pytest.raises(ShapeError):
            tc.stack([t, t], dim=bad)
    # dtype is kept through shape ops, fp8 included
    q = tc.tensor(x.astype(ml_dtypes.float8_e4m3fn))
    assert q.reshape(4, 7).dtype is tc.fp8_e4m3 and q[1:3].dtype is tc.fp8_e4m3 and q.T.dtype is tc.fp8_e4m3
    assert tc.cat([q, q]).dtype is tc.fp8_e4m3
    numpy.testing.assert_array_equal(tc.cat([q, q]).data, numpy.concatenate([q.data, q.data]))


# ------------------------------------------------------------------------------------------------------------
# indexing
# ------------------------------------------------------------------------------------------------------------

KEYS = [1, -1, (0, 2), (-2, -1), slice(1, 3), slice(None, None, -1), (slice(None), 1), (Ellipsis, 2),
        (None, 1), (1, None, Ellipsis), (Ellipsis, None), (slice(0, 3, 2), slice(None), slice(1, None)),
        [0, 2, 2], [-1, 0], ([0, 1], [1, 2]), (slice(None), [3, 0, 3]), (Ellipsis, [4, -5]),
        ([[0, 1], [2, 0]], slice(None), 0), (0, [1, 1, 2], [0, 4, 4])]


@pytest.mark.parametrize("key", KEYS, ids=[repr(k) for k in KEYS])
def test_getitem_matches_numpy(key):
    x = numpy.arange(60, dtype=numpy.float32).reshape(3, 4, 5)
    def np_key(k):
        return tuple(numpy.asarray(p) if isinstance(p, list) else p for p in k) if isinstance(k, tuple) else \
            (numpy.asarray(k) if isinstance(k, list) else k)
    expected = x[np_key(key)]
    result = tc.tensor(x)[key]
    assert result.shape == expected.shape
    numpy.testing.assert_array_equal(result.numpy(), expected)


def test_getitem_with_tensor_and_mask_indices():
    x = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    t = tc.tensor(x)
    numpy.testing.assert_array_equal(t[tc.tensor([2, 0])].numpy(), x[[2, 0]])
    numpy.testing.assert_array_equal(t[t > 6].numpy(), x[x > 6])
    numpy.testing.assert_array_equal(t[tc.tensor([True, False, True])].numpy(), x[[True, False, True]])
    numpy.testing.assert_array_equal(t[:, numpy.array([1, 3])].numpy(), x[:, [1, 3]])
    assert t[tc.tensor(1)].numpy().tolist() == x[1].tolist()  # a 0-d integer tensor
    assert t[[]].shape == x[numpy.array([], dtype=numpy.int64)].shape == (0, 4)
    y = numpy.arange(60, dtype=numpy.float32).reshape(3, 4, 5)
    mask = (y[1] % 3) == 0
    numpy.testing.assert_array_equal(tc.tensor(y)[..., tc.tensor(mask)].numpy(), y[..., mask])  # mask after ...
    numpy.testing.assert_array_equal(tc.tensor(y)[1:, tc.tensor(mask)].numpy(), y[1:, mask])
    numpy.testing.assert_array_equal(tc.tensor(y)[tc.tensor(mask[None].repeat(3, 0)), None].numpy(),
                                     y[mask[None].repeat(3, 0), None])
    with pytest.raises(IndexOutOfRangeError):
        t[tc.tensor([True, False])]  # mask of the wrong length
    with pytest.raises(DTypeError):
        t[tc.tensor([0.0, 1.0])]


@pytest.mark.parametrize("key", [3, -4, (0, 4), (0, -5), [0, 3], [-4], ([0, 1], [0, 4]), (slice(None), [1, 9]),
                                 (Ellipsis, 5), (0, 0, 0), (Ellipsis, [5]), (slice(None),) * 3, (Ellipsis, 0, 0, 0),
                                 (Ellipsis, Ellipsis), (None, 1, Ellipsis, 4), ([[0, 2], [3, 1]],)])
def test_index_out_of_range_raises(key):
    t = tc.tensor(numpy.arange(12, dtype=numpy.float32).reshape(3, 4))
    with pytest.raises(IndexOutOfRangeError):
        t[key]
    with pytest.raises(IndexOutOfRangeError):
        t[key] = 1.0
    assert isinstance(IndexOutOfRangeError("x"), IndexError)


def test_setitem_forms():
    x = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    t = tc.tensor(x)
    x = x.copy()
    t[0] = 100.0
    x[0] = 100.0
    t[:, 1] = tc.tensor([7.0, 8.0, 9.0])
    x[:, 1] = [7.0, 8.0, 9.0]
    t[t > 10] = -1.0
    x[x > 10] = -1.0
    t[[2, 0], -1] = tc.tensor([5.0, 6.0])
    x[[2, 0], -1] = [5.0, 6.0]
    t[1:, 2:] = tc.tensor([[0.5, 0.25]])  # broadcast
    x[1:, 2:] = [[0.5, 0.25]]
    t[..., 0] = 3  # int into float
    x[..., 0] = 3
    numpy.testing.assert_array_equal(t.numpy(), x)
    with pytest.raises(ShapeError):
        t[0] = tc.ones(5)
    with pytest.raises(ShapeError):
        t[[0, 1]] = tc.ones(3, 4)
    i = tc.tensor([1, 2, 3])
    i[0] = 2.7  # float into int: cast to the tensor's dtype
    assert i.dtype is tc.int64 and i.numpy().tolist() == [2, 2, 3]


def test_where_masked_fill_gather_scatter(rng):
    x = rand64(rng, 3, 4).astype(numpy.float32)
    y = rand64(rng, 4).astype(numpy.float32)
    cond = x > 0
    t = tc.tensor(x)
    numpy.testing.assert_array_equal(tc.where(tc.tensor(cond), t, tc.tensor(y)).numpy(), numpy.where(cond, x, y))
    numpy.testing.assert_array_equal(tc.where(t > 0, t, 0.0).numpy(), numpy.where(cond, x, 0))
    numpy.testing.assert_array_equal(tc.where(t > 0, 1.0, t).numpy(), numpy.where(cond, 1, x))
    assert tc.where(t > 0, 1.0, 0.0).dtype is tc.f32
    with pytest.raises(DTypeError):
        tc.where(t, t, t)
    filled = t.masked_fill(t < 0, -numpy.inf)
    numpy.testing.assert_array_equal(filled.numpy(), numpy.where(x < 0, -numpy.inf, x))
    assert filled.dtype is tc.f32
    b = tc.tensor(x.astype(BF16))
    assert b.masked_fill(b < 0, 0.0).dtype is tc.bf16
    index = numpy.array([[0, 3, 3], [1, 1, 0], [2, 0, 1]])
    g = t.gather(1, tc.tensor(index))
    numpy.testing.assert_array_equal(g.numpy(), numpy.take_along_axis(x, index, axis=1))
    index0 = numpy.array([[2, 0, 1, 1]])
    numpy.testing.assert_array_equal(t.gather(0, index0).numpy(), numpy.take_along_axis(x, index0, axis=0))
    with pytest.raises(IndexOutOfRangeError):
        t.gather(1, tc.tensor([[0], [4], [0]]))
    with pytest.raises(ShapeError):
        t.gather(1, tc.tensor([0, 1]))
    # scatter_: out[i][index[i][j]] = src[i][j] along dim 1 (no repeated targets per row)
    s = tc.zeros(3, 5)
    idx = numpy.array([[4, 0], [1, 2], [3, 3 - 3]])
    src = numpy.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=numpy.float32)
    out = s.scatter_(1, tc.tensor(idx), tc.tensor(src))
    expected = numpy.zeros((3, 5))
    for i in range(3):
        for j in range(2):
            expected[i, idx[i, j]] = src[i, j]
    assert out is s
    numpy.testing.assert_array_equal(f64(s), expected)
    s2 = tc.zeros(2, 3).scatter(0, tc.tensor([[1, 0, 1]]), 9.0)
    assert f64(s2).tolist() == [[0, 9, 0], [9, 0, 9]]
    with pytest.raises(IndexOutOfRangeError):
        tc.zeros(2, 3).scatter(0, tc.tensor([[2, 0, 0]]), 1.0)


# ------------------------------------------------------------------------------------------------------------
# casts, conversion, devices, DLPack, repr
# ------------------------------------------------------------------------------------------------------------

def test_casts(rng):
    x = rand64(rng, 50) * 100
    t = tc.tensor(x, dtype=tc.f64)
    for method, dtype, np_dtype in [("float", tc.f32, numpy.float32), ("half", tc.f16, numpy.float16),
                                    ("bfloat16", tc.bf16, BF16), ("double", tc.f64, numpy.float64)]:
        c = getattr(t, method)()
        assert c.dtype is dtype and c.data.dtype == np_dtype
        numpy.testing.assert_array_equal(c.numpy(), x.astype(np_dtype))  # round to nearest even, as NumPy
    assert t.astype("bf16").dtype is tc.bf16 and t.cast(tc.f16).dtype is tc.f16 and t.to(tc.f32).dtype is tc.f32
    assert t.to("bfloat16").dtype is tc.bf16
    assert t.astype(tc.f64) is t
    assert t.long().numpy().tolist() == x.astype(numpy.int64).tolist()
    assert t.int().dtype is tc.int32 and (t > 0).bool().dtype is tc.bool_
    with pytest.raises(DTypeError):
        t.astype("float128")
    with pytest.raises(DTypeError):
        t.astype("nonsense")


def test_numpy_item_tolist():
    t = tc.tensor([[1.5, 2.5]], dtype=tc.bf16)
    assert t.numpy().dtype == BF16
    assert t.tolist() == [[1.5, 2.5]]
    assert numpy.asarray(t).dtype == BF16
    assert numpy.asarray(tc.ones(2), dtype=numpy.float64).dtype == numpy.float64
    with pytest.raises(ShapeError):
        t.item()
    assert int(tc.tensor([3])) == 3 and bool(tc.tensor(True)) is True
    assert len(tc.zeros(4, 2)) == 4 and [r.shape for r in tc.zeros(3, 2)] == [(2,)] * 3
    with pytest.raises(TypeError):
        len(tc.tensor(1.0))
    assert tc.zeros(2, 3).numel() == 6 and tc.zeros(2, 3).size() == (2, 3) and tc.zeros(2, 3).size(1) == 3
    assert tc.zeros(2, 3, dtype=tc.bf16).size_bytes == 12
    assert list(range(5))[tc.tensor(2)] == 2
    with pytest.raises(DTypeError):
        list(range(5))[tc.tensor(2.0)]


@pytest.mark.skipif(tc.cuda_available(), reason="checks the errors of a machine without a GPU")
def test_to_cuda_without_gpu_is_a_device_error():
    t = tc.ones(2)
    for thunk in [lambda: t.to("cuda"), lambda: t.cuda(), lambda: t.to("cuda:0"), lambda: tc.ones(2, device="cuda"),
                  lambda: tc.tensor([1.0], device="cuda"), lambda: tc.randn(2, device="cuda")]:
        with pytest.raises(DeviceError, match="cuda"):
            thunk()
    assert t.to("cpu") is t and t.cpu() is t
    with pytest.raises(TesseraError, match="tpu"):  # neither a device nor a dtype
        t.to("tpu")


def test_dlpack_round_trip_with_numpy():
    t = tc.tensor(numpy.arange(6, dtype=numpy.float32).reshape(2, 3))
    a = numpy.from_dlpack(t)
    assert a.dtype == numpy.float32 and a.shape == (2, 3)
    assert numpy.shares_memory(a, t.data)  # zero-copy out
    back = tc.Tensor(numpy.from_dlpack(a))
    assert back.dtype is tc.f32 and numpy.shares_memory(back.data, t.data)  # zero-copy in
    back.data[0, 0] = 42
    assert t.numpy()[0, 0] == 42
    assert t.__dlpack_device__()[0] == 1  # kDLCPU
    with pytest.raises(AttributeError):
        t.__cuda_array_interface__


def test_repr_is_readable():
    t = tc.tensor([[1.0, 2.5], [-3.0, 4.0]], requires_grad=True)
    r = repr(t)
    assert r.startswith("tensor(") and "2.5" in r and "-3." in r
    assert "dtype=f32" in r and "device='cpu'" in r and "requires_grad=True" in r
    b = repr(tc.tensor([0.5, 1.5], dtype=tc.bf16))
    assert "0.5" in b and "1.5" in b and "dtype=bf16" in b and "requires_grad" not in b
    q = repr(tc.tensor(numpy.array([2.0, -0.5], dtype=ml_dtypes.float8_e5m2)))
    assert "2." in q and "-0.5" in q and "fp8_e5m2" in q
    long = repr(tc.zeros(10000))
    assert "..." in long and len(long) < 300  # summarized, not 10,000 numbers


def test_from_dlpack_shares_memory_with_numpy():
    source = numpy.arange(6, dtype=numpy.float32).reshape(2, 3)
    t = tc.from_dlpack(source)
    source[0, 0] = 42.0
    assert t.shape == (2, 3) and t.dtype is tc.f32 and t.numpy()[0, 0] == 42.0
