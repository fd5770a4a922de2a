import numpy
import pytest

import tessera_cp as tc
from tessera_cp import nn, optim


def _param(values):
    return nn.Parameter(tc.tensor(numpy.array(values, dtype=numpy.float64)))


def test_sgd_momentum_matches_formula():
    p = _param([1.0, -2.0])
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    buf = numpy.zeros(2)
    w = numpy.array([1.0, -2.0])
    for _ in range(3):
        opt.zero_grad()
        (p * p).sum().backward()
        g = 2 * w
        buf = 0.9 * buf + g if buf.any() else g
        w = w - 0.1 * buf
        opt.step()
    assert numpy.allclose(p.numpy(), w)


def test_adamw_matches_formula():
    p = _param([0.5, -1.5, 3.0])
    opt = optim.AdamW([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    w, m, v = numpy.array([0.5, -1.5, 3.0]), numpy.zeros(3), numpy.zeros(3)
    for t in range(1, 5):
        opt.zero_grad()
        (p ** 3).sum().backward()
        g = 3 * w ** 2
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        w = w * (1 - 0.01 * 0.1) - 0.01 * (m / (1 - 0.9 ** t)) / (numpy.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
        opt.step()
    assert numpy.allclose(p.numpy(), w, rtol=1e-12)


def test_bf16_parameters_update_through_f32():
    p = nn.Parameter(tc.ones(4).bfloat16())
    opt = optim.SGD([p], lr=1e-3)
    for _ in range(10):
        opt.zero_grad()
        p.sum().backward()
        opt.step()
    assert p.dtype is tc.bf16 and numpy.all(p.numpy().astype(numpy.float32) < 1.0)


def test_clip_grad_norm():
    a, b = _param([3.0, 0.0]), _param([4.0])
    (a * a).sum().backward()  # grad 6, 0
    (b * b).sum().backward()  # grad 8
    norm = optim.clip_grad_norm_([a, b], max_norm=1.0)
    assert norm == pytest.approx(10.0)
    clipped = numpy.concatenate([a.grad.numpy(), b.grad.numpy()])
    assert numpy.linalg.norm(clipped) == pytest.approx(1.0, rel=1e-5)


def test_bad_arguments():
    with pytest.raises(tc.TesseraError):
        optim.SGD([], lr=0.1)
    with pytest.raises(tc.TesseraError):
        optim.AdamW([_param([1.0])], lr=-1)
