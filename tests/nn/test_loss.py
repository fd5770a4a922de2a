"""Losses (tessera_cp/nn/loss.py, tessera_cp/cuda/loss.cu).

CPU: every loss against a float64 formula written here from its definition, gradients against the formula and by
finite differences (gradcheck), the edge cases the issue names (all ignored, out-of-range targets, extreme logits,
rows without a positive), the fused linear cross-entropy against the unfused path and its memory, and the kernel
path's host code run through an emulator of loss.cu's documented semantics (argument types checked against the
kernels' signatures). GPU (`-m gpu`): each kernel against float64 with the low-precision rule, NaN-poisoned outputs,
odd sizes, extreme logits, all-ignored batches and a row index past 2^31 elements.
"""
import re
import tracemalloc
import types

import numpy
import pytest

import tessera_cp as tc
from tessera_cp import backend, dtypes
from tessera_cp.cuda import SOURCE_DIR
from tessera_cp.errors import DTypeError, IndexOutOfRangeError, ShapeError, TesseraError
from tessera_cp.nn import loss as L
from tessera_cp.testing import assert_low_precision_close, gradcheck


# ------------------------------------------------------------------------------------------------- float64 formulas
def ce64(logits, targets, ignore=-100, eps=0.0):
    """Per-row cross-entropy against the smoothed target distribution q, its gradient (upstream 1), the kept mask."""
    x = numpy.asarray(logits, dtype=numpy.float64)
    x = x.reshape(-1, x.shape[-1])
    t = numpy.asarray(targets).reshape(-1)
    v = x.shape[1]
    keep = t != ignore
    q = numpy.full(x.shape, eps / v)
    q[numpy.flatnonzero(keep), t[keep]] += 1 - eps
    peak = x.max(axis=1, keepdims=True)
    logp = x - peak - numpy.log(numpy.exp(x - peak).sum(axis=1, keepdims=True))
    rows = numpy.where(keep, -(q * logp).sum(axis=1), 0.0)
    grad = (numpy.exp(logp) - q) * keep[:, None]
    return rows, grad, keep


def reduce64(rows, keep, reduction, shape):
    if reduction == "none":
        return rows.reshape(shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum() if keep.any() else 0.0


def grad_factor(keep, reduction):
    return 1.0 / keep.sum() if reduction == "mean" and keep.any() else 1.0


def as64(t):
    return numpy.asarray(t.numpy(), dtype=numpy.float64)


def random_targets(rng, shape, v, ignore_fraction=0.25, ignore=-100):
    t = rng.integers(0, v, size=shape)
    t[rng.random(shape) < ignore_fraction] = ignore
    return t


# ------------------------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_cross_entropy_loss_and_gradient_match_the_definition(rng, reduction, eps, dtype):
    x = rng.standard_normal((3, 5, 11)) * 3
    t = random_targets(rng, (3, 5), 11)
    logits = tc.tensor(x, dtype=dtype, requires_grad=True)
    loss = L.stable_cross_entropy(logits, t, label_smoothing=eps, reduction=reduction)
    rows, grad, keep = ce64(as64(logits.detach()), t, eps=eps)
    tol = 1e-12 if dtype == "f64" else 2e-6
    assert loss.dtype is dtypes.as_dtype(dtype)
    numpy.testing.assert_allclose(as64(loss), reduce64(rows, keep, reduction, (3, 5)), rtol=tol, atol=tol)
    upstream = rng.standard_normal((3, 5)) if reduction == "none" else 1.0
    loss.backward(tc.tensor(upstream, dtype=dtype) if reduction == "none" else None)
    scale = numpy.reshape(upstream, (-1, 1)) * grad_factor(keep, reduction)
    numpy.testing.assert_allclose(as64(logits.grad), (grad * scale).reshape(x.shape), rtol=tol, atol=tol)


def test_cross_entropy_of_uniform_logits_is_log_v_for_any_smoothing():
    for eps in (0.0, 0.3, 1.0):
        loss = L.stable_cross_entropy(tc.zeros(4, 7, dtype="f64"), [0, 3, 6, 2], label_smoothing=eps)
        assert abs(loss.item() - numpy.log(7)) < 1e-14


def test_label_smoothing_is_pytorchs_definition():
    # (1 - eps) * nll + eps * mean_j(-log p_j): worked by hand for logits [0, ln 2] (p = [1/3, 2/3]) and target 1.
    x = tc.tensor([[0.0, numpy.log(2.0)]], dtype="f64")
    eps = 0.2
    expected = (1 - eps) * -numpy.log(2 / 3) + eps * 0.5 * (-numpy.log(1 / 3) - numpy.log(2 / 3))
    assert abs(L.stable_cross_entropy(x, [1], label_smoothing=eps).item() - expected) < 1e-14


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy_gradcheck(rng, reduction, eps):
    x = tc.tensor(rng.standard_normal((4, 6)), dtype="f64", requires_grad=True)
    t = numpy.array([1, -100, 5, 0])
    assert gradcheck(lambda a: L.stable_cross_entropy(a, t, label_smoothing=eps, reduction=reduction), [x])


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_logits_accumulate_in_f32_and_give_an_f32_loss(rng, dtype):
    v = 1000
    logits = tc.tensor(rng.standard_normal((6, v)) * 4, dtype=dtype, requires_grad=True)
    t = rng.integers(0, v, size=6)
    loss = L.stable_cross_entropy(logits, t, reduction="sum")
    assert loss.dtype is dtypes.f32
    rows, grad, _ = ce64(as64(logits.detach()), t)
    assert abs(loss.item() - rows.sum()) <= 1e-6 * abs(rows.sum())
    loss.backward()
    assert logits.grad.dtype is dtypes.as_dtype(dtype)
    # One rounding to the half type (relative 2^-8 for bf16, 2^-11 for f16) on top of f32 arithmetic.
    rel = 2.0 ** -8 if dtype == "bf16" else 2.0 ** -11
    assert (numpy.abs(as64(logits.grad) - grad) <= rel * numpy.abs(grad) + 1e-7).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_gives_zero_not_nan(reduction):
    logits = tc.tensor(numpy.random.default_rng(0).standard_normal((3, 4, 9)), requires_grad=True)
    t = numpy.full((3, 4), -100)
    loss = L.stable_cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1)
    assert (loss.numpy() == 0).all()
    loss.sum().backward()
    assert (logits.grad.numpy() == 0).all()


def test_empty_batch_gives_zero():
    logits = tc.zeros(0, 5, requires_grad=True)
    assert L.stable_cross_entropy(logits, numpy.zeros(0, dtype=numpy.int64)).item() == 0.0


def test_custom_ignore_index_and_none():
    x = numpy.random.default_rng(1).standard_normal((5, 4))
    t = numpy.array([0, 1, 2, 3, 2])
    loss = L.stable_cross_entropy(tc.tensor(x, dtype="f64"), t, ignore_index=2, reduction="none").numpy()
    rows, _, _ = ce64(x, t, ignore=2)
    assert loss[2] == 0 and loss[4] == 0
    numpy.testing.assert_allclose(loss, rows, rtol=1e-13)
    with pytest.raises(IndexOutOfRangeError, match="-100"):
        L.stable_cross_entropy(tc.tensor(x), numpy.array([0, 1, -100, 3, 2]), ignore_index=None)


@pytest.mark.parametrize("bad", [7, -1, 10 ** 12, -101])
def test_out_of_range_targets_raise_before_anything_is_written(bad):
    x = numpy.random.default_rng(2).standard_normal((2, 3, 7)).astype(numpy.float32)
    logits = tc.tensor(x, requires_grad=True)
    t = numpy.array([[0, 1, -100], [3, bad, 6]])
    with pytest.raises(IndexOutOfRangeError, match=rf"{bad}.*\(1, 1\)"):
        L.stable_cross_entropy(logits, t, inplace_backward=True)
    assert (logits.numpy() == x).all()  # the in-place gradient was not started


def test_targets_as_int32_and_uint8_tensors(rng):
    x = rng.standard_normal((5, 9))
    t = rng.integers(0, 9, size=5)
    rows, _, _ = ce64(x, t)
    for ttype in ("int32", "uint8"):
        loss = L.stable_cross_entropy(tc.tensor(x, dtype="f64"), tc.tensor(t, dtype=ttype), reduction="none")
        numpy.testing.assert_allclose(loss.numpy(), rows, rtol=1e-13)


@pytest.mark.parametrize("dtype,big", [("f32", 1e30), ("f64", 1e300), ("bf16", 1e4), ("f16", 6e4)])
def test_extreme_logits_stay_finite_and_exact(rng, dtype, big):
    x = rng.choice([-big, big, 0.5 * big, -0.25 * big], size=(6, 33)) * (1 + 0.01 * rng.standard_normal((6, 33)))
    logits = tc.tensor(x, dtype=dtype, requires_grad=True)
    t = rng.integers(0, 33, size=6)
    loss = L.stable_cross_entropy(logits, t, reduction="none", label_smoothing=0.1)
    rows, grad, _ = ce64(as64(logits.detach()), t, eps=0.1)
    assert numpy.isfinite(loss.numpy()).all()
    numpy.testing.assert_allclose(as64(loss), rows, rtol=1e-6)
    loss.sum().backward()
    assert numpy.isfinite(as64(logits.grad)).all()
    numpy.testing.assert_allclose(as64(logits.grad), grad, atol=1e-2 if dtype in ("bf16", "f16") else 1e-6)


def test_inplace_backward_writes_the_gradient_over_the_logits(rng):
    x = rng.standard_normal((4, 3, 10))
    t = random_targets(rng, (4, 3), 10)
    plain = tc.tensor(x, dtype="f64", requires_grad=True)
    L.stable_cross_entropy(plain, t, label_smoothing=0.05).backward()
    inplace = tc.tensor(x, dtype="f64", requires_grad=True)
    storage = inplace.data
    loss = L.stable_cross_entropy(inplace, t, label_smoothing=0.05, inplace_backward=True)
    _, grad, keep = ce64(x, t, eps=0.05)
    numpy.testing.assert_allclose(storage, (grad / keep.sum()).reshape(x.shape), rtol=1e-13, atol=1e-16)
    (loss * 3.0).backward()
    numpy.testing.assert_allclose(inplace.grad.numpy(), 3.0 * plain.grad.numpy(), rtol=1e-13, atol=1e-16)


def test_checkpoint_region_recomputes_and_refuses_inplace(rng):
    from tessera_cp import autograd
    x = rng.standard_normal((5, 7))
    t = rng.integers(0, 7, size=5)
    logits = tc.tensor(x, dtype="f64", requires_grad=True)
    with autograd.checkpoint_region():
        loss = L.stable_cross_entropy(logits * 1.0, t, label_smoothing=0.1)
    loss.backward()
    _, grad, _ = ce64(x, t, eps=0.1)
    numpy.testing.assert_allclose(logits.grad.numpy(), grad / 5, rtol=1e-12)
    with autograd.checkpoint_region(), pytest.raises(TesseraError, match="checkpoint"):
        L.stable_cross_entropy(logits * 1.0, t, inplace_backward=True)


def test_upstream_gradient_scales_and_second_backward_raises(rng):
    x = tc.tensor(rng.standard_normal((5, 8)), dtype="f64", requires_grad=True)
    t = rng.integers(0, 8, size=5)
    loss = L.stable_cross_entropy(x, t)
    (loss * -2.5).backward()
    _, grad, keep = ce64(x.numpy(), t)
    numpy.testing.assert_allclose(x.grad.numpy(), -2.5 * grad / keep.sum(), rtol=1e-12)
    with pytest.raises(TesseraError, match="once"):
        loss.backward()


def test_no_gradient_is_made_without_grad_mode(rng):
    x = tc.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    with tc.no_grad():
        loss = L.stable_cross_entropy(x, [0, 1, 2], inplace_backward=True)
    assert not loss.requires_grad and (x.numpy() == x.numpy()).all()
    assert numpy.isfinite(loss.item())


def test_precision_compute_f64_upcasts(rng):
    x = rng.standard_normal((4, 6))
    with tc.precision(compute="f64"):
        loss = L.stable_cross_entropy(tc.tensor(x, dtype="f32"), [1, 2, 3, 4])
    assert loss.dtype is dtypes.f64
    rows, _, keep = ce64(x.astype(numpy.float32), [1, 2, 3, 4])
    assert abs(loss.item() - rows.mean()) < 1e-13


def test_cross_entropy_argument_errors():
    x = tc.zeros(2, 3)
    with pytest.raises(ShapeError, match=r"\(2,\)"):
        L.stable_cross_entropy(x, [[0, 1]])
    with pytest.raises(DTypeError, match="integer"):
        L.stable_cross_entropy(x, numpy.array([0.0, 1.0]))
    with pytest.raises(DTypeError, match="int64"):
        L.stable_cross_entropy(tc.zeros(2, 3, dtype="int64"), [0, 1])
    with pytest.raises(TesseraError, match="reduction"):
        L.stable_cross_entropy(x, [0, 1], reduction="avg")
    with pytest.raises(TesseraError, match="label_smoothing"):
        L.stable_cross_entropy(x, [0, 1], label_smoothing=1.5)
    with pytest.raises(TesseraError, match="ignore_index"):
        L.stable_cross_entropy(x, [0, 1], ignore_index=1.0)
    with pytest.raises(ShapeError, match="class axis"):
        L.stable_cross_entropy(tc.zeros(2, 0), [0, 1])


def test_softmax_cross_entropy(rng):
    x = rng.standard_normal((7, 5))
    t = rng.integers(0, 5, size=7)
    logits = tc.tensor(x, dtype="f64", requires_grad=True)
    loss = L.softmax_cross_entropy(logits, t)
    rows, grad, _ = ce64(x, t)
    assert abs(loss.item() - rows.mean()) < 1e-13
    loss.backward()
    numpy.testing.assert_allclose(logits.grad.numpy(), grad / 7, rtol=1e-12)
    assert gradcheck(lambda a: L.softmax_cross_entropy(a, t, reduction="none"), [tc.tensor(x, requires_grad=True,
                                                                                             dtype="f64")])
    with pytest.raises(ShapeError, match=r"\[B, C\]"):
        L.softmax_cross_entropy(tc.zeros(2, 3, 4), numpy.zeros((2, 3), dtype=int))
    with pytest.raises(IndexOutOfRangeError):
        L.softmax_cross_entropy(logits, numpy.array([0, 1, 2, -100, 0, 0, 0]))


# ------------------------------------------------------------------------------------------------- log-softmax
def test_log_softmax_stable_matches_formula_and_extremes(rng):
    x = rng.standard_normal((3, 4, 5)) * 10
    out = L.log_softmax_stable(tc.tensor(x, dtype="f64"), dim=1).numpy()
    expected = x - numpy.log(numpy.exp(x).sum(axis=1, keepdims=True))
    numpy.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    huge = L.log_softmax_stable(tc.tensor([[1e30, -1e30, 1e30, 0.0]], dtype="f32")).numpy()
    assert numpy.isfinite(huge).all()
    numpy.testing.assert_allclose(huge, [[-numpy.log(2), -2e30, -numpy.log(2), -1e30]], rtol=1e-6)
    assert gradcheck(lambda a: L.log_softmax_stable(a, dim=0), [tc.tensor(x[0], dtype="f64", requires_grad=True)])


def test_log_softmax_stable_half_and_compute():
    x = tc.tensor([[9984.0, 9920.0, -9984.0]], dtype="bf16")  # exact in bf16 (its step is 64 there)
    out = L.log_softmax_stable(x)
    assert out.dtype is dtypes.bf16
    assert as64(out).tolist() == [[0.0, -64.0, -19968.0]]  # log(1 + e^-64) is far below bf16's resolution
    with tc.precision(compute="f64"):
        assert L.log_softmax_stable(tc.tensor([[1.0, 2.0]])).dtype is dtypes.f64
    with pytest.raises(ShapeError):
        L.log_softmax_stable(tc.tensor(1.0))


# ------------------------------------------------------------------------------------------------- max-margin
def margin64(scores, targets, margin):
    out = []
    for s, t in zip(numpy.asarray(scores, dtype=numpy.float64), targets):
        negatives = [s[j] + margin for j in range(len(s)) if j != t]
        out.append(max(0.0, max(negatives) - s[t]) if negatives else 0.0)
    return numpy.array(out)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_max_margin_matches_definition_and_gradcheck(rng, reduction):
    s = rng.standard_normal((9, 6))
    t = rng.integers(0, 6, size=9)
    s[numpy.arange(4), t[:4]] += 4.0  # these rows clear the margin
    rows = margin64(s, t, 0.7)
    assert 0 < (rows > 0).sum() < 9  # both active and inactive rows are covered
    got = L.stable_max_margin_loss(tc.tensor(s, dtype="f64"), t, margin=0.7, reduction=reduction).numpy()
    numpy.testing.assert_allclose(got, {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction], rtol=1e-13)
    x = tc.tensor(s, dtype="f64", requires_grad=True)
    assert gradcheck(lambda a: L.stable_max_margin_loss(a, t, margin=0.7, reduction=reduction), [x])


def test_max_margin_edge_cases():
    assert L.stable_max_margin_loss(tc.tensor([[3.0], [-2.0]]), [0, 0]).item() == 0.0  # one class: no negatives
    big = tc.tensor([[1e30, -1e30, 0.0]], dtype="f32", requires_grad=True)
    loss = L.stable_max_margin_loss(big, [1])
    assert loss.item() == pytest.approx(2e30, rel=1e-6)
    loss.backward()
    assert big.grad.numpy().tolist() == [[1.0, -1.0, 0.0]]
    with pytest.raises(IndexOutOfRangeError):
        L.stable_max_margin_loss(tc.zeros(2, 3), [0, 3])
    with pytest.raises(ShapeError):
        L.stable_max_margin_loss(tc.zeros(2, 3, 1), [0, 1])


# ------------------------------------------------------------------------------------------------- contrastive
def contrastive64(x, labels, temperature, normalize):
    x = numpy.asarray(x, dtype=numpy.float64)
    z = x / numpy.linalg.norm(x, axis=1, keepdims=True) if normalize else x
    out, defined = [], []
    for i in range(len(x)):
        sims = {a: z[i] @ z[a] / temperature for a in range(len(x)) if a != i}
        positives = [a for a in sims if labels[a] == labels[i]]
        if not positives:
            out.append(0.0)
            defined.append(False)
            continue
        top, pos_top = max(sims.values()), max(sims[a] for a in positives)
        log_all = top + numpy.log(sum(numpy.exp(v - top) for v in sims.values()))
        log_pos = pos_top + numpy.log(sum(numpy.exp(sims[a] - pos_top) for a in positives))
        out.append(log_all - log_pos)
        defined.append(True)
    return numpy.array(out), numpy.array(defined)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_contrastive_matches_definition_and_gradcheck(rng, normalize, reduction):
    x = rng.standard_normal((7, 4))
    labels = numpy.array([0, 1, 0, 2, 1, 0, 3])  # labels 2 and 3 appear once: rows 3 and 6 have no positive
    rows, defined = contrastive64(x, labels, 0.5, normalize)
    expected = {"mean": rows[defined].mean(), "sum": rows.sum(), "none": rows}[reduction]
    got = L.stable_contrastive_loss(tc.tensor(x, dtype="f64"), labels, temperature=0.5, normalize=normalize,
                                    reduction=reduction)
    numpy.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    e = tc.tensor(x, dtype="f64", requires_grad=True)
    assert gradcheck(lambda a: L.stable_contrastive_loss(a, labels, temperature=0.5, normalize=normalize,
                                                         reduction=reduction), [e])


def test_contrastive_without_positives_and_tiny_temperature(rng):
    e = tc.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    loss = L.stable_contrastive_loss(e, [0, 1, 2, 3])
    assert loss.item() == 0.0
    loss.backward()
    assert (e.grad.numpy() == 0).all()
    x = rng.standard_normal((6, 5))
    labels = [0, 0, 1, 1, 2, 2]
    cold = L.stable_contrastive_loss(tc.tensor(x, dtype="f32"), labels, temperature=1e-4)
    rows, defined = contrastive64(x, labels, 1e-4, True)
    assert numpy.isfinite(cold.item())
    assert cold.item() == pytest.approx(rows.mean(), rel=1e-4)
    single = L.stable_contrastive_loss(tc.tensor([[1.0, 2.0]]), [5])
    assert single.item() == 0.0
    with pytest.raises(TesseraError, match="temperature"):
        L.stable_contrastive_loss(tc.zeros(2, 2), [0, 0], temperature=0.0)
    with pytest.raises(ShapeError):
        L.stable_contrastive_loss(tc.zeros(2, 2), [0, 0, 1])


# ------------------------------------------------------------------------------------------------- fused linear CE
def linear_ce64(h, w, b, t, ignore, eps, reduction, upstream=None):
    """Loss and gradients of cross_entropy(h @ w.T + b) in float64, unfused."""
    h, w = numpy.asarray(h, numpy.float64), numpy.asarray(w, numpy.float64)
    logits = h.reshape(-1, h.shape[-1]) @ w.T + (0 if b is None else numpy.asarray(b, numpy.float64))
    rows, grad, keep = ce64(logits, t, ignore=ignore, eps=eps)
    loss = reduce64(rows, keep, reduction, numpy.shape(t))
    scale = grad_factor(keep, reduction) * (numpy.reshape(upstream, (-1, 1)) if upstream is not None else 1.0)
    dl = grad * scale
    return loss, (dl @ w).reshape(h.shape), dl.T @ h.reshape(-1, h.shape[-1]), dl.sum(axis=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linear_cross_entropy_matches_unfused_definition(rng, reduction, with_bias):
    n_b, n_s, d, v = 3, 13, 6, 29  # 39 rows in chunks of 8: no size divides
    h = tc.tensor(rng.standard_normal((n_b, n_s, d)), dtype="f64", requires_grad=True)
    w = tc.tensor(rng.standard_normal((v, d)), dtype="f64", requires_grad=True)
    b = tc.tensor(rng.standard_normal(v), dtype="f64", requires_grad=True) if with_bias else None
    t = random_targets(rng, (n_b, n_s), v)
    loss = L.fused_linear_cross_entropy(h, w, t, bias=b, label_smoothing=0.1, reduction=reduction, chunk_size=8)
    upstream = rng.standard_normal((n_b, n_s)) if reduction == "none" else None
    ref_loss, gh, gw, gb = linear_ce64(h.numpy(), w.numpy(), None if b is None else b.numpy(), t, -100, 0.1,
                                       reduction, upstream)
    numpy.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-12)
    loss.backward(tc.tensor(upstream, dtype="f64") if upstream is not None else None)
    numpy.testing.assert_allclose(h.grad.numpy(), gh, rtol=1e-10, atol=1e-13)
    numpy.testing.assert_allclose(w.grad.numpy(), gw, rtol=1e-10, atol=1e-13)
    if with_bias:
        numpy.testing.assert_allclose(b.grad.numpy(), gb, rtol=1e-10, atol=1e-13)


def test_fused_linear_cross_entropy_gradcheck(rng):
    h = tc.tensor(rng.standard_normal((5, 3)), dtype="f64", requires_grad=True)
    w = tc.tensor(rng.standard_normal((4, 3)), dtype="f64", requires_grad=True)
    b = tc.tensor(rng.standard_normal(4), dtype="f64", requires_grad=True)
    t = numpy.array([0, 3, -100, 1, 2])
    for reduction in ("mean", "none"):
        assert gradcheck(lambda x, y, z: L.fused_linear_cross_entropy(x, y, t, bias=z, reduction=reduction,
                                                                      chunk_size=2), [h, w, b])


def test_fused_linear_cross_entropy_only_some_inputs_need_grad(rng):
    h = tc.tensor(rng.standard_normal((6, 4)), dtype="f64")
    w = tc.tensor(rng.standard_normal((9, 4)), dtype="f64", requires_grad=True)
    t = rng.integers(0, 9, size=6)
    L.fused_linear_cross_entropy(h, w, t, reduction="sum", chunk_size=4).backward()
    _, _, gw, _ = linear_ce64(h.numpy(), w.numpy(), None, t, -100, 0.0, "sum")
    numpy.testing.assert_allclose(w.grad.numpy(), gw, rtol=1e-11)
    assert h.grad is None
    with tc.no_grad():
        loss = L.fused_linear_cross_entropy(h, w, t)
    assert not loss.requires_grad


def test_fused_linear_cross_entropy_all_ignored_and_errors(rng):
    h = tc.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    w = tc.tensor(rng.standard_normal((5, 4)), requires_grad=True)
    loss = L.fused_linear_cross_entropy(h, w, [-100, -100, -100])
    assert loss.item() == 0.0
    loss.backward()
    assert (h.grad.numpy() == 0).all() and (w.grad.numpy() == 0).all()
    with pytest.raises(IndexOutOfRangeError, match="5"):
        L.fused_linear_cross_entropy(h, w, [0, 5, 1])
    with pytest.raises(ShapeError, match="share D"):
        L.fused_linear_cross_entropy(h, tc.zeros(5, 3), [0, 1, 2])
    with pytest.raises(DTypeError, match="hidden's dtype"):
        L.fused_linear_cross_entropy(h, w.detach().float(), [0, 1, 2])
    with pytest.raises(ShapeError, match="bias"):
        L.fused_linear_cross_entropy(h, w, [0, 1, 2], bias=tc.zeros(4))
    with pytest.raises(TesseraError, match="chunk_size"):
        L.fused_linear_cross_entropy(h, w, [0, 1, 2], chunk_size=0)
    with pytest.raises(TypeError, match="vocab_chunk_size"):  # removed: the weight gradient needs no vocabulary sweep
        L.fused_linear_cross_entropy(h, w, [0, 1, 2], vocab_chunk_size=2)


def _traced_peak(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def test_fused_linear_cross_entropy_never_holds_the_whole_logits(rng):
    n, d, v = 512, 8, 8192
    logits_bytes = n * v * 4
    h = tc.tensor(rng.standard_normal((n, d)), dtype="f32", requires_grad=True)
    w = tc.tensor(rng.standard_normal((v, d)) * 0.1, dtype="f32", requires_grad=True)
    t = rng.integers(0, v, size=n)

    def fused():
        L.fused_linear_cross_entropy(h, w, t, chunk_size=16).backward()

    def unfused():
        L.stable_cross_entropy(h @ w.T, t).backward()

    fused_peak, unfused_peak = _traced_peak(fused), _traced_peak(unfused)
    assert unfused_peak >= logits_bytes       # the measurement sees the logits when they exist
    assert fused_peak < 0.25 * logits_bytes   # the fused path holds a chunk at a time


def test_default_chunks_fit_the_budget():
    assert L._default_chunk(L.CHUNK_BYTES, 128256, 2, 8192) == 1024
    assert L._default_chunk(L.CHUNK_BYTES, 8192, 2, 128256) == 16384
    assert L._default_chunk(100, 1000, 4, 10) == 1      # never zero
    assert L._default_chunk(1 << 30, 10, 4, 37) == 37   # never more than there is


# ------------------------------------------------------------------------------------------------- kernel host code
def _signatures():
    """{kernel: [(is_pointer, base type), ...]} read from loss.cu's definitions."""
    source = (SOURCE_DIR / "loss.cu").read_text()
    out = {}
    for name in ("cross_entropy_fwd", "cross_entropy_fwd_cluster", "cross_entropy_bwd", "scale_rows",
                 "count_targets", "reduce_loss"):
        params = re.search(rf"\b{name}\(([^)]*)\)\s*\{{", source).group(1)
        out[name] = []
        for p in params.split(","):
            words = p.replace("*", " * ").split()[:-1]  # drop the parameter's name
            out[name].append(("*" in words, " ".join(w for w in words if w not in ("const", "*"))))
    return out


_SCALAR = {"long long": numpy.int64, "float": numpy.float32, "int": numpy.int32}
_POINTEE = {"long long": numpy.dtype(numpy.int64), "float": numpy.dtype(numpy.float32),
            "unsigned long long": numpy.dtype(numpy.uint64)}


_NULLABLE = {"cross_entropy_fwd": (3, 4), "cross_entropy_fwd_cluster": (3, 4)}  # row_max, row_logsum may be null


class KernelEmulator:
    """Stands in for the runtime: checks each launch against loss.cu's signatures and runs the semantics that
    loss.cu's header documents, in float64 (written from that text, not from the reference in loss.py)."""

    def __init__(self):
        self.signatures, self.launches = _signatures(), []

    def launch(self, kernel, grid, block, args, shared_mem=0):
        name, dtype = kernel
        self.launches.append(name)
        params = self.signatures[name]
        assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
        for i, ((pointer, base), a) in enumerate(zip(params, args)):
            if pointer and i in _NULLABLE.get(name, ()) and type(a) is numpy.uint64:
                assert a == 0, f"{name} argument {i}: a pointer given as the integer {a}"
            elif pointer:
                assert isinstance(a, numpy.ndarray) and a.flags.c_contiguous, f"{name} argument {i}"
                assert a.dtype == (dtype if base == "T" else _POINTEE[base]), f"{name} argument {i}: {a.dtype}"
            else:
                assert type(a) is _SCALAR[base], f"{name} argument {i}: {type(a)} for {base}"
        if name in ("count_targets", "reduce_loss"):  # one block
            assert grid == (1,) and block == ((L.COUNT_THREADS,) if name == "count_targets" else (L.REDUCE_THREADS,))
            return getattr(self, name)(*args)
        rows = int(args[2 if name == "scale_rows" else 6])
        if name == "cross_entropy_fwd_cluster":  # a cluster of 1, 2, 4 or 8 blocks per row
            assert grid[0] // rows in (1, 2, 4, 8) and grid[0] % rows == 0 and block == (L.CLUSTER_THREADS,)
        elif name == "scale_rows":  # blocks stride over the rows: one per row for per-row factors, or fewer
            assert 1 <= grid[0] <= rows
        else:
            assert grid == (rows,)
        assert block[0] % 32 == 0 and 32 <= block[0] <= L.MAX_THREADS
        getattr(self, name.replace("_cluster", ""))(*args)  # the cluster kernel computes the same results

    launch_planned = launch  # loss.py launches through the runtime's planned path

    @staticmethod
    def cross_entropy_fwd(x, t, loss, m, log_s, grad, n, v, ignore, eps, scale, write, check, per_count):
        if check[1]:  # a target out of range: nothing written
            return
        if per_count and check[0]:
            scale = float(scale) / float(check[0])
        has_stats = isinstance(m, numpy.ndarray)  # else both are null: loss alone
        for r in range(int(n)):
            row = x[r].astype(numpy.float64)  # read before a gradient written over x
            if t[r] == ignore or not 0 <= t[r] < v:
                fill = 0.0 if t[r] == ignore else numpy.nan
                loss[r] = fill
                if has_stats:
                    m[r] = log_s[r] = fill
                if write:
                    grad[r] = fill
                continue
            top = row.max()
            ls = numpy.log(numpy.exp(row - top).sum())
            loss[r] = ls + (1 - eps) * (top - row[t[r]]) + eps * (top - row.mean())
            if has_stats:
                m[r], log_s[r] = top, ls
            if write:
                g = numpy.exp(row - top - ls) - eps / v
                g[t[r]] -= 1 - eps
                grad[r] = g * scale

    @staticmethod
    def cross_entropy_bwd(x, t, m, log_s, row_scale, out, n, cols, col0, vocab, ignore, eps, base, stride):
        for r in range(int(n)):
            if t[r] == ignore or not 0 <= t[r] < vocab:
                out[r] = 0.0 if t[r] == ignore else numpy.nan
                continue
            g = numpy.exp(x[r].astype(numpy.float64) - float(m[r]) - float(log_s[r])) - eps / vocab
            if col0 <= t[r] < col0 + cols:
                g[t[r] - col0] -= 1 - eps
            out[r] = g * float(base) * float(row_scale[r * stride])

    @staticmethod
    def count_targets(t, n, n_classes, ignore, out):
        counted = t[:int(n)] != ignore
        out[0] = counted.sum()
        out[1] = (counted & ((t[:int(n)] < 0) | (t[:int(n)] >= n_classes))).sum()

    @staticmethod
    def scale_rows(x, g, n, cols, stride):
        g = g.reshape(-1)
        for r in range(int(n)):
            if g[r * stride] != 1:
                x[r] = x[r].astype(numpy.float64) * float(g[r * stride])

    @staticmethod
    def reduce_loss(loss, n, check, mean, out):
        total = loss[:int(n)].astype(numpy.float64).sum()
        if mean:
            total = total / float(check[0]) if check[0] else 0.0
        out[()] = numpy.nan if check[1] else total


@pytest.fixture
def emulated_kernels(monkeypatch):
    emulator = KernelEmulator()
    monkeypatch.setattr(L, "_use_kernel", lambda x: x.dtype in L._CTYPES)
    monkeypatch.setattr(L, "_kernel", lambda name, dtype=None, *params: (emulator, (name, numpy.dtype(dtype))))
    return emulator


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("cluster", [0, 2])
def test_kernel_path_host_code_through_the_emulator(rng, emulated_kernels, monkeypatch, dtype, reduction, cluster):
    monkeypatch.setattr(L, "_cluster_shape", lambda x, grad: (cluster, 8 if cluster else 0))  # the host's pick
    x = rng.standard_normal((4, 5, 37))
    t = random_targets(rng, (4, 5), 37)
    logits = tc.tensor(x, dtype=dtype, requires_grad=True)
    loss = L.stable_cross_entropy(logits, t, label_smoothing=0.1, reduction=reduction, inplace_backward=True)
    rows, grad, keep = ce64(x.astype(numpy.float32) if dtype == "f32" else as64(tc.tensor(x, dtype=dtype)), t,
                            eps=0.1)
    numpy.testing.assert_allclose(as64(loss), reduce64(rows, keep, reduction, (4, 5)), rtol=1e-6)
    upstream = rng.standard_normal((4, 5)) if reduction == "none" else None
    if upstream is not None:
        upstream[0, 0] = 1.0  # a row the scale kernel skips
    loss.backward(tc.tensor(upstream, dtype="f32") if upstream is not None else None)
    scale = grad_factor(keep, reduction) * (upstream.reshape(-1, 1) if upstream is not None else 1.0)
    tol = 2.0 ** -7 if dtype == "bf16" else 1e-6
    numpy.testing.assert_allclose(as64(logits.grad), (grad * scale).reshape(x.shape), rtol=tol, atol=1e-7)
    forward = "cross_entropy_fwd_cluster" if cluster else "cross_entropy_fwd"
    assert emulated_kernels.launches == [forward, "scale_rows"]


class _DeviceArrayStandIn:
    """What _cluster_shape reads of a CuPy array: shape, itemsize and the data pointer."""

    def __init__(self, v, itemsize=2, ptr=0):
        self.shape, self.itemsize, self.data = (8192, v), itemsize, types.SimpleNamespace(ptr=ptr)


def test_cluster_shape_choice(monkeypatch):
    a = _DeviceArrayStandIn

    def shape(v, itemsize=2, ptr=0, grad_ptr=0):
        return L._cluster_shape(a(v, itemsize, ptr), a(v, itemsize, grad_ptr))

    monkeypatch.setattr(L, "_has_clusters", lambda x: True)
    assert shape(128256) == (8, 8)       # 250.5 KiB of bf16: eight blocks of 32 KiB (8 packs per thread)
    assert shape(128256, 4) == (8, 16)   # the same in f32: eight of 8 packs do not hold it, eight of 16 do
    assert shape(131072) == (8, 8)       # 128k bf16: exactly eight blocks of 8 packs
    assert shape(131080) == (8, 16)      # one pack more
    assert shape(262144) == (8, 16)      # 256k bf16: exactly eight blocks of 16 packs
    assert shape(262152) == (0, 0)       # one pack more than eight blocks hold: one block per row
    assert shape(131076, 4) == (0, 0)
    assert shape(50257) == (4, 8)
    assert shape(2048) == (0, 0)         # 4 KiB: under one pack per thread, the one-block kernel
    assert shape(2049) == (1, 8)
    assert shape(50257, grad_ptr=2) == (0, 0)  # a gradient buffer aligned unlike the logits
    assert shape(50257, ptr=2, grad_ptr=18) == (4, 8)
    assert L._cluster_shape(a(128256), None) == (0, 0)  # no gradient: the one-block kernel reads each row once
    for packs, sizes in L.CLUSTER_SIZES.items():  # every pick is an instantiation loss.cu lists
        source = (SOURCE_DIR / "loss.cu").read_text()
        for size in sizes:
            assert f"cross_entropy_fwd_cluster<__nv_bfloat16, {size}, {packs}>" in source
    monkeypatch.setattr(L, "_has_clusters", lambda x: False)
    assert shape(128256) == (0, 0)
    monkeypatch.undo()
    assert not L._has_clusters(numpy.zeros((2, 2), numpy.float32))


def test_target_check_kernel_through_the_emulator(emulated_kernels, monkeypatch):
    monkeypatch.setattr(L, "_targets_on_gpu", lambda flat: True)
    logits = tc.tensor(numpy.zeros((4, 6)), dtype="f32")
    assert L.stable_cross_entropy(logits, [0, -100, 5, -100]).item() == pytest.approx(numpy.log(6))
    assert emulated_kernels.launches[0] == "count_targets"
    with pytest.raises(IndexOutOfRangeError, match=r"2 target\(s\) outside \[0, 6\).*the first is 6 at position \(2,\)"):
        L.stable_cross_entropy(logits, [0, -100, 6, -7])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cluster", [0, 2])
def test_count_on_the_device_through_the_emulator(rng, emulated_kernels, monkeypatch, reduction, cluster):
    """The GPU path's order: count_targets, the forward kernel reading the count (the "mean" scale), reduce_loss,
    and only then the host's read of the count; the backward launches only the scale kernel."""
    monkeypatch.setattr(L, "_targets_on_gpu", lambda flat: True)
    monkeypatch.setattr(L, "_cluster_shape", lambda x, grad: (cluster, 8 if cluster else 0))
    x = rng.standard_normal((3, 4, 23))
    t = random_targets(rng, (3, 4), 23)
    logits = tc.tensor(x, dtype="f32", requires_grad=True)
    loss = L.stable_cross_entropy(logits, t, label_smoothing=0.1, reduction=reduction)
    rows, grad, keep = ce64(x.astype(numpy.float32), t, eps=0.1)
    numpy.testing.assert_allclose(as64(loss), reduce64(rows, keep, reduction, (3, 4)), rtol=1e-6)
    forward = "cross_entropy_fwd_cluster" if cluster else "cross_entropy_fwd"
    assert emulated_kernels.launches == ["count_targets", forward] + (["reduce_loss"] if reduction != "none" else [])
    loss.backward(tc.tensor(numpy.ones((3, 4)), dtype="f32") if reduction == "none" else None)
    numpy.testing.assert_allclose(as64(logits.grad), (grad * grad_factor(keep, reduction)).reshape(x.shape),
                                  rtol=1e-6, atol=1e-8)
    assert emulated_kernels.launches[-1] == "scale_rows"
    # All ignored: 0, not NaN, with the count read on the device.
    none_counted = L.stable_cross_entropy(tc.tensor(x, dtype="f32"), numpy.full((3, 4), -100), reduction=reduction)
    assert (as64(none_counted) == 0).all()


def test_out_of_range_on_the_device_path_raises_after_a_launch_that_writes_nothing(rng, emulated_kernels,
                                                                                   monkeypatch):
    monkeypatch.setattr(L, "_targets_on_gpu", lambda flat: True)
    x = rng.standard_normal((2, 3, 7)).astype(numpy.float32)
    logits = tc.tensor(x, requires_grad=True)
    t = numpy.array([[0, 1, -100], [3, 9, 6]])
    with pytest.raises(IndexOutOfRangeError, match=r"9.*\(1, 1\)"):
        L.stable_cross_entropy(logits, t, inplace_backward=True)
    assert emulated_kernels.launches == ["count_targets", "cross_entropy_fwd", "reduce_loss"]  # launched first
    assert (logits.numpy() == x).all()  # the in-place gradient was refused by the kernel itself


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_linear_kernel_path_through_the_emulator(rng, emulated_kernels, reduction):
    h = tc.tensor(rng.standard_normal((11, 4)), dtype="f32", requires_grad=True)
    w = tc.tensor(rng.standard_normal((13, 4)), dtype="f32", requires_grad=True)
    b = tc.tensor(rng.standard_normal(13), dtype="f32", requires_grad=True)
    t = random_targets(rng, (11,), 13)
    loss = L.fused_linear_cross_entropy(h, w, t, bias=b, label_smoothing=0.2, reduction=reduction, chunk_size=4)
    upstream = rng.standard_normal(11) if reduction == "none" else None
    ref_loss, gh, gw, gb = linear_ce64(h.numpy(), w.numpy(), b.numpy(), t, -100, 0.2, reduction, upstream)
    numpy.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-5)
    loss.backward(tc.tensor(upstream, dtype="f32") if upstream is not None else tc.tensor(2.0))
    factor = 2.0 if upstream is None else 1.0
    for got, want in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        numpy.testing.assert_allclose(got.numpy(), factor * want, rtol=1e-4, atol=1e-5)
    # "sum": one sweep in the forward (gradients made there), the backward only scales; "none": the backward sweeps
    # again with per-row scales, through the backward kernel.
    expected = {"cross_entropy_fwd"} | ({"scale_rows"} if upstream is None else {"cross_entropy_bwd"})
    assert set(emulated_kernels.launches) == expected


def test_kernel_block_sizes():
    assert L._threads(1, 2) == 32
    assert L._threads(128256, 2) == 1024
    assert L._threads(4097, 4) == 288  # 1025 packs of 4 floats, about 4 per thread
    for v in (1, 17, 1000, 4097, 50257, 262144):
        assert L._threads(v, 2) % 32 == 0


def test_dispatch_needs_cupy_and_respects_tessera_reference(monkeypatch):
    assert not L._use_kernel(numpy.zeros((2, 2), numpy.float32))
    monkeypatch.setenv("TESSERA_REFERENCE", "1")
    assert not L._use_kernel(numpy.zeros((2, 2), numpy.float32))


# ------------------------------------------------------------------------------------------------- GPU
def _cupy():
    cupy = pytest.importorskip("cupy")
    if not backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    return cupy


def _poison_pool(cupy, nbytes):
    """Leave a freed block of 0xFF bytes (NaN in f32, f16 and bf16) in the memory pool for the next allocations."""
    junk = cupy.full(int(nbytes), 255, dtype=numpy.uint8)
    cupy.cuda.get_current_stream().synchronize()
    del junk


def _nan_filled(cupy, shape, dtype):
    out = cupy.empty(shape, dtype=dtype)
    out.view(numpy.uint8)[...] = 255
    return out


def _device_logits(rng, shape, dtype, scale=3.0):
    return tc.tensor((rng.standard_normal(shape) * scale).astype(numpy.float32), dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("v", [1, 17, 1000, 4097, 50257])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("cluster", [None, 0])
def test_gpu_forward_kernel_against_float64(rng, dtype, v, eps, offset, cluster):
    """The forward kernel writing the gradient: loss, m + log_s and gradient vs float64, NaN-poisoned outputs.
    offset=1 runs on a view that starts one element in, so rows are not 16-byte aligned. cluster=None: the kernel
    the host picks (the cluster kernel for the longer rows on a Hopper GPU); 0: the one-block-per-row kernel."""
    cupy = _cupy()
    n = 37
    x = _device_logits(rng, (n * v + offset,), dtype)
    logits = x.data[offset:].reshape(n, v)
    t_host = random_targets(rng, n, v)
    t = cupy.asarray(t_host)
    out = tuple(_nan_filled(cupy, n, numpy.float32) for _ in range(3))
    grad = _nan_filled(cupy, (n, v), logits.dtype)
    scale = 1.0 / max(1, int((t_host != -100).sum()))
    loss, m, log_s = L._rows_forward_kernel(logits, t, -100, eps, grad, scale, out=out, cluster=cluster)
    x64 = numpy.asarray(cupy.asnumpy(logits), dtype=numpy.float64)
    rows, grad64, keep = ce64(x64, t_host, eps=eps)
    plain_grad = numpy.empty((n, v), dtype=logits.dtype)
    plain = L._rows_forward_reference(cupy.asnumpy(logits), t_host, -100, eps, plain_grad, scale)
    assert_low_precision_close(cupy.asnumpy(loss), rows, plain[0], atol=1e-5 * (1 + numpy.abs(rows).max()))
    lse64 = numpy.log(numpy.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
    lse = cupy.asnumpy(m + log_s)
    assert_low_precision_close(lse[keep], lse64[keep], (plain[1] + plain[2])[keep], atol=1e-5 * (1 + abs(lse64).max()))
    assert (cupy.asnumpy(loss)[~keep] == 0).all()
    assert_low_precision_close(cupy.asnumpy(grad).astype(numpy.float64), grad64 * scale,
                               plain_grad.astype(numpy.float64), atol=1e-6 * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("cluster,packs", [(c, p) for p, sizes in L.CLUSTER_SIZES.items() for c in sizes])
@pytest.mark.parametrize("v", [4097, 50257, 128256])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_cluster_kernel_against_float64(rng, dtype, cluster, packs, v, offset, inplace):
    """cross_entropy_fwd_cluster at every cluster size that holds the row (the larger ones leave blocks without
    packs), on rows off 16-byte alignment (offset=1: scalar head and tail), the gradient in place or in a
    NaN-poisoned buffer aligned like the logits; ignored rows, and targets out of range (the kernel's own guard)."""
    cupy = _cupy()
    itemsize = 4 if dtype == "f32" else 2
    if v * itemsize // 16 > cluster * L.CLUSTER_THREADS * packs:
        pytest.skip("the row is longer than this cluster holds")
    if not L._has_clusters(cupy.empty(1)):
        pytest.skip("thread-block clusters need compute capability 9.0")
    n, eps, scale = 9, 0.1, 0.25
    logits = _device_logits(rng, (n * v + offset,), dtype).data[offset:].reshape(n, v)
    t_host = rng.integers(0, v, size=n)
    t_host[:4] = [0, v - 1, -100, -100]  # the first and last class, two ignored rows
    t_host[7:] = [-5, v]                 # refused by the host check; the kernel gives NaN rows
    x_host = cupy.asnumpy(logits)        # before an in-place gradient replaces them
    if inplace:
        grad = logits
    else:
        grad = _nan_filled(cupy, (n * v + offset,), logits.dtype)[offset:].reshape(n, v)
    out = tuple(_nan_filled(cupy, n, numpy.float32) for _ in range(3))
    loss, m, log_s = L._rows_forward_kernel(logits, cupy.asarray(t_host), -100, eps, grad, scale, out=out,
                                            cluster=cluster, packs=packs)
    loss, lse, got = cupy.asnumpy(loss), cupy.asnumpy(m + log_s), cupy.asnumpy(grad).astype(numpy.float64)
    good = slice(0, 7)
    x64 = x_host[good].astype(numpy.float64)
    rows, grad64, keep = ce64(x64, t_host[good], eps=eps)
    plain_grad = numpy.empty((7, v), dtype=x_host.dtype)
    plain = L._rows_forward_reference(x_host[good], t_host[good], -100, eps, plain_grad, scale)
    assert_low_precision_close(loss[good], rows, plain[0], atol=1e-5 * (1 + numpy.abs(rows).max()))
    lse64 = numpy.log(numpy.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
    assert_low_precision_close(lse[good][keep], lse64[keep], (plain[1] + plain[2])[keep],
                               atol=1e-5 * (1 + abs(lse64).max()))
    assert_low_precision_close(got[good], grad64 * scale, plain_grad.astype(numpy.float64), atol=1e-6 * scale)
    assert (loss[2:4] == 0).all() and (got[2:4] == 0).all()
    assert numpy.isnan(loss[7:]).all() and numpy.isnan(got[7:]).all()
    if not inplace:  # the loss alone (no gradient written), forced onto the cluster kernel too: the same bits
        alone = L._rows_forward_kernel(logits, cupy.asarray(t_host), -100, eps, None, scale, cluster=cluster,
                                       packs=packs)[0]
        assert (cupy.asnumpy(alone)[good] == loss[good]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_stable_cross_entropy_public_path(rng, dtype, reduction, inplace):
    cupy = _cupy()
    shape, v = (3, 11), 4097
    host = (rng.standard_normal(shape + (v,)) * 3).astype(numpy.float32)
    t = random_targets(rng, shape, v)
    upstream = rng.standard_normal(shape).astype(numpy.float32) if reduction == "none" else numpy.float32(2.5)
    results, inputs = {}, {}
    for device in ("cpu", "cuda"):
        logits = tc.tensor(host, dtype=dtype, device=device, requires_grad=True)
        inputs[device] = as64(logits.detach())  # before an in-place gradient replaces them
        if device == "cuda":
            _poison_pool(cupy, 4 * host.size * 4)
        loss = L.stable_cross_entropy(logits, tc.tensor(t, device=device), label_smoothing=0.1, reduction=reduction,
                                      inplace_backward=inplace)
        loss.backward(tc.tensor(upstream, device=device))
        results[device] = (as64(loss), as64(logits.grad))
    x64 = inputs["cuda"]
    rows, grad, keep = ce64(x64, t, eps=0.1)
    scale = grad_factor(keep, reduction) * numpy.reshape(upstream, (-1, 1))
    assert_low_precision_close(results["cuda"][0], reduce64(rows, keep, reduction, shape), results["cpu"][0],
                               atol=1e-5 * (1 + numpy.abs(rows).max()))
    ref_grad = (grad * scale).reshape(host.shape)
    assert_low_precision_close(results["cuda"][1], ref_grad, results["cpu"][1], atol=1e-6 * numpy.abs(ref_grad).max())


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [None, 0])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gpu_forward_kernels_read_the_device_count(rng, cluster, dtype):
    """``check`` as count_targets leaves it: with per_count the gradient is the one made with grad_scale = 1 / count
    (bit for bit); with a target out of range nothing is written, not even in place."""
    cupy = _cupy()
    n, v = 9, 50257
    logits = _device_logits(rng, (n, v), dtype).data
    t_host = random_targets(rng, n, v)
    t = cupy.asarray(t_host)
    count = int((t_host != -100).sum())
    want = _nan_filled(cupy, (n, v), logits.dtype)
    want_loss = L._rows_forward_kernel(logits, t, -100, 0.1, want, 1.0 / count, cluster=cluster)[0]
    got = _nan_filled(cupy, (n, v), logits.dtype)
    check = cupy.asarray([count, 0], dtype=numpy.uint64)
    got_loss = L._rows_forward_kernel(logits, t, -100, 0.1, got, 1.0, cluster=cluster, check=check, per_count=True)[0]
    assert (cupy.asnumpy(got).view(numpy.uint8) == cupy.asnumpy(want).view(numpy.uint8)).all()
    assert (cupy.asnumpy(got_loss) == cupy.asnumpy(want_loss)).all()
    refused = _nan_filled(cupy, (n, v), logits.dtype)
    out = tuple(_nan_filled(cupy, n, numpy.float32) for _ in range(3))
    bad = cupy.asarray([count, 1], dtype=numpy.uint64)
    L._rows_forward_kernel(logits, t, -100, 0.1, refused, 1.0, out=out, cluster=cluster, check=bad, per_count=True)
    before = cupy.asnumpy(logits).view(numpy.uint8)
    L._rows_forward_kernel(logits, t, -100, 0.1, logits, 1.0, cluster=cluster, check=bad)  # in place
    assert numpy.isnan(cupy.asnumpy(refused).astype(numpy.float32)).all()
    assert all(numpy.isnan(cupy.asnumpy(o)).all() for o in out)
    assert (cupy.asnumpy(logits).view(numpy.uint8) == before).all()
    total = cupy.empty((), numpy.float32)
    runtime, kernel = L._kernel("reduce_loss")
    for mean, c, expected in ((1, count, float(cupy.asnumpy(want_loss).astype(numpy.float64).sum()) / count),
                              (0, count, float(cupy.asnumpy(want_loss).astype(numpy.float64).sum())), (1, 0, 0.0)):
        runtime.launch(kernel, (1,), (L.REDUCE_THREADS,), (want_loss, numpy.int64(n),
                                                           cupy.asarray([c, 0], dtype=numpy.uint64),
                                                           numpy.int32(mean), total))
        assert float(total) == pytest.approx(expected, rel=1e-6, abs=0.0 if c else 1e-30)


@pytest.mark.gpu
def test_gpu_upstream_of_one_leaves_the_gradient_as_made(rng):
    """The scale kernel must skip factor-1 rows: the gradient after backward() equals the forward's, bit for bit."""
    cupy = _cupy()
    logits = _device_logits(rng, (9, 1000), "bf16")
    t = cupy.asarray(rng.integers(0, 1000, size=9))
    grad = _nan_filled(cupy, (9, 1000), logits.data.dtype)
    L._rows_forward_kernel(logits.data, t, -100, 0.0, grad, 1.0 / 9)
    logits.requires_grad_(True)
    L.stable_cross_entropy(logits, tc.Tensor(t)).backward()
    assert (cupy.asnumpy(logits.grad.data).view(numpy.uint16) == cupy.asnumpy(grad).view(numpy.uint16)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_gpu_scale_rows_kernel(rng, dtype):
    cupy = _cupy()
    x = _device_logits(rng, (5, 4097), dtype).data
    before = cupy.asnumpy(x).astype(numpy.float64)
    g = numpy.array([1.0, -2.0, 0.5, 1.0, 3.0], dtype=numpy.float32)
    L._scale_rows(x, cupy.asarray(g), per_row=True)
    after = cupy.asnumpy(x).astype(numpy.float64)
    assert (after[[0, 3]] == before[[0, 3]]).all()
    expected = before * g[:, None]
    plain = (before * g[:, None]).astype(dtypes.as_dtype(dtype).storage).astype(numpy.float64)
    assert_low_precision_close(after, expected, plain, atol=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gpu_backward_kernel_on_a_vocabulary_slice(rng, dtype):
    cupy = _cupy()
    n, v, col0, cols = 33, 5003, 1717, 1001
    full = _device_logits(rng, (n, v), dtype).data
    t_host = random_targets(rng, n, v)
    t_host[:4] = [col0, col0 + cols - 1, col0 - 1, col0 + cols]  # targets at and just outside the slice's edges
    t = cupy.asarray(t_host)
    _, m, log_s = L._rows_forward_kernel(full, t, -100, 0.1, None, 1.0)
    piece = cupy.ascontiguousarray(full[:, col0:col0 + cols])
    row_scale = cupy.asarray(rng.standard_normal(n).astype(numpy.float32))
    out = _nan_filled(cupy, (n, cols), full.dtype)
    L._rows_backward(piece, t, m, log_s, col0, v, -100, 0.1, out, 0.5, row_scale)
    _, grad, _ = ce64(cupy.asnumpy(full).astype(numpy.float64), t_host, eps=0.1)
    expected = grad[:, col0:col0 + cols] * 0.5 * cupy.asnumpy(row_scale)[:, None]
    plain = expected.astype(full.dtype).astype(numpy.float64)  # the same values rounded once to the storage type
    assert_low_precision_close(cupy.asnumpy(out).astype(numpy.float64), expected, plain,
                               atol=1e-6 * numpy.abs(expected).max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,big", [("bf16", 1e4), ("f32", 1e30)])
def test_gpu_extreme_logits_stay_finite(rng, dtype, big):
    _cupy()
    host = rng.choice([-big, big, 0.5 * big], size=(8, 50257)) * (1 + 0.01 * rng.standard_normal((8, 50257)))
    t = rng.integers(0, 50257, size=8)
    out = {}
    for device in ("cpu", "cuda"):
        logits = tc.tensor(host.astype(numpy.float32), dtype=dtype, device=device, requires_grad=True)
        loss = L.stable_cross_entropy(logits, tc.tensor(t, device=device), reduction="none", label_smoothing=0.1)
        loss.sum().backward()
        out[device] = (as64(loss), as64(logits.grad), as64(logits.detach()))
    rows, grad, _ = ce64(out["cuda"][2], t, eps=0.1)
    assert numpy.isfinite(out["cuda"][0]).all() and numpy.isfinite(out["cuda"][1]).all()
    assert_low_precision_close(out["cuda"][0], rows, out["cpu"][0], atol=1e-6 * numpy.abs(rows).max())
    assert_low_precision_close(out["cuda"][1], grad, out["cpu"][1], atol=1e-6)


@pytest.mark.gpu
def test_gpu_all_ignored_and_out_of_range(rng):
    cupy = _cupy()
    _poison_pool(cupy, 1 << 22)
    logits = _device_logits(rng, (6, 1000), "bf16")
    logits.requires_grad_(True)
    loss = L.stable_cross_entropy(logits, tc.tensor(numpy.full(6, -100), device="cuda"))
    assert loss.item() == 0.0
    loss.backward()
    assert (as64(logits.grad) == 0).all()
    with pytest.raises(IndexOutOfRangeError, match="1000"):
        L.stable_cross_entropy(logits.detach(), tc.tensor([0, 1, 1000, 2, 3, 4], device="cuda"))
    # In place: the forward kernel is launched before the host reads the count, and must leave the logits intact.
    before = cupy.asnumpy(logits.data).view(numpy.uint16).copy()
    for bad in ([0, 1, 1000, 2, 3, 4], [-3, 1, 2, 3, 4, 5]):
        with pytest.raises(IndexOutOfRangeError, match=str(bad[0] if bad[0] < 0 else 1000)):
            L.stable_cross_entropy(logits, tc.tensor(bad, device="cuda"), inplace_backward=True)
        assert (cupy.asnumpy(logits.data).view(numpy.uint16) == before).all()
    # The kernel's own guard, reached only by bypassing the host check: NaN, no out-of-bounds read.
    loss_rows, _, _ = L._rows_forward_kernel(logits.data, cupy.asarray([0, -5, 10 ** 9, -100, 1, 2]), -100, 0.0,
                                             None, 1.0)
    got = cupy.asnumpy(loss_rows)
    assert numpy.isnan(got[1]) and numpy.isnan(got[2]) and got[3] == 0 and numpy.isfinite(got[[0, 4, 5]]).all()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_rows_past_two_to_the_31_elements(rng):
    """8193 rows of 262144 bf16 logits (2^31 + 2^18 elements): the last rows' loss and gradient are right."""
    cupy = _cupy()
    n, v = 8193, 262144
    logits = cupy.empty((n, v), dtype=dtypes.bf16.storage)
    for r0 in range(0, n, 512):
        block = cupy.random.standard_normal((min(512, n - r0), v), dtype=numpy.float32)
        logits[r0:r0 + block.shape[0]] = block.astype(logits.dtype)
        del block
    t_host = rng.integers(0, v, size=n)
    grad = cupy.empty_like(logits)
    grad[-3:].view(numpy.uint16)[...] = 0xFFFF
    loss, _, _ = L._rows_forward_kernel(logits, cupy.asarray(t_host), -100, 0.0, grad, 1.0)
    tail = cupy.asnumpy(logits[-3:]).astype(numpy.float64)
    rows, grad64, _ = ce64(tail, t_host[-3:])
    plain = L._rows_forward_reference(cupy.asnumpy(logits[-3:]), t_host[-3:], -100, 0.0, None, 1.0)
    assert_low_precision_close(cupy.asnumpy(loss[-3:]), rows, plain[0], atol=1e-4)
    assert_low_precision_close(cupy.asnumpy(grad[-3:]).astype(numpy.float64), grad64,
                               grad64.astype(logits.dtype).astype(numpy.float64), atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_fused_linear_cross_entropy_against_unfused(rng, reduction):
    cupy = _cupy()
    n, d, v = 1000, 64, 4097
    h_host = (rng.standard_normal((n, d)) * 0.5).astype(numpy.float32)
    w_host = (rng.standard_normal((v, d)) * 0.5).astype(numpy.float32)
    b_host = rng.standard_normal(v).astype(numpy.float32)
    t = random_targets(rng, n, v, ignore_fraction=0.1)
    upstream = rng.standard_normal(n).astype(numpy.float32) if reduction == "none" else None

    def run(fused):
        h, w, b = (tc.tensor(a, dtype="bf16", device="cuda", requires_grad=True) for a in (h_host, w_host, b_host))
        targets = tc.tensor(t, device="cuda")
        if fused:
            _poison_pool(cupy, 64 << 20)
            loss = L.fused_linear_cross_entropy(h, w, targets, bias=b, reduction=reduction, chunk_size=384)
        else:
            loss = L.stable_cross_entropy(h @ w.T + b, targets, reduction=reduction)
        loss.backward(tc.tensor(upstream, device="cuda") if upstream is not None else None)
        return [as64(a) for a in (loss, h.grad, w.grad, b.grad)]

    fused, unfused = run(True), run(False)
    h64, w64, b64 = (as64(tc.tensor(a, dtype="bf16")) for a in (h_host, w_host, b_host))
    exact = linear_ce64(h64, w64, b64, t, -100, 0.0, reduction, upstream)
    for got, same_precision, want in zip(fused, unfused, exact):
        assert_low_precision_close(got, want, same_precision, atol=1e-5 * (1 + numpy.abs(want).max()))


@pytest.mark.gpu
def test_gpu_other_losses_match_the_cpu(rng):
    _cupy()
    s = rng.standard_normal((17, 9)).astype(numpy.float32)
    t = rng.integers(0, 9, size=17)
    labels = rng.integers(0, 4, size=17)
    for fn, args in ((L.stable_max_margin_loss, (s, t)), (L.softmax_cross_entropy, (s, t)),
                     (L.stable_contrastive_loss, (s, labels))):
        values = []
        for device in ("cpu", "cuda"):
            x = tc.tensor(args[0], device=device, requires_grad=True)
            loss = fn(x, tc.tensor(args[1], device=device))
            loss.backward()
            values.append((loss.item(), as64(x.grad)))
        assert values[1][0] == pytest.approx(values[0][0], rel=1e-5)
        numpy.testing.assert_allclose(values[1][1], values[0][1], rtol=1e-4, atol=1e-6)
    out = L.log_softmax_stable(tc.tensor(s, device="cuda", dtype="bf16"))
    assert numpy.isfinite(as64(out)).all()
