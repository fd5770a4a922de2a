"""Tuning run for gemv_mma's variants (cuda/gemv.cu; CastedLinear's weight-only int8 product), in one call on the
GPU machine (about a minute on an H100):

    PYTHONPATH=. python3 bench/tune_gemv_mma.py [--out DIR]

Issue 11's figures: at M = 1..16 rows of x, N = K = 8192 and N = 28672, K = 8192 (int8 W + f32 row scales, bf16 x
and out), >= 1.6x faster than the cuBLAS bf16 product of the same shape and >= 75% of the 3.0 TB/s copy ceiling
in weight bytes read. The variants (nn/casted.py GEMV_VARIANTS: template arguments PIPE, XPH, EPI, LEAN and, for
gemv_mma_mc, MC; gemv.cu's header says what each changes) all compute the same bits as "base" (the kernel before
them).

1. One NVRTC build of gemv.cu with every variant instantiation the checks and timings use.
2. Correctness, on fresh random inputs with NaN-poisoned outputs: every variant equals "base" bit for bit (odd
   shapes, S = 1 and split K, K not a multiple of the slice, every prologue and weight type the variant serves,
   bias f32 / bf16, residual aliasing out); "base" (and so each variant) meets the low-precision rule against
   float64 (error <= 2 x that of the same inputs computed in float32 and rounded to the output dtype, + 1e-3;
   f32 logits: 1e-5 of the largest); each row alone gives the bits it has in a batch of 16; repeat = same bits.
3. Timings: CUDA events around a CUDA graph of >= 20 launches, median of 15 replays, per launch, weights rotated
   over enough copies that a replay reads > 4 x the 50 MB L2 (cold, as a decode step reads them); cuBLAS bf16
   (torch, when importable) on the same shapes captured the same way in the same run. "base" is timed twice (its
   spread is the noise floor). GB/s = weight bytes (N K) / time.
A short table is printed last, with the policy (GEMV_VARIANT_BY_ROWS) the timings suggest; everything also goes
to DIR/tune_gemv_mma.json and DIR/tune_gemv_mma.log.

Predictions (before any measurement; H100, 8192^2 M=1 base 30.3 us, M=16 38.2 us):
- base: as bench/RESULTS.md (M=1 74%, M=16 59% at 8192^2).
- lean: <= 3% (about 10% fewer instructions in the main loop; the loop is not issue-bound at ~50%).
- epi: M=16 1-2 us less (the last block's 8 dependent round trips become ~2), M=1 ~0.3 us less.
- x4 (phased x staging): M=16 1-2.5 us less (the 64 KB x slice no longer holds W back at the start); M=1 ~0.
- pipe: 3-8% at every M (loads in flight through the arithmetic: ~64 KB a SM all the time, instead of draining).
- ple_x4 (all four): the best, M=16 8192^2 near 31-32 us (~70%), M=1 ~28 us (~80%); x2 / x8 within noise of x4.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402

from tessera_cp.cuda import runtime  # noqa: E402
from tessera_cp.nn import casted  # noqa: E402

sys.path.insert(0, HERE)
import tune_gemv  # noqa: E402
from tune_gemv import _log_file, log, time_graph, time_torch  # noqa: E402

BF16 = ml_dtypes.bfloat16
COPY_GBS = 3000.0
SHAPES = ((8192, 8192), (28672, 8192))
ROWS = (1, 2, 4, 8, 12, 16)
VARIANTS = list(casted.GEMV_VARIANTS)
# (weight, x, out, prologue) combinations, as CUDA type names; which variants are checked on which: every variant
# on the timed path (int8, bf16, 0) and f16 x; the variants that may become the default on plain x with bf16
# weights too; "ple" (PIPE, EPI and LEAN together; XPH only changes plain x) on every combination.
I8, BF, F16, F32 = "signed char", "__nv_bfloat16", "__half", "float"
ALL_COMBOS = [(I8, BF, BF, 0), (I8, BF, BF, 1), (I8, BF, BF, 2), (BF, BF, BF, 0), (BF, BF, BF, 1), (BF, BF, BF, 2),
              (BF, BF, F32, 1), (I8, F16, F16, 0)]


def combos_for(variant):
    if variant in ("base", "ple"):
        return ALL_COMBOS
    if variant.startswith("ple") or variant == "le_x4":
        return [(I8, BF, BF, 0), (BF, BF, BF, 0), (I8, F16, F16, 0)]
    if variant in ("pipe", "pipe_lean", "lean", "epi"):
        return [(I8, BF, BF, 0), (I8, F16, F16, 0), (BF, BF, BF, 1)]
    return [(I8, BF, BF, 0), (I8, F16, F16, 0)]


# ------------------------------------------------------------------------------------------------ build
_built = {}


def prebuild():
    """gemv.cu with its instantiation lines replaced by one naming every kernel used below, built once through
    the runtime; the launcher's kernel seam then takes its kernels from that module (the runtime rebuilds a module
    once per name it was not built with: dozens of rebuilds otherwise)."""
    names = sorted({casted.gemv_kernel_name(*c, variant=v) for v in VARIANTS for c in combos_for(v)})
    code = (runtime.SOURCE_DIR / "gemv.cu").read_text()
    code = runtime._INSTANTIATE_RE.sub("", code) + "\n// tessera-instantiate: " + "; ".join(names) + "\n"
    t0 = time.time()
    runtime.compile_source(code, names[0], filename="gemv.cu+variants")
    for name in names:
        _built[name] = runtime.compile_source(code, name, filename="gemv.cu+variants")
    casted._gemv_kernel = lambda name: _built[name] if name in _built else runtime.get_kernel("gemv.cu", name)
    log(f"built {len(names)} gemv_mma instantiations in {time.time() - t0:.1f} s")
    for name in names:
        k = _built[name]
        log(f"  {name}: {k.num_regs} registers, {k.local_size_bytes} B local")


# ------------------------------------------------------------------------------------------------ correctness
def rand_case(rng, combo, B, N, K, bias_kind, with_res):
    """Fresh random inputs (drawn on the device: the large weights would take seconds on the host)."""
    wt, xt, ot, pro = combo
    r = cupy.random.RandomState(int(rng.integers(2 ** 31)))
    normal = lambda *shape: r.standard_normal(shape, dtype=numpy.float32)  # noqa: E731
    xdt = numpy.float16 if xt == F16 else BF16
    x = normal(B, 2 * K if pro == 2 else K).astype(xdt)
    if wt == I8:
        w = r.randint(-127, 128, size=(N, K), dtype=numpy.int32).astype(numpy.int8)
        scale = (r.random_sample(N, dtype=numpy.float32) * 0.02 + 0.001).astype(numpy.float32)
    else:
        w = (normal(N, K) / math.sqrt(K)).astype(BF16)
        scale = None
    g = (1 + 0.1 * normal(K)).astype(xdt) if pro == 1 else None
    bias = None
    if bias_kind:
        bias = normal(N)
        bias = bias if bias_kind == 1 else bias.astype(BF16)
    odt = {BF: BF16, F16: numpy.float16, F32: numpy.float32}[ot]
    res = normal(B, N).astype(BF16) if with_res else None
    return dict(x=x, w=w, scale=scale, g=g, bias=bias, res=res, pro=pro, odt=odt)


def reference(c, dtype):
    """The product in `dtype` (float64: the reference; float32: the same-precision one), as float64."""
    x, w = c["x"].astype(dtype), c["w"].astype(dtype)
    if c["pro"] == 2:
        K = x.shape[1] // 2
        gate, up = x[:, :K], x[:, K:]
        x = gate / (1 + cupy.exp(-gate)) * up
    if c["pro"] == 1:
        x = x / cupy.sqrt((x * x).mean(axis=1, keepdims=True) + dtype(1e-5)) * c["g"].astype(dtype)
    y = x @ w.T
    if c["scale"] is not None:
        y = y * c["scale"].astype(dtype)
    if c["bias"] is not None:
        y = y + c["bias"].astype(dtype)
    if c["res"] is not None:
        y = y + c["res"].astype(dtype)
    return y.astype(c["odt"]).astype(cupy.float64) if dtype != cupy.float64 else y


def run(c, variant, rows=None, alias=False):
    """gemv_mma on case c (rows: a slice of x) into a NaN-poisoned output; alias: residual is the output."""
    x = c["x"] if rows is None else c["x"][rows]
    res = c["res"] if rows is None or c["res"] is None else c["res"][rows]
    out = cupy.full((x.shape[0], c["w"].shape[0]), numpy.nan, dtype=c["odt"])
    if alias and res is not None:
        out[...] = res
        res = out
    assert casted.gemv_mma_supported(x, c["w"], out, c["scale"], c["bias"], c["g"], res, c["pro"] == 2)
    casted.gemv_mma(x, c["w"], out, scale=c["scale"], bias=c["bias"], norm=c["g"], eps=1e-5, swiglu=c["pro"] == 2,
                    residual=res, variant=variant)
    return out


def same_bits(a, b):
    return bool((a.view(numpy.uint8) == b.view(numpy.uint8)).all())


# (B, N, K, bias kind, residual): odd N and K, S = 1 (K = 256), split K with a short last slice, the shapes
CASES = [(1, 8192, 8192, 1, False), (16, 8192, 8192, 2, True), (5, 1000, 1008, 1, True), (16, 4097, 256, 0, False),
         (9, 300, 4112, 2, True), (12, 2560, 2048, 1, False), (8, 33, 4112, 0, True), (3, 11264, 2048, 2, False),
         (16, 28672, 8192, 1, False)]


def check_all(rng):
    failures = []
    n_cases = 0
    for combo in ALL_COMBOS:
        variants = [v for v in VARIANTS if combo in combos_for(v)]
        for B, N, K, bias_kind, with_res in CASES:
            if combo != (I8, BF, BF, 0) and N * K >= 2 ** 26:
                continue   # the large shapes on the timed path only
            wt, xt, ot, pro = combo
            if xt == F16 or ot == F32:
                with_res = False   # f16 x takes no residual; the f32 logits have none
            if xt == F16 and bias_kind == 2:
                bias_kind = 1
            c = rand_case(rng, combo, B, N, K, bias_kind, with_res)
            base = run(c, "base")
            ref = reference(c, cupy.float64)
            got = base.astype(cupy.float64)
            err = float(cupy.abs(got - ref).max())
            if ot == F32:
                ok = err <= 1e-5 * float(cupy.abs(ref).max())
                bar = f"1e-5 of {float(cupy.abs(ref).max()):.3g}"
            else:
                plain = float(cupy.abs(reference(c, cupy.float32) - ref).max())
                ok = err <= 2 * plain + 1e-3
                bar = f"2 x {plain:.3g} + 1e-3"
            ok &= bool(cupy.isfinite(got).all())
            tag = f"{combo} B={B} N={N} K={K} bias={bias_kind} res={with_res}"
            n_cases += 1
            if not ok:
                failures.append(f"base {tag}: err {err:.3g} over {bar}")
            if B > 1:   # batch invariance of the base: the first and last rows alone
                for b in (0, B - 1):
                    if not same_bits(run(c, "base", rows=slice(b, b + 1)), base[b:b + 1]):
                        failures.append(f"base {tag}: row {b} alone differs from the batch")
            for v in variants:
                n_cases += 1
                o = run(c, v)
                if not same_bits(o, base):
                    bad = int((o.view(numpy.uint8) != base.view(numpy.uint8)).sum())
                    failures.append(f"{v} {tag}: {bad} bytes differ from base (finite: "
                                    f"{bool(cupy.isfinite(o.astype(cupy.float64)).all())})")
                elif not same_bits(run(c, v), o):
                    failures.append(f"{v} {tag}: a second run differs")
                elif with_res and not same_bits(run(c, v, alias=True), base):
                    failures.append(f"{v} {tag}: residual aliasing out differs")
                elif B > 1 and not same_bits(run(c, v, rows=slice(B - 1, B)), base[B - 1:B]):
                    failures.append(f"{v} {tag}: the last row alone differs")
    for f in failures:
        log("  FAIL", f)
    log(f"correctness: {n_cases - len(failures)}/{n_cases} pass")
    return failures


# ------------------------------------------------------------------------------------------------ timing
# CUDA-graph timing of ours and torch's, and weights rotated past the L2: bench/tune_gemv.py's.
def weight_copies(N, K, int8):
    return tune_gemv.weight_copies(N, K, int8, cold=True)[0]


def have_torch():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def time_shape(N, K, results, torch_ok):
    ws8 = weight_copies(N, K, True)
    wsb = weight_copies(N, K, False) if torch_ok else None
    rng = numpy.random.default_rng(7)
    scale = cupy.asarray((rng.random(N) * 0.02 + 0.001).astype(numpy.float32))
    plan = casted.gemv_plan(N, K, 1, 0, runtime.device_attribute(runtime.SM_COUNT))
    log(f"shape {N}x{K}: plan (KS, S) = {plan}, {len(ws8)} int8 weight copies")
    rows = []
    for B in ROWS:
        x = cupy.asarray(rng.standard_normal((B, K)).astype(numpy.float32)).astype(BF16)
        out = cupy.empty((B, N), dtype=BF16)
        row = {"N": N, "K": K, "B": B, "bytes": N * K, "plan": plan}
        if torch_ok:
            import torch
            xt = torch.randn(B, K, dtype=torch.bfloat16, device="cuda")
            wts = [torch.from_dlpack(w) for w in wsb]
            row["cublas"] = time_torch(lambda i: xt @ wts[i % len(wts)].T, max(20, len(wts))) * 1e3
        for v in VARIANTS + ["base"]:   # base again last: the spread of two timings of one kernel
            key = v if v not in row else "base#2"
            row[key] = time_graph(lambda i, v=v: casted.gemv_mma(x, ws8[i % len(ws8)], out, scale=scale, variant=v),
                                  max(20, len(ws8))) * 1e3
        if B in (1, 16) and N == 8192:   # the best new variant on another split, for information
            best = min((v for v in VARIANTS if v != "base"), key=lambda v: row[v])
            for ks in (1024, 4096 if B == 1 else 1024):
                if ks != plan[0] and f"{best}@{ks}" not in row and casted.gemv_shared_bytes(2, B, ks, 0) < 227 * 1024:
                    row[f"{best}@{ks}"] = time_graph(
                        lambda i, v=best, ks=ks: casted.gemv_mma(x, ws8[i % len(ws8)], out, scale=scale, variant=v,
                                                                 splits=(ks, -(-K // ks))), max(20, len(ws8))) * 1e3
        rows.append(row)
        log(fmt_row(row))
    results["timings"] += rows


def fmt_row(row):
    best = min(VARIANTS, key=lambda v: row[v])
    gbs = row["bytes"] / row[best] / 1e3
    cub = row.get("cublas")
    vs = f"{cub / row[best]:.2f}x cuBLAS {cub:.1f}" if cub else "no cuBLAS"
    ok = gbs / COPY_GBS >= 0.75 and (cub is None or cub / row[best] >= 1.6)
    extra = "".join(f" {k}={row[k]:.1f}" for k in row if "@" in k)
    return (f"{row['N']:>5}x{row['K']} M={row['B']:2d} | " + " ".join(f"{v}={row[v]:.1f}" for v in VARIANTS)
            + f" base#2={row['base#2']:.1f} | best {best} {row[best]:.1f} us {gbs:.0f} GB/s ({gbs / COPY_GBS:.0%}) "
            + f"{vs} {'MEETS' if ok else 'misses'} (base {row['bytes'] / row['base'] / 1e3 / COPY_GBS:.0%})"
            + extra)


def suggest(timings):
    """Per M, the variant with the least geometric-mean time over both shapes, as a GEMV_VARIANT_BY_ROWS."""
    policy = []
    for B in ROWS:
        rows = [r for r in timings if r["B"] == B]
        score = {v: math.exp(sum(math.log(r[v] / r["base"]) for r in rows) / len(rows)) for v in VARIANTS}
        best = min(score, key=score.get)
        policy.append((B, best, score[best]))
    return policy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    _log_file.append(open(os.path.join(args.out, "tune_gemv_mma.log"), "w"))
    t0 = time.time()
    results = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "timings": []}
    log(f"device {results['device']}, SMs {runtime.device_attribute(runtime.SM_COUNT)}")
    prebuild()
    rng = numpy.random.default_rng(int(time.time()))
    results["failures"] = check_all(rng)
    log(f"checks done at {time.time() - t0:.0f} s")
    torch_ok = have_torch()
    if not torch_ok:
        log("torch not importable: no cuBLAS column")
    for N, K in SHAPES:
        time_shape(N, K, results, torch_ok)
        cupy.get_default_memory_pool().free_all_blocks()   # this shape's weights, now unreferenced
        if torch_ok:
            import torch
            torch.cuda.empty_cache()
        log(f"{N}x{K} timed at {time.time() - t0:.0f} s")
    policy = suggest(results["timings"])
    results["suggested"] = policy
    with open(os.path.join(args.out, "tune_gemv_mma.json"), "w") as f:
        json.dump(results, f, indent=1)

    print(f"\n==== summary ({results['device']}; us per launch, cold weights; GB/s of int8 weight bytes; "
          f"x = cuBLAS bf16 / best) ====")
    print("variants (PIPE, XPH, EPI, LEAN): " + ", ".join(f"{v}={casted.GEMV_VARIANTS[v]}" for v in VARIANTS))
    for row in results["timings"]:
        print(fmt_row(row))
    print("suggested GEMV_VARIANT_BY_ROWS by M (geomean time / base over both shapes): "
          + ", ".join(f"M<={b}: {v} ({s:.3f})" for b, v, s in policy))
    print(f"failures: {len(results['failures'])}" + "".join(f"\n  {f}" for f in results["failures"][:10]))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
