"""The basic layers: Linear, Embedding, Dropout, and their functional forms."""
import math

from ..errors import DTypeError, ShapeError, TesseraError
from ..tensor import Tensor, default_generator, empty, where
from . import init
from .module import Module, Parameter


def linear(x, weight, bias=None):
    """x @ weight.T + bias, weight laid out [out_features, in_features] as in PyTorch and Hugging Face files."""
    if x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"linear: x has {x.shape[-1]} features, weight {tuple(weight.shape)} expects {weight.shape[1]}")
    out = x @ weight.T
    return out + bias if bias is not None else out


class Linear(Module):
    def __init__(self, in_features, out_features, bias=True, dtype=None, device=None, generator=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(empty(out_features, in_features, dtype=dtype, device=device))
        init.kaiming_uniform_(self.weight, generator=generator)
        self.bias = None
        if bias:
            self.bias = Parameter(empty(out_features, dtype=dtype, device=device))
            bound = 1 / math.sqrt(in_features)
            init.uniform_(self.bias, -bound, bound, generator)

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


def embedding(indices, weight):
    """Rows of ``weight`` picked by integer ``indices`` (any shape); out-of-range indices raise."""
    if not isinstance(indices, Tensor) or indices.dtype.kind != "int":
        raise DTypeError(f"embedding: indices must be an integer Tensor, got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)}")
    return weight[indices]


class Embedding(Module):
    def __init__(self, num_embeddings, embedding_dim, dtype=None, device=None, generator=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(empty(num_embeddings, embedding_dim, dtype=dtype, device=device))
        init.normal_(self.weight, generator=generator)

    def forward(self, indices):
        return embedding(indices, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


def dropout(x, p=0.5, training=True, generator=None):
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout)."""
    if not 0.0 <= p <= 1.0:
        raise TesseraError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    keep = (generator or default_generator).rand(*x.shape, device=x.device) >= p
    return where(keep, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(Module):
    def __init__(self, p=0.5, generator=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise TesseraError(f"Dropout probability must be in [0, 1], got {p}")
        self.p, self.generator = p, generator

    def forward(self, x):
        return dropout(x, self.p, self.training, self.generator)

    def extra_repr(self):
        return f"p={self.p}"


