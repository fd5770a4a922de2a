"""Tuning run for the few-row products of cuda/gemv.cu (gemv_mma: CastedLinear's weight-only int8 path;
gemv_rows: the decode step's) and the CastedEmbedding gather (cuda/quant.cu), in one call on the GPU machine:

    PYTHONPATH=$PWD python bench/tune_gemv.py [--no-llama] [--out DIR]

1. Correctness: fresh random inputs, NaN-poisoned outputs, against float64 (cupy) with the low-precision rule
   (error <= 2 x that of the same-precision reference + a small absolute term); bitwise batch invariance (rows of
   B = 16 equal each row alone) and repeatability; the gather bit for bit against its float32 formula.
2. Timings (CUDA events around a CUDA graph of R launches, median of several replays, per launch) beside cuBLAS bf16
   (torch, captured the same way) on the same shapes. Weights rotate over enough copies that the bytes of one
   graph replay exceed the 50 MB L2 ("cold", as in a decode step); the issue's 8192 x 8192 shape is also timed on
   one weight copy ("same", as bench_casted.py does). Bytes = weight bytes read (N K itemsize).
3. The Llama (TinyLlama-1.1B shape) batch-1 decode step, bf16 and int8 weight-only, replayed from its CUDA graph,
   under each choice of decode kernel (bytes as bench_llama.py counts them).
A short table is printed last; everything also goes to DIR/tune_gemv.json and DIR/tune_gemv.log.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402

import tessera_cp as tc  # noqa: E402
from tessera_cp import dtypes  # noqa: E402
from tessera_cp.cuda import runtime  # noqa: E402
from tessera_cp.models import gemv  # noqa: E402
from tessera_cp.nn import casted  # noqa: E402

BF16 = ml_dtypes.bfloat16
COPY_GBS = 3000.0
L2_BYTES = 50 * 2 ** 20
# Llama decode projections (TinyLlama): name, N, K, prologue
LLAMA = [("qkv", 2560, 2048, 1), ("o", 2048, 2048, 0), ("gate_up", 11264, 2048, 1), ("down", 2048, 5632, 2),
         ("lm_head", 32000, 2048, 1)]

log_lines = []
_log_file = []


def log(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    log_lines.append(line)
    if _log_file:   # written as it goes: a run cut short still leaves its lines
        _log_file[0].write(line + "\n")
        _log_file[0].flush()


# ------------------------------------------------------------------------------------------------ decode kernels
class decode_policy:
    """Inside the block, the decode step's products (models.gemv.rows_linear) take `kernel` ("rows" or "mma") for
    both weight kinds, and gemv_rows uses `int8_rows` rows of W per block for int8 weights and one row of x."""

    def __init__(self, kernel, int8_rows=None):
        self.kernel, self.int8_rows = kernel, int8_rows

    def __enter__(self):
        self.saved = (gemv.DECODE_KERNEL, dict(gemv._GEMV_ROWS))
        gemv.DECODE_KERNEL = {"bf16": self.kernel, "int8": self.kernel}
        if self.int8_rows:
            gemv._GEMV_ROWS[("int8", 1)] = self.int8_rows

    def __exit__(self, *exc):
        gemv.DECODE_KERNEL = self.saved[0]
        gemv._GEMV_ROWS.clear()
        gemv._GEMV_ROWS.update(self.saved[1])


# "rows4": gemv_rows with 4 rows of int8 W per block (the earlier choice; not listed in gemv.cu, built on demand).
POLICIES = {"rows": ("rows", None), "rows4": ("rows", 4), "mma": ("mma", None)}


# ------------------------------------------------------------------------------------------------ timing
_streams = []


def time_graph(fn, repeat, reps=15):
    """Median ms per fn() call: fn captured `repeat` times in one CUDA graph, replays timed with events."""
    if not _streams:   # one stream for every timing: gemv's workspace is per stream
        _streams.append(cupy.cuda.Stream(non_blocking=True))
    stream = _streams[0]
    with stream:
        fn(0)   # warm-up and workspace allocation outside the capture
        stream.synchronize()
        stream.begin_capture()
        for i in range(repeat):
            fn(i)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(reps):
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / repeat)
    return statistics.median(times)


def time_torch(fn, repeat, reps=15):
    import torch
    fn(0)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(0)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for i in range(repeat):
                fn(i)
        run = graph.replay
    except Exception as e:  # noqa: BLE001
        log(f"torch graph capture failed ({e}); timing a loop")
        run = lambda: [fn(i) for i in range(repeat)]  # noqa: E731
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / repeat)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ correctness
def time_plain(fn, reps=20):
    """Median ms of one fn() call between two events (kernels long enough that launch overhead does not show)."""
    fn()
    cupy.cuda.get_current_stream().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def rand_inputs(rng, B, N, K, int8, pro, weights=True):
    x = cupy.asarray(rng.standard_normal((B, 2 * K if pro == 2 else K)).astype(numpy.float32)).astype(BF16)
    if not weights:
        w = scale = None
    elif int8:
        w = cupy.asarray(rng.integers(-127, 128, size=(N, K), dtype=numpy.int8))
        scale = cupy.asarray((rng.random(N) * 0.02 + 0.001).astype(numpy.float32))
    else:
        w = cupy.asarray((rng.standard_normal((N, K)) / math.sqrt(K)).astype(numpy.float32)).astype(BF16)
        scale = None
    g = cupy.asarray((1 + 0.1 * rng.standard_normal(K)).astype(numpy.float32)).astype(BF16)
    bias = cupy.asarray(rng.standard_normal(N).astype(numpy.float32)).astype(BF16)
    res = cupy.asarray(rng.standard_normal((B, N)).astype(numpy.float32)).astype(BF16)
    return x, w, scale, g, bias, res


def reference64(x, w, scale, g, bias, res, pro, eps):
    x, w = x.astype(cupy.float64), w.astype(cupy.float64)
    if pro == 2:
        K = x.shape[1] // 2
        gate, up = x[:, :K], x[:, K:]
        x = gate / (1 + cupy.exp(-gate)) * up
    if pro == 1:
        x = x / cupy.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * g.astype(cupy.float64)
    y = x @ w.T
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias.astype(cupy.float64)
    if res is not None:
        y = y + res.astype(cupy.float64)
    return y


def product(path, x, w, out, **kw):
    """One few-row product through `path`: "mma" (casted.gemv_mma) or a decode policy of rows_linear."""
    if path == "mma":
        return casted.gemv_mma(x, w, out, **kw)
    with decode_policy(*POLICIES[path]):
        return gemv.rows_linear(x, w, out=out, **kw)


def check_case(path, rng, B, N, K, int8, pro, out_f32=False, with_extras=True):
    x, w, scale, g, bias, res = rand_inputs(rng, B, N, K, int8, pro)
    if not with_extras:
        bias = res = None
    if out_f32:
        res = None
    eps = 1e-5
    norm = g if pro == 1 else None
    out = cupy.full((B, N), numpy.nan, dtype=numpy.float32 if out_f32 else BF16)
    assert casted.gemv_mma_supported(x, w, out, scale, bias, norm, res, pro == 2)
    kw = dict(scale=scale, bias=bias, norm=norm, eps=eps, swiglu=pro == 2)
    product(path, x, w, out, residual=res, **kw)
    ref = reference64(x, w, scale, g, bias, res, pro, eps)
    plain = gemv._rows_linear_reference(x, w, scale, bias, norm, eps, pro == 2, res, out.dtype)
    got = out.astype(cupy.float64)
    finite = bool(cupy.isfinite(got).all())
    err = float(cupy.abs(got - ref).max())
    plain_err = float(cupy.abs(plain.astype(cupy.float64) - ref).max())
    scale_ref = float(cupy.abs(ref).max())
    if out_f32:   # the LM-head test's bar: 1e-5 of the largest logit
        ok = finite and err <= 1e-5 * scale_ref
    else:
        ok = finite and err <= 2 * plain_err + 1e-3
    inv = True    # batch invariance: each row alone gives the same bits
    if B > 1 and ok:
        for b in (0, B - 1):
            o1 = cupy.full((1, N), numpy.nan, dtype=out.dtype)
            product(path, x[b:b + 1], w, o1, residual=None if res is None else res[b:b + 1], **kw)
            inv &= bool((o1.view(numpy.uint8) == out[b:b + 1].view(numpy.uint8)).all())
    again = cupy.full_like(out, numpy.nan)   # repeatability: the same call again gives the same bits
    product(path, x, w, again, residual=res, **kw)
    det = bool((again.view(numpy.uint8) == out.view(numpy.uint8)).all())
    return ok and inv and det, f"err {err:.3g} (plain {plain_err:.3g}, |ref| {scale_ref:.3g}) inv {inv} det {det}"


CHECKS = [(1, 1, 256, True, 0), (1, 17, 5632, False, 2), (3, 1000, 1008, True, 1), (16, 4097, 256, False, 0),
          (4, 33, 4112, True, 2), (16, 300, 512, True, 1), (5, 2560, 2048, False, 1), (16, 2048, 5632, True, 2),
          (2, 4097, 1024, False, 0), (16, 8192, 8192, True, 0), (1, 8192, 8192, True, 0), (9, 11264, 2048, True, 1),
          (16, 28672, 8192, True, 0)]


def run_checks(path, rng):
    failures, cases = 0, 0
    for case in CHECKS:
        if path != "mma" and case[1] * case[2] > 2 ** 26:
            continue
        ok, msg = check_case(path, rng, *case)
        cases += 1
        failures += not ok
        if not ok:
            log(f"  FAIL {path} B,N,K,int8,pro={case}: {msg}")
    ok, msg = check_case(path, rng, 16, 4097, 1024, False, 1, out_f32=True, with_extras=False)
    cases += 1
    failures += not ok
    if not ok:
        log(f"  FAIL {path} f32 logits: {msg}")
    if path == "mma":   # f16 activations through CastedLinear's weight-only entry (M > 16: two launches)
        for m in (1, 17):
            x = cupy.asarray(rng.standard_normal((m, 1000))).astype(numpy.float16)
            w = cupy.asarray(rng.integers(-128, 128, (333, 1000), dtype=numpy.int8))
            ws = cupy.asarray(rng.uniform(1e-3, 2e-2, 333).astype(numpy.float32))
            bias = cupy.asarray(rng.standard_normal(333).astype(numpy.float32))
            out = cupy.full((m, 333), numpy.nan, dtype=numpy.float16)
            casted.weight_only_linear(x, w, ws, bias, out=out)
            ref = (x.astype(cupy.float64) @ w.astype(cupy.float64).T) * ws + bias
            err = float(cupy.abs(out.astype(cupy.float64) - ref).max())
            plain = float(cupy.abs(ref.astype(numpy.float16).astype(cupy.float64) - ref).max())
            ok = bool(cupy.isfinite(out).all()) and err <= 2 * plain + 1e-5
            cases += 1
            failures += not ok
            if not ok:
                log(f"  FAIL mma f16 weight-only m={m}: err {err:.3g} plain {plain:.3g}")
    log(f"correctness {path}: {cases - failures}/{cases} cases pass")
    return failures


def check_gather(rng):
    failures = 0
    for storage in (dtypes.fp8_e4m3, dtypes.fp8_e5m2, dtypes.int8, dtypes.bf16):
        for compute in (dtypes.bf16, dtypes.f16, dtypes.f32):
            for dim in (4096, 4097, 48):
                w = (rng.standard_normal((500, dim)) * rng.uniform(0.01, 10, (500, 1))).astype(numpy.float32)
                q, s = casted._quantize_table(w, storage, "row")
                idx = rng.integers(0, 500, 700).astype(numpy.int64)
                out = cupy.full((700, dim), numpy.nan, dtype=compute.storage)
                casted.embedding_gather(cupy.asarray(idx), cupy.asarray(q), cupy.asarray(s), storage, compute, 0.75,
                                        out=out)
                expected = ((casted._decode(q, storage)[idx] * s[idx][:, None]) * numpy.float32(0.75))
                expected = expected.astype(compute.storage)
                if not numpy.array_equal(cupy.asnumpy(out).view(numpy.uint8), expected.view(numpy.uint8)):
                    failures += 1
                    log(f"  FAIL gather {storage.name}->{compute.name} dim {dim}")
    log(f"correctness gather: {36 - failures}/36 bit-exact")
    return failures


# ------------------------------------------------------------------------------------------------ timings
def weight_copies(N, K, int8, cold):
    nbytes = N * K * (1 if int8 else 2)
    copies = max(1, math.ceil(4 * L2_BYTES / nbytes)) if cold else 1
    rng = numpy.random.default_rng(N + K)
    ws = []
    for _ in range(copies):
        if int8:
            ws.append(cupy.asarray(rng.integers(-127, 128, size=(N, K), dtype=numpy.int8)))
        else:
            ws.append(cupy.random.standard_normal((N, K), dtype=numpy.float32).astype(BF16))
    return ws, nbytes


def bench_product(path, B, N, K, int8, pro, ws, splits=None, out_f32=False):
    rng = numpy.random.default_rng(7)
    x, _, _, g, _, res = rand_inputs(rng, B, N, K, int8, pro, weights=False)
    scale = cupy.asarray((rng.random(N) * 0.02 + 0.001).astype(numpy.float32)) if int8 else None
    out = cupy.empty((B, N), dtype=numpy.float32 if out_f32 else BF16)
    kw = dict(scale=scale, norm=g if pro == 1 else None, swiglu=pro == 2,
              residual=res if pro != 1 and not out_f32 else None)
    if path == "mma" and splits:
        kw["splits"] = splits
    return time_graph(lambda i: product(path, x, ws[i % len(ws)], out, **kw), max(20, len(ws)))


def bench_cublas(B, N, K, ws_bf16):
    import torch
    xt = torch.randn(B, K, dtype=torch.bfloat16, device="cuda")
    wts = [torch.from_dlpack(w) for w in ws_bf16]
    return time_torch(lambda i: xt @ wts[i % len(wts)].T, max(20, len(wts)))


def fmt_row(row, paths):
    best = min(paths, key=lambda v: row[v])
    gbs = row["bytes"] / row[best] / 1e3
    return (f"{row['shape']:>26} B={row['B']:2d} {'cold' if row['cold'] else 'same'} cuBLAS {row['cublas_us']:6.1f} | "
            + " ".join(f"{v}={row[v]:.1f}" for v in paths)
            + f" | best {best}: {gbs:.0f} GB/s ({gbs / COPY_GBS:.0%}) {row['cublas_us'] / row[best]:.2f}x"
            + "".join(f" {k}={row[k]:.1f}" for k in row if "@" in k))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    _log_file.append(open(os.path.join(args.out, "tune_gemv.log"), "w"))
    results = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "gemv": [], "llama": {}}
    log(f"device {results['device']}, SMs {runtime.device_attribute(runtime.SM_COUNT)}")
    t_start = time.time()
    rng = numpy.random.default_rng(int(time.time()))
    failures = {p: run_checks(p, rng) for p in ("mma", "rows", "rows4")}
    failures["gather"] = check_gather(rng)
    results["failures"] = failures
    log(f"checks done at {time.time() - t_start:.0f} s")

    table = []
    # The shapes: int8 weights, M = 1..16, gemv_mma at its plan (and two other splits at M = 1, 16).
    for N, K in ((8192, 8192), (28672, 8192)):
        for cold in (True, False):
            if not cold and N * K > 4 * L2_BYTES:
                continue   # one copy is already cold
            ws8, nbytes = weight_copies(N, K, True, cold)
            wsb, _ = weight_copies(N, K, False, cold)
            plan = casted.gemv_plan(N, K, 1, 0, runtime.device_attribute(runtime.SM_COUNT))
            for B in (1, 2, 4, 8, 16):
                row = {"shape": f"int8 {N}x{K}", "B": B, "cold": cold, "bytes": nbytes, "plan": plan,
                       "cublas_us": bench_cublas(B, N, K, wsb) * 1e3,
                       "mma": bench_product("mma", B, N, K, True, 0, ws8) * 1e3}
                if B in (1, 16) and cold:
                    for ks in (1024, 2048):
                        if ks != plan[0]:
                            row[f"mma@{ks}"] = bench_product("mma", B, N, K, True, 0, ws8, (ks, -(-K // ks))) * 1e3
                table.append(row)
                log(fmt_row(row, ["mma"]))
            del ws8, wsb
            cupy.get_default_memory_pool().free_all_blocks()
    log(f"issue shapes done at {time.time() - t_start:.0f} s")
    # Llama decode shapes, bf16 and int8, cold: gemv_rows (int8 with 4 or 8 rows per block) against gemv_mma.
    for name, N, K, pro in LLAMA:
        for int8 in (False, True):
            if name == "lm_head" and int8:
                continue
            ws, nbytes = weight_copies(N, K, int8, True)
            wsb = ws if not int8 else weight_copies(N, K, False, True)[0]
            paths = ["rows", "rows4", "mma"] if int8 else ["rows", "mma"]
            for B in (1, 16):
                row = {"shape": f"{name} {'int8' if int8 else 'bf16'} {N}x{K}", "B": B, "cold": True,
                       "bytes": nbytes, "cublas_us": bench_cublas(B, N, K, wsb) * 1e3,
                       "plan": casted.gemv_plan(N, K, 1 if int8 else 2, pro, runtime.device_attribute(runtime.SM_COUNT))}
                for path in paths:
                    if path == "rows4" and B != 1:
                        row[path] = row["rows"]
                        continue
                    row[path] = bench_product(path, B, N, K, int8, pro, ws, out_f32=name == "lm_head") * 1e3
                table.append(row)
                log(fmt_row(row, paths))
            del ws, wsb
            cupy.get_default_memory_pool().free_all_blocks()
    results["gemv"] = table
    log(f"llama shapes done at {time.time() - t_start:.0f} s")

    # CastedEmbedding gather, bench_casted.py's shape and method (one call between two events).
    import torch
    vocab, dim, n = 128256, 4096, 65536
    for storage in (dtypes.fp8_e4m3, dtypes.int8):
        layer = casted.CastedEmbedding(vocab, dim, storage_dtype=storage, generator=tc.Generator(2)).cuda()
        idx = tc.randint(0, vocab, (n,), device="cuda").data
        table_q, scale = layer.weight.data, layer.weight_scale.data
        out = cupy.empty((n, dim), dtype=BF16)
        ours = time_plain(lambda o=out, st=storage: casted.embedding_gather(idx, table_q, scale, st, dtypes.bf16,
                                                                            check=False, out=o))
        dense = torch.randn(vocab, dim, dtype=torch.bfloat16, device="cuda")
        it = torch.from_dlpack(idx)
        emb = time_plain(lambda d=dense: torch.nn.functional.embedding(it, d))
        nbytes = n * dim * 3 + 8 * n
        results[f"gather_{storage.name}"] = {"us": ours * 1e3, "torch_us": emb * 1e3, "bytes": nbytes}
        log(f"gather {storage.name}->bf16 {n}x{dim}: {ours * 1e3:.1f} us {nbytes / ours / 1e6:.0f} GB/s "
            f"({nbytes / ours / 1e6 / COPY_GBS:.0%}); torch F.embedding bf16 {emb * 1e3:.1f} us ({emb / ours:.2f}x)")
        del layer, dense, out
        torch.cuda.empty_cache()
        cupy.get_default_memory_pool().free_all_blocks()

    if not args.no_llama:
        llama_steps(results, t_start)
    with open(os.path.join(args.out, "tune_gemv.json"), "w") as f:
        json.dump(results, f, indent=1)

    print("\n==== summary (us per launch; GB/s of weight bytes; x = cuBLAS bf16 time / the best) ====")
    for row in table:
        print(fmt_row(row, [p for p in ("rows", "rows4", "mma") if p in row]))
    for key in ("gather_fp8_e4m3", "gather_int8"):
        if key in results:
            r = results[key]
            print(f"{key}: {r['us']:.1f} us {r['bytes'] / r['us'] / 1e3:.0f} GB/s "
                  f"({r['bytes'] / r['us'] / 1e3 / COPY_GBS:.0%}); torch F.embedding {r['torch_us'] / r['us']:.2f}x")
    for key, r in results["llama"].items():
        print(f"llama decode {key}: {r['us']:.0f} us, {r['gbs']:.0f} GB/s ({r['gbs'] / COPY_GBS:.0%})")
    print("failures:", failures)


def llama_steps(results, t_start):
    sys.path.insert(0, HERE)
    import bench_llama as bl
    from tessera_cp.models import LlamaConfig, LlamaForCausalLM, TextGenerator
    config = LlamaConfig.from_dict(bl.TINYLLAMA)
    model = LlamaForCausalLM(config, device="cuda", generator=tc.Generator(0))
    prompt = bl._prompt(bl.CONTEXT)
    for label, policies in (("bf16", ("rows", "mma")), ("int8", ("rows", "rows4", "mma"))):
        if label == "int8":
            model.quantize_int8()
        nbytes = bl._weight_bytes(model) + bl._kv_bytes(config, bl.CONTEXT + 1)
        tokens = {}
        for policy in policies:
            with decode_policy(*POLICIES[policy]):
                gen = TextGenerator(model, max_batch=1, max_context=bl.CONTEXT + bl.NEW + 64)
                # The generator's stream does not wait for the default stream (where quantize_int8 and the KV
                # cache's zeros ran): without this the cache can be zeroed after the prefill wrote it.
                cupy.cuda.Device().synchronize()
                out = gen.generate(prompt, 12, stop_tokens=[])
                assert out.used_graph
                state, graph = gen._states[1], gen._graphs[(1, True)][0]
                start = cupy.asarray([bl.CONTEXT], dtype=numpy.int32)
                stream = gen.stream
                times = []
                with stream:
                    for _ in range(3):
                        state.pos[...] = start
                        graph.launch(stream)
                    a, b = cupy.cuda.Event(), cupy.cuda.Event()
                    for _ in range(30):
                        state.pos[...] = start
                        a.record(stream)
                        graph.launch(stream)
                        b.record(stream)
                        b.synchronize()
                        times.append(cupy.cuda.get_elapsed_time(a, b))
                ms = statistics.median(times)
                tokens[policy] = list(out.tokens[0])
                results["llama"][f"{label} {policy}"] = {"us": ms * 1e3, "gbs": nbytes / ms / 1e6}
                log(f"llama decode {label} {policy}: {ms * 1e3:.0f} us, {nbytes / ms / 1e6:.0f} GB/s "
                    f"({nbytes / ms / 1e6 / COPY_GBS:.0%} of {COPY_GBS:.0f}); tokens {tokens[policy][:6]}")
                del gen
        log(f"llama {label}: greedy tokens per policy identical: {len({str(t) for t in tokens.values()}) == 1} "
            "(rows and rows4 must agree; mma sums in another order)")
    log(f"llama done at {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
