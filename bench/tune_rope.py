"""RoPE launch tuning, one device call: rope.cu's kernel for q and k (8 x 4096 x 32 x 128 bf16, [B, S, H, D]) at
several block shapes, heads per step and grid caps, out of place and in place, beside a device copy of the same
bytes and torch.compile's rotate_half, each variant checked bit for bit against the current launch. Run from the
repository root: ``PYTHONPATH=. python3 bench/tune_rope.py``; prints a table last.

Bytes: q and k each read and written once, 4 * 8 * 4096 * 32 * 128 * 2 = 1.07 GB (the tables, 2 MB, not counted).
Timings: "stream" = CUDA events around 10 back-to-back calls; "single" = events around one call (bench/conftest.py's
way, host part included). Rounds alternate the variants, so a drifting clock shows as spread, not as a winner.
"""
import re
import statistics
from pathlib import Path

import ml_dtypes
import numpy as np

import cupy as cp

from tessera_cp.cuda import runtime
from tessera_cp.nn import rope

B, S, H, D = 8, 4096, 32, 128
NBYTES = 4 * B * S * H * D * 2
SOURCE = (Path(rope.__file__).resolve().parent.parent / "cuda" / "rope.cu").read_text()
SMS = cp.cuda.Device().attributes["MultiProcessorCount"]


def variant_kernel(heads_per_step, block_threads, min_blocks):
    code = re.sub(r"HEADS_PER_STEP = \d+", f"HEADS_PER_STEP = {heads_per_step}", SOURCE)
    code = re.sub(r"BLOCK_THREADS = \d+", f"BLOCK_THREADS = {block_threads}", code)
    code = re.sub(r"MIN_BLOCKS = \d+", f"MIN_BLOCKS = {min_blocks}", code)
    return runtime.compile_source(code, "rope_apply<__nv_bfloat16, 8>", filename="rope_variant.cu")


def launcher(kernel, xs, outs, cos, sin, pos, threads, tokens_per_block, grid_cap):
    (q, k), (qo, ko) = xs, outs
    i64 = np.int64
    st = [i64(s // 2) for s in q.strides[:3]]
    half = D // 2
    lanes = half // 8
    grid = min(-(-(B * S) // tokens_per_block), grid_cap)
    args = (q, *st, qo, *st, np.int32(H), k, *st, ko, *st, np.int32(H), cos, sin, pos, i64(0), i64(1), i64(B),
            i64(S), np.int32(half), np.int32(lanes), np.float32(1.0))
    return lambda: runtime.launch(kernel, grid, (threads, tokens_per_block), args)


def timings(fn, n=10, reps=7):
    a, b = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(3):
        fn()
    cp.cuda.get_current_stream().synchronize()
    stream, single = [], []
    for _ in range(reps):
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        stream.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / n)
        a.record()
        fn()
        b.record()
        b.synchronize()
        single.append(cp.cuda.get_elapsed_time(a, b) * 1e3)
    return statistics.median(stream), statistics.median(single)


def main():
    q = cp.random.standard_normal((B, S, H, D), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    k = cp.random.standard_normal((B, S, H, D), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    cos, sin = rope.rope_cache(S, D, device="cuda")
    cos, sin = cos.data, sin.data
    pos = cp.arange(S, dtype=cp.int64)[None, :]
    qo, ko = cp.empty_like(q), cp.empty_like(k)
    rope._launch_rope([q, k], [qo, ko], cos, sin, pos, "BSHD", 1.0)
    want = (qo.copy(), ko.copy())

    rows = {}
    variants = {}
    # (heads per step, block threads, min blocks, tokens per block, grid cap in blocks)
    for hps, threads, minb, tpb, cap in [(2, 256, 4, 1, 1 << 30), (2, 256, 4, 1, SMS * 8), (2, 256, 3, 1, 1 << 30),
                                         (2, 256, 2, 1, 1 << 30), (1, 512, 2, 1, 1 << 30), (1, 256, 4, 1, 1 << 30),
                                         (4, 128, 6, 1, 1 << 30), (2, 256, 3, 1, SMS * 6), (2, 128, 3, 2, 1 << 30)]:
        name = f"hps{hps} t{threads}x{tpb} minb{minb} cap{cap if cap < 1 << 30 else '-'}"
        # a token's threads: 8 lanes (a half's 8 vectors) x threads / 8 head slots; tpb tokens a block
        kernel = variant_kernel(hps, threads * tpb, minb)
        variants[name] = (kernel, threads, tpb, cap)
    for name, (kernel, threads, tpb, cap) in variants.items():
        for place in ("out", "in"):
            outs = [qo, ko] if place == "out" else [q.copy(), k.copy()]
            ins = [q, k] if place == "out" else outs
            if place == "out":
                qo.fill(0), ko.fill(0)
                launcher(kernel, ins, outs, cos, sin, pos, threads, tpb, cap)()
                ok = bool((qo.view(cp.uint16) == want[0].view(cp.uint16)).all()
                          & (ko.view(cp.uint16) == want[1].view(cp.uint16)).all())
            else:
                ok = True
            rows[(name, place)] = dict(ok=ok, fn=launcher(kernel, ins, outs, cos, sin, pos, threads, tpb, cap),
                                       stream=[], single=[])
    rows[("current _launch_rope", "out")] = dict(ok=True, stream=[], single=[],
                                                 fn=lambda: rope._launch_rope([q, k], [qo, ko], cos, sin, pos,
                                                                              "BSHD", 1.0))
    rows[("device copy of the same bytes", "out")] = dict(ok=True, stream=[], single=[],
                                                          fn=lambda: (cp.copyto(qo, q), cp.copyto(ko, k)))
    try:
        import torch
        qt, kt = torch.from_dlpack(q), torch.from_dlpack(k)
        ang = torch.outer(torch.arange(S, device="cuda", dtype=torch.float32),
                          1.0 / 10000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
        emb = torch.cat((ang, ang), dim=-1)[None, :, None, :]
        ct, stt = emb.cos().to(qt.dtype), emb.sin().to(qt.dtype)

        def rot(x):
            return torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)
        compiled = torch.compile(lambda q, k: (q * ct + rot(q) * stt, k * ct + rot(k) * stt))
        rows[("torch.compile rotate_half", "out")] = dict(ok=True, stream=[], single=[],
                                                          fn=lambda: compiled(qt, kt))
    except Exception as exc:  # no torch: the table has no such row
        print("torch:", repr(exc))
    for _ in range(3):
        for row in rows.values():
            st, si = timings(row["fn"])
            row["stream"].append(st)
            row["single"].append(si)
    print(f"\n{'variant':44s} {'place':5s} {'stream us':>10s} {'single us':>10s} {'of copy':>8s}  ok")
    for (name, place), row in rows.items():
        st, si = min(row["stream"]), min(row["single"])
        print(f"{name:44s} {place:5s} {st:10.1f} {si:10.1f} {NBYTES / si / 1e3 / 3000:8.0%}  {row['ok']}")


if __name__ == "__main__":
    main()
