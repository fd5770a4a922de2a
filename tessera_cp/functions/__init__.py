"""The differentiable ops behind the Tensor's methods, one family per file (elementwise math, reductions, shape
changes, indexing, matmul). Each is a ``Function`` with forward and backward side by side, on raw arrays."""
