"""Tuning run for gemm_sm90.cu (issue 13 item 4): correctness of every variant on fresh random inputs with
poisoned outputs, then CUDA-event timings beside torch (torch._int_mm, torch._scaled_mm, cuBLAS bf16) in the same
process. Prints a table last. Run on the H100: PYTHONPATH=. python bench/tune_gemm90.py"""
import sys
import time

import cupy
import numpy

import tessera_cp as tc
from tessera_cp import dtypes, fp8, quant
from tessera_cp.nn import casted


def exact_int32(a, b):
    return (a.astype(numpy.float64) @ b.astype(numpy.float64).T).astype(numpy.int64).astype(numpy.int32)


def check_int8(m, n, k, seed):
    rng = numpy.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k), dtype=numpy.int8)
    b = rng.integers(-128, 128, (n, k), dtype=numpy.int8)
    out = cupy.full((m, n), -0x5A5A5A5A, dtype=numpy.int32)
    casted.int8_matmul(cupy.asarray(a), cupy.asarray(b), gemm="sm90", out=out)
    got, want = cupy.asnumpy(out), exact_int32(a, b)
    bad = int((got != want).sum())
    print(f"int8 sm90 {m}x{n}x{k}: {bad} of {got.size} differ", flush=True)
    return bad == 0


def fp8_bits(rng, shape):
    x = (rng.standard_normal(shape) * 4).astype(numpy.float32)
    return cupy.asarray(quant.quantize(x, dtypes.fp8_e4m3, scale=numpy.float32(1.0))[0])


def check_fp8(m, n, k, seed, per_row, out_dtype):
    rng = numpy.random.default_rng(seed)
    a, b = fp8_bits(rng, (m, k)), fp8_bits(rng, (n, k))
    sa = cupy.asarray(rng.uniform(0.5, 2, m if per_row else 1).astype(numpy.float32))
    sb = cupy.asarray(rng.uniform(0.5, 2, n if per_row else 1).astype(numpy.float32))
    out = cupy.full((m, n), numpy.nan, dtype=out_dtype.storage)
    casted.fp8_matmul(a, b, sa, sb, out_dtype, out=out)
    a64 = fp8.decode(cupy.asnumpy(a), dtypes.fp8_e4m3, dtypes.f32).astype(numpy.float64)
    b64 = fp8.decode(cupy.asnumpy(b), dtypes.fp8_e4m3, dtypes.f32).astype(numpy.float64)
    s = cupy.asnumpy(sa).astype(numpy.float64).reshape(-1, 1) * cupy.asnumpy(sb).astype(numpy.float64).reshape(1, -1)
    ref = (a64 @ b64.T) * s
    mag = (numpy.abs(a64) @ numpy.abs(b64).T) * s
    got = cupy.asnumpy(out).astype(numpy.float64)
    ulp = 2.0 ** -8 if out_dtype is dtypes.bf16 else 2.0 ** -11 if out_dtype is dtypes.f16 else 2.0 ** -24
    err = numpy.abs(got - ref) - (ulp * numpy.abs(ref) + 2.0 ** -12 * mag)
    ok = bool(numpy.isfinite(got).all() and (err <= 0).all())
    rel = float(numpy.max(numpy.abs(got - ref) / numpy.maximum(mag, 1e-30)))
    print(f"fp8 sm90 {m}x{n}x{k} per_row={per_row} {out_dtype.name}: ok={ok} max |err|/sum|ab| {rel:.2e}",
          flush=True)
    return ok


def w8a8_equal(m, n, k, seed):
    rng = numpy.random.default_rng(seed)
    x = cupy.asarray(rng.standard_normal((m, k)).astype(numpy.float32)).astype(dtypes.bf16.storage)
    w = cupy.asarray(rng.integers(-127, 128, (n, k), dtype=numpy.int8))
    ws = cupy.asarray(rng.uniform(1e-3, 2e-2, n).astype(numpy.float32))
    bias = cupy.asarray(rng.standard_normal(n).astype(numpy.float32))
    outs = []
    for gemm in ("mma", "sm90"):
        out = cupy.full((m, n), numpy.nan, dtype=dtypes.bf16.storage)
        casted.w8a8_linear(x, w, ws, bias, dtypes.bf16.storage, gemm, out=out)
        outs.append(cupy.asnumpy(out).view(numpy.uint16))
    same = bool(numpy.array_equal(outs[0], outs[1]))
    print(f"W8A8 sm90 == mma {m}x{n}x{k}: {same}", flush=True)
    return same


def sm90(config, a, b, out, scale=None):
    """out = a @ b.T through gemm_sm90_<config> directly (any config, whichever the public ops pick)."""
    m, n = a.shape[0], b.shape[0]
    return casted._sm90_gemm(config, casted._pad_k(a), casted._pad_k(b), m, n, out, scale, scale)


def check_pingpong():
    """e4m3_bf16_fast_pp (what fp8_matmul(fast_accum=True) runs for bf16) bit for bit against the cooperative
    fast-accum config (each element's k order is the same) and against float64 within a loose bound."""
    ok = True
    for m, n, k in [(1, 1, 16), (33, 33, 48), (1000, 1000, 4097), (17, 4097, 1000), (4097, 33, 1000)]:
        rng = numpy.random.default_rng(m + n + k)
        fa, fb = fp8_bits(rng, (m, k)), fp8_bits(rng, (n, k))
        one = cupy.ones((1,), numpy.float32)
        outs = {}
        for config in ("e4m3_bf16_fast", "e4m3_bf16_fast_pp"):
            outs[config] = cupy.full((m, n), numpy.nan, dtype=dtypes.bf16.storage)
            sm90(config, fa, fb, outs[config], one)
        a64 = fp8.decode(cupy.asnumpy(fa), dtypes.fp8_e4m3, dtypes.f32).astype(numpy.float64)
        b64 = fp8.decode(cupy.asnumpy(fb), dtypes.fp8_e4m3, dtypes.f32).astype(numpy.float64)
        ref, mag = a64 @ b64.T, numpy.abs(a64) @ numpy.abs(b64).T
        got = cupy.asnumpy(outs["e4m3_bf16_fast_pp"]).astype(numpy.float64)
        within = bool((numpy.abs(got - ref) <= 2.0 ** -8 * numpy.abs(ref) + 2.0 ** -10 * mag).all())
        same = bool(numpy.array_equal(cupy.asnumpy(outs["e4m3_bf16_fast"]).view(numpy.uint16),
                                      cupy.asnumpy(outs["e4m3_bf16_fast_pp"]).view(numpy.uint16)))
        print(f"fp8 fast ping-pong {m}x{n}x{k}: within bound {within}, same bits as cooperative {same}", flush=True)
        ok &= within and same
    return ok


def timeit(fn, reps=20):
    fn()
    cupy.cuda.get_current_stream().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end) / reps)
    return best  # ms per call


def main():
    t0 = time.time()
    ok = True
    for shape in [(1, 1, 16), (33, 33, 33), (1000, 1000, 4097), (4097, 33, 1000), (17, 4097, 1000),
                  (1, 4097, 4097), (257, 129, 200), (4097, 4097, 1000)]:
        ok &= check_int8(*shape, seed=sum(shape))
    for m, n, k in [(129, 257, 4112), (3, 300, 2 ** 16 + 16)]:  # sums past 2^24, odd: no float rounding
        a = numpy.full((m, k), 127, dtype=numpy.int8)
        a[:, ::7] = -128
        b = numpy.random.default_rng(k).integers(125, 128, (n, k), dtype=numpy.int8)
        got = cupy.asnumpy(casted.int8_matmul(cupy.asarray(a), cupy.asarray(b), gemm="sm90"))
        want = exact_int32(a, b)
        same = bool(numpy.array_equal(got, want))
        print(f"int8 sm90 large sums {m}x{n}x{k} (max |sum| {numpy.abs(want).max()}): exact={same}", flush=True)
        ok &= same
    a = cupy.full((3, 2 ** 17), -128, dtype=numpy.int8)
    wrap = bool((cupy.asnumpy(casted.int8_matmul(a, a, gemm="sm90")) == -2 ** 31).all())
    print(f"int8 sm90 wraps at 2^31 like int32: {wrap}", flush=True)
    ok &= wrap
    print(f"first sm90 compile + checks: {time.time() - t0:.1f} s", flush=True)
    for shape in [(1, 1, 16), (33, 33, 48), (1000, 1000, 4097), (17, 4097, 1000), (4097, 4097, 1024)]:
        for per_row, od in ((False, dtypes.bf16), (True, dtypes.bf16), (False, dtypes.f32), (True, dtypes.f16)):
            ok &= check_fp8(*shape, seed=sum(shape), per_row=per_row, out_dtype=od)
    for shape in [(1, 1, 1), (33, 33, 33), (1000, 1000, 4097), (17, 4097, 1000)]:
        ok &= w8a8_equal(*shape, seed=sum(shape))
    k0 = casted._runtime().get_cute_kernel("gemm_sm90.cu", "gemm_sm90_s8")
    k1 = casted._runtime().get_cute_kernel("gemm_sm90.cu", "gemm_sm90_e4m3_bf16")
    print(f"regs s8 {k0.num_regs} local {k0.local_size_bytes}; e4m3 {k1.num_regs} local {k1.local_size_bytes}; "
          f"plans {casted._sm90_plans.get(('s8', 8192, 8192, 8192, 132, 0))}", flush=True)
    ok &= check_pingpong()
    print("CORRECTNESS", "OK" if ok else "FAILED", flush=True)

    import torch
    rows = []
    for size in (8192, 4096):
        m = n = k = size
        ops = 2.0 * m * n * k
        a8 = cupy.random.randint(-128, 128, (m, k), dtype=numpy.int8)
        b8 = cupy.random.randint(-128, 128, (n, k), dtype=numpy.int8)
        o32 = cupy.empty((m, n), numpy.int32)
        rng = numpy.random.default_rng(size)
        f8a, f8b = fp8_bits(rng, (m, k)), fp8_bits(rng, (n, k))
        one = cupy.ones((1,), numpy.float32)
        srow, scol = cupy.ones((m,), numpy.float32), cupy.ones((n,), numpy.float32)
        obf = cupy.empty((m, n), dtypes.bf16.storage)
        at, bt = torch.from_dlpack(a8), torch.from_dlpack(b8)
        fa, fb = torch.from_dlpack(f8a).view(torch.float8_e4m3fn), torch.from_dlpack(f8b).view(torch.float8_e4m3fn)
        st = torch.ones((), device="cuda")
        xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        layer = casted.CastedLinear(k, n, mode="w8a8", generator=tc.Generator(0)).cuda()
        x = tc.randn(m, k, dtype=tc.bf16, device="cuda")
        xs = x.data
        w, ws, bias = layer.weight.data, layer.weight_scale.data, layer.bias.data.astype(numpy.float32)
        variants = [
            ("int8 sm90 GEMM (int32 out)", lambda: casted.int8_matmul(a8, b8, gemm="sm90", out=o32)),
            ("int8 mma GEMM (int32 out)", lambda: casted.int8_matmul(a8, b8, gemm="mma", out=o32)),
            ("torch._int_mm", lambda: torch._int_mm(at, bt.t())),
            ("fp8 sm90 GEMM per-tensor -> bf16 (fused)", lambda: casted.fp8_matmul(f8a, f8b, one, one, out=obf)),
            ("fp8 sm90 GEMM per-row/col -> bf16 (f32 + epilogue)",
             lambda: casted.fp8_matmul(f8a, f8b, srow, scol, out=obf)),
            ("torch._scaled_mm e4m3 -> bf16", lambda: torch._scaled_mm(fa, fb.t(), st, st, out_dtype=torch.bfloat16)),
            ("fp8 sm90 fast accum cooperative 128x256 -> bf16", lambda: sm90("e4m3_bf16_fast", f8a, f8b, obf, one)),
            ("fp8_matmul(fast_accum=True) -> bf16 (ping-pong 128x128)",
             lambda: casted.fp8_matmul(f8a, f8b, one, one, out=obf, fast_accum=True)),
            ("torch._scaled_mm e4m3 fast accum -> bf16",
             lambda: torch._scaled_mm(fa, fb.t(), st, st, out_dtype=torch.bfloat16, use_fast_accum=True)),
            ("cuBLAS bf16 (torch)", lambda: xb @ wb.T),
            ("W8A8 linear sm90 (quant + GEMM + epilogue)",
             lambda: casted.w8a8_linear(xs, w, ws, bias, gemm="sm90", weight_padded=w)),
            ("W8A8 linear mma", lambda: casted.w8a8_linear(xs, w, ws, bias, gemm="mma", weight_padded=w)),
        ]
        for name, fn in variants:
            try:
                ms = timeit(fn, reps=10 if size == 8192 else 20)
            except Exception as e:  # a baseline this torch build lacks
                print(f"{name}: unavailable ({type(e).__name__}: {e})", flush=True)
                continue
            rows.append((f"{name} {size}^3", ms, ops / ms / 1e9))
            print(f"{name} {size}^3: {ms * 1e3:.1f} us {ops / ms / 1e9:.0f} T/s", flush=True)
    print(f"\n{'variant':<62} {'us':>9} {'TOP/s or TFLOP/s':>17}")
    for name, ms, t in rows:
        print(f"{name:<62} {ms * 1e3:9.1f} {t:17.0f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
