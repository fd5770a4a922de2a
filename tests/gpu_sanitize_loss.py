"""Run every loss.cu kernel once on small, awkward cases, for compute-sanitizer (not collected by pytest).

    PYTHONPATH=. compute-sanitizer --tool memcheck python3 tests/gpu_sanitize_loss.py
    PYTHONPATH=. compute-sanitizer --tool racecheck python3 tests/gpu_sanitize_loss.py

Covers: cross_entropy_fwd with and without the gradient, in place, on rows that start off 16-byte alignment,
vocabularies of 1, 17 and 1000, ignored rows and (bypassing the host check) targets out of range;
cross_entropy_bwd on a vocabulary slice with per-row scales; scale_rows with factors of 1 and not; the fused
linear cross-entropy end to end. Prints "ok" when every launch has finished.
"""
import numpy

import cupy

import tessera_cp as tc
from tessera_cp import dtypes
from tessera_cp.nn import loss as L


def main():
    rng = numpy.random.default_rng(0)
    for storage in (numpy.float32, numpy.float16, dtypes.bf16.storage):
        for v in (1, 17, 1000):
            n = 5
            flat = cupy.asarray(rng.standard_normal(n * v + 1).astype(numpy.float32)).astype(storage)
            for offset in (0, 1):
                x = flat[offset:offset + n * v].reshape(n, v)
                t = cupy.asarray([0, v - 1, -100, -3, v])  # valid, valid, ignored, and two the kernel must refuse
                L._rows_forward_kernel(x, t, -100, 0.1, None, 1.0)
                grad = cupy.empty((n, v), dtype=storage)
                L._rows_forward_kernel(x, t, -100, 0.1, grad, 0.5)
                inplace = cupy.ascontiguousarray(x)
                _, m, log_s = L._rows_forward_kernel(inplace, t, -100, 0.0, inplace, 1.0)
                col0 = v // 3
                piece = cupy.ascontiguousarray(x[:, col0:])
                out = cupy.empty_like(piece)
                row_scale = cupy.asarray([1.0, -2.0, 3.0, 1.0, 0.5], dtype=numpy.float32)
                L._rows_backward(piece, t, m, log_s, col0, v, -100, 0.0, out, 0.25, row_scale)
                L._scale_rows(out, row_scale, per_row=True)
                L._scale_rows(out, cupy.asarray(2.0, dtype=numpy.float32), per_row=False)
    h = tc.tensor(rng.standard_normal((7, 16)).astype(numpy.float32), dtype="bf16", device="cuda",
                  requires_grad=True)
    w = tc.tensor(rng.standard_normal((33, 16)).astype(numpy.float32), dtype="bf16", device="cuda",
                  requires_grad=True)
    loss = L.fused_linear_cross_entropy(h, w, tc.tensor([0, 5, -100, 32, 7, 1, 2], device="cuda"),
                                        chunk_size=3)
    (loss * 2.0).backward()
    cupy.cuda.get_current_stream().synchronize()
    print("ok")


if __name__ == "__main__":
    main()
