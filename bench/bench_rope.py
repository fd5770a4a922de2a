"""RoPE on q and k (B=8, S=4096, 32 heads, D=128, bf16, [B, S, H, D]) against the rotate_half form (Hugging Face
Llama's) in PyTorch eager and torch.compile."""
import pytest

pytestmark = pytest.mark.gpu

B, S, H, D = 8, 4096, 32, 128


def _setup():
    cp = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    import ml_dtypes
    q = cp.random.standard_normal((B, S, H, D), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    k = cp.random.standard_normal((B, S, H, D), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    return cp, torch, q, k


def _torch_rope(torch):
    def rotate_half(x):
        return torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)

    def apply(q, k, cos, sin):      # cos, sin: [1, S, 1, D] in q's dtype, as Hugging Face passes them
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    return apply


# bytes: q and k each read and written once: 4 * B * S * H * D * 2 (the cos/sin tables, 2 MB, are not counted)
NBYTES = 4 * B * S * H * D * 2


def _baselines(cp, torch, q, k):
    qt, kt = torch.from_dlpack(q), torch.from_dlpack(k)
    angles = torch.outer(torch.arange(S, device="cuda", dtype=torch.float32),
                         1.0 / 10000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    emb = torch.cat((angles, angles), dim=-1)[None, :, None, :]
    cos_t, sin_t = emb.cos().to(qt.dtype), emb.sin().to(qt.dtype)
    eager = _torch_rope(torch)
    compiled = torch.compile(eager)
    return {"eager (HF rotate_half)": lambda: eager(qt, kt, cos_t, sin_t),
            "torch.compile": lambda: compiled(qt, kt, cos_t, sin_t)}


def test_rope_q_and_k_kernel(cuda_bench):
    cp, torch, q, k = _setup()
    from tessera_cp.nn import rope
    cos, sin = rope.rope_cache(S, D, device="cuda")
    pos = cp.arange(S, dtype=cp.int64)[None, :]
    qo, ko = cp.empty_like(q), cp.empty_like(k)
    cuda_bench("rope q+k 8x4096x32x128 bf16 (kernel, one launch)",
               lambda: rope._launch_rope([q, k], [qo, ko], cos.data, sin.data, pos, "BSHD", 1.0),
               bytes=NBYTES, baselines=_baselines(cp, torch, q, k))


def test_rope_q_and_k_kernel_in_place(cuda_bench):
    cp, torch, q, k = _setup()
    from tessera_cp.nn import rope
    cos, sin = rope.rope_cache(S, D, device="cuda")
    pos = cp.arange(S, dtype=cp.int64)[None, :]
    cuda_bench("rope q+k 8x4096x32x128 bf16 (kernel, in place)",
               lambda: rope._launch_rope([q, k], [q, k], cos.data, sin.data, pos, "BSHD", 1.0),
               bytes=NBYTES, baselines=_baselines(cp, torch, q, k))


def test_rope_q_and_k_public_api(cuda_bench):
    cp, torch, q, k = _setup()
    import tessera_cp as tc
    from tessera_cp.nn import rope
    cos, sin = rope.rope_cache(S, D, device="cuda")
    qs, ks = tc.Tensor(q), tc.Tensor(k)
    with tc.no_grad():   # the Python entry: argument checks, dispatch and allocation included
        cuda_bench("rope q+k 8x4096x32x128 bf16 (public apply_rope)", lambda: rope.apply_rope(qs, ks, cos, sin),
                   bytes=NBYTES, baselines=_baselines(cp, torch, q, k))
