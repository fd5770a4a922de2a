"""Tuning run for issue 6's losses on the lent GPU: every variant timed with CUDA events beside PyTorch, same run.

    PYTHONPATH=. python3 bench/tune_loss.py [ce] [fused]      (both when none is named; logs go to $OUT if set)
    PYTHONPATH=. compute-sanitizer --tool memcheck python3 bench/tune_loss.py sanitize

ce:    cross-entropy forward+backward, N=8192, V=128256, bf16 (fresh random logits, never zeros). Bytes counted: the
       logits read once and the gradient written once (2 * N * V * 2), against the device-to-device copy ceiling
       measured here. Variants: the one-block-per-row kernel (pass 2 re-reads the row from L2), the cluster kernel
       (row held in registers over a cluster of blocks; loss.py's default and a few block shapes built with -D
       overrides of loss.cu's constants), the op's forward plus its node's backward (also in place), a full
       loss.backward() through the tape, and torch's F.cross_entropy forward+backward. Forward alone too.
fused: fused_linear_cross_entropy at N=8192, D=4096, V=128256, bf16: time and peak memory (CuPy pool, everything
       allocated during one forward+backward; "transient" = that peak less what is still allocated at the end, i.e.
       less the gradients) for several chunk sizes, beside our unfused path and torch eager; the gradients of both
       paths against an f32 computation of the same function.
Correctness of each kernel is proven by `pytest -m gpu tests/nn/test_loss.py` (float64 rule, NaN poison); this
script checks each CE variant's gradient against the default's on the benchmark data before timing it.
"""
import gc
import os
import statistics
import subprocess
import sys
import traceback

import numpy

import cupy

import tessera_cp as tc
from tessera_cp import dtypes
from tessera_cp.cuda import SOURCE_DIR, runtime
from tessera_cp.nn import loss as L

OUT = os.environ.get("OUT", "")
BF16 = dtypes.bf16.storage
GIB = 2 ** 30
ROWS = []  # (section, variant, ms, rate text, comparison text)


def log(*args):
    print(*args, flush=True)


def time_cuda(fn, warmup=10, repeat=50, min_ms=100.0):
    """Median milliseconds of fn() over CUDA-event timings of single calls, after warm-up."""
    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times, total = [], 0.0
    while len(times) < repeat or (total < min_ms and len(times) < 10 * repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        ms = cupy.cuda.get_elapsed_time(start, stop)
        times.append(ms)
        total += ms
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


def variant_kernel(threads, packs, min_blocks, cluster):
    """cross_entropy_fwd_cluster<bf16, cluster> built with loss.cu's block shape overridden."""
    code = "\n".join(line for line in (SOURCE_DIR / "loss.cu").read_text().splitlines()
                     if "tessera-instantiate" not in line)  # only the one instantiation asked for
    opts = (f"-DTESSERA_LOSS_CLUSTER_THREADS={threads}", f"-DTESSERA_LOSS_CLUSTER_PACKS={packs}",
            f"-DTESSERA_LOSS_CLUSTER_MIN_BLOCKS={min_blocks}")
    return runtime.compile_source(code, f"cross_entropy_fwd_cluster<__nv_bfloat16, {cluster}>", opts,
                                  filename=f"loss.cu[{threads}x{packs},{min_blocks}/SM]")


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

    # Reference gradient: the default path once; every other variant must give the same bits or close to them.
    L._rows_forward_kernel(x, t, -100, 0.0, grad, scale)
    want = grad.astype(numpy.float32)
    want_loss = L._rows_forward_kernel(x, t, -100, 0.0, None, scale)[0].copy()

    def same(label, fn, loss_of=None):
        grad.view(numpy.uint16).fill(0xFFFF)  # NaN
        out = fn()
        cupy.cuda.get_current_stream().synchronize()
        diff = float(cupy.abs(grad.astype(numpy.float32) - want).max())
        dl = float(cupy.abs(out[0] - want_loss).max()) if out is not None else 0.0
        log(f"check    {label:<52} max |grad - default| {diff:.3g}  max |loss - default| {dl:.3g}")
        return diff <= 2.0 ** -8 * float(cupy.abs(want).max()) and dl <= 1e-4

    launches = {
        "one block per row, L2 re-read (fallback)": lambda: L._rows_forward_kernel(x, t, -100, 0.0, grad, scale,
                                                                                   cluster=0),
        "cluster 256x16, 2/SM, 4 per row (default)": lambda: L._rows_forward_kernel(x, t, -100, 0.0, grad, scale),
    }
    for threads, packs, min_blocks in ((256, 8, 4), (512, 8, 2)):
        need = -(-v * 2 // 16) / (threads * packs)
        cluster = 1
        while cluster < need:
            cluster *= 2
        try:
            kernel = variant_kernel(threads, packs, min_blocks, cluster)
        except Exception as e:
            log(f"variant {threads}x{packs}: compile failed: {e}")
            continue
        loss, m, log_s = (cupy.empty(n, dtype=numpy.float32) for _ in range(3))

        def launch(kernel=kernel, cluster=cluster, threads=threads):
            runtime.launch(kernel, (n * cluster,), (threads,),
                           (x, t, loss, m, log_s, grad, numpy.int64(n), numpy.int64(v), numpy.int64(-100),
                            numpy.float32(0.0), numpy.float32(scale), numpy.int32(1)))
            return loss, m, log_s
        launches[f"cluster {threads}x{packs}, {min_blocks}/SM, {cluster} per row (regs {kernel.num_regs})"] = launch
    for label, fn in launches.items():
        try:
            ok = same(label, fn)
        except Exception as e:
            log(f"check    {label}: FAILED {type(e).__name__}: {e}")
            continue
        if ok:
            record("ce k", label, fn, nbytes=nbytes_fb)
        else:
            log(f"check    {label}: gradient differs from the default: not timed")

    # What users run. Bytes: the same 2 * N * V * 2.
    logits = tc.Tensor(x, dtype=tc.bf16)
    logits.requires_grad_(True)
    targets = tc.Tensor(t)
    upstream = tc.tensor(1.0, device="cuda").data

    def op_step():
        loss = L.stable_cross_entropy(logits, targets)
        return loss._node.backward(upstream)

    def tape_step():
        logits.grad = None
        L.stable_cross_entropy(logits, targets).backward()

    def inplace_step():  # the gradient over the logits' memory: after the first call they hold gradients
        loss = L.stable_cross_entropy(logits, targets, inplace_backward=True)
        return loss._node.backward(upstream)

    record("ce op", "stable_cross_entropy fwd + node backward", op_step, nbytes=nbytes_fb)
    record("ce op", "stable_cross_entropy fwd + loss.backward() (tape)", tape_step, nbytes=nbytes_fb)
    record("ce op", "the target check alone (count_targets + copy)",
           lambda: L._count_targets(t, v, -100, (n,), "check"))
    logits.grad = None
    with tc.no_grad():
        record("ce fwd", "cluster kernel (4 per row), forward only",
               lambda: L._rows_forward_kernel(x, t, -100, 0.0, None, 1.0, cluster=4), nbytes=nbytes_f)
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
        log(f"check    torch loss {lt.item():.6f} vs ours {float(want_loss.mean()):.6f}")
        record("ce torch", "F.cross_entropy fwd+bwd (eager)", torch_step, nbytes=nbytes_fb)
        record("ce op", "stable_cross_entropy inplace_backward fwd + node bwd", inplace_step, nbytes=nbytes_fb)
        with torch.no_grad():
            record("ce torch", "F.cross_entropy fwd (eager)", lambda: F.cross_entropy(xt, tt), nbytes=nbytes_f)


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
            "l = L._rows_forward_kernel(x, t, -100, 0.0, g, 1.0, cluster=2)[0];"
            "r = L._rows_forward_kernel(x, t, -100, 0.0, None, 1.0, cluster=0)[0];"
            "cupy.cuda.get_current_stream().synchronize();"
            "assert float(abs(l - r).max()) < 1e-4, (l, r); print('cluster probe ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    log(result.stdout.strip() or result.stderr.strip()[-2000:])
    return result.returncode == 0


def sanitize_section():
    """Small awkward cases of loss.cu's newer kernels, for compute-sanitizer (memcheck, racecheck): the cluster
    kernel at every cluster size that holds the row, rows off 16-byte alignment, in place and not, ignored and
    out-of-range targets, the loss alone; count_targets."""
    rng = numpy.random.default_rng(0)
    for storage in (numpy.float32, numpy.float16, BF16):
        for v in (1031, 20000):
            n = 5
            flat = cupy.asarray(rng.standard_normal(n * v + 1).astype(numpy.float32)).astype(storage)
            t = cupy.asarray([0, v - 1, -100, -3, v])
            for offset in (0, 1):
                x = flat[offset:offset + n * v].reshape(n, v)
                need = -(-v * x.itemsize // 16) / (L.CLUSTER_THREADS * L.CLUSTER_PACKS)
                for cluster in (c for c in (1, 2, 4, 8) if c >= need):
                    L._rows_forward_kernel(x, t, -100, 0.1, None, 1.0, cluster=cluster)
                    g = cupy.empty(n * v + 1, dtype=storage)[offset:offset + n * v].reshape(n, v)
                    L._rows_forward_kernel(x, t, -100, 0.1, g, 0.5, cluster=cluster)
                    inplace = x.copy()
                    L._rows_forward_kernel(inplace, t, -100, 0.0, inplace, 1.0, cluster=cluster)
        L._count_targets(cupy.asarray(rng.integers(-1, 7, size=3001)), 7, -1, (3001,), "sanitize")
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
        L._cluster_size = lambda x, grad: 0
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
