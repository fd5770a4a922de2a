"""Cross-entropy and the fused linear cross-entropy against PyTorch (eager and torch.compile), bf16, same run.

Issue 6's targets (H100): cross-entropy forward+backward at N=8192, V=128256 reaching >= 75% of the copy ceiling
(counting the logits read once and the gradient written once) and >= 1.5x F.cross_entropy forward+backward;
fused linear cross-entropy at N=8192, D=4096, V=128256 with peak extra memory <= 25% of the unfused path's and time
<= 1.2x the unfused path's. The memory figures are printed (not timed) by test_fused_linear_cross_entropy.
"""
import gc

import pytest

import tessera_cp as tc
from tessera_cp.nn import loss as L

N, V = 8192, 128256
D = 4096
BACK_TO_BACK = 10
GIB = 2 ** 30


def _torch():
    torch = pytest.importorskip("torch")
    return torch, torch.nn.functional


def _ce_inputs(seed=0):
    logits = tc.randn(N, V, dtype=tc.bf16, device="cuda", generator=tc.Generator(seed))
    targets = tc.randint(0, V, size=N, device="cuda", generator=tc.Generator(seed + 1))
    return logits, targets


def _torch_ce_baselines(logits, targets):
    """torch eager and torch.compile forward+backward on the same data (their own copy of the logits)."""
    try:
        torch, F = _torch()
    except pytest.skip.Exception:
        return {}
    xt = torch.from_dlpack(logits.data).clone().requires_grad_()
    tt = torch.from_dlpack(targets.data)
    compiled = torch.compile(lambda a, b: F.cross_entropy(a, b))

    def eager():
        xt.grad = None
        F.cross_entropy(xt, tt).backward()

    def compiled_step():
        xt.grad = None
        compiled(xt, tt).backward()

    return {"torch eager": eager, "torch.compile": compiled_step}


def _op_step(logits, targets, **kw):
    """The op's forward and its own backward, without the tape's accumulation into the leaf's .grad (which copies
    the gradient: one more [N, V] read and write that torch's AccumulateGrad does not pay)."""
    upstream = tc.tensor(1.0, device="cuda").data  # the f32 0-d gradient loss.backward() would hand it

    def step():
        loss = L.stable_cross_entropy(logits, targets, **kw)
        return loss._node.backward(upstream)
    return step


@pytest.mark.gpu
def test_cross_entropy_forward_backward(cuda_bench):
    # Bytes: the logits read once and their gradient written once, 2 * N * V * 2 (bf16), which is what the cluster
    # kernel moves. This is the figure: the op's forward and backward (target check and loss reduction
    # included).
    logits, targets = _ce_inputs()
    baselines = _torch_ce_baselines(logits, targets)
    logits.requires_grad_(True)
    cuda_bench(f"cross-entropy fwd+bwd {N}x{V} bf16", _op_step(logits, targets), bytes=2 * N * V * 2,
               baselines=baselines)


@pytest.mark.gpu
def test_cross_entropy_forward_backward_back_to_back(cuda_bench):
    # Same bytes per call, BACK_TO_BACK calls queued and timed together (the time is for all of them): how a
    # training step runs the op, behind other GPU work, so the host's ~0.1-0.2 ms before the forward kernel's
    # launch (which a single call timed alone waits for) overlaps the work queued before it.
    logits, targets = _ce_inputs()
    baselines = {name: _repeat(fn) for name, fn in _torch_ce_baselines(logits, targets).items()}
    logits.requires_grad_(True)
    cuda_bench(f"cross-entropy fwd+bwd x{BACK_TO_BACK} {N}x{V} bf16", _repeat(_op_step(logits, targets)),
               bytes=BACK_TO_BACK * 2 * N * V * 2, baselines=baselines)


def _repeat(step):
    def steps():
        for _ in range(BACK_TO_BACK):
            step()
    return steps


@pytest.mark.gpu
def test_cross_entropy_forward_backward_inplace(cuda_bench):
    # Same bytes; the gradient goes over the logits' own memory (after the first call the logits hold gradients:
    # the work per call is unchanged, only the numbers differ).
    logits, targets = _ce_inputs()
    baselines = _torch_ce_baselines(logits, targets)
    logits.requires_grad_(True)
    cuda_bench(f"cross-entropy fwd+bwd inplace {N}x{V} bf16", _op_step(logits, targets, inplace_backward=True),
               bytes=2 * N * V * 2, baselines=baselines)


@pytest.mark.gpu
def test_cross_entropy_forward_backward_through_the_tape(cuda_bench):
    # Same bytes, as a user runs it: loss.backward() on a leaf, including the tape's copy into logits.grad.
    logits, targets = _ce_inputs()
    baselines = _torch_ce_baselines(logits, targets)
    logits.requires_grad_(True)

    def ours():
        logits.grad = None
        L.stable_cross_entropy(logits, targets).backward()

    cuda_bench(f"cross-entropy fwd+bwd via tape {N}x{V} bf16", ours, bytes=2 * N * V * 2, baselines=baselines)


@pytest.mark.gpu
def test_cross_entropy_forward(cuda_bench):
    # Bytes: the logits read once, N * V * 2.
    logits, targets = _ce_inputs()
    baselines = {}
    try:
        torch, F = _torch()
        xt, tt = torch.from_dlpack(logits.data), torch.from_dlpack(targets.data)

        def eager():
            with torch.no_grad():
                F.cross_entropy(xt, tt)
        baselines = {"torch eager": eager}
    except pytest.skip.Exception:
        pass

    def ours():
        with tc.no_grad():
            L.stable_cross_entropy(logits, targets)

    cuda_bench(f"cross-entropy fwd {N}x{V} bf16", ours, bytes=N * V * 2, baselines=baselines)


def _cupy_peak_bytes(fn):
    """(peak bytes of CuPy memory-pool allocations made, and not yet freed, while fn runs; bytes of them still
    allocated when it returns: the gradients it leaves)."""
    import cupy

    class Peak(cupy.cuda.MemoryHook):
        name = "tessera_peak"

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


def _torch_peak_bytes(torch, fn):
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base


@pytest.mark.gpu
def test_fused_linear_cross_entropy(cuda_bench):
    # FLOPs: 6 * N * D * V, the forward+backward GEMM work (logits, grad hidden, grad weight), the same for every
    # callable: the fused path does these three GEMMs a chunk of rows at a time, adding each chunk's weight
    # gradient into the whole (no recomputation).
    gen = tc.Generator(0)
    h = tc.randn(N, D, dtype=tc.bf16, device="cuda", generator=gen, requires_grad=True)
    w = (tc.randn(V, D, dtype=tc.bf16, device="cuda", generator=gen) * 0.02).detach().requires_grad_(True)
    targets = tc.randint(0, V, size=N, device="cuda", generator=gen)

    def fused_step():
        L.fused_linear_cross_entropy(h, w, targets).backward()

    def unfused_step():
        L.stable_cross_entropy(h @ w.T, targets).backward()

    def fresh(step):
        def run():
            h.grad = w.grad = None
            step()
        return run

    memory = {}
    for label, step in (("tessera fused", fused_step), ("tessera unfused", unfused_step)):
        h.grad = w.grad = None  # freed before measuring, so the hook sees only what one step allocates
        memory[label] = _cupy_peak_bytes(step)
    fused, baselines = fresh(fused_step), {"tessera unfused": fresh(unfused_step)}
    try:
        torch, F = _torch()
        ht = torch.from_dlpack(h.data).clone().requires_grad_()
        wt = torch.from_dlpack(w.data).clone().requires_grad_()
        tt = torch.from_dlpack(targets.data)
        compiled = torch.compile(lambda a, b, c: F.cross_entropy(F.linear(a, b), c))

        def eager():
            ht.grad = wt.grad = None
            F.cross_entropy(F.linear(ht, wt), tt).backward()

        def compiled_step():
            ht.grad = wt.grad = None
            compiled(ht, wt, tt).backward()

        memory["torch eager"] = _torch_peak_bytes(torch, eager)
        baselines.update({"torch eager": eager, "torch.compile": compiled_step})
    except pytest.skip.Exception:
        pass
    h.grad = w.grad = None
    results = cuda_bench(f"fused linear CE {N}x{D}->{V} bf16", fused, flops=6 * N * D * V, baselines=baselines)
    # Peak extra memory: everything allocated during one forward+backward, the gradients included; and that peak
    # less what is still allocated at the end (the gradients, which every path returns): the transient part.
    line = "  ".join(f"{k} {p / GIB:.2f} GiB (transient {(p - live) / GIB:.2f})" for k, (p, live) in memory.items())
    print(f"fused linear CE peak extra memory: {line}")
    fused_peak, fused_live = memory["tessera fused"]
    for other in ("tessera unfused", "torch eager"):
        if other in memory:
            peak, live = memory[other]
            print(f"  fused / {other}: memory {fused_peak / peak:.2f}, transient "
                  f"{(fused_peak - fused_live) / max(1, peak - live):.2f} (target <= 0.25), "
                  f"time {results['tessera_cp'] / results[other]:.2f} (target <= 1.2)")
