"""Benchmark fixtures: GPU work timed with CUDA events, reported as GB/s or TFLOP/s beside the alternative a user
would pick, measured in the same run.

``cuda_bench(name, ours, bytes=..., flops=..., baselines={"torch.compile": fn})`` warms each callable up, times it
with CUDA events (median of many runs), prints one line per callable, and records the rows; the session ends with
a table, also written to ``bench/last_run.md`` (copy it into ``RESULTS.md`` with the date and GPU).
"""
import os
import statistics

import pytest

COPY_CEILING_GBS = float(os.environ.get("TESSERA_COPY_CEILING_GBS", "3000"))  # measured H100 D2D copy, GPU_NOTES.md
_rows = []


def time_cuda(fn, warmup=10, repeat=50, min_ms=200.0):
    """Median milliseconds of fn() timed with CUDA events (each run timed alone, after warm-up)."""
    return statistics.median(cuda_timings(fn, warmup, repeat, min_ms))


def cuda_timings(fn, warmup=10, repeat=50, min_ms=200.0):
    """Milliseconds of each of at least ``repeat`` calls of fn() (more until ``min_ms`` in all, at most 10x),
    each between two CUDA events, after ``warmup`` calls."""
    import cupy
    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    total = 0.0
    while len(times) < repeat or (total < min_ms and len(times) < 10 * repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        ms = cupy.cuda.get_elapsed_time(start, stop)
        times.append(ms)
        total += ms
    return times


def _rate(ms, nbytes, flops):
    parts = []
    if nbytes:
        gbs = nbytes / ms / 1e6
        parts.append(f"{gbs:8.0f} GB/s ({gbs / COPY_CEILING_GBS:4.0%} of copy)")
    if flops:
        parts.append(f"{flops / ms / 1e9:7.1f} TFLOP/s")
    return "  ".join(parts)


@pytest.fixture
def cuda_bench(request):
    """Times with CUDA events (the figures reported) and also hands tessera_cp's callable to pytest-benchmark
    (host clock around a synchronised call), so --benchmark-json and its tables work as usual."""
    cupy = pytest.importorskip("cupy")
    from tessera_cp import backend
    if not backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    benchmark = request.getfixturevalue("benchmark")  # after the skip: an unused one only earns a warning

    timed_by_pytest_benchmark = []

    def run(name, ours, *, bytes=0, flops=0, baselines=None):
        results = {"tessera_cp": time_cuda(ours)}
        for label, fn in (baselines or {}).items():
            results[label] = time_cuda(fn)
        for label, ms in results.items():
            ratio = "" if label == "tessera_cp" else f"  tessera_cp is {ms / results['tessera_cp']:.2f}x its speed"
            line = f"{name:<44} {label:<18} {ms * 1e3:10.1f} us  {_rate(ms, bytes, flops)}{ratio}"
            print(line)
            _rows.append(line)
        benchmark.extra_info.update({f"{label} ms": ms for label, ms in results.items()}, bytes=bytes, flops=flops)
        if not timed_by_pytest_benchmark:  # pytest-benchmark times one callable per test: the first
            timed_by_pytest_benchmark.append(name)
            benchmark.pedantic(lambda: (ours(), cupy.cuda.get_current_stream().synchronize()), rounds=20,
                               warmup_rounds=2)
        return results
    return run


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    terminalreporter.write_line("")
    terminalreporter.write_line("benchmark (median of CUDA-event timings; ratio = baseline time / tessera_cp time)")
    for line in _rows:
        terminalreporter.write_line(line)
    with open(os.path.join(os.path.dirname(__file__), "last_run.md"), "w") as f:
        f.write("```\n" + "\n".join(_rows) + "\n```\n")
