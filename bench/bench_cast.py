"""fp8 casts: bf16 -> e4m3 (saturating) and e4m3 -> bf16 over 64M elements, against PyTorch's .to(float8).

Bytes moved: encode reads 2 bytes and writes 1 per element; decode reads 1 and writes 2. Both: 3 * n.
"""
import pytest

import tessera_cp as tc
from tessera_cp import fp8

N = 64 * 2 ** 20


@pytest.mark.gpu
def test_fp8_encode_decode(cuda_bench):
    x = tc.randn(N, dtype=tc.bf16, device="cuda")
    bits = fp8.encode(x.data, tc.fp8_e4m3, saturate=True)
    baselines = {}
    try:
        import torch
        xt = torch.from_dlpack(x.data)
        qt = xt.to(torch.float8_e4m3fn)
        baselines = {"torch .to(e4m3)": lambda: xt.to(torch.float8_e4m3fn)}
        decode_baselines = {"torch .to(bf16)": lambda: qt.to(torch.bfloat16)}
    except ImportError:
        decode_baselines = {}
    cuda_bench("fp8 encode bf16->e4m3 sat, 64M", lambda: fp8.encode(x.data, tc.fp8_e4m3, saturate=True),
               bytes=3 * N, baselines=baselines)
    cuda_bench("fp8 decode e4m3->bf16, 64M", lambda: fp8.decode(bits, tc.fp8_e4m3, tc.bf16),
               bytes=3 * N, baselines=decode_baselines)
