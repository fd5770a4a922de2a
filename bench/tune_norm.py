"""rms_norm forward and fp8 encode tuning, one device call: checks and times norm.cu's forward at several grid sizes,
the variants of bench/tune_norm_variants.cu, the host's part of a call (tiny inputs, tight loop), F.rms_norm and the
copy ceiling; and cast.cu's encode (now, at several grids, and as it was: bench/tune_cast_before.cu) beside torch's
cast, after a bit-exact check against ml_dtypes. Run from the repository root:
``PYTHONPATH=. python3 bench/tune_norm.py``. Writes tune_norm.json under $OUT (or /tmp); prints a table last.

Two numbers (16384 x 4096 bf16): x read + y written = 2 * 16384 * 4096 * 2 = 268 MB, under one FLOP a byte:
memory-bound; the measured device copy of the same bytes takes about 93 us (2.88 TB/s). fp8 encode of 64M bf16:
192 MB, about 67 us at that rate.
Timings: "stream" = CUDA events around 20 back-to-back calls (the kernel alone: the host runs ahead of it);
"single" = events around one call, as bench/conftest.py times (the host's part of the call included).

Measured on the H100 (2026-11-25, two calls; stream / single us):
- first call: norm.cu's forward 107.0 / 113.4 with one wave of 512 persistent blocks; its ring clone 106.1 with one
  wave, 99.5 with two; cp.async hints (L2::256B, st.global.cs) and ring depth 3..5 within 1 %. Host us a call:
  CuPy's launch 8.8, runtime.launch 12.4, _launch_forward 15.9, public rms_norm 32.2, F.rms_norm 15.7.
  fp8 encode: the old kernel 125.6, the branch-free one 72.9 (4096 blocks), torch 71.9.
- second call: norm.cu's forward by waves of blocks 1: 104.9, 2: 99.6, 3: 97.0, 4: 95.8, 8: 94.6 (kept), one row
  a block 98.1; plain one-row-a-block variants NV2 / NV4 93.0 (the copy 92.1), NV1 95.6; TMA bulk 98.7 at best.
  Host: CuPy's launch 7.2, _launch_forward 9.9, public rms_norm 18.7, F.rms_norm 11.3.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

import cupy as cp

import tessera_cp as tc
from tessera_cp import fp8
from tessera_cp.cuda import runtime
from tessera_cp.nn import norm

T0 = time.time()
OUT = Path(os.environ.get("OUT", "/tmp"))
HERE = Path(__file__).resolve().parent
BF16 = ml_dtypes.bfloat16
ROWS, D, EPS = 16384, 4096, 1e-6
NBYTES = 2 * ROWS * D * 2
CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half", np.dtype(BF16): "__nv_bfloat16"}
results = {"norm": [], "host": [], "cast": [], "notes": []}


def log(*a):
    print(*a, flush=True)


def save():
    (OUT / "tune_norm.json").write_text(json.dumps(results, indent=1, default=str))


def sync():
    cp.cuda.get_current_stream().synchronize()


def t_single(fn, warmup=5, reps=40):
    for _ in range(warmup):
        fn()
    sync()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) * 1e3)
    return statistics.median(ts)


def t_stream(fn, n=20, reps=7, warmup=3):
    for _ in range(warmup):
        fn()
    sync()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(reps):
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / n)
    return statistics.median(ts), min(ts), max(ts)


def t_host(fn, n=3000):
    """Microseconds of host time a call (tiny inputs: the GPU keeps up), synchronised at the end."""
    for _ in range(50):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    sync()
    return host


def timed(section, name, fn, nbytes, ok=True, err=0.0, note="", n=20):
    """Times fn both ways and records a row; a failure is logged, not raised (one bad row must not end the run)."""
    try:
        st = t_stream(fn, n=n)
        si = t_single(fn)
    except Exception as exc:
        log(f"{name}: FAILED {exc!r}")
        results["notes"].append(f"{name}: {exc!r}")
        return
    rec = dict(name=name, stream_us=st[0], stream_min=st[1], stream_max=st[2], single_us=si, ok=ok, err=err,
               note=note, gbs=nbytes / st[0] / 1e3)
    results[section].append(rec)
    log(f"{name:36s} stream {st[0]:7.1f} us ({st[1]:.1f}-{st[2]:.1f})  single {si:7.1f} us  "
        f"{rec['gbs']:6.0f} GB/s  ok={ok} err={err:.3g} {note}")
    save()


# ------------------------------------------------------------------------------------------ inputs, references
def rand(shape, dtype):
    return cp.random.standard_normal(shape, dtype=cp.float32).astype(dtype)


def ref64(x, w, eps):
    x64 = x.astype(cp.float64)
    return x64 / cp.sqrt(cp.mean(x64 * x64, axis=-1, keepdims=True) + eps) * w.astype(cp.float64)


def check(y, x, w, eps):
    """(ok, kernel error): the flash-attention rule of tessera_cp.testing, float64 reference, every element finite."""
    r64 = ref64(x, w, eps)
    plain_err = float(cp.abs(norm._reference_forward(x, w, eps).astype(cp.float64) - r64).max())
    y64 = y.astype(cp.float64)
    finite = bool(cp.isfinite(y64).all())
    err = float(cp.abs(y64 - r64).max()) if finite else float("nan")
    return finite and err <= 2 * plain_err + 1e-5, err


# ------------------------------------------------------------------------------------------ variants
SRC = (HERE / "tune_norm_variants.cu").read_text()
SM = runtime.device_attribute(runtime.SM_COUNT, 0)
SMEM_SM = runtime.device_attribute(runtime.SMEM_PER_SM, 0)
# (label, kind, NV, stages, PF, CS, waves of persistent blocks); bulk last: a wait that never ends would hang
VARIANTS = [("ring S5 x2", "ring", 1, 5, 0, 0, 2), ("ring S5 x4", "ring", 1, 5, 0, 0, 4),
            ("ring S3 x2", "ring", 1, 3, 0, 0, 2), ("ring S5 pf1 cs1 x2", "ring", 1, 5, 1, 1, 2),
            ("plain NV1", "plain", 1, 0, 0, 0, 0), ("plain NV1 pf1 cs1", "plain", 1, 0, 1, 1, 0),
            ("plain NV2", "plain", 2, 0, 0, 0, 0), ("plain NV4", "plain", 4, 0, 0, 0, 0),
            ("bulk NV1 S3 x1", "bulk", 1, 3, 0, 0, 1), ("bulk NV1 S3 x2", "bulk", 1, 3, 0, 0, 2),
            ("bulk NV1 S4 x2", "bulk", 1, 4, 0, 0, 2), ("bulk NV2 S3 x2", "bulk", 2, 3, 0, 0, 2),
            ("bulk NV2 S4 x2", "bulk", 2, 4, 0, 0, 2), ("bulk NV1 S2 x2", "bulk", 1, 2, 0, 0, 2)]
DTYPES = [(BF16, BF16), (BF16, np.float32), (np.float16, np.float32), (np.float32, np.float32)]


def instantiation(v, T, W):
    _, kind, nv, stages, pf, cs, _ = v
    t, w, vec = CTYPE[np.dtype(T)], CTYPE[np.dtype(W)], 16 // np.dtype(T).itemsize
    if kind == "ring":
        return f"fwd_ring<{t}, {w}, {vec}, {stages}, {pf}, {cs}>"
    if kind == "plain":
        return f"fwd_plain<{t}, {w}, {vec}, {nv}, {pf}, {cs}>"
    return f"fwd_bulk<{t}, {w}, {vec}, {nv}, {stages}, {cs}>"


SRC_ALL = "// tessera-instantiate: " + "; ".join(
    dict.fromkeys(instantiation(v, T, W) for v in VARIANTS for T, W in DTYPES)) + "\n" + SRC


def launch_variant(v, x, w, y, eps):
    _, kind, nv, stages, _, _, waves = v
    k = runtime.compile_source(SRC_ALL, instantiation(v, x.dtype, w.dtype), filename="tune_norm_variants.cu")
    rows, Dx = x.size // x.shape[-1], x.shape[-1]
    nvec = Dx * x.dtype.itemsize // 16
    per_thread = -(-nvec // nv)
    threads = min(512, -(-per_thread // 32) * 32)
    rpb = norm.WARP_ROWS_PER_BLOCK if threads == 32 else 1
    units = -(-rows // rpb)
    if kind == "plain":
        grid, smem = units, 0
    else:
        smem = stages * threads * rpb * 16 if kind == "ring" else stages * rpb * nvec * 16
        resident = norm._resident_blocks(k, threads * rpb, smem, SMEM_SM)
        grid = norm._persistent_grid(units, SM * resident * waves)
    if smem + k.shared_size_bytes > runtime.SMEM_DEFAULT_LIMIT:
        k.max_dynamic_shared_size_bytes = smem
    args = (x, w, y, np.int64(rows), np.int32(Dx), np.float32(eps))
    return (lambda: k((grid,), (threads, rpb), args, shared_mem=smem)), (grid, (threads, rpb), smem, k.num_regs)


def norm_section(torch):
    import torch.nn.functional as F
    x, w = rand((ROWS, D), BF16), rand(D, BF16)
    y = cp.full(x.shape, cp.nan, dtype=BF16)
    norm._launch_forward(x, w, EPS, out=y)
    ok, err = check(y, x, w, EPS)
    kernel, grid, block, smem, scalars = norm._forward_launches._plans[next(
        k for k in norm._forward_launches._plans if k[0] == (ROWS, D))]
    args = (x, w, y) + scalars
    log(f"norm.cu forward as launched: grid {grid} block {block} smem {smem} regs {kernel.num_regs}")
    _, _, max_grid, _ = norm._plan(cp, "rms_norm_fwd", x, w, D, (x, y))
    grids = [(f"x{k}", norm._persistent_grid(ROWS, k * max_grid)) for k in (1, 2, 3, 4, 8)] + [("a row a block", ROWS)]
    for label, g in grids:
        y[...] = cp.nan
        fn = lambda g=g: kernel((g,), block, args, shared_mem=smem)  # noqa: E731
        fn()
        okg, errg = check(y, x, w, EPS)
        timed("norm", f"norm.cu kernel grid {label} ({g})", fn, NBYTES, okg, errg)
    timed("norm", "_launch_forward(out=y)", lambda: norm._launch_forward(x, w, EPS, out=y), NBYTES, ok, err)
    timed("norm", "_launch_forward (allocates)", lambda: norm._launch_forward(x, w, EPS), NBYTES, ok, err)
    xs, ws = tc.Tensor(x), tc.Tensor(w)
    with tc.no_grad():
        yp = norm.rms_norm(xs, ws, EPS)
        okp, errp = check(yp.data, x, w, EPS)
        timed("norm", "public rms_norm (no_grad)", lambda: norm.rms_norm(xs, ws, EPS), NBYTES, okp, errp)
    xt, wt = torch.from_dlpack(x), torch.from_dlpack(w)
    timed("norm", "torch F.rms_norm", lambda: F.rms_norm(xt, (D,), wt, EPS), NBYTES)
    big = cp.empty_like(x)
    timed("norm", "memcpy D2D (same bytes)", lambda: cp.cuda.runtime.memcpyAsync(
        big.data.ptr, x.data.ptr, x.nbytes, cp.cuda.runtime.memcpyDeviceToDevice, cp.cuda.get_current_stream().ptr),
        NBYTES)

    # the host's part of a call: tiny inputs, so the GPU keeps up with the host
    xs_small, ws_small = rand((8, D), BF16), rand(D, BF16)
    ys_small = cp.empty_like(xs_small)
    norm._launch_forward(xs_small, ws_small, EPS, out=ys_small)
    ks, gs, bs, sm, sc = norm._forward_launches._plans[next(k for k in norm._forward_launches._plans if k[0] == (8, D))]
    sargs = (xs_small, ws_small, ys_small) + sc
    Xs, Ws = tc.Tensor(xs_small), tc.Tensor(ws_small)
    txs, tws = torch.from_dlpack(xs_small), torch.from_dlpack(ws_small)
    small_bits = rand(1024, BF16)
    tsb = torch.from_dlpack(small_bits)
    f = fp8._FORMATS[tc.fp8_e4m3]
    items = [("raw CuPy kernel call", lambda: ks(gs, bs, sargs, shared_mem=sm)),
             ("runtime.launch", lambda: runtime.launch(ks, gs, bs, sargs, shared_mem=sm)),
             ("_launch_forward(out=y)", lambda: norm._launch_forward(xs_small, ws_small, EPS, out=ys_small)),
             ("_launch_forward (allocates)", lambda: norm._launch_forward(xs_small, ws_small, EPS)),
             ("public rms_norm (no_grad)", lambda: norm.rms_norm(Xs, Ws, EPS)),
             ("torch F.rms_norm", lambda: F.rms_norm(txs, (D,), tws, EPS)),
             ("fp8.encode 1024 bf16", lambda: fp8.encode(small_bits, tc.fp8_e4m3, saturate=True)),
             ("fp8._encode_cuda 1024 bf16", lambda: fp8._encode_cuda(small_bits, f, True)),
             ("torch .to(float8) 1024", lambda: tsb.to(torch.float8_e4m3fn))]
    with tc.no_grad():
        for name, fn in items:
            try:
                us = t_host(fn)
            except Exception as exc:
                log(f"host {name}: FAILED {exc!r}")
                continue
            results["host"].append(dict(name=name, us=us))
            log(f"host {name:30s} {us:6.2f} us/call")
    save()


def variants_section():
    odd = [((17, 1000), BF16, BF16), ((1000, 96), BF16, BF16), ((3, 4096), np.float16, np.float32),
           ((5, 2048), np.float32, np.float32), ((7, 4096), BF16, np.float32), ((33, 256), BF16, BF16)]
    w = rand(D, BF16)
    y = cp.empty((ROWS, D), dtype=BF16)
    for v in VARIANTS:
        try:
            bad = []
            for shape, T, W in odd:   # fresh inputs, NaN-poisoned outputs, odd shapes and other dtypes
                xo, wo = rand(shape, T), rand(shape[-1:], W)
                yo = cp.full(shape, cp.nan, dtype=T)
                launch_variant(v, xo, wo, yo, 1e-5)[0]()
                okk, e = check(yo, xo, wo, 1e-5)
                if not okk:
                    bad.append(f"{shape} {np.dtype(T).name}/{np.dtype(W).name} err {e:.3g}")
            x2 = rand((ROWS, D), BF16)
            y[...] = cp.nan
            fn, cfg = launch_variant(v, x2, w, y, EPS)
            fn()
            okk, e = check(y, x2, w, EPS)
            timed("norm", v[0], fn, NBYTES, okk and not bad, e, f"cfg {cfg}" + (f" ODD FAIL {bad}" if bad else ""))
        except Exception as exc:
            log(f"{v[0]}: FAILED {exc!r}")
            results["notes"].append(f"{v[0]}: {exc!r}")


def _oracle_encode(x, fmt, saturate):
    maxf = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[fmt.name]
    x = np.asarray(x).astype(np.float32)
    with np.errstate(all="ignore"):
        if saturate:
            x = np.clip(x, -maxf, maxf)
        return x.astype(fmt.ml_type).view(np.uint8)


def cast_section(torch):
    N = 64 * 2 ** 20
    bad = []   # every bf16 and f16 pattern (plus 13: the tail runs too), random f32 bits; both formats, both modes
    samples = []
    for T in (BF16, np.float16):
        pat = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(T)
        samples.append((np.dtype(T).name, np.concatenate([pat, pat[:13]])))
    samples.append(("f32", np.random.default_rng(0).integers(0, 1 << 32, size=1 << 22, dtype=np.uint32)
                    .view(np.float32)))
    for name, pat in samples:
        for fmt in (tc.fp8_e4m3, tc.fp8_e5m2):
            for sat in (False, True):
                got = cp.asnumpy(fp8.encode(cp.asarray(pat), fmt, saturate=sat))
                n_bad = int((got != _oracle_encode(pat, fmt, sat)).sum())
                if n_bad:
                    bad.append(f"{name}->{fmt.name} sat={sat}: {n_bad} differ")
    log(f"cast check against ml_dtypes: {bad if bad else 'all bit-exact'}")
    results["notes"].append(dict(cast_bad=bad))

    x = rand(N, BF16)
    f = fp8._FORMATS[tc.fp8_e4m3]
    out = cp.empty(N, dtype=np.uint8)
    new_k = runtime.get_kernel("cast.cu", "encode_e4m3<__nv_bfloat16>")
    old_k = runtime.compile_source((HERE / "tune_cast_before.cu").read_text(), "encode_e4m3<__nv_bfloat16>",
                                   filename="tune_cast_before.cu")
    ref = cp.empty(N, dtype=np.uint8)
    old_k((8192,), (256,), (x, ref, np.int64(N), np.int32(1)))
    xt = torch.from_dlpack(x)
    items = [("fp8.encode (public)", lambda: fp8.encode(x, tc.fp8_e4m3, saturate=True)),
             ("fp8._encode_cuda(out=)", lambda: fp8._encode_cuda(x, f, True, out=out))]
    for g in (2112, 4096, 8192):
        items.append((f"new kernel grid {g}", lambda g=g: new_k((g,), (256,), (x, out, np.int64(N), np.int32(1)))))
    items.append(("old kernel (grid 8192)", lambda: old_k((8192,), (256,), (x, out, np.int64(N), np.int32(1)))))
    items.append(("torch .to(float8_e4m3fn)", lambda: xt.to(torch.float8_e4m3fn)))
    for name, fn in items:
        out[...] = 0xAB
        r = fn()
        got = r if name.startswith("fp8.encode") else out
        same = bool((got == ref).all()) if not name.startswith("torch") else True
        timed("cast", f"cast {name}", fn, 3 * N, same, 0.0, "" if same else "BITS DIFFER FROM OLD KERNEL", n=10)


def summary():
    log("\n=== rms_norm fwd 16384x4096 bf16 (stream: the kernel alone; single: one call timed as conftest does)")
    base = next((r for r in results["norm"] if r["name"] == "torch F.rms_norm"),
                dict(single_us=float("nan"), stream_us=float("nan")))
    for r in results["norm"]:
        log(f"{r['name']:36s} {r['stream_us']:7.1f} {r['single_us']:7.1f} us {r['gbs']:5.0f} GB/s  "
            f"F.rms_norm/this: single {base['single_us'] / r['single_us']:.2f}x stream "
            f"{base['stream_us'] / r['stream_us']:.2f}x {'ok' if r['ok'] else 'FAIL'}")
    log("=== host us/call: " + ", ".join(f"{h['name']} {h['us']:.1f}" for h in results["host"]))
    log("=== fp8 encode 64M bf16 -> e4m3 sat (stream/single us, GB/s):")
    for c in results["cast"]:
        log(f"{c['name']:36s} {c['stream_us']:7.1f} {c['single_us']:7.1f} us {c['gbs']:5.0f} GB/s "
            f"{'' if c['ok'] else 'DIFFERS'}")
    log(f"=== notes: {results['notes']}  total {time.time() - T0:.0f} s")


def main():
    log(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {SM} SMs")
    import torch
    for section in (norm_section, cast_section):
        try:
            section(torch)
        except Exception as exc:
            log(f"{section.__name__} FAILED {exc!r}")
            results["notes"].append(f"{section.__name__}: {exc!r}")
    variants_section()
    save()
    summary()


if __name__ == "__main__":
    sys.exit(main())
