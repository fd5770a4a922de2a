"""Elementwise math: binary arithmetic with broadcasting (undone in backward by the tape) and unary functions."""
from .. import backend
from ..autograd import Function


class Add(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, g):
        return g, g


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, g):
        return g, -g


class Mul(Function):
    def forward(self, a, b):
        self.save(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        return g * b, g * a


class Div(Function):
    def forward(self, a, b):
        self.save(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        ga = g / b
        return ga, -ga * a / b


class Pow(Function):
    def forward(self, a, b):
        out = a ** b
        self.save(a, b, out)
        return out

    def backward(self, g):
        a, b, out = self.saved
        xp = backend.array_module(a)
        ga = g * b * a ** (b - 1)
        if self.inputs[1] is None:  # a constant exponent needs no gradient
            return ga, None
        # d(a^b)/db = a^b log a, taken as 0 where a <= 0 (the limit at 0 for b > 0).
        safe_log = xp.log(xp.where(a > 0, a, 1))
        return ga, g * out * safe_log


class Maximum(Function):
    def forward(self, a, b):
        xp = backend.array_module(a, b)
        self.save(a >= b)
        return xp.maximum(a, b)

    def backward(self, g):
        (a_wins,) = self.saved
        return g * a_wins, g * ~a_wins


class Minimum(Function):
    def forward(self, a, b):
        xp = backend.array_module(a, b)
        self.save(a <= b)
        return xp.minimum(a, b)

    def backward(self, g):
        (a_wins,) = self.saved
        return g * a_wins, g * ~a_wins


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Exp(Function):
    def forward(self, a):
        out = backend.array_module(a).exp(a)
        self.save(out)
        return out

    def backward(self, g):
        return (g * self.saved[0],)


class Log(Function):
    def forward(self, a):
        self.save(a)
        return backend.array_module(a).log(a)

    def backward(self, g):
        return (g / self.saved[0],)


class Sqrt(Function):
    def forward(self, a):
        out = backend.array_module(a).sqrt(a)
        self.save(out)
        return out

    def backward(self, g):
        return (g / (2 * self.saved[0]),)


class Rsqrt(Function):
    def forward(self, a):
        xp = backend.array_module(a)
        out = (1 / xp.sqrt(_at_least_f32(xp, a))).astype(a.dtype, copy=False)
        self.save(out)
        return out

    def backward(self, g):
        out = self.saved[0]
        return (g * (-0.5) * out * out * out,)


class Sin(Function):
    def forward(self, a):
        self.save(a)
        return backend.array_module(a).sin(a)

    def backward(self, g):
        return (g * backend.array_module(g).cos(self.saved[0]),)


class Cos(Function):
    def forward(self, a):
        self.save(a)
        return backend.array_module(a).cos(a)

    def backward(self, g):
        return (-g * backend.array_module(g).sin(self.saved[0]),)


class Tanh(Function):
    def forward(self, a):
        out = backend.array_module(a).tanh(a)
        self.save(out)
        return out

    def backward(self, g):
        out = self.saved[0]
        return (g * (1 - out * out),)


def _at_least_f32(xp, a):
    """Half types upcast: a formula of several roundings in bf16 drifts by more than a bf16 step."""
    return a.astype(xp.float32) if a.dtype.itemsize < 4 else a


def stable_sigmoid(xp, a):
    """1 / (1 + exp(-a)) without overflow: exp of a non-positive number only; f32 inside for half types."""
    x = _at_least_f32(xp, a)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)


class Sigmoid(Function):
    def forward(self, a):
        out = stable_sigmoid(backend.array_module(a), a)
        self.save(out)
        return out

    def backward(self, g):
        out = self.saved[0]
        return (g * out * (1 - out),)


class Abs(Function):
    def forward(self, a):
        xp = backend.array_module(a)
        self.save(xp.sign(a))
        return xp.abs(a)

    def backward(self, g):
        return (g * self.saved[0],)


class Relu(Function):
    def forward(self, a):
        positive = a > 0
        self.save(positive)
        return a * positive

    def backward(self, g):
        return (g * self.saved[0],)


class Clamp(Function):
    def forward(self, a, lo=None, hi=None):
        xp = backend.array_module(a)
        inside = xp.ones(a.shape, dtype=bool)
        if lo is not None:
            inside &= a >= lo
        if hi is not None:
            inside &= a <= hi
        self.save(inside)
        return xp.clip(a, lo, hi).astype(a.dtype, copy=False)

    def backward(self, g):
        return (g * self.saved[0],)


class Where(Function):
    def forward(self, cond, a, b):
        self.save(cond)
        return backend.array_module(a, b, cond).where(cond, a, b)

    def backward(self, g):
        (cond,) = self.saved
        zero = g.dtype.type(0)
        xp = backend.array_module(g)
        return None, xp.where(cond, g, zero), xp.where(cond, zero, g)


class Cast(Function):
    """A dtype change between non-fp8 dtypes; the gradient is cast back to the input's dtype."""

    def forward(self, a, storage=None):
        self.source = a.dtype
        return a.astype(storage)

    def backward(self, g):
        return (g.astype(self.source),)
