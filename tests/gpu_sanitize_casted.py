"""Run each kernel of cuda/quant.cu and cuda/int8_gemm.cu once on a small, odd-sized case, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python tests/gpu_sanitize_casted.py
    compute-sanitizer --tool racecheck python tests/gpu_sanitize_casted.py

(from the repository root, with PYTHONPATH=.). Not collected by pytest. Sizes are not multiples of any tile, so
the edge paths (zero-filled cp.async chunks, partial tiles, scalar gather tails, out-of-range indices) all run.
Exits non-zero if a result is wrong, so a silent corruption is caught too.
"""
import sys

import ml_dtypes
import numpy

import tessera_cp as tc
from tessera_cp import quant
from tessera_cp.nn import casted


def main():
    import cupy
    rng = numpy.random.default_rng(0)
    failures = []

    def check(name, ok):
        print(("ok    " if ok else "FAIL  ") + name)
        if not ok:
            failures.append(name)

    # quantize_rows_int8: vector (cols % 8 == 0) and scalar paths
    for cols in (40, 37):
        x = cupy.asarray(rng.standard_normal((5, cols)).astype(ml_dtypes.bfloat16))
        q, s = quant.quantize_rows_int8(x, pad_to=16)
        check(f"quantize_rows_int8 cols={cols}", q.shape == (5, 48) and not bool(q[:, cols:].any()))

    # w8a8_gemm_mma / w8a8_gemm_dp4a, raw and fused
    m, n, k = 37, 45, 83
    a = rng.integers(-128, 128, (m, k), dtype=numpy.int8)
    b = rng.integers(-128, 128, (n, k), dtype=numpy.int8)
    want = (a.astype(numpy.int64) @ b.astype(numpy.int64).T).astype(numpy.int32)
    for gemm in ("mma", "dp4a"):
        got = casted.int8_matmul(cupy.asarray(a), cupy.asarray(b), gemm=gemm)
        check(f"w8a8_gemm_{gemm}<int>", numpy.array_equal(cupy.asnumpy(got), want))
        x = cupy.asarray(rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16))
        y = casted.w8a8_linear(x, cupy.asarray(b), cupy.ones((n,), numpy.float32), cupy.zeros((n,), numpy.float32),
                               gemm=gemm)
        check(f"w8a8_gemm_{gemm}<bf16>", bool(cupy.isfinite(y.astype(numpy.float32)).all()))

    # weight_only_gemm (bf16, f16), M below and above the 16-row tile
    for storage in (ml_dtypes.bfloat16, numpy.float16):
        for rows in (3, 9, 19):   # 9: the cluster (multicast) kernel on sm_90
            x = cupy.asarray(rng.standard_normal((rows, k)).astype(storage))
            y = casted.weight_only_linear(x, cupy.asarray(b), cupy.ones((n,), numpy.float32))
            ref = cupy.asnumpy(x).astype(numpy.float64) @ b.astype(numpy.float64).T
            err = numpy.abs(cupy.asnumpy(y).astype(numpy.float64) - ref).max()
            check(f"weight_only_gemm<{numpy.dtype(storage).name}> rows={rows}", err <= 2e-2 * numpy.abs(ref).max())

    # embedding_gather (vector and scalar rows) and an out-of-range index
    for dim in (64, 13):
        layer = casted.CastedEmbedding(50, dim).cuda()
        out = layer(tc.tensor([0, 49, 7], device="cuda"))
        check(f"embedding_gather dim={dim}", out.shape == (3, dim))
    try:
        layer(tc.tensor([3, 50], device="cuda"))
        check("embedding_gather out of range raises", False)
    except tc.IndexOutOfRangeError:
        check("embedding_gather out of range raises", True)

    # sparse_embedding_gather, with per-lookup weights and an out-of-range index
    sparse = casted.CastedSparseEmbedding(40, 48, sparsity=0.5, block_size=16).cuda()
    out = sparse(tc.tensor([[0, 39]], device="cuda"), tc.tensor([[1.0, -2.0]], device="cuda"))
    check("sparse_embedding_gather", out.shape == (1, 2, 48))
    try:
        sparse(tc.tensor([40], device="cuda"))
        check("sparse_embedding_gather out of range raises", False)
    except tc.IndexOutOfRangeError:
        check("sparse_embedding_gather out of range raises", True)

    cupy.cuda.get_current_stream().synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
