"""SwiGLU: the elementwise kernel (16384 x 14336 bf16) forward and backward, and the whole fused swiglu against the
seed's formula in PyTorch eager and torch.compile."""
import pytest

pytestmark = pytest.mark.gpu

N, F_FF = 16384, 14336            # elementwise: tokens x D_ff
TOKENS, DIM = 8192, 4096          # whole SwiGLU: Llama-3-8B's feed-forward on 8192 tokens


def _setup():
    cp = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    import ml_dtypes
    return cp, torch, ml_dtypes.bfloat16


def _randn(cp, shape, dtype, scale=1.0):
    return (cp.random.standard_normal(shape, dtype=cp.float32) * scale).astype(dtype)


def test_swiglu_elementwise_forward(cuda_bench):
    cp, torch, bf16 = _setup()
    import torch.nn.functional as F
    from tessera_cp.nn import activation
    h = _randn(cp, (N, 2 * F_FF), bf16)          # the fused GEMM's output [gate | up]
    out = cp.empty((N, F_FF), dtype=bf16)
    ht = torch.from_dlpack(h)
    gt, ut = ht[:, :F_FF], ht[:, F_FF:]
    eager = lambda g, u: F.silu(g) * u           # noqa: E731
    compiled = torch.compile(eager)
    # bytes: gate and up read, out written: 3 * N * F_FF * 2
    cuda_bench("swiglu elementwise fwd 16384x14336 bf16",
               lambda: activation._launch_swiglu_forward(h[:, :F_FF], h[:, F_FF:], 1.0, out=out),
               bytes=3 * N * F_FF * 2,
               baselines={"eager": lambda: eager(gt, ut), "torch.compile": lambda: compiled(gt, ut)})


def test_swiglu_elementwise_backward(cuda_bench):
    cp, torch, bf16 = _setup()
    import torch.nn.functional as F
    from tessera_cp.nn import activation
    h, dout = _randn(cp, (N, 2 * F_FF), bf16), _randn(cp, (N, F_FF), bf16)
    dh = cp.empty_like(h)
    ht = torch.from_dlpack(h).requires_grad_(True)
    dt = torch.from_dlpack(dout)
    y_e = F.silu(ht[:, :F_FF]) * ht[:, F_FF:]
    y_c = torch.compile(lambda a: F.silu(a[:, :F_FF]) * a[:, F_FF:])(ht)
    # bytes: gate, up and dout read, dgate and dup written: 5 * N * F_FF * 2
    cuda_bench("swiglu elementwise bwd 16384x14336 bf16",
               lambda: activation._launch_swiglu_backward(h[:, :F_FF], h[:, F_FF:], dout, 1.0,
                                                          dh[:, :F_FF], dh[:, F_FF:]),
               bytes=5 * N * F_FF * 2,
               baselines={"eager": lambda: torch.autograd.grad(y_e, ht, dt, retain_graph=True),
                          "torch.compile": lambda: torch.autograd.grad(y_c, ht, dt, retain_graph=True)})


def test_swiglu_whole_forward(cuda_bench):
    cp, torch, bf16 = _setup()
    import torch.nn.functional as F
    import tessera_cp as tc
    from tessera_cp.nn.activation import swiglu_fused
    x = _randn(cp, (TOKENS, DIM), bf16)
    w_gate_up = _randn(cp, (DIM, 2 * F_FF), bf16, DIM ** -0.5)
    w_down = _randn(cp, (F_FF, DIM), bf16, F_FF ** -0.5)
    xt, wgt = torch.from_dlpack(x), torch.from_dlpack(w_gate_up)
    wg, wu, wd = wgt[:, :F_FF].contiguous(), wgt[:, F_FF:].contiguous(), torch.from_dlpack(w_down)
    seed = lambda a: (F.silu(a @ wg) * (a @ wu)) @ wd    # noqa: E731  (the seed's formula)
    compiled = torch.compile(seed)
    xs, wgus, wds = tc.Tensor(x), tc.Tensor(w_gate_up), tc.Tensor(w_down)
    # FLOPs: 2*T*D*2F (gate and up) + 2*T*F*D (down) = 6 * TOKENS * DIM * F_FF
    with tc.no_grad():
        cuda_bench("swiglu fwd 8192 tokens, 4096 -> 14336 bf16", lambda: swiglu_fused(xs, wgus, wds),
                   flops=6 * TOKENS * DIM * F_FF,
                   baselines={"eager (seed formula)": lambda: seed(xt), "torch.compile": lambda: compiled(xt)})


def test_swiglu_whole_forward_backward(cuda_bench):
    cp, torch, bf16 = _setup()
    import torch.nn.functional as F
    import tessera_cp as tc
    from tessera_cp.nn.activation import swiglu_fused
    x = _randn(cp, (TOKENS, DIM), bf16)
    w_gate_up = _randn(cp, (DIM, 2 * F_FF), bf16, DIM ** -0.5)
    w_down = _randn(cp, (F_FF, DIM), bf16, F_FF ** -0.5)
    g = _randn(cp, (TOKENS, DIM), bf16)
    xs = tc.Tensor(x).requires_grad_(True)
    wgus, wds = tc.Tensor(w_gate_up).requires_grad_(True), tc.Tensor(w_down).requires_grad_(True)
    gs = tc.Tensor(g)
    xt = torch.from_dlpack(x).requires_grad_(True)
    wg = torch.from_dlpack(w_gate_up)[:, :F_FF].contiguous().requires_grad_(True)
    wu = torch.from_dlpack(w_gate_up)[:, F_FF:].contiguous().requires_grad_(True)
    wd = torch.from_dlpack(w_down).requires_grad_(True)
    gt = torch.from_dlpack(g)

    def ours():
        swiglu_fused(xs, wgus, wds).backward(gs)

    def eager():
        ((F.silu(xt @ wg) * (xt @ wu)) @ wd).backward(gt)
    # FLOPs: forward 6*T*D*F, backward twice that: 18 * TOKENS * DIM * F_FF
    cuda_bench("swiglu fwd+bwd 8192 tokens, 4096 -> 14336 bf16", ours, flops=18 * TOKENS * DIM * F_FF,
               baselines={"eager (seed formula)": eager})
