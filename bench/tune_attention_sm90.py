"""Variants of the Hopper attention forward (cuda/attention_sm90.cu) side by side, in one call on the GPU machine:

    PYTHONPATH=. python3 bench/tune_attention_sm90.py [VARIANT.cu ...]

Each VARIANT is a copy of attention_sm90.cu placed in tessera_cp/cuda/ (e.g. an older commit's, written there by
``git show REV:tessera_cp/cuda/attention_sm90.cu > tessera_cp/cuda/attn90_old.cu``; it must take the current
launch arguments); the current file is always timed, also launched with a block per work item ("block an item",
not persistent). For each shape every variant is checked against the mma.sync kernel (TESSERA_ATTN_SM90=0: its output and
LSE, max abs difference printed; a variant off by more than 2e-2 in out or 1e-3 in LSE is marked WRONG), then timed
(median of CUDA-event timings, bench/conftest.py) beside the mma.sync kernel and torch SDPA's cuDNN backend.
FLOPs: 4 B H S^2 D, halved when causal. A table is printed last.
"""
import importlib
import os
import sys

import cupy

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import _sdpa  # noqa: E402
from conftest import time_cuda  # noqa: E402

import tessera_cp as tc  # noqa: E402

A = importlib.import_module("tessera_cp.nn.attention")
SHAPES = [(4, 32, 4096, 128, True), (4, 32, 4096, 128, False), (8, 16, 2048, 64, True), (16, 16, 1024, 128, True)]


def main(variants):
    variants = ["attention_sm90.cu"] + [v for v in variants if v != "attention_sm90.cu"] + ["block an item"]
    kernel = A._kernel
    rows = []
    for B, H, S, D, causal in SHAPES:
        q, k, v = (tc.randn(B, H, S, D, dtype=tc.bf16, device="cuda").data for _ in range(3))
        scale = D ** -0.5
        os.environ["TESSERA_ATTN_SM90"] = "0"
        ref_o, ref_lse = A._forward_kernel(q, k, v, None, None, scale, causal)
        ms = {"mma.sync": time_cuda(lambda: A._forward_kernel(q, k, v, None, None, scale, causal))}
        del os.environ["TESSERA_ATTN_SM90"]
        errors = {}
        for name in variants:
            source_file = "attention_sm90.cu" if name == "block an item" else name
            A._SM90_BLOCKS_PER_SM = 1 << 20 if name == "block an item" else 1  # not persistent: a block an item
            A._kernel = lambda source, kname, f=source_file: kernel(f if source == "attention_sm90.cu" else source,
                                                                    kname)
            o, lse = A._forward_kernel(q, k, v, None, None, scale, causal)
            finite = cupy.isfinite(ref_lse)
            eo = float(cupy.abs(o.astype(cupy.float32) - ref_o.astype(cupy.float32)).max())
            el = float(cupy.abs(cupy.where(finite, lse - ref_lse, 0)).max())
            errors[name] = (eo, el, "WRONG" if not (eo <= 2e-2 and el <= 1e-3) else "ok")
            ms[name] = time_cuda(lambda: A._forward_kernel(q, k, v, None, None, scale, causal))
        A._kernel, A._SM90_BLOCKS_PER_SM = kernel, 1
        cudnn = _sdpa(*(tc.Tensor(x) for x in (q, k, v)), causal, "cudnn")  # None: torch or the backend missing
        if cudnn is not None:
            ms["cudnn"] = time_cuda(cudnn)
        flops = 4 * B * H * S * S * D / (2 if causal else 1)
        label = f"B{B} H{H} S{S} D{D}{' causal' if causal else ''}"
        cells = " | ".join(f"{n} {flops / t / 1e9:.1f}" for n, t in ms.items())
        errs = " ".join(f"{n}: out {e[0]:.2g} lse {e[1]:.2g} {e[2]}" for n, e in errors.items())
        print(f"{label}: {cells} TFLOP/s; {errs}", flush=True)
        rows.append(f"{label:<28} {cells}")
    print("\n==== TFLOP/s (median of CUDA-event timings) ====")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
