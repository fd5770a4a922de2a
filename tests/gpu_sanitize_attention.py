"""Each attention kernel once on a small case, for compute-sanitizer (not collected by pytest):

    PYTHONPATH=. compute-sanitizer --tool memcheck python3 tests/gpu_sanitize_attention.py
    PYTHONPATH=. compute-sanitizer --tool racecheck python3 tests/gpu_sanitize_attention.py

Covers attn_fwd (plain, with mask + ALiBi, packed decode with split keys), the in-launch split merge, attn_bwd_dot, attn_bwd_dq
and attn_bwd_dkdv (plain and masked), and on an sm_90 GPU attn_fwd_sm90 (D 64 causal, D 128 not; enough heads for
it to be chosen), on lengths that are not multiples of any tile.
"""
import importlib

import cupy

import tessera_cp as tc

A = importlib.import_module("tessera_cp.nn.attention")  # the module: tessera_cp.nn.attention is the function


def run(B, Hq, Hkv, Sq, Sk, D, causal, masked=False, backward=True):
    q = tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    k = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    v = tc.randn(B, Hkv, Sk, D, dtype=tc.bf16, device="cuda", requires_grad=True)
    mask = slopes = None
    if masked:
        mask = tc.Tensor(cupy.random.default_rng(0).random((B, 1, Sq, Sk)) > 0.3)
        slopes = A.alibi_slopes(Hq, device="cuda")
    out = A.attention(q, k, v, mask=mask, is_causal=causal, alibi_slopes=slopes)
    assert out._node.used_kernel
    if backward:
        out.backward(tc.randn(B, Hq, Sq, D, dtype=tc.bf16, device="cuda"))
    cupy.cuda.Device().synchronize()
    print(f"ok B={B} Hq={Hq} Hkv={Hkv} Sq={Sq} Sk={Sk} D={D} causal={causal} masked={masked}")


if __name__ == "__main__":
    run(1, 4, 2, 37, 45, 64, True)
    run(1, 2, 1, 21, 70, 128, False, masked=True)
    run(1, 8, 2, 1, 300, 128, False, backward=False)   # decode: packed rows, split keys, combine
    sm90 = A._use_sm90(cupy.zeros((2, 66, 150, 64), dtype=cupy.float16), 0.125)
    print(f"attn_fwd_sm90 {'chosen' if sm90 else 'not chosen (not an sm_90 GPU)'} for the next two")
    run(2, 66, 22, 150, 170, 64, True, backward=False)
    run(1, 132, 132, 77, 200, 128, False, backward=False)
