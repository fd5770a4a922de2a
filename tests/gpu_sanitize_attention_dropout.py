"""The dropout kernels and the short (driver-launched) path once each on small cases, for compute-sanitizer (not
collected by pytest):

    PYTHONPATH=. compute-sanitizer --tool memcheck python3 tests/gpu_sanitize_attention_dropout.py
    PYTHONPATH=. compute-sanitizer --tool racecheck python3 tests/gpu_sanitize_attention_dropout.py

Covers attn_fwd with DROP (whole tiles and split keys), attn_bwd_dq and attn_bwd_dkdv with DROP (D 64 and 128),
and attn_fwd launched through the short path's argument block, on lengths that are not multiples of any tile.
"""
import importlib

import cupy

import tessera_cp as tc

A = importlib.import_module("tessera_cp.nn.attention")  # the module: tessera_cp.nn.attention is the function


def dropout(B, Hq, Hkv, Sq, Sk, D, causal):
    q = tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    k = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    v = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    out = A.attention(q, k, v, is_causal=causal, dropout_p=0.2, dropout_seed=5)
    assert out._node.used_kernel
    out.backward(tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda"))
    cupy.cuda.Device().synchronize()
    print(f"ok dropout B={B} Hq={Hq} Hkv={Hkv} Sq={Sq} Sk={Sk} D={D} causal={causal}")


def short(B, Hq, Hkv, Sq, Sk, D):
    q = tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda")
    k = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda")
    v = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda")
    for _ in range(3):  # the plan (through CuPy), then the driver launches
        A.attention(q, k, v)
    cupy.cuda.Device().synchronize()
    print(f"ok short path B={B} Hq={Hq} Hkv={Hkv} Sq={Sq} Sk={Sk} D={D}")


if __name__ == "__main__":
    dropout(1, 4, 2, 37, 45, 64, True)
    dropout(1, 2, 1, 21, 70, 128, False)
    dropout(1, 2, 2, 3, 300, 128, False)   # few rows: split keys, partials merged
    short(1, 8, 2, 1, 300, 128)             # decode: packed rows, split keys
