"""RMSNorm forward and backward (bf16, 16384 x 4096) against F.rms_norm, torch.compile'd and eager RMSNorm."""
import pytest

pytestmark = pytest.mark.gpu

ROWS, D, EPS = 16384, 4096, 1e-6


def _setup():
    cp = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    import ml_dtypes
    x = cp.random.standard_normal((ROWS, D), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    w = cp.random.standard_normal(D, dtype=cp.float32).astype(ml_dtypes.bfloat16)
    g = cp.random.standard_normal((ROWS, D), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    return cp, torch, x, w, g


def _hf_rms_norm(torch):
    def rms_norm(x, w):   # Hugging Face LlamaRMSNorm: f32 statistics, cast back, then the weight
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return rms_norm


def _forward_baselines(torch, x, w):
    import torch.nn.functional as F
    xt, wt = torch.from_dlpack(x), torch.from_dlpack(w)
    eager = _hf_rms_norm(torch)
    compiled = torch.compile(eager)
    return {"F.rms_norm": lambda: F.rms_norm(xt, (D,), wt, EPS), "torch.compile": lambda: compiled(xt, wt),
            "eager (HF Llama)": lambda: eager(xt, wt)}


# bytes: x read + y written, 2 bytes each: 2 * ROWS * D * 2 (the 8 KB weight is not counted)
FORWARD_BYTES = 2 * ROWS * D * 2


def test_rms_norm_forward_kernel(cuda_bench):
    cp, torch, x, w, _ = _setup()
    from tessera_cp.nn import norm
    y = cp.empty_like(x)
    cuda_bench("rms_norm fwd 16384x4096 bf16 (kernel)", lambda: norm._launch_forward(x, w, EPS, out=y),
               bytes=FORWARD_BYTES, baselines=_forward_baselines(torch, x, w))


def test_rms_norm_forward_public_api(cuda_bench):
    cp, torch, x, w, _ = _setup()
    import tessera_cp as tc
    from tessera_cp.nn import norm
    xs, ws = tc.Tensor(x), tc.Tensor(w)
    baselines = _forward_baselines(torch, x, w)
    with tc.no_grad():   # the Python entry: argument checks, dispatch and allocation included
        cuda_bench("rms_norm fwd 16384x4096 bf16 (public rms_norm)", lambda: norm.rms_norm(xs, ws, EPS),
                   bytes=FORWARD_BYTES, baselines={"F.rms_norm": baselines["F.rms_norm"]})


def test_rms_norm_backward(cuda_bench):
    cp, torch, x, w, g = _setup()
    import torch.nn.functional as F
    from tessera_cp.nn import norm
    dx, dw = cp.empty_like(x), cp.empty_like(w)
    xt = torch.from_dlpack(x).requires_grad_(True)
    wt = torch.from_dlpack(w).requires_grad_(True)
    gt = torch.from_dlpack(g)
    y_f = F.rms_norm(xt, (D,), wt, EPS)
    y_c = torch.compile(_hf_rms_norm(torch))(xt, wt)
    baselines = {"F.rms_norm": lambda: torch.autograd.grad(y_f, (xt, wt), gt, retain_graph=True),
                 "torch.compile": lambda: torch.autograd.grad(y_c, (xt, wt), gt, retain_graph=True)}
    # bytes: x and dy read, dx written: 3 * ROWS * D * 2 (dweight and its f32 partial sums are not counted)
    cuda_bench("rms_norm bwd 16384x4096 bf16 (kernel)", lambda: norm._launch_backward(x, w, g, EPS, dx=dx, dw=dw),
               bytes=3 * ROWS * D * 2, baselines=baselines)
