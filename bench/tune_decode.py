"""The TinyLlama-shaped batch-1 decode step (bench_llama.py's model and byte count) replayed from its CUDA graph,
with the decode kernels launched plainly and programmatically (PDL, models/gemv.py), in one device call:
greedy tokens of both must match, then each graph is timed in alternating rounds. Run from the repository root:
``PYTHONPATH=. python3 bench/tune_decode.py``; prints a table last.

Timings: "stream" = CUDA events around 20 back-to-back replays; "single" = events around one replay (as
bench/conftest.py times it, with the 4-byte position reset before it); "host" = the Python time of one reset and
replay. With ``--kernels`` only the plain graph is built and replayed 20 times under torch's profiler (CUPTI; the
lent machine has no nsys), which prints each kernel's time per step.

H100, 2026-11-25 (stream / single / host us): plain 1187.0 / 1353.8 / 44.7; programmatic 1150.6 / 1304.5 / 38.7;
programmatic with gemv_rows prefetching its weights into L2 before pdl_wait() 1174.8 / 1350.4 / 47.8 (dropped).
Tried and not kept (stream us, programmatic): the paged decode and its combine launched programmatically too,
1150.2; the combine kernel replaced by a merge in the last split's block (a ticket per head group), 1199.8 with a
warp per row and 1156.5 with the block over (row, column pair), while bench_paged's MLA decode went 166 -> 233 us.
The single-replay figure moves by +-100 us between runs on the same machine; the stream figure within ~1%.
H100, 2026-11-25, later session (stream us): PDL with 4 / 8 / 16 bf16 rows a gemv_rows block 1137.3 / 1147.6 /
1198.4, plain 1174.9 (4 kept); after rope_append went to one thread per column pair and the paged combine and
argmax to loads in flight (--kernels: 4.18 -> 1.69, 4.52 -> 3.97, 8.59 -> 4.87 us a launch): 1063.2 / 1072.8 /
1130.3, plain 1102.6.
"""
import sys
import time
from pathlib import Path

import numpy

import cupy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llama as B  # noqa: E402  (the model shape, the byte count)
from tune_rope import timings  # noqa: E402  (stream and single-call medians)

import tessera_cp as tc  # noqa: E402
from tessera_cp.cuda import runtime  # noqa: E402
from tessera_cp.models import LlamaConfig, LlamaForCausalLM, TextGenerator, gemv  # noqa: E402


def prebuild_rows(rows_set):
    """gemv.cu built once with the batch-1 bf16 gemv_rows instantiations for every ROWS asked for (the runtime
    rebuilds a module once per name it was not built with, which took this script's whole time limit); the
    decode step's kernel lookup then takes them from that module."""
    names = [f"gemv_rows<__nv_bfloat16, {out}, {pro}, 1, {rows}>" for rows in sorted(rows_set)
             for out, pro in (("__nv_bfloat16", 0), ("__nv_bfloat16", 1), ("__nv_bfloat16", 2), ("float", 1))]
    code = (runtime.SOURCE_DIR / "gemv.cu").read_text() + "\n// tessera-instantiate: " + "; ".join(names) + "\n"
    built = {name: runtime.compile_source(code, name, filename="gemv.cu+rows") for name in names}
    listed = gemv._kernel
    gemv._kernel = lambda name: built[name] if name in built else listed(name)


def main():
    config = LlamaConfig.from_dict(B.TINYLLAMA)
    model = LlamaForCausalLM(config, device="cuda", generator=tc.Generator(0))
    prompt = B._prompt(B.CONTEXT)
    nbytes = B._weight_bytes(model) + B._kv_bytes(config, B.CONTEXT + 1)
    steps, tokens = {}, {}
    # (name, programmatic launches, rows of W per gemv_rows block for bf16 weights and one row of x)
    variants = (("plain launches", False, 4),) if "--kernels" in sys.argv else \
        (("plain launches", False, 4), ("programmatic (PDL), 8 rows a block", True, 8),
         ("PDL, 4 rows a block (default)", True, 4), ("PDL, 16 rows a block", True, 16))
    prebuild_rows({rows for _, _, rows in variants})
    for name, pdl, rows in variants:
        runtime._PDL_DEVICES[cupy.cuda.runtime.getDevice()] = pdl
        gemv._GEMV_ROWS[("bf16", 1)] = rows
        gen = TextGenerator(model, max_batch=1, max_context=B.CONTEXT + B.NEW + 64)
        gen.generate(prompt, 8, stop_tokens=[])                  # compile, capture the graph
        out = gen.generate(prompt, 32, stop_tokens=[])
        assert out.used_graph
        tokens[name] = out.tokens
        state, graph = gen._states[1], gen._graphs[(1, True)][0]
        start = cupy.asarray([B.CONTEXT], dtype=numpy.int32)

        def step(state=state, graph=graph, start=start, stream=gen.stream):
            state.pos[...] = start
            graph.launch()
        steps[name] = step
        gen.stream.synchronize()
    if "--kernels" in sys.argv:
        return kernel_table(steps["plain launches"], replays=20)
    first = next(iter(tokens.values()))
    print("greedy tokens identical:", all(t == first for t in tokens.values()), flush=True)
    rows = {name: ([], [], []) for name in steps}
    for _ in range(3):
        for name, step in steps.items():
            st, si = timings(step, n=20, reps=9)
            rows[name][0].append(st)
            rows[name][1].append(si)
            cupy.cuda.get_current_stream().synchronize()
            t = time.perf_counter()
            step()
            rows[name][2].append((time.perf_counter() - t) * 1e6)   # host time of the reset and the graph launch
            cupy.cuda.get_current_stream().synchronize()
    print(f"\n{'decode step, batch 1, context 512':36s} {'stream us':>10s} {'single us':>10s} {'host us':>8s} "
          f"{'roofline':>9s}")
    for name, (st, si, host) in rows.items():
        st, si = min(st), min(si)
        print(f"{name:36s} {st:10.1f} {si:10.1f} {min(host):8.1f} {nbytes / si / 1e3 / 3000:9.1%}")


def kernel_table(step, replays):
    """Each kernel's GPU time per decode step (CUPTI through torch.profiler), the largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    step()
    cupy.cuda.get_current_stream().synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step()
        cupy.cuda.get_current_stream().synchronize()
        torch.cuda.synchronize()
    totals, kernels = {}, [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in kernels:
        name = e.name.split("(")[0][:70]
        count, us = totals.get(name, (0, 0.0))
        totals[name] = (count + 1, us + e.time_range.elapsed_us())
    step_us = sum(us for _, us in totals.values()) / replays
    span_us = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / replays
    print(f"\n{'kernel (plain launches)':72s} {'calls':>6s} {'us/step':>8s} {'us/call':>8s}")
    for name, (count, us) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:72s} {count // replays:6d} {us / replays:8.1f} {us / count:8.2f}")
    print(f"{'sum of kernel times per step':72s} {'':6s} {step_us:8.1f}")
    print(f"{'first kernel start to last kernel end, per step (replays back to back)':72s} {'':6s} {span_us:8.1f}")


if __name__ == "__main__":
    main()
