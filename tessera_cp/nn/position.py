"""Position information without rotation: ALiBi attention biases and learned absolute position embeddings."""
import math

import numpy

from .. import backend, dtypes
from ..errors import DTypeError, ShapeError, TesseraError
from ..tensor import Tensor
from . import init
from .layers import Embedding
from .module import Module


def alibi_slopes(num_heads):
    """The per-head slopes of ALiBi (Press et al., 2022), float64 NumPy [num_heads].

    For n a power of two: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise (the paper's rule for
    other head counts): the slopes of the largest power of two p below n, then every other slope of 2p (the ones
    that interleave between those) for the remaining n - p heads.
    """
    if int(num_heads) != num_heads or num_heads < 1:
        raise ShapeError(f"alibi_slopes: num_heads must be an int >= 1, got {num_heads}")
    num_heads = int(num_heads)

    def power_of_two(n):
        return 2.0 ** (-8.0 / n * numpy.arange(1, n + 1))

    p = 1 << (num_heads.bit_length() - 1)
    if p == num_heads:
        return power_of_two(p)
    return numpy.concatenate([power_of_two(p), power_of_two(2 * p)[0::2][:num_heads - p]])


def alibi_bias(seq_len, num_heads, key_len=None, dtype=None, device=None):
    """ALiBi biases [num_heads, seq_len, key_len]: ``bias[h, i, j] = -slope[h] * |i + key_len - seq_len - j|``,
    the bias ``attention(..., alibi_slopes=...)`` adds inside its kernel, for use as an explicit additive mask.
    Queries are aligned to the last keys (query i sits at key position i + key_len - seq_len, as in decoding with
    a KV cache); for causal attention this is the paper's -slope * (i - j) on every visible key. Computed in
    float64 and rounded once to ``dtype`` (default f32)."""
    key_len = seq_len if key_len is None else key_len
    for name, n in (("seq_len", seq_len), ("key_len", key_len)):
        if int(n) != n or n < 0:
            raise ShapeError(f"alibi_bias: {name} must be an int >= 0, got {n}")
    dtype = dtypes.f32 if dtype is None else dtypes.as_dtype(dtype)
    if not dtype.is_floating or dtype.is_fp8:
        raise DTypeError(f"alibi_bias: dtype must be f16, bf16, f32 or f64, got {dtype.name}")
    xp = backend.xp_for(device)
    query_positions = xp.arange(int(seq_len), dtype=numpy.float64) + (int(key_len) - int(seq_len))
    distances = xp.abs(query_positions[:, None] - xp.arange(int(key_len), dtype=numpy.float64)[None, :])
    slopes = xp.asarray(alibi_slopes(num_heads))
    return Tensor((-slopes[:, None, None] * distances[None]).astype(dtype.storage), dtype)


class LearnedPositionalEmbedding(Module):
    """Absolute position embeddings learned as a table [max_seq_len, dim] (GPT-2, BERT): ``forward(position_ids)``
    gathers rows, any shape of ids (out-of-range ids raise). Initialised N(0, ``std``^2), GPT-2's 0.02 by default."""

    def __init__(self, max_seq_len, dim, dtype=None, device=None, std=0.02, generator=None):
        super().__init__()
        if min(int(max_seq_len), int(dim)) < 1:
            raise ShapeError(f"LearnedPositionalEmbedding: sizes must be >= 1, got {max_seq_len} and {dim}")
        if not std > 0 or math.isinf(std):
            raise TesseraError(f"LearnedPositionalEmbedding: std must be a positive number, got {std}")
        self.max_seq_len, self.dim = int(max_seq_len), int(dim)
        self.embeddings = Embedding(self.max_seq_len, self.dim, dtype=dtype, device=device, generator=generator)
        init.normal_(self.embeddings.weight, std=std, generator=generator)

    def forward(self, position_ids):
        return self.embeddings(position_ids)

    def extra_repr(self):
        return f"{self.max_seq_len}, {self.dim}"


__all__ = ["alibi_slopes", "alibi_bias", "LearnedPositionalEmbedding"]
