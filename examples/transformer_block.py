"""A pre-norm Llama-style transformer block built from tessera_cp ops, run forward and backward.

    RMSNorm -> Q/K/V projections -> RoPE -> causal flash attention (GQA) -> output projection -> residual
    RMSNorm -> SwiGLU feed-forward -> residual

On a GPU each op runs its CUDA kernel (bf16); on the CPU the same code runs the NumPy references (f32).
"""
import time

import tessera_cp as tc
from tessera_cp import nn
from tessera_cp.nn.activation import SwiGLU
from tessera_cp.nn.norm import RMSNorm
from tessera_cp.nn.rope import apply_rope, rope_cache


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, ffn_dim, dtype, generator):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.attn_norm = RMSNorm(dim, dtype=dtype)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False, dtype=dtype, generator=generator)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False, dtype=dtype, generator=generator)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False, dtype=dtype, generator=generator)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False, dtype=dtype, generator=generator)
        self.ffn_norm = RMSNorm(dim, dtype=dtype)
        self.ffn = SwiGLU(dim, ffn_dim, dtype=dtype, generator=generator)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).reshape(B, S, self.n_heads, self.head_dim)      # [B, S, H, D], the seeds' RoPE layout
        k = self.wk(h).reshape(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(h).reshape(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, k, cos, sin)
        attn = nn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(attn.transpose(1, 2).reshape(B, S, -1))
        return x + self.ffn(self.ffn_norm(x))


def main(batch=2, seq=256, dim=512, n_heads=8, n_kv_heads=2, ffn_dim=1408):
    on_gpu = tc.default_device() == "cuda"
    dtype = tc.bf16 if on_gpu else tc.f32
    generator = tc.Generator(0)
    block = Block(dim, n_heads, n_kv_heads, ffn_dim, dtype, generator)
    cos, sin = rope_cache(seq, dim // n_heads, device=tc.default_device())
    x = tc.randn(batch, seq, dim, dtype=dtype, generator=generator, requires_grad=True)

    block(x, cos, sin).float().sum().backward()                      # warm-up: kernels compile on first use
    tc.backend.synchronize()
    start = time.perf_counter()
    y = block(x, cos, sin)
    y.float().sum().backward()
    tc.backend.synchronize()
    elapsed = time.perf_counter() - start
    info = tc.info()
    print(f"backend {info['backend']} on {info['device']}: block [{batch}, {seq}, {dim}] {dtype.name}, "
          f"forward + backward in {elapsed * 1e3:.1f} ms; output mean |y| = {float(y.float().abs().mean()):.4f}, "
          f"|dx| = {float(x.grad.float().abs().mean()):.4f}")


if __name__ == "__main__":
    main()
