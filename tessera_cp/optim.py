"""Optimizers (SGD with momentum, AdamW with decoupled weight decay) and gradient clipping by global norm.

Updates run in place on the parameters' arrays. Half-precision parameters keep an f32 master copy in the optimizer
(updated in f32, then rounded into the parameter), so updates smaller than a bf16 step still accumulate.
"""
import math

import numpy

from . import backend
from .errors import TesseraError
from .tensor import Tensor


class Optimizer:
    def __init__(self, params, lr):
        self.params = [p for p in params]
        if not self.params:
            raise TesseraError("the optimizer got no parameters")
        if lr <= 0:
            raise TesseraError(f"learning rate must be positive, got {lr}")
        self.lr = lr
        self.state = {}
        self.master = {}  # f32 copies of half-precision parameters

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            if p.data.dtype.itemsize < 4:
                master = self.master.get(id(p))
                master = p.data.astype(numpy.float32) if master is None else master
                self.master[id(p)] = self._update(id(p), master, p.grad.data.astype(numpy.float32))
                p.data[...] = self.master[id(p)].astype(p.data.dtype)
            else:
                p.data[...] = self._update(id(p), p.data, p.grad.data.astype(p.data.dtype, copy=False))

    def _update(self, key, weight, grad):  # pragma: no cover - abstract
        raise NotImplementedError


class SGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov

    def _update(self, key, weight, grad):
        if self.weight_decay:
            grad = grad + self.weight_decay * weight
        if self.momentum:
            buf = self.state.get(key)
            buf = grad.copy() if buf is None else self.momentum * buf + grad
            self.state[key] = buf
            grad = grad + self.momentum * buf if self.nesterov else buf
        return weight - self.lr * grad


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter): w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def _update(self, key, weight, grad):
        xp = backend.array_module(weight)
        b1, b2 = self.betas
        step, m, v = self.state.get(key, (0, xp.zeros_like(weight), xp.zeros_like(weight)))
        step += 1
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        self.state[key] = (step, m, v)
        m_hat = m / (1 - b1 ** step)
        v_hat = v / (1 - b2 ** step)
        weight = weight * (1 - self.lr * self.weight_decay)
        return weight - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)


def clip_grad_norm_(params, max_norm):
    """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    total = math.sqrt(sum(float((p.grad.data.astype(numpy.float32) ** 2).sum()) for p in params))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:  # new arrays, never in place: leaves may share one gradient array
            p.grad = Tensor((p.grad.data.astype(numpy.float32) * scale).astype(p.grad.data.dtype), p.grad.dtype)
    return total
