"""Flash attention against PyTorch's SDPA (FlashAttention-2 and cuDNN backends), bf16, measured in the same run.

FLOPs: forward = 4 * B * H * Sq * Sk * D (two matrix products of 2 * Sq * Sk * D each), halved when causal;
forward + backward = 3.5 x forward (the issue's convention: backward = 2.5 forward-equivalents).
Decode bytes: the K and V read once, 2 * B * Hkv * Sk * D * 2 (the queries and output are negligible).
"""
import importlib
import math
import os

import pytest

import tessera_cp as tc

A = importlib.import_module("tessera_cp.nn.attention")  # the module: tessera_cp.nn.attention is the function


def _sdpa(q, k, v, causal, backend, grad=None, dropout_p=0.0):
    """A callable running torch SDPA on the same data with one backend, or None when torch or it is missing."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa
    except ImportError:
        return None
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qt, kt, vt = (torch.from_dlpack(x.data) for x in (q, k, v))
    gqa = qt.shape[1] != kt.shape[1]
    if grad is not None:
        qt, kt, vt = (x.detach().requires_grad_(True) for x in (qt, kt, vt))
        gt = torch.from_dlpack(grad.data)

    def run():
        with sdpa_kernel(which):
            out = sdpa(qt, kt, vt, is_causal=causal, enable_gqa=gqa, dropout_p=dropout_p)
            if grad is not None:
                out.backward(gt)
        return out
    try:
        run()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is left out of the table
        print(f"torch SDPA {backend} backend unavailable for this shape: {type(e).__name__}: {e}"[:200])
        return None
    return run


def _baselines(q, k, v, causal, grad=None, dropout_p=0.0):
    out = {}
    for name in ("flash", "cudnn"):
        fn = _sdpa(q, k, v, causal, name, grad, dropout_p)
        if fn is not None:
            out[f"torch SDPA {name}"] = fn
    return out


def _without_sm90(fn):
    """fn with the Hopper forward turned off (TESSERA_ATTN_SM90=0): the mma.sync kernel, for comparison."""
    def run():
        before = os.environ.get("TESSERA_ATTN_SM90")
        os.environ["TESSERA_ATTN_SM90"] = "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["TESSERA_ATTN_SM90"]
            else:
                os.environ["TESSERA_ATTN_SM90"] = before
    return run


def _inputs(B, Hq, Hkv, Sq, Sk, D, grad=False):
    q = tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda", requires_grad=grad)
    k = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=grad)
    v = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=grad)
    return q, k, v


FWD = [  # B, H, S, D, causal
    (4, 32, 4096, 128, True),
    (4, 32, 4096, 128, False),
    (8, 16, 2048, 64, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", FWD)
def test_attention_forward(cuda_bench, shape):
    B, H, S, D, causal = shape
    q, k, v = _inputs(B, H, H, S, S, D)
    flops = 4 * B * H * S * S * D // (2 if causal else 1)
    ours = lambda: A.attention(q, k, v, is_causal=causal)  # noqa: E731
    baselines = {"tessera mma.sync": _without_sm90(ours), **_baselines(q, k, v, causal)}
    cuda_bench(f"attn fwd B{B} H{H} S{S} D{D}{' causal' if causal else ''}", ours, flops=flops, baselines=baselines)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [FWD[0], FWD[2]])
def test_attention_forward_backward(cuda_bench, shape):
    B, H, S, D, causal = shape
    q, k, v = _inputs(B, H, H, S, S, D, grad=True)
    dout = tc.randn(B, H, S, D, dtype=tc.bf16, device="cuda")
    flops = int(3.5 * 4 * B * H * S * S * D // (2 if causal else 1))

    def ours():
        A.attention(q, k, v, is_causal=causal).backward(dout)
    cuda_bench(f"attn fwd+bwd B{B} H{H} S{S} D{D}{' causal' if causal else ''}", ours, flops=flops,
               baselines=_baselines(q, k, v, causal, grad=dout))


@pytest.mark.gpu
@pytest.mark.parametrize("backward", [False, True])
def test_attention_dropout(cuda_bench, backward):
    """Dropout 0.1 in the kernels (Philox regenerated in the backward), B4 H32 S4096 D128 causal; SDPA with the
    same dropout beside it. FLOPs as without dropout."""
    B, H, S, D, p = 4, 32, 4096, 128, 0.1
    q, k, v = _inputs(B, H, H, S, S, D, grad=backward)
    dout = tc.randn(B, H, S, D, dtype=tc.bf16, device="cuda") if backward else None
    flops = int((3.5 if backward else 1) * 4 * B * H * S * S * D // 2)

    def ours():
        out = A.attention(q, k, v, is_causal=True, dropout_p=p, dropout_seed=1)
        if backward:
            out.backward(dout)
    cuda_bench(f"attn {'fwd+bwd' if backward else 'fwd'} dropout {p} B{B} H{H} S{S} D{D} causal", ours, flops=flops,
               baselines=_baselines(q, k, v, True, grad=dout, dropout_p=p))


@pytest.mark.gpu
def test_attention_decode(cuda_bench):
    B, Hq, Hkv, Sk, D = 1, 32, 8, 32768, 128
    q, k, v = _inputs(B, Hq, Hkv, 1, Sk, D)
    cuda_bench(f"attn decode B{B} Hq{Hq} Hkv{Hkv} Sk{Sk} D{D}", lambda: A.attention(q, k, v),
               bytes=2 * B * Hkv * Sk * D * 2, baselines=_baselines(q, k, v, False))


@pytest.mark.gpu
def test_attention_decode_back_to_back(cuda_bench):
    """50 decode calls queued back to back, timed together (reported per 50 calls): what a decode loop over layers
    sees, where one call's host work overlaps the device work queued before it. The single-call row above also
    counts the host time before the first launch (the device idles meanwhile)."""
    B, Hq, Hkv, Sk, D, n = 1, 32, 8, 32768, 128, 50
    q, k, v = _inputs(B, Hq, Hkv, 1, Sk, D)
    baselines = {name: (lambda fn=fn: [fn() for _ in range(n)]) for name, fn in _baselines(q, k, v, False).items()}
    cuda_bench(f"attn decode x{n} B{B} Hq{Hq} Hkv{Hkv} Sk{Sk} D{D}", lambda: [A.attention(q, k, v) for _ in range(n)],
               bytes=n * 2 * B * Hkv * Sk * D * 2, baselines=baselines)


# ---------------------------------------------------------------------------------------------- tile-shape sweep
# TESSERA_ATTN_SWEEP=1 times each candidate tile shape of the kernels (template arguments, see attention.py's
# tables) on the benchmark shapes, after a check against float64 on an odd-sized case, and prints a table: the
# way the defaults were chosen. Kernels are timed alone: their launches are recorded once and replayed
# back-to-back between CUDA events (no host time). FLOPs as above; dQ counts 3 products of 2 * Sq * Sk * D, dK/dV 4
# (halved causal); decode counts the K and V bytes.
SWEEP = {
    "fwd": {128: [(4, 2, 32, 2, 2), (4, 2, 64, 2, 2)], 64: [(4, 2, 64, 2, 2)]},
    "decode": {128: [(4, 1, 64, 2, 2)]},
    "dq": {128: [(4, 2, 32)], 64: [(4, 2, 32)]},
    "dkdv": {128: [(4, 32)], 64: [(4, 64)]},
}


def _record(fn, monkeypatch):
    """fn() once, returning the (kernel, grid, block, args, shared_mem) of every launch it made."""
    launches, real = [], A._launch

    def recording(kernel, grid, block, args, shared_mem=0):
        launches.append((kernel, grid, block, args, shared_mem))
        real(kernel, grid, block, args, shared_mem)
    with monkeypatch.context() as m:
        m.setattr(A, "_launch", recording)
        fn()
    return launches


def _replay_ms(launches, reps=20):
    """Median over 5 rounds of the device time of `reps` back-to-back replays of the launches, per replay."""
    import cupy
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(6):
        start.record()
        for _ in range(reps):
            for kernel, grid, block, args, smem in launches:
                kernel(grid, block, args, shared_mem=smem)
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / reps)
    return sorted(times[1:])[2]


def _rel64(got, q, k, v, causal, dout=None):
    """Relative errors of the kernel's out (or dq, dk, dv) against float64 (K/V expanded to the query heads)."""
    import cupy
    G = q.shape[1] // k.shape[1]
    q64, k64, v64 = (x.astype(cupy.float64) for x in (q, k, v))
    k64, v64 = cupy.repeat(k64, G, axis=1), cupy.repeat(v64, G, axis=1)
    s = q64 @ k64.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        Sq, Sk = s.shape[-2:]
        s = cupy.where(cupy.arange(Sk)[None] <= cupy.arange(Sq)[:, None] + Sk - Sq, s, -cupy.inf)
    p = cupy.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v64
    refs = [o]
    if dout is not None:
        do = dout.astype(cupy.float64)
        dp = do @ v64.swapaxes(-1, -2)
        ds = p * (dp - (do * o).sum(-1, keepdims=True)) / math.sqrt(q.shape[-1])
        shape = (k.shape[0], k.shape[1], G) + k.shape[2:]
        refs = [ds @ k64, (ds.swapaxes(-1, -2) @ q64).reshape(shape).sum(2),
                (p.swapaxes(-1, -2) @ do).reshape(shape).sum(2)]
    errs = [float(cupy.linalg.norm(g.astype(cupy.float64) - r) / cupy.linalg.norm(r)) for g, r in zip(got, refs)]
    return errs[0] if len(errs) == 1 else tuple(errs)


_SWEEP_ROWS = []


def _sweep_print(line):
    print(line)
    _SWEEP_ROWS.append(line)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "sweep.txt"), "a") as f:
            f.write(line + "\n")


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TESSERA_ATTN_SWEEP") != "1", reason="set TESSERA_ATTN_SWEEP=1 to sweep tiles")
@pytest.mark.parametrize("D", [128, 64])
def test_attention_tile_sweep(D, monkeypatch):
    pytest.importorskip("cupy")
    B, H, S = (4, 32, 4096) if D == 128 else (8, 16, 2048)
    scale = 1 / math.sqrt(D)
    fwd_flops = 4 * B * H * S * S * D // 2
    small = [tc.randn(*shape, dtype=tc.bf16, device="cuda").data
             for shape in ((1, 4, 333, D), (1, 2, 333, D), (1, 2, 333, D), (1, 4, 333, D))]
    big = [tc.randn(B, H, S, D, dtype=tc.bf16, device="cuda").data for _ in range(4)]
    for cfg in SWEEP["fwd"][D]:
        monkeypatch.setitem(A._FWD_TILES, D, cfg)
        A._plans.clear()  # plans remember the tile shape
        err = _rel64(A._forward_kernel(*small[:3], None, None, scale, True)[:1], *small[:3], True)
        ms = _replay_ms(_record(lambda: A._forward_kernel(*big[:3], None, None, scale, True), monkeypatch))
        _sweep_print(f"fwd  D{D} {str(cfg):18} rel err {err:.2e} {ms:8.3f} ms {fwd_flops / ms / 1e9:6.1f} TFLOP/s")
    monkeypatch.undo()
    A._plans.clear()
    out_s, lse_s = A._forward_kernel(*small[:3], None, None, scale, True)
    out_b, lse_b = A._forward_kernel(*big[:3], None, None, scale, True)
    for which, table in (("dq", A._DQ_TILES), ("dkdv", A._DKDV_TILES)):
        base = table[D]
        for cfg in SWEEP[which][D]:
            monkeypatch.setitem(table, D, cfg)
            A._bwd_plans.clear()
            got = A._backward_kernel(small[3], *small[:3], out_s, lse_s, None, None, scale, True)
            err = _rel64(got, *small[:3], True, dout=small[3])
            launches = _record(lambda: A._backward_kernel(big[3], *big[:3], out_b, lse_b, None, None, scale, True),
                               monkeypatch)
            names = ("dot", "dq", "dkdv")
            per = {n: _replay_ms([launch]) for n, launch in zip(names, launches)}
            counted = (3 if which == "dq" else 4) * 2 * B * H * S * S * D / 2
            _sweep_print(f"bwd  D{D} {which:4} {str(cfg):12} rel err dq dk dv {err[0]:.1e} {err[1]:.1e} {err[2]:.1e} "
                         f"{which} {per[which]:7.3f} ms "
                         f"({counted / per[which] / 1e9:6.1f} TFLOP/s), dot {per['dot']:.3f} ms, whole backward "
                         f"{sum(per.values()):.3f} ms ({2.5 * fwd_flops / sum(per.values()) / 1e9:6.1f} counted)")
        monkeypatch.setitem(table, D, base)
    A._bwd_plans.clear()


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TESSERA_ATTN_SWEEP") != "1", reason="set TESSERA_ATTN_SWEEP=1 to sweep tiles")
def test_attention_decode_sweep_and_host_time(monkeypatch):
    """Decode tile shapes (kernels alone), then where the host time of one decode call goes."""
    cupy = pytest.importorskip("cupy")
    import cProfile
    import io
    import pstats
    import time
    B, Hq, Hkv, Sk, D = 1, 32, 8, 32768, 128
    nbytes = 2 * B * Hkv * Sk * D * 2
    small = _inputs(1, 32, 8, 1, 1000, D)
    q, k, v = _inputs(B, Hq, Hkv, 1, Sk, D)
    for cfg, target in [(c, t) for c in SWEEP["decode"][D] for t in (2,)]:
        monkeypatch.setitem(A._DECODE_TILES, D, cfg)
        monkeypatch.setattr(A, "_TARGET_BLOCKS_PER_SM", target)
        A._plans.clear()  # plans remember the tile shape
        err = _rel64(A._forward_kernel(*(x.data for x in small), None, None, 1 / math.sqrt(D), False)[:1],
                     *(x.data for x in small), False)
        launches = _record(lambda: A._forward_kernel(q.data, k.data, v.data, None, None, 1 / math.sqrt(D), False),
                           monkeypatch)
        ms = _replay_ms(launches, reps=50)
        _sweep_print(f"dec  D{D} {str(cfg):18} target {target} blocks/SM rel err {err:.2e} {ms * 1e3:7.1f} us "
                     f"({nbytes / ms / 1e6:6.0f} GB/s), {len(launches)} launch(es), grid {launches[0][1]}")
    A._plans.clear()
    monkeypatch.undo()

    def call():
        A.attention(q, k, v)
    for _ in range(20):
        call()
    cupy.cuda.Device().synchronize()
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    t1 = time.perf_counter()
    cupy.cuda.Device().synchronize()
    t2 = time.perf_counter()
    _sweep_print(f"dec  host {1e6 * (t1 - t0) / n:6.1f} us per call enqueued, {1e6 * (t2 - t0) / n:6.1f} us per call "
                 f"back-to-back with the device")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    cupy.cuda.Device().synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    for line in text.getvalue().splitlines():
        if line.strip() and ("/" in line or "{" in line):
            _sweep_print("prof " + " ".join(line.split()[:1] + line.split()[1:2] + line.split()[5:])[:150])
