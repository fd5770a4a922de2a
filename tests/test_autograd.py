"""The tape: every differentiable Tensor method against central finite differences in float64
(tessera_cp.testing.gradcheck), accumulation, grad modes, errors, deep graphs. Hand-written expectations are
derivatives worked out on paper and evaluated with NumPy."""
import threading
import time

import numpy
import pytest

import tessera_cp as tc
from tessera_cp.errors import DTypeError, ShapeError, TesseraError
from tessera_cp.testing import gradcheck


def leaf(rng, *shape, low=None, away_from=None):
    """An f64 CPU leaf with standard normal values; ``low`` shifts |x| above it, ``away_from`` keeps values at
    least 0.05 from each listed kink so finite differences never straddle one."""
    x = rng.standard_normal(shape)
    if low is not None:
        x = numpy.abs(x) + low
    for k in away_from or ():
        near = numpy.abs(x - k) < 0.05
        x[near] += 0.1 * numpy.sign(x[near] - k + 1e-12)
    return tc.tensor(x, dtype=tc.f64, requires_grad=True)


def distinct(rng, *shape):
    """An f64 leaf with well separated values (no ties for max/min; gaps far wider than the FD step)."""
    n = int(numpy.prod(shape))
    return tc.tensor(rng.permutation(n).reshape(shape) * 0.1 + 0.01, dtype=tc.f64, requires_grad=True)


# ------------------------------------------------------------------------------------------------------------
# elementwise
# ------------------------------------------------------------------------------------------------------------

BINARY_SHAPES = [((3, 4), (3, 4)), ((3, 1), (4,)), ((2, 3, 4), (1, 4)), ((4,), (2, 3, 4)), ((), (3,)), ((1, 1), (2, 3))]


@pytest.mark.parametrize("sa,sb", BINARY_SHAPES)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow", "maximum", "minimum"])
def test_binary_with_broadcasting(op, sa, sb, rng):
    if op == "pow":
        a, b = leaf(rng, *sa, low=0.3), leaf(rng, *sb)
    elif op == "div":
        a, b = leaf(rng, *sa), leaf(rng, *sb, low=0.5)
    elif op in ("maximum", "minimum"):  # no ties and no near-ties between the operands
        a = distinct(rng, *sa)
        b = tc.tensor(rng.permutation(int(numpy.prod(sb))).reshape(sb) * 0.1 + 0.06, dtype=tc.f64,
                      requires_grad=True)
    else:
        a, b = leaf(rng, *sa), leaf(rng, *sb)
    fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
          "div": lambda x, y: x / y, "pow": lambda x, y: x ** y, "maximum": lambda x, y: x.maximum(y),
          "minimum": lambda x, y: x.minimum(y)}[op]
    assert gradcheck(fn, [a, b])
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("fn", [lambda x: x + 2.5, lambda x: 2.5 + x, lambda x: x - 1, lambda x: 1 - x,
                                lambda x: 3 * x, lambda x: x * 3, lambda x: x / 4, lambda x: 2 / x,
                                lambda x: x ** 3, lambda x: x ** 0.5, lambda x: 2.0 ** x, lambda x: -x,
                                lambda x: x.square(), lambda x: x.reciprocal()],
                         ids=["add", "radd", "sub", "rsub", "rmul", "mul", "div", "rdiv", "pow3", "pow_half",
                              "rpow", "neg", "square", "reciprocal"])
def test_scalar_operands(fn, rng):
    assert gradcheck(fn, [leaf(rng, 3, 4, low=0.5)])


def test_tensor_constant_operand_gets_no_grad(rng):
    x = leaf(rng, 3)
    c = tc.tensor(rng.standard_normal(3), dtype=tc.f64)
    (x * c).sum().backward()
    assert c.grad is None
    numpy.testing.assert_array_equal(x.grad.numpy(), c.numpy())
    # a constant tensor exponent: only the base gets a gradient
    y = leaf(rng, 3, low=0.5)
    assert gradcheck(lambda a: a ** tc.tensor([2.0, 0.5, 3.0], dtype=tc.f64), [y])


UNARY = {
    "exp": {}, "log": {"low": 0.2}, "sqrt": {"low": 0.2}, "rsqrt": {"low": 0.2}, "sin": {}, "cos": {},
    "tanh": {}, "sigmoid": {}, "relu": {"away_from": [0.0]}, "abs": {"away_from": [0.0]},
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, rng):
    x = leaf(rng, 4, 5, **UNARY[name])
    assert gradcheck(lambda a: getattr(a, name)(), [x])
    if hasattr(tc, name):
        assert gradcheck(lambda a: getattr(tc, name)(a), [x])


def test_relu_and_abs_derivatives_by_hand():
    x = tc.tensor([-2.0, -0.5, 0.5, 3.0], dtype=tc.f64, requires_grad=True)
    x.relu().sum().backward()
    assert x.grad.numpy().tolist() == [0, 0, 1, 1]
    x.grad = None
    abs(x).sum().backward()
    assert x.grad.numpy().tolist() == [-1, -1, 1, 1]


@pytest.mark.parametrize("lo,hi", [(-0.5, 0.5), (None, 0.3), (-0.2, None)])
def test_clamp(lo, hi, rng):
    x = leaf(rng, 5, 4, away_from=[v for v in (lo, hi) if v is not None])
    assert gradcheck(lambda a: a.clamp(lo, hi), [x])
    assert gradcheck(lambda a: tc.clamp(a, min=lo, max=hi), [x])


def test_where_and_masked_fill(rng):
    cond = tc.tensor(rng.standard_normal((3, 4)) > 0)
    a, b = leaf(rng, 3, 4), leaf(rng, 4)
    assert gradcheck(lambda x, y: tc.where(cond, x, y), [a, b])
    assert gradcheck(lambda x: tc.where(cond, x, 0.0), [a])
    assert gradcheck(lambda x: tc.where(cond, 1.5, x), [a])
    assert gradcheck(lambda x: x.masked_fill(cond, -3.0), [a])
    x = tc.tensor([1.0, 2.0, 3.0], dtype=tc.f64, requires_grad=True)
    x.masked_fill(tc.tensor([True, False, True]), 0.0).sum().backward()
    assert x.grad.numpy().tolist() == [0, 1, 0]


# ------------------------------------------------------------------------------------------------------------
# reductions and softmax
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [None, 0, -1, (0, 2)])
@pytest.mark.parametrize("keepdim", [False, True])
def test_reductions(dim, keepdim, rng):
    x = leaf(rng, 3, 2, 4)
    assert gradcheck(lambda a: a.sum(dim, keepdim), [x])
    assert gradcheck(lambda a: a.mean(dim=dim, keepdim=keepdim), [x])
    assert gradcheck(lambda a: a.var(dim, keepdim), [x])
    assert gradcheck(lambda a: a.var(dim, keepdim, correction=0), [x])
    assert gradcheck(lambda a: a.std(dim, keepdim), [x])
    assert gradcheck(lambda a: a.logsumexp(dim, keepdim), [x])
    assert gradcheck(lambda a: a.sum(axis=dim, keepdim=keepdim), [x])


def test_max_min_without_ties(rng):
    x = distinct(rng, 3, 4, 2)
    assert gradcheck(lambda a: a.max(), [x])
    assert gradcheck(lambda a: a.min(), [x])
    for dim in (0, 1, -1):
        for keepdim in (False, True):
            assert gradcheck(lambda a: a.max(dim, keepdim).values, [x])
            assert gradcheck(lambda a: a.min(dim=dim, keepdim=keepdim).values, [x])
    # the gradient lands exactly on the winner
    y = tc.tensor([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]], dtype=tc.f64, requires_grad=True)
    y.max(dim=1).values.sum().backward()
    assert y.grad.numpy().tolist() == [[0, 1, 0], [1, 0, 0]]


def test_max_ties_split_the_gradient():
    y = tc.tensor([2.0, 2.0, 1.0, 2.0], dtype=tc.f64, requires_grad=True)
    y.max().backward()
    numpy.testing.assert_allclose(y.grad.numpy(), [1 / 3, 1 / 3, 0, 1 / 3], rtol=1e-15)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_log_softmax(dim, rng):
    x = leaf(rng, 3, 5)
    assert gradcheck(lambda a: a.softmax(dim), [x])
    assert gradcheck(lambda a: a.log_softmax(dim=dim), [x])
    assert gradcheck(lambda a: tc.softmax(a, dim), [x])


def test_softmax_gradient_by_hand(rng):
    # d/dx sum(w * softmax(x)) = p * (w - sum(w p)), evaluated independently
    x0, w = rng.standard_normal(6), rng.standard_normal(6)
    x = tc.tensor(x0, dtype=tc.f64, requires_grad=True)
    (x.softmax() * tc.tensor(w, dtype=tc.f64)).sum().backward()
    p = numpy.exp(x0) / numpy.exp(x0).sum()
    numpy.testing.assert_allclose(x.grad.numpy(), p * (w - (w * p).sum()), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sa,sb", [((4,), (4,)), ((3, 4), (4,)), ((4,), (4, 2)), ((3, 4), (4, 2)),
                                   ((2, 3, 4), (4, 2)), ((4,), (2, 4, 3)), ((2, 3, 4), (2, 4, 2)),
                                   ((2, 1, 3, 4), (3, 4, 2)), ((3, 4), (2, 4, 2)), ((2, 3, 4), (4,))])
def test_matmul(sa, sb, rng):
    a, b = leaf(rng, *sa), leaf(rng, *sb)
    assert gradcheck(lambda x, y: x @ y, [a, b])
    assert gradcheck(lambda x, y: tc.matmul(x, y), [a, b])


# ------------------------------------------------------------------------------------------------------------
# shape ops
# ------------------------------------------------------------------------------------------------------------

SHAPE_OPS = {
    "reshape": lambda a: a.reshape(4, -1), "view": lambda a: a.view(-1), "flatten": lambda a: a.flatten(1),
    "permute": lambda a: a.permute(2, 0, 1), "transpose": lambda a: a.transpose(0, 2), "T": lambda a: a.T,
    "mT": lambda a: a.mT, "unsqueeze": lambda a: a.unsqueeze(1), "squeeze": lambda a: a.unsqueeze(0).squeeze(0),
    "expand": lambda a: a[:, :1].expand(5, 2, 4, 3), "broadcast_to": lambda a: a.broadcast_to((2, 2, 4, 3)),
    "clone": lambda a: a.clone() * 2, "contiguous": lambda a: a.transpose(0, 1).contiguous(),
    "chunk": lambda a: a.chunk(3, dim=2)[1] * 3 + a.chunk(3, dim=2)[0],
    "split": lambda a: a.split([1, 3], dim=1)[1].sum(1) + a.split(1, dim=1)[0].squeeze(1),
    "cat": lambda a: tc.cat([a, a * 2, a[:, :1]], dim=1), "stack": lambda a: tc.stack([a, a.exp()], dim=-1),
    "to_cpu": lambda a: a.to("cpu") * 2,
}


@pytest.mark.parametrize("name", sorted(SHAPE_OPS))
def test_shape_ops(name, rng):
    assert gradcheck(SHAPE_OPS[name], [leaf(rng, 2, 4, 3)])


def test_cat_and_stack_of_several_leaves(rng):
    a, b, c = leaf(rng, 2, 3), leaf(rng, 1, 3), leaf(rng, 4, 3)
    assert gradcheck(lambda x, y, z: tc.cat([x, y, z]), [a, b, c])
    d, e = leaf(rng, 2, 3), leaf(rng, 2, 3)
    assert gradcheck(lambda x, y: tc.stack([x, y], dim=1), [d, e])


# ------------------------------------------------------------------------------------------------------------
# indexing
# ------------------------------------------------------------------------------------------------------------

GETITEM_KEYS = [1, -1, (slice(1, 3), 0), (Ellipsis, 1), (None, slice(None, None, -1)), (0, slice(0, 3, 2), None),
                [0, 2, 0, 0], ([1, 1], [2, 2]), (slice(None), [3, 0, 3]), (Ellipsis, [1, 1]),
                ([[0, 1], [1, 1]], slice(1, 3))]


@pytest.mark.parametrize("key", GETITEM_KEYS, ids=[repr(k) for k in GETITEM_KEYS])
def test_getitem(key, rng):
    assert gradcheck(lambda a: a[key], [leaf(rng, 3, 4, 2)])


def test_getitem_bool_mask_and_repeated_indices(rng):
    mask = tc.tensor(rng.standard_normal((3, 4)) > 0)
    x = leaf(rng, 3, 4)
    assert gradcheck(lambda a: a[mask], [x])
    y = tc.tensor([1.0, 2.0, 3.0], dtype=tc.f64, requires_grad=True)
    y[tc.tensor([0, 0, 2, 0])].sum().backward()
    assert y.grad.numpy().tolist() == [3, 0, 1]  # repeated indices accumulate


@pytest.mark.parametrize("key", [1, (slice(None), 0), (slice(0, 2), slice(1, 3)), [2, 0], (Ellipsis, [1, 3])],
                         ids=repr)
def test_setitem_on_non_leaf(key, rng):
    def fn(a, v):
        y = a * 1.5  # a non-leaf
        y[key] = v
        return y * y
    x = leaf(rng, 3, 4)
    value_shape = tc.zeros(3, 4)[key].shape
    assert gradcheck(fn, [x, leaf(rng, *value_shape)])
    # a broadcast value: its gradient is summed over the broadcast dims
    if len(value_shape) >= 1:
        assert gradcheck(fn, [x, leaf(rng, value_shape[-1])])


def test_setitem_value_with_grad_into_plain_tensor(rng):
    v = leaf(rng, 2)
    buf = tc.zeros(3, dtype=tc.f64)
    buf[1:] = v
    assert buf.requires_grad
    (buf * tc.tensor([5.0, 6.0, 7.0], dtype=tc.f64)).sum().backward()
    assert v.grad.numpy().tolist() == [6, 7]


def test_setitem_keeps_the_graph_of_the_old_value(rng):
    x = leaf(rng, 4)
    y = x.exp()
    y[0] = 0.0
    y.sum().backward()
    expected = numpy.exp(x.numpy())
    expected[0] = 0
    numpy.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-15)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gather(dim, rng):
    x = leaf(rng, 3, 4)
    n = x.shape[dim]
    index = tc.tensor(rng.integers(-n, n, size=(3, 4)))  # repeats and negative indices
    assert gradcheck(lambda a: a.gather(dim, index), [x])
    assert gradcheck(lambda a: tc.gather(a, dim, index), [x])


def test_gather_repeated_accumulates():
    x = tc.tensor([[1.0, 2.0, 3.0]], dtype=tc.f64, requires_grad=True)
    x.gather(1, tc.tensor([[2, 2, 0, 2]])).sum().backward()
    assert x.grad.numpy().tolist() == [[1, 0, 3]]


def test_scatter(rng):
    x = leaf(rng, 3, 5)
    src = leaf(rng, 3, 3)
    index = tc.tensor(numpy.stack([rng.permutation(5)[:2] for _ in range(3)]))  # distinct targets per row
    assert gradcheck(lambda a, s: a.scatter(1, index, s), [x, src])
    assert gradcheck(lambda a: a.scatter(1, index, 2.0), [x])

    def in_place(a, s):
        y = a * 1.0
        y.scatter_(1, index, s)
        return y
    assert gradcheck(in_place, [x, src])


# ------------------------------------------------------------------------------------------------------------
# casts
# ------------------------------------------------------------------------------------------------------------

def test_cast_gradients_come_back_in_the_source_dtype(rng):
    x = tc.tensor(rng.standard_normal(4), dtype=tc.f64, requires_grad=True)
    w = rng.standard_normal(4).astype(numpy.float32)
    (x.float() * tc.tensor(w)).sum().backward()
    assert x.grad.dtype is tc.f64
    numpy.testing.assert_array_equal(x.grad.numpy(), w.astype(numpy.float64))
    b = tc.tensor([1.0, 2.0], dtype=tc.bf16, requires_grad=True)
    (b.float() * 3.0).sum().backward()
    assert b.grad.dtype is tc.bf16 and b.grad.numpy().astype(numpy.float64).tolist() == [3.0, 3.0]
    h = tc.tensor([1.0, 2.0], dtype=tc.f32, requires_grad=True)
    (h.half().double() * tc.tensor([0.5, 0.25], dtype=tc.f64)).sum().backward()
    assert h.grad.dtype is tc.f32 and h.grad.numpy().tolist() == [0.5, 0.25]
    assert gradcheck(lambda a: a.astype(tc.f64) * 2, [leaf(rng, 3)])


def test_integer_results_do_not_require_grad(rng):
    x = leaf(rng, 5)
    assert not x.argmax().requires_grad and not (x > 0).requires_grad
    assert not x.max(dim=0).indices.requires_grad
    assert not x.long().requires_grad


# ------------------------------------------------------------------------------------------------------------
# the tape itself
# ------------------------------------------------------------------------------------------------------------

def test_diamond_graph(rng):
    # a value used by two consumers of different depth: each path's gradient must arrive before it propagates
    x0 = 0.37
    x = tc.tensor([x0], dtype=tc.f64, requires_grad=True)
    y = x * 2
    (y + y.exp()).sum().backward()
    assert x.grad.numpy()[0] == pytest.approx(2 + 2 * numpy.exp(2 * x0), rel=1e-14)
    assert gradcheck(lambda a: (a * 2).exp() + a * 2 + ((a * 2).sin() * (a * 2)), [leaf(rng, 3)])

    def shared(a):
        b = a.tanh()
        c = b * b
        return c + b.exp() * c.sin() + b
    assert gradcheck(shared, [leaf(rng, 4)])


def test_gradients_accumulate_over_two_backward_calls(rng):
    x0 = rng.standard_normal(3)
    x = tc.tensor(x0, dtype=tc.f64, requires_grad=True)
    (x * x).sum().backward()
    first = x.grad.numpy().copy()
    numpy.testing.assert_allclose(first, 2 * x0, rtol=1e-15)
    (x * 3).sum().backward()
    numpy.testing.assert_allclose(x.grad.numpy(), 2 * x0 + 3, rtol=1e-15)
    # the same graph twice
    x.zero_grad()
    out = (x.sin() * 2).sum()
    out.backward()
    out.backward()
    numpy.testing.assert_allclose(x.grad.numpy(), 4 * numpy.cos(x0), rtol=1e-14)
    # a leaf used twice in one expression
    z = tc.tensor([3.0], dtype=tc.f64, requires_grad=True)
    (z * z * z).sum().backward()
    assert z.grad.numpy().tolist() == [27.0]


def test_backward_with_explicit_gradient(rng):
    x0 = rng.standard_normal((2, 3))
    x = tc.tensor(x0, dtype=tc.f64, requires_grad=True)
    g = rng.standard_normal((2, 3))
    (x * x).backward(tc.tensor(g, dtype=tc.f64))
    numpy.testing.assert_allclose(x.grad.numpy(), 2 * x0 * g, rtol=1e-15)
    with pytest.raises(ShapeError):
        (x * x).backward(tc.zeros(3, dtype=tc.f64))


def test_backward_errors():
    x = tc.ones(2, 3, requires_grad=True)
    with pytest.raises(ShapeError):
        (x * 2).backward()  # non-scalar without a gradient
    with pytest.raises(TesseraError):
        tc.ones(3).sum().backward()  # no graph
    with tc.no_grad():
        y = (x * 2).sum()
    with pytest.raises(TesseraError):
        y.backward()
    # a scalar leaf: backward seeds its own gradient
    s = tc.tensor(2.0, requires_grad=True)
    s.backward()
    assert s.grad.item() == 1.0


def test_no_grad_and_enable_grad():
    x = tc.ones(2, requires_grad=True)
    assert tc.is_grad_enabled()
    with tc.no_grad():
        assert not tc.is_grad_enabled()
        y = x * 2
        with tc.enable_grad():
            assert tc.is_grad_enabled()
            z = x * 2
            with tc.no_grad():
                w = x * 2
            assert tc.is_grad_enabled()
        assert not tc.is_grad_enabled()
    assert tc.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    assert z.requires_grad and not z.is_leaf
    assert not w.requires_grad

    @tc.no_grad()
    def frozen(a):
        assert not tc.is_grad_enabled()
        return a * 3

    @tc.enable_grad()
    def live(a):
        return a * 3

    assert not frozen(x).requires_grad and tc.is_grad_enabled()
    with tc.no_grad():
        assert live(x).requires_grad
        assert not tc.is_grad_enabled()
    # an exception inside restores the mode
    with pytest.raises(RuntimeError):
        with tc.no_grad():
            raise RuntimeError("boom")
    assert tc.is_grad_enabled()


def test_grad_mode_is_per_thread():
    seen = {}
    barrier = threading.Barrier(2)

    def worker():
        barrier.wait()  # the main thread is inside no_grad now
        seen["worker"] = tc.is_grad_enabled()
        barrier.wait()

    t = threading.Thread(target=worker)
    t.start()
    with tc.no_grad():
        barrier.wait()
        barrier.wait()
    t.join()
    assert seen["worker"] is True


def test_detach(rng):
    x = leaf(rng, 3)
    y = x * 2
    d = y.detach()
    assert not d.requires_grad and d.is_leaf and numpy.shares_memory(d.data, y.data)
    (y.sum() + (d * 5).sum()).backward()
    assert x.grad.numpy().tolist() == [2, 2, 2]


def test_requires_grad_flags():
    with pytest.raises(DTypeError):
        tc.tensor([1, 2]).requires_grad_()
    with pytest.raises(DTypeError):
        tc.tensor([1, 2], requires_grad=True)
    x = tc.ones(2)
    assert x.requires_grad_() is x and x.requires_grad
    assert not x.requires_grad_(False).requires_grad


def test_leaf_in_place_assignment_is_refused():
    x = tc.ones(3, requires_grad=True)
    with pytest.raises(TesseraError):
        x[0] = 5.0
    with pytest.raises(TesseraError):
        x.scatter_(0, tc.tensor([1]), 2.0)
    assert x.numpy().tolist() == [1, 1, 1]  # untouched
    with tc.no_grad():  # allowed where nothing is recorded (parameter updates)
        x[0] = 5.0
    assert x.numpy().tolist() == [5, 1, 1] and x.is_leaf and x.requires_grad


def test_ten_thousand_op_chain_is_fast_and_exact():
    x = tc.tensor([0.5], dtype=tc.f64, requires_grad=True)
    y = x
    start = time.perf_counter()
    for i in range(5000):
        y = y * 1.0001
        y = y + 0.001
    y.sum().backward()
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"10,000 ops forward + backward took {elapsed:.2f} s"
    numpy.testing.assert_allclose(x.grad.numpy(), [1.0001 ** 5000], rtol=1e-12)


def test_ten_thousand_consumers_of_one_node():
    x = tc.tensor([1.5, -0.5], dtype=tc.f64, requires_grad=True)
    h = x * 1.0  # a non-leaf read by every term
    start = time.perf_counter()
    total = h * 0.0
    for i in range(5000):
        total = total + h * float(i)
    total.sum().backward()
    assert time.perf_counter() - start < 3.0
    assert x.grad.numpy().tolist() == [sum(range(5000))] * 2  # integers: exact in f64


def test_deep_chain_of_unary_ops_no_recursion_error(rng):
    x = tc.tensor(rng.standard_normal(4), dtype=tc.f64, requires_grad=True)
    y = x
    for _ in range(10000):
        y = y.sin()
    y.sum().backward()
    # the derivative of sin^(n) by the chain rule, evaluated step by step in NumPy
    v, d = x.numpy().copy(), numpy.ones(4)
    for _ in range(10000):
        d *= numpy.cos(v)
        v = numpy.sin(v)
    numpy.testing.assert_allclose(x.grad.numpy(), d, rtol=1e-10)


def test_custom_function():
    class Cube(tc.Function):
        def forward(self, a):
            self.save(a)
            return a ** 3

        def backward(self, g):
            (a,) = self.saved
            return (3 * a * a * g,)

    x = tc.tensor([1.0, -2.0], dtype=tc.f64, requires_grad=True)
    assert gradcheck(lambda a: Cube.apply(a) * 2, [x])


def test_gradcheck_catches_a_wrong_backward():
    class WrongSquare(tc.Function):
        def forward(self, a):
            self.save(a)
            return a * a

        def backward(self, g):
            return (g * self.saved[0],)  # should be 2 * a * g

    x = tc.tensor([1.0, -2.0, 0.5], dtype=tc.f64, requires_grad=True)
    with pytest.raises(AssertionError, match="input 0"):
        gradcheck(lambda a: WrongSquare.apply(a), [x])
    with pytest.raises(TesseraError):
        gradcheck(lambda a: a * 2, [tc.tensor([1.0], requires_grad=True)])  # f32 inputs are refused


def test_setitem_shape_errors_on_the_graph_path(rng):
    y = leaf(rng, 2, 3) * 1.0
    with pytest.raises(ShapeError):
        y[0] = leaf(rng, 4)


def test_grad_mode_decorators_are_reentrant_and_thread_safe():
    @tc.no_grad()
    def frozen(n):
        assert not tc.is_grad_enabled()
        if n:
            frozen(n - 1)
        assert not tc.is_grad_enabled()

    frozen(3)
    assert tc.is_grad_enabled()  # the outer call restores what was there before it

    @tc.enable_grad()
    def live(n):
        assert tc.is_grad_enabled()
        if n:
            with tc.no_grad():
                live(n - 1)

    with tc.no_grad():
        live(3)
        assert not tc.is_grad_enabled()
    assert tc.is_grad_enabled()

    # one decorated function entered by two threads at once, each from its own grad mode: the first enters, the
    # second enters, the first leaves, the second leaves
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    after = {}

    @tc.no_grad()
    def meet(role):
        if role == "a":
            a_in.set()
            assert b_in.wait(timeout=30)
        else:
            b_in.set()
            assert a_out.wait(timeout=30)

    def thread_a():
        with tc.enable_grad():
            meet("a")
            a_out.set()
            after["a"] = tc.is_grad_enabled()

    def thread_b():
        with tc.no_grad():
            assert a_in.wait(timeout=30)
            meet("b")
            after["b"] = tc.is_grad_enabled()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert after == {"a": True, "b": False}


def test_backward_refuses_a_saved_input_modified_in_place():
    w = tc.tensor([1.0, 2.0, 3.0], requires_grad=True)
    c = tc.tensor([4.0, 5.0, 6.0])
    out = (w * c).sum()          # Mul saves c for w's gradient
    c[0] = 100.0                 # the array backward would read has changed
    with pytest.raises(TesseraError, match="modified in place"):
        out.backward()


def test_in_place_write_into_an_unsaved_input_is_fine():
    w = tc.tensor([1.0, 2.0], requires_grad=True)
    c = tc.tensor([4.0, 5.0])
    out = (w + c).sum()          # Add saves nothing
    c[0] = 100.0
    out.backward()
    numpy.testing.assert_array_equal(w.grad.numpy(), [1.0, 1.0])


def test_in_place_write_into_a_checkpointed_input_is_refused():
    w = tc.tensor([1.0, 2.0], requires_grad=True)
    c = tc.tensor([4.0, 5.0])
    with tc.checkpoint_region():  # the region keeps its inputs to recompute from
        out = (w + c).exp().sum()
    c[1] = -1.0
    with pytest.raises(TesseraError, match="modified in place"):
        out.backward()
