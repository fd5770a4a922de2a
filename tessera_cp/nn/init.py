"""Weight initialisers, in place on a Tensor's data (as torch.nn.init). Each draws from ``generator`` or the default."""
import math

from .. import autograd
from ..tensor import rand, randn, where
from ..errors import ShapeError


def _fill(t, sample):
    with autograd.no_grad():
        t.data[...] = sample.astype(t.dtype).data
    return t


def _fans(t):
    if t.ndim < 2:
        raise ShapeError(f"fan-based initialisers need a tensor of rank >= 2, got shape {t.shape}")
    receptive = 1
    for n in t.shape[2:]:
        receptive *= n
    return t.shape[1] * receptive, t.shape[0] * receptive  # fan_in, fan_out (torch's [out, in, ...] layout)


def zeros_(t):
    t.data[...] = 0
    return t


def ones_(t):
    t.data[...] = 1
    return t


def normal_(t, mean=0.0, std=1.0, generator=None):
    return _fill(t, randn(*t.shape, device=t.device, generator=generator) * std + mean)


def uniform_(t, a=0.0, b=1.0, generator=None):
    return _fill(t, rand(*t.shape, device=t.device, generator=generator) * (b - a) + a)


def trunc_normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    """Normal values redrawn until inside [a, b] (in units of std around mean, as the bounds are absolute in torch:
    here a and b are absolute too)."""
    sample = randn(*t.shape, device=t.device, generator=generator) * std + mean
    for _ in range(100):
        outside = (sample < a) | (sample > b)
        if not bool(outside.any()):
            break
        fresh = randn(*t.shape, device=t.device, generator=generator) * std + mean
        sample = where(outside, fresh, sample)
    return _fill(t, sample.clamp(a, b))


def xavier_uniform_(t, gain=1.0, generator=None):
    fan_in, fan_out = _fans(t)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(t, -bound, bound, generator)


def kaiming_uniform_(t, a=math.sqrt(5), generator=None):
    """torch.nn.Linear's default: uniform in +-gain*sqrt(3/fan_in), gain = sqrt(2/(1+a^2))."""
    fan_in, _ = _fans(t)
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan_in)
    return uniform_(t, -bound, bound, generator)
