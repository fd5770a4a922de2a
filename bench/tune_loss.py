"""Tuning run for issue 6's losses on the lent GPU: every variant timed with CUDA events beside PyTorch, same run.

    PYTHONPATH=. python3 bench/tune_loss.py [ce] [fused]      (both when none is named; logs go to $OUT if set)
    PYTHONPATH=. compute-sanitizer --tool memcheck python3 bench/tune_loss.py sanitize

ce:    cross-entropy forward+backward, N=8192, V=128256, bf16 (fresh random logits, never zeros). Bytes counted: the
       logits read once and the gradient written once (2 * N * V * 2), against the device-to-device copy ceiling
       measured here. Variants: the one-block-per-row kernel (pass 2 re-reads the row from L2), the cluster kernel
       (row held in registers over a cluster of blocks) with 8 packs per thread (8 blocks per row, 4 per SM:
       loss.py's default) and 16 (4 per row, 2 per SM: the previous default), the op's forward plus its node's
       backward (also in place, and with the host waiting for the target count before the launch, the previous
       order), a full loss.backward() through the tape, and torch's F.cross_entropy forward+backward. Forward alone
       too. Then where the host's time goes: microseconds from the call's start to each launch (median of
       synchronised calls) and a cProfile of the op's calls.
fused: fused_linear_cross_entropy at N=8192, D=4096, V=128256, bf16: time and peak memory (CuPy pool, everything
       allocated during one forward+backward; "transient" = that peak less what is still allocated at the end, i.e.
       less the gradients) for several chunk sizes, beside our unfused path and torch eager; the gradients of both
       paths against an f32 computation of the same function.
Correctness of each kernel is proven by `pytest -m gpu tests/nn/test_loss.py` (float64 rule, NaN poison); this
script checks each CE variant's gradient against the default's on the benchmark data before timing it.
"""
import cProfile
import gc
import io
import os
import pstats
import statistics
import subprocess
import sys
import time
import traceback

import numpy

import cupy

import tessera_cp as tc
from tessera_cp import dtypes
from tessera_cp.cuda import runtime
from tessera_cp.nn import loss as L

from conftest import cuda_timings  # bench/, the script's folder, is on sys.path

OUT = os.environ.get("OUT", "")
BF16 = dtypes.bf16.storage
GIB = 2 ** 30
ROWS = []  # (section, variant, ms, rate text, comparison text)


def log(*args):
    print(*args, flush=True)


def time_cuda(fn, warmup=10, repeat=50, min_ms=100.0):
    """(median, min, max) milliseconds of fn() over CUDA-event timings of single calls (conftest's), after warm-up."""
    times = cuda_timings(fn, warmup, repeat, min_ms)
    return statistics.median(times), min(times), max(times)


def record(section, name, fn, nbytes=0, flops=0, **kw):
    try:
        med, lo, hi = time_cuda(fn, **kw)
    except Exception as e:  # one broken variant must not cost the rest of the run
        log(f"{section}: {name}: FAILED {type(e).__name__}: {e}")
        traceback.print_exc()
        return None
    rate = ""
    if nbytes:
        rate = f"{nbytes / med / 1e6:7.0f} GB/s"
    if flops:
        rate += f" {flops / med / 1e9:6.1f} TFLOP/s"
    ROWS.append((section, name, med, rate))
    log(f"{section:<8} {name:<52} {med * 1e3:9.1f} us (min {lo * 1e3:.1f}, max {hi * 1e3:.1f})  {rate}")
    return med


def torch_or_none():
    try:
        import torch
        return torch
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------- cross-entropy
def random_bf16(shape, seed):
    """Normal(0, 2) logits in bf16, made a slab at a time (no full f32 copy)."""
    out = cupy.empty(shape, dtype=BF16)
    gen = cupy.random.default_rng(seed)
    step = max(1, (256 << 20) // (4 * shape[1]))
    for r0 in range(0, shape[0], step):
        out[r0:r0 + step] = (gen.standard_normal((min(step, shape[0] - r0), shape[1]), dtype=numpy.float32)
                             * 2.0).astype(BF16)
    return out


def host_timeline(step, calls=40):
    """Median microseconds from a call's start to each kernel launch it makes (and back from it), to the entry of
    a few of loss.py's steps, and to its return (the GPU idle before each call: synchronised), as [(mark, us)]."""
    marks = []
    names = getattr(runtime, "_kernel_names", {})

    def tracer(launcher):
        def traced(kernel, *args, **kwargs):
            name = names.get(kernel, "?").split(":")[-1].split("<")[0]
            marks.append((name, time.perf_counter()))
            try:
                return launcher(kernel, *args, **kwargs)
            finally:
                marks.append((f"{name} returned", time.perf_counter()))
        return traced

    def entry(fn, name):
        def traced(*args, **kwargs):
            marks.append((name, time.perf_counter()))
            return fn(*args, **kwargs)
        return traced

    patched = [(runtime, "launch"), (runtime, "launch_planned"), (L, "_check_ce_options"), (L, "_flat_targets"),
               (L, "_forward_plan"), (L.CrossEntropy, "forward"), (L._TargetCheck, "result")]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr in patched]
    for owner, attr, fn in saved:
        wrap = tracer(fn) if owner is runtime else entry(fn, attr)
        setattr(owner, attr, wrap)
    runs = []
    try:
        for _ in range(calls):
            cupy.cuda.get_current_stream().synchronize()
            marks.clear()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            runs.append([(k, (t - t0) * 1e6) for k, t in marks] + [("(return)", (t1 - t0) * 1e6)])
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
    cupy.cuda.get_current_stream().synchronize()
    return [(runs[0][i][0], statistics.median(r[i][1] for r in runs)) for i in range(len(runs[0]))]


def device_timeline(step, calls=5):
    """What the GPU ran during the last of ``calls`` synchronised calls (CUPTI through torch.profiler): each kernel
    and copy as (name, start us, duration us), the start counted from the first one's."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            cupy.cuda.get_current_stream().synchronize()
            time.sleep(0.01)  # an idle gap that marks where a call starts
            step()
            cupy.cuda.get_current_stream().synchronize()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    last, latest_end = [], None
    for e in events:  # the last call: the events after the last idle gap of over 5 ms
        if latest_end is not None and e.time_range.start - latest_end > 5000:
            last = []
        last.append(e)
        latest_end = max(latest_end or 0, e.time_range.end)
    t0 = last[0].time_range.start
    return [(e.name.split("(")[0][:48], e.time_range.start - t0, e.time_range.elapsed_us()) for e in last]


def profile_calls(step, calls=200, top=18):
    """cProfile of ``calls`` synchronised calls (the synchronisation outside the profile): the top functions by
    their own time, as text."""
    prof = cProfile.Profile()
    for _ in range(calls):
        cupy.cuda.get_current_stream().synchronize()
        prof.enable()
        step()
        prof.disable()
    cupy.cuda.get_current_stream().synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def ce_section():
    n, v = 8192, 128256
    nbytes_fb, nbytes_f = 2 * n * v * 2, n * v * 2
    x = random_bf16((n, v), 1)
    t = cupy.random.default_rng(2).integers(0, v, size=n).astype(numpy.int64)
    grad = cupy.empty_like(x)
    scale = 1.0 / n

    # The copy ceiling, measured here: bytes read + written.
    record("ceiling", "D2D copy 2.1 GB (cudaMemcpyAsync)",
           lambda: cupy.cuda.runtime.memcpyAsync(grad.data.ptr, x.data.ptr, x.nbytes,
                                                 cupy.cuda.runtime.memcpyDeviceToDevice,
                                                 cupy.cuda.get_current_stream().ptr), nbytes=2 * x.nbytes)
    record("ceiling", "read-only sum 2.1 GB (cupy x.sum(axis=1))", lambda: x.sum(axis=1, dtype=numpy.float32),
           nbytes=x.nbytes)

    # Reference: float32 arithmetic on the same bf16 logits (softmax - onehot) / n, and the loss per row.
    ref_loss = cupy.empty(n, dtype=numpy.float32)
    for r0 in range(0, n, 1024):
        rows = x[r0:r0 + 1024].astype(numpy.float32)
        top = rows.max(axis=1, keepdims=True)
        lse = cupy.log(cupy.exp(rows - top).sum(axis=1)) + top[:, 0]
        ref_loss[r0:r0 + 1024] = lse - rows[cupy.arange(rows.shape[0]), t[r0:r0 + 1024]]
    want_loss = ref_loss

    def grad_error():
        """max |grad - f32 reference| over a few row blocks, relative to the largest reference entry."""
        worst = 0.0
        for r0 in (0, 4096, n - 512):
            rows = x[r0:r0 + 512].astype(numpy.float32)
            p = cupy.exp(rows - rows.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[cupy.arange(512), t[r0:r0 + 512]] -= 1.0
            p *= scale
            diff = cupy.abs(grad[r0:r0 + 512].astype(numpy.float32) - p).max() / cupy.abs(p).max()
            worst = max(worst, float(diff))
        return worst

    def same(label, fn):
        grad.view(numpy.uint16).fill(0xFFFF)  # NaN
        out = fn()
        cupy.cuda.get_current_stream().synchronize()
        nan = int(cupy.isnan(grad.astype(numpy.float32)).sum())
        g_err = grad_error()
        l_err = float(cupy.abs(out[0] - want_loss).max())
        log(f"check    {label:<52} grad max rel err {g_err:.3g} (bf16 step 2^-8 = 0.0039)  NaN {nan}  "
            f"max |loss - f32 ref| {l_err:.3g}")
        return nan == 0 and g_err <= 2.0 ** -7 and l_err <= 1e-3

    def kernel(cluster=None, packs=None):
        return lambda: L._rows_forward_kernel(x, t, -100, 0.0, grad, scale, cluster=cluster, packs=packs)

    launches = {
        "one block per row, L2 re-read (fallback)": kernel(0),
        "cluster 8 x (256 thr x 8 packs), 4/SM (default)": kernel(),
        "cluster 4 x (256 thr x 16 packs), 2/SM (previous)": kernel(4, 16),
    }
    log(f"default choice for {n}x{v} bf16: cluster, packs = {L._cluster_shape(x, grad)}")
    for label, fn in launches.items():
        try:
            ok = same(label, fn)
        except Exception as e:
            log(f"check    {label}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        if ok:
            record("ce k", label, fn, nbytes=nbytes_fb)
        else:
            log(f"check    {label}: wrong: not timed")

    # What users run. Bytes: the same 2 * N * V * 2.
    logits = tc.Tensor(x, dtype=tc.bf16)
    logits.requires_grad_(True)
    targets = tc.Tensor(t)
    upstream = tc.tensor(1.0, device="cuda").data

    def op_step():
        loss = L.stable_cross_entropy(logits, targets)
        return loss._node.backward(upstream)

    def count_first_step():  # the previous order: the host waits for the count, then launches the kernel
        count = L._count_targets(t, v, -100, (n,), "stable_cross_entropy")
        loss = L.CrossEntropy.apply(logits, t, target_shape=(n,), count=count, ignore_index=-100, smoothing=0.0,
                                    reduction="mean", need_grad=True, inplace=False)
        return loss._node.backward(upstream)

    def tape_step():
        logits.grad = None
        L.stable_cross_entropy(logits, targets).backward()

    def inplace_step():  # the gradient over the logits' memory: after the first call they hold gradients
        loss = L.stable_cross_entropy(logits, targets, inplace_backward=True)
        return loss._node.backward(upstream)

    # The op's outputs against the reference; the pool block its gradient takes was left full of NaN first.
    junk = cupy.full(x.nbytes, 255, dtype=numpy.uint8)
    cupy.cuda.get_current_stream().synchronize()
    del junk
    loss = L.stable_cross_entropy(logits, targets)
    g_op = loss._node.backward(upstream)[0]
    cupy.cuda.get_current_stream().synchronize()
    grad[...] = g_op
    log(f"check    op: loss {float(loss.data):.6f} vs f32 reference {float(want_loss.mean()):.6f}; "
        f"grad max rel err {grad_error():.3g}; NaN {int(cupy.isnan(grad.astype(numpy.float32)).sum())}")
    del loss, g_op

    record("ce op", "stable_cross_entropy fwd + node backward", op_step, nbytes=nbytes_fb)
    record("ce op", "same, host waits for the count first (previous)", count_first_step, nbytes=nbytes_fb)
    record("ce op", "stable_cross_entropy fwd + loss.backward() (tape)", tape_step, nbytes=nbytes_fb)
    record("ce op", "the target check alone (count_targets + read back)",
           lambda: L._count_targets(t, v, -100, (n,), "check"))
    logits.grad = None
    for label, step in (("op fwd + node backward", op_step), ("host count first (previous)", count_first_step)):
        marks = host_timeline(step)
        log(f"host     {label:<30} " + "  ".join(f"{k} +{us:.0f} us" for k, us in marks))
    # The forward kernel's own duration in the op and alone: with the op's count check and "mean" scale read on
    # the device, and with a fresh gradient buffer per call (as the op allocates one).
    counts = cupy.asarray([n, 0], dtype=numpy.uint64)
    kernel_runs = {
        "op fwd + node backward": op_step,
        "kernel alone (default)": kernel(),
        "kernel alone, check + per_count": lambda: L._rows_forward_kernel(x, t, -100, 0.0, grad, 1.0, check=counts,
                                                                          per_count=True, stats=False),
        "kernel alone, fresh gradient buffer": lambda: L._rows_forward_kernel(x, t, -100, 0.0, cupy.empty_like(x),
                                                                              scale),
    }
    for label, step in kernel_runs.items():
        try:
            for name, start, dur in device_timeline(step):
                log(f"device   {label:<36} {name:<40} start +{start:8.1f} us  lasts {dur:8.1f} us")
        except Exception as e:  # torch missing or CUPTI unavailable: the rest still runs
            log(f"device timeline FAILED: {type(e).__name__}: {e}")
    text = profile_calls(op_step)
    log("cProfile of 200 calls of stable_cross_entropy fwd + node backward (synchronised between calls):")
    log("\n".join(text.strip().splitlines()[:40]))
    if OUT:
        with open(os.path.join(OUT, "tune_loss_profile.txt"), "w") as f:
            f.write(text)
    with tc.no_grad():
        record("ce fwd", "one-block kernel, forward only (default)",
               lambda: L._rows_forward_kernel(x, t, -100, 0.0, None, 1.0), nbytes=nbytes_f)
        record("ce fwd", "stable_cross_entropy under no_grad", lambda: L.stable_cross_entropy(logits, targets),
               nbytes=nbytes_f)

    torch = torch_or_none()
    if torch is not None:
        F = torch.nn.functional
        xt = torch.from_dlpack(x).clone().requires_grad_()
        tt = torch.from_dlpack(t)

        def torch_step():
            xt.grad = None
            F.cross_entropy(xt, tt).backward()

        lt = F.cross_entropy(xt.float(), tt)
        log(f"check    torch loss {lt.item():.6f} vs f32 reference {float(want_loss.mean()):.6f}")
        record("ce torch", "F.cross_entropy fwd+bwd (eager)", torch_step, nbytes=nbytes_fb)
        with torch.no_grad():
            record("ce torch", "F.cross_entropy fwd (eager)", lambda: F.cross_entropy(xt, tt), nbytes=nbytes_f)
        del xt
    # Last: it turns the logits into gradients.
    record("ce op", "stable_cross_entropy inplace_backward fwd + node bwd", inplace_step, nbytes=nbytes_fb)


# ------------------------------------------------------------------------------------------------- fused linear CE
def cupy_peak(fn):
    """(peak bytes allocated during fn, bytes still allocated at its end) of CuPy's pool."""
    class Peak(cupy.cuda.MemoryHook):
        name = "tune_peak"

        def __init__(self):
            self.live = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.live += kw["mem_size"]
            self.peak = max(self.peak, self.live)

        def free_postprocess(self, **kw):
            self.live -= kw["mem_size"]

    gc.collect()
    hook = Peak()
    with hook:
        fn()
        cupy.cuda.get_current_stream().synchronize()
    return hook.peak, hook.live


def fused_section():
    n, d, v = 8192, 4096, 128256
    flops = 6 * n * d * v  # the unfused path's forward+backward GEMM work, for every row (like for like)
    gen = tc.Generator(0)
    h = tc.randn(n, d, dtype=tc.bf16, device="cuda", generator=gen, requires_grad=True)
    w = (tc.randn(v, d, dtype=tc.bf16, device="cuda", generator=gen) * 0.02).detach().requires_grad_(True)
    targets = tc.randint(0, v, size=n, device="cuda", generator=gen)

    def fused(rows=None):
        def step():
            h.grad = w.grad = None
            L.fused_linear_cross_entropy(h, w, targets, chunk_size=rows).backward()
        return step

    def unfused():
        h.grad = w.grad = None
        L.stable_cross_entropy(h @ w.T, targets).backward()

    # Gradients against f32 arithmetic on the same bf16 inputs (logits, softmax and both products in f32).
    h32, w32 = h.data.astype(numpy.float32), w.data.astype(numpy.float32)
    logits32 = h32 @ w32.T
    logits32 -= logits32.max(axis=1, keepdims=True)
    cupy.exp(logits32, out=logits32)
    logits32 /= logits32.sum(axis=1, keepdims=True)
    logits32[cupy.arange(n), targets.data] -= 1.0
    logits32 /= n
    ref_h, ref_w = logits32 @ w32, logits32.T @ h32
    del logits32, h32, w32
    gc.collect()

    def errors(label):
        out = []
        for got, ref in ((h.grad.data, ref_h), (w.grad.data, ref_w)):
            diff = got.astype(numpy.float32) - ref
            out.append((float(cupy.linalg.norm(diff) / cupy.linalg.norm(ref)), float(cupy.abs(diff).max())))
        log(f"check    {label:<40} grad_h rel {out[0][0]:.3g} max {out[0][1]:.3g}   "
            f"grad_w rel {out[1][0]:.3g} max {out[1][1]:.3g}")

    steps = {"unfused (h @ w.T, stable_cross_entropy)": unfused,
             "fused, chunk 1024 (default)": fused(),
             "fused, chunk 512": fused(512),
             "fused, chunk 2048": fused(2048),
             "fused, chunk 4096": fused(4096)}
    memory = {}
    for label, step in steps.items():
        try:
            h.grad = w.grad = None
            memory[label] = cupy_peak(step)
            errors(label)
        except Exception as e:
            log(f"fused: {label}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
    h.grad = w.grad = None
    gc.collect()
    times = {}
    for label, step in steps.items():
        if label in memory:
            times[label] = record("fused", label, step, flops=flops, warmup=2, repeat=8, min_ms=0)
    torch = torch_or_none()
    if torch is not None:
        F = torch.nn.functional
        ht = torch.from_dlpack(h.data).clone().requires_grad_()
        wt = torch.from_dlpack(w.data).clone().requires_grad_()
        tt = torch.from_dlpack(targets.data)

        def torch_step():
            ht.grad = wt.grad = None
            F.cross_entropy(F.linear(ht, wt), tt).backward()

        torch_step()
        torch.cuda.synchronize()
        ht.grad = wt.grad = None
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch_step()
        torch.cuda.synchronize()
        memory["torch eager"] = (torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base)
        times["torch eager"] = record("fused", "torch eager F.linear + F.cross_entropy", torch_step, flops=flops,
                                      warmup=2, repeat=8, min_ms=0)
    base = "unfused (h @ w.T, stable_cross_entropy)"
    log("")
    log("fused linear CE: peak memory allocated during one fwd+bwd (GiB), and that peak less what is still "
        "allocated at the end (the gradients)")
    for label, (peak, live) in memory.items():
        ratio = ""
        if base in memory and label != base:
            ratio = (f"  vs unfused: peak {peak / memory[base][0]:.2f}, transient "
                     f"{(peak - live) / max(1, memory[base][0] - memory[base][1]):.2f}")
        t_ratio = ""
        if times.get(label) and times.get(base) and label != base:
            t_ratio = f"  time {times[label] / times[base]:.2f}x unfused"
        log(f"  {label:<42} peak {peak / GIB:6.2f}  transient {(peak - live) / GIB:6.2f}{ratio}{t_ratio}")


def probe_clusters():
    """Run one small cluster launch in a child process: a faulting kernel would poison this process's context."""
    code = ("import cupy, numpy; from tessera_cp.nn import loss as L; from tessera_cp import dtypes;"
            "x = cupy.random.standard_normal((3, 50257), dtype=numpy.float32).astype(dtypes.bf16.storage);"
            "t = cupy.asarray([0, 5, 50256]); g = cupy.empty_like(x);"
            "l = L._rows_forward_kernel(x, t, -100, 0.0, g, 1.0, cluster=4, packs=8)[0];"
            "r = L._rows_forward_kernel(x, t, -100, 0.0, None, 1.0, cluster=0)[0];"
            "cupy.cuda.get_current_stream().synchronize();"
            "assert float(abs(l - r).max()) < 1e-4, (l, r); print('cluster probe ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    log(result.stdout.strip() or result.stderr.strip()[-2000:])
    return result.returncode == 0


def sanitize_section():
    """Small awkward cases of loss.cu's newer kernels, for compute-sanitizer (memcheck, racecheck): the cluster
    kernel at every instantiated (cluster size, packs) that holds the row, rows off 16-byte alignment, in place and
    not, ignored and out-of-range targets, the loss alone, a refused launch; count_targets; the public path."""
    rng = numpy.random.default_rng(0)
    for storage in (numpy.float32, numpy.float16, BF16):
        for v in (1031, 20000):
            n = 5
            flat = cupy.asarray(rng.standard_normal(n * v + 1).astype(numpy.float32)).astype(storage)
            t = cupy.asarray([0, v - 1, -100, -3, v])
            for offset in (0, 1):
                x = flat[offset:offset + n * v].reshape(n, v)
                for packs, sizes in L.CLUSTER_SIZES.items():
                    for cluster in (c for c in sizes if c * L.CLUSTER_THREADS * packs * 16 >= v * x.itemsize):
                        L._rows_forward_kernel(x, t, -100, 0.1, None, 1.0, cluster=cluster, packs=packs)
                        g = cupy.empty(n * v + 1, dtype=storage)[offset:offset + n * v].reshape(n, v)
                        L._rows_forward_kernel(x, t, -100, 0.1, g, 0.5, cluster=cluster, packs=packs)
                        inplace = x.copy()
                        L._rows_forward_kernel(inplace, t, -100, 0.0, inplace, 1.0, cluster=cluster, packs=packs)
                        check = cupy.asarray([3, 1], dtype=numpy.uint64)  # refused: nothing written
                        L._rows_forward_kernel(inplace, t, -100, 0.0, inplace, 1.0, cluster=cluster, packs=packs,
                                               check=check, per_count=True)
        L._count_targets(cupy.asarray(rng.integers(-1, 7, size=3001)), 7, -1, (3001,), "sanitize")
    logits = tc.tensor(rng.standard_normal((4, 20000)).astype(numpy.float32), dtype="bf16", device="cuda",
                       requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        L.stable_cross_entropy(logits, tc.tensor([0, 19999, -100, 7], device="cuda"), reduction=reduction).sum()
    cupy.cuda.get_current_stream().synchronize()
    log("sanitize cases ok")


def main():
    if "sanitize" in sys.argv[1:]:
        return sanitize_section()
    sections = [a for a in sys.argv[1:] if a in ("ce", "fused")] or ["ce", "fused"]
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    log(f"device {props['name'].decode()}, {props['multiProcessorCount']} SMs, L2 {props['l2CacheSize'] >> 20} MiB, "
        f"cupy {cupy.__version__}")
    if not probe_clusters():
        log("cluster kernel probe FAILED: timing with the one-block-per-row kernel only")
        L._cluster_shape = lambda x, grad: (0, 0)
    for name in sections:
        try:
            {"ce": ce_section, "fused": fused_section}[name]()
            gc.collect()
            cupy.get_default_memory_pool().free_all_blocks()
            if "torch" in sys.modules:
                sys.modules["torch"].cuda.empty_cache()
        except Exception as e:
            log(f"section {name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
    log("")
    log("summary (median of CUDA-event timings)")
    for section, name, ms, rate in ROWS:
        log(f"{section:<8} {name:<60} {ms:9.3f} ms  {rate}")
    if OUT:
        with open(os.path.join(OUT, "tune_loss_summary.txt"), "w") as f:
            for row in ROWS:
                f.write("\t".join(str(c) for c in row) + "\n")


if __name__ == "__main__":
    main()
