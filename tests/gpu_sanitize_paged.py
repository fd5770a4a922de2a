"""Each paged-attention kernel once on a small case, for compute-sanitizer (not collected by pytest):

    PYTHONPATH=. compute-sanitizer --tool memcheck python3 tests/gpu_sanitize_paged.py
    PYTHONPATH=. compute-sanitizer --tool racecheck python3 tests/gpu_sanitize_paged.py

Covers paged_decode (GQA D=128 and D=64, paged and contiguous, one split and several with
paged_decode_combine, an empty sequence, a partial head group) and the MLA instantiation (576/512, paged and
contiguous), on lengths that are not multiples of any tile. Each run asserts the kernel path ran and the output is
finite.
"""
import cupy
import numpy

import tessera_cp as tc
from tessera_cp.nn import kv_cache as K
from tessera_cp.nn.mla import mla_decode_attention


def _no_reference(*args, **kwargs):
    raise AssertionError("the reference ran where the kernel should have")


K._decode_reference = _no_reference
rng = numpy.random.default_rng(0)


def _finite(out, what):
    cupy.cuda.Device().synchronize()
    assert bool(cupy.isfinite(out.data.astype(cupy.float32)).all()), what
    print("ok", what)


def paged(lens, Hq, Hkv, D, bs, splits, dtype=tc.bf16):
    per = [-(-n // bs) for n in lens]
    nb = sum(per) + 1
    order = rng.permutation(nb)
    table = numpy.zeros((len(lens), max(per + [1])), dtype=numpy.int32)
    at = 0
    for b, n in enumerate(per):
        table[b, :n] = order[at:at + n]
        at += n
    k = tc.randn(nb, Hkv, bs, D, dtype=dtype, device="cuda")
    v = tc.randn(nb, Hkv, bs, D, dtype=dtype, device="cuda")
    q = tc.randn(len(lens), Hq, D, dtype=dtype, device="cuda")
    lens_t = tc.Tensor(cupy.asarray(lens, dtype=cupy.int32))
    out = K.paged_decode_attention(q, k, v, tc.Tensor(cupy.asarray(table)), lens_t, num_splits=splits)
    _finite(out, f"paged lens={lens} Hq={Hq} Hkv={Hkv} D={D} bs={bs} splits={splits}")
    S = max(lens)
    kc = tc.randn(len(lens), Hkv, S, D, dtype=dtype, device="cuda")
    vc = tc.randn(len(lens), Hkv, S, D, dtype=dtype, device="cuda")
    out = K.decode_attention(q, kc, vc, lens_t, num_splits=splits)
    _finite(out, f"contiguous lens={lens} splits={splits}")


def mla(lens, H, bs, splits):
    C, R = 512, 64
    per = [-(-n // bs) for n in lens]
    nb = sum(per) + 1
    table = numpy.zeros((len(lens), max(per)), dtype=numpy.int32)
    table[0, :per[0]] = numpy.arange(per[0])[::-1]
    if len(lens) > 1:
        table[1, :per[1]] = per[0] + numpy.arange(per[1])
    pool = tc.randn(nb, bs, C + R, dtype=tc.bf16, device="cuda")
    q = tc.randn(len(lens), H, C + R, dtype=tc.bf16, device="cuda")
    lens_t = tc.Tensor(cupy.asarray(lens, dtype=cupy.int32))
    out = mla_decode_attention(q, pool, lens_t, tc.Tensor(cupy.asarray(table)), value_dim=C, scale=0.07,
                               num_splits=splits)
    _finite(out, f"mla paged lens={lens} H={H} splits={splits}")
    rows = tc.randn(len(lens), max(lens), C + R, dtype=tc.bf16, device="cuda")
    out = mla_decode_attention(q, rows, lens_t, value_dim=C, scale=0.07, num_splits=splits)
    _finite(out, f"mla contiguous lens={lens} H={H} splits={splits}")


if __name__ == "__main__":
    paged([37, 0, 100], 8, 2, 128, 16, 1)      # one split, an empty sequence
    paged([300, 5], 12, 4, 64, 16, 3)          # split + combine
    paged([70], 40, 2, 64, 16, None)           # 20 heads per KV head: a partial head group
    paged([45], 4, 4, 128, 8, 2, dtype=tc.f16)
    mla([100, 3], 32, 16, 3)
    mla([50], 16, 16, 1)
