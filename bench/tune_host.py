"""What the host's building blocks cost on the lent machine: the Python-side microseconds of the calls an op makes
before its kernel reaches the GPU (an op timed alone waits for all of them). Run from the repository root:
``PYTHONPATH=. python3 bench/tune_host.py``; prints one line per primitive (median of 5 rounds of 2000 calls).
"""
import os
import statistics
import time

import numpy

import cupy

import tessera_cp as tc
from tessera_cp import backend
from tessera_cp.cuda import runtime
from tessera_cp.nn import loss as L


def per_call_us(fn, calls=2000, rounds=5):
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        cupy.cuda.get_current_stream().synchronize()
    return statistics.median(times)


def main():
    n, v = 8192, 128256
    x = cupy.zeros((4, v), dtype=tc.bf16.storage)
    t = cupy.zeros(n, dtype=numpy.int64)
    counts = cupy.zeros(2, dtype=numpy.uint64)
    big = cupy.empty((n, v), dtype=tc.bf16.storage)
    del big  # the pool keeps the block: later empties of that size are pool hits
    _, count_kernel = L._kernel_for(t, "count_targets")
    count_args = (t, numpy.int64(n), numpy.int64(v), numpy.int64(-100), counts)
    event = cupy.cuda.Event(block=False, disable_timing=True)
    logits = tc.Tensor(x)
    rows = {
        "os.environ.get (unset name)": lambda: os.environ.get("TESSERA_SYNC"),
        "backend.reference_forced()": backend.reference_forced,
        "cupy.empty(2, uint64)": lambda: cupy.empty(2, dtype=numpy.uint64),
        "cupy.empty(8192, f32)": lambda: cupy.empty(n, dtype=numpy.float32),
        "cupy.empty((8192, 128256), bf16) (pool hit)": lambda: cupy.empty((n, v), dtype=tc.bf16.storage),
        "view x[0] of a 2-d array": lambda: x[0],
        "x.device.id": lambda: x.device.id,
        "cupy.cuda.Event(block=False, disable_timing=True)": lambda: cupy.cuda.Event(block=False,
                                                                                   disable_timing=True),
        "event.record()": event.record,
        "count_targets: kernel(...) directly (5 args)": lambda: count_kernel((1,), (1024,), count_args),
        "count_targets: runtime.launch_planned": lambda: runtime.launch_planned(count_kernel, (1,), (1024,),
                                                                                count_args),
        "count_targets: runtime.launch": lambda: runtime.launch(count_kernel, 1, 1024, count_args),
        "tc.Tensor(array)": lambda: tc.Tensor(x),
        "stable_cross_entropy 4 x 128256, no grad": lambda: L.stable_cross_entropy(logits, tc.Tensor(t[:4])),
    }
    for name, fn in rows.items():
        print(f"{name:<52} {per_call_us(fn):7.2f} us", flush=True)


if __name__ == "__main__":
    main()
