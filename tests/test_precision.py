"""precision(compute=..., accumulate=...): nesting, per-thread isolation, argument checks, and the effect of f64
accumulation on sums that f32 accumulation gets wrong (expected values from exact integer arithmetic)."""
import importlib
import threading

import ml_dtypes
import numpy
import pytest

import tessera_cp as tc
from tessera_cp.errors import DTypeError

precision_module = importlib.import_module("tessera_cp.precision")  # tc.precision is the context function


def setting():
    s = precision_module.current()
    return s["compute"], s["accumulate"]


def test_nested_contexts_restore():
    assert setting() == (None, None)
    with tc.precision(accumulate=tc.f64) as outer:
        assert outer["accumulate"] is tc.f64
        assert setting() == (None, tc.f64)
        with tc.precision(compute="f32"):
            assert setting() == (tc.f32, tc.f64)  # unspecified keys keep the outer setting
            with tc.precision(accumulate=tc.f32, compute=tc.bf16):
                assert setting() == (tc.bf16, tc.f32)
            assert setting() == (tc.f32, tc.f64)
        assert setting() == (None, tc.f64)
    assert setting() == (None, None)
    with pytest.raises(KeyError):
        with tc.precision(accumulate="float64"):
            raise KeyError("an exception inside")
    assert setting() == (None, None)


def test_compute_dtype_reads_the_setting():
    assert precision_module.compute_dtype(tc.f32) is tc.f32
    with tc.precision(compute=tc.f64):
        assert precision_module.compute_dtype(tc.f32) is tc.f64
    assert precision_module.compute_dtype("bf16") is tc.bf16


def test_accumulate_storage_rules():
    acc = precision_module.accumulate_storage
    assert acc(numpy.float16) == numpy.float32 and acc(ml_dtypes.bfloat16) == numpy.float32  # default: f32
    assert acc(numpy.float32) == numpy.float32 and acc(numpy.float64) == numpy.float64
    assert acc(numpy.int32) == numpy.int32
    with tc.precision(accumulate=tc.f64):
        assert acc(ml_dtypes.bfloat16) == numpy.float64 and acc(numpy.float32) == numpy.float64
        assert acc(numpy.int64) == numpy.int64  # integers are exact already
    with tc.precision(accumulate=tc.f16):
        assert acc(numpy.float32) == numpy.float32  # never narrower than the input


@pytest.mark.parametrize("bad", ["int32", tc.int8, tc.bool_, tc.fp8_e4m3, "fp8_e5m2", "nonsense", numpy.int64])
def test_bad_dtype_is_a_dtype_error(bad):
    with pytest.raises(DTypeError):
        with tc.precision(accumulate=bad):
            pass
    with pytest.raises(DTypeError):
        with tc.precision(compute=bad):
            pass
    assert setting() == (None, None)


def test_f64_accumulation_fixes_an_f32_sum():
    # 2^25 followed by 4096 ones: the exact sum 2^25 + 4096 is an f32 value, but an f32 accumulator that holds
    # 2^25 rounds each +1 away (f32 spacing there is 4)
    x = numpy.array([2.0 ** 25] + [1.0] * 4096, dtype=numpy.float32)
    exact = 2 ** 25 + 4096
    t = tc.tensor(x)
    plain = t.sum().item()
    with tc.precision(accumulate=tc.f64):
        wide = t.sum()
        wide_mean = t.mean().item()
    assert wide.dtype is tc.f32 and wide.item() == exact
    assert plain != exact and abs(plain - exact) >= 4  # measurably off: at least one f32 step
    assert wide_mean == float(numpy.float32(exact / 4097))  # the exact mean, rounded once to f32


def test_f64_accumulation_fixes_a_bf16_sum():
    # 2^25 + 2^17 + fifteen ones. bf16 spacing at 2^25 is 2^18, so 2^25 + 2^17 is the midpoint: the exact sum
    # (midpoint + 15) rounds up to 2^25 + 2^18; an f32 accumulator that adds the ones to 2^25 loses all of them,
    # lands on the midpoint and rounds to even, 2^25.
    b = numpy.zeros(128)
    b[0], b[1] = 2.0 ** 25, 2.0 ** 17
    b[8:128:8] = 1.0
    exact = 2 ** 25 + 2 ** 17 + 15
    correctly_rounded = 2 ** 25 + 2 ** 18
    assert abs(exact - correctly_rounded) < abs(exact - 2 ** 25)
    t = tc.tensor(b.astype(ml_dtypes.bfloat16))
    plain = t.sum()
    with tc.precision(accumulate="f64"):
        wide = t.sum()
    assert wide.dtype is tc.bf16 and plain.dtype is tc.bf16
    assert wide.item() == correctly_rounded
    assert plain.item() == 2 ** 25  # off by 2^18


def test_threads_do_not_see_each_others_setting():
    x = tc.tensor(numpy.array([2.0 ** 25] + [1.0] * 4096, dtype=numpy.float32))
    exact = 2 ** 25 + 4096
    barrier = threading.Barrier(3)
    seen, errors = {}, []

    def worker(name, accumulate):
        try:
            barrier.wait(timeout=30)  # everyone starts together
            if accumulate is None:
                barrier.wait(timeout=30)  # the f64 thread is inside its context now
                seen[name] = (setting(), x.sum().item())
                barrier.wait(timeout=30)
            else:
                with tc.precision(accumulate=accumulate, compute=tc.f64):
                    barrier.wait(timeout=30)
                    seen[name] = (setting(), x.sum().item())
                    barrier.wait(timeout=30)  # hold the context until the other thread has read
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=("wide", tc.f64)),
               threading.Thread(target=worker, args=("plain", None))]
    for th in threads:
        th.start()
    with tc.precision(accumulate=tc.f32):  # the main thread's own setting, also invisible to the others
        for _ in range(3):  # start; the wide thread has entered its context; both have read
            barrier.wait(timeout=30)
        for th in threads:
            th.join()
        assert setting() == (None, tc.f32)
    assert not errors
    assert seen["wide"] == ((tc.f64, tc.f64), exact)
    assert seen["plain"][0] == (None, None) and seen["plain"][1] != exact
    assert setting() == (None, None)


def test_softmax_and_logsumexp_honour_f64_accumulation():
    # computed in f64 throughout, the f32 results are the float64 values rounded once (within half an f32 ulp)
    x = numpy.linspace(-3, 3, 1001).astype(numpy.float32)
    t = tc.tensor(x)
    x64 = x.astype(numpy.float64)
    exact = numpy.log(numpy.exp(x64).sum())
    with tc.precision(accumulate=tc.f64):
        got = t.logsumexp().item()
        probs = t.softmax().numpy()
    assert abs(got - exact) <= abs(float(numpy.float32(exact)) - exact) + 1e-12
    p64 = numpy.exp(x64 - x64.max()) / numpy.exp(x64 - x64.max()).sum()
    numpy.testing.assert_array_equal(probs, p64.astype(numpy.float32))
