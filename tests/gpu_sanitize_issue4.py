"""Run every kernel of issue 4 (norm.cu, activation.cu, rope.cu) once on a small case, for compute-sanitizer:

    PYTHONPATH=. compute-sanitizer --tool memcheck python3 tests/gpu_sanitize_issue4.py
    PYTHONPATH=. compute-sanitizer --tool racecheck python3 tests/gpu_sanitize_issue4.py

Cases are chosen to reach every code path: each vector width (aligned rows, odd and misaligned ones), a warp per
row and a block per row, rows longer than the registers hold (the re-read path), q-only and q+k RoPE in both
layouts, in place and out of place. Not collected by pytest (no test_ prefix). Exits non-zero on a CUDA error.
"""
import os
import sys

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cupy as cp  # noqa: E402

from tessera_cp.nn import activation, norm, rope  # noqa: E402

BF16 = ml_dtypes.bfloat16


def rand(shape, dtype, seed=[0]):   # noqa: B006 - a counter: fresh values for every array
    seed[0] += 1
    return cp.asarray(np.random.default_rng(seed[0]).standard_normal(shape).astype(dtype))


def run_norm():
    cases = [((5, 64), BF16, BF16),      # VEC 8, warp per row
             ((3, 4096), BF16, np.float32),   # VEC 8, block per row, f32 weight
             ((4, 63), np.float16, np.float16),   # VEC 1
             ((2, 4097), np.float32, np.float32),  # VEC 1 and rows longer than the registers: re-read path
             ((7, 6), BF16, BF16)]        # VEC 2
    for shape, dtype, wdtype in cases:
        x, w, g = rand(shape, dtype), rand(shape[-1:], wdtype), rand(shape, dtype)
        norm._launch_forward(x, w, 1e-6)
        norm._launch_backward(x, w, g, 1e-6)
    buf = rand(3 * 64 + 1, BF16)          # misaligned rows
    norm._launch_forward(buf[1:].reshape(3, 64), rand(64, BF16), 1e-6)


def run_activation():
    for rows, cols, dtype in [(5, 64, BF16), (3, 17, np.float16), (4, 12, np.float32)]:
        h, dout = rand((rows, 2 * cols), dtype), rand((rows, cols), dtype)
        activation._launch_swiglu_forward(h[:, :cols], h[:, cols:], 1.0)
        dh = cp.empty_like(h)
        activation._launch_swiglu_backward(h[:, :cols], h[:, cols:], dout, 1.0, dh[:, :cols], dh[:, cols:])


def run_rope():
    cos, sin = rope.rope_cache(64, 128, device="cuda")
    pos = cp.asarray(np.array([[3, 0, 63, 7, 1], [9, 9, 2, 0, 5]], np.int64))
    for layout in ("BSHD", "BHSD"):
        shape = (lambda H: (2, 5, H, 128)) if layout == "BSHD" else (lambda H: (2, H, 5, 128))
        q, k = rand(shape(3), BF16), rand(shape(2), BF16)
        rope._launch_rope([q, k], [cp.empty_like(q), cp.empty_like(k)], cos.data, sin.data, pos, layout, 1.0)
        rope._launch_rope([q], [q], cos.data, sin.data, pos, layout, -1.0)          # q only, in place
    c6, s6 = rope.rope_cache(16, 6, device="cuda")
    x = rand((1, 4, 2, 6), np.float32)                                               # half = 3: VEC 1
    rope._launch_rope([x], [cp.empty_like(x)], c6.data, s6.data, cp.arange(4, dtype=cp.int64)[None], "BSHD", 1.0)


if __name__ == "__main__":
    run_norm()
    run_activation()
    run_rope()
    cp.cuda.get_current_stream().synchronize()
    print("issue 4 kernels ran")
