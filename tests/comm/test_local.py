"""Parts of tessera_cp.comm that need no second process: shard sizes, the LSE merge of partial attention, the
dtypes MPI reduces in, and that importing the package does not start MPI."""
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy
import pytest
from numpy.testing import assert_allclose

from tessera_cp.comm import attention_block_lse, merge_lse, shard_bounds
from tessera_cp.comm.transport import _wide_storage


@pytest.mark.parametrize("n", [0, 1, 5, 13, 16])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_shard_bounds_are_numpy_array_split(n, parts):
    pieces = numpy.array_split(numpy.arange(n), parts)
    for index, piece in enumerate(pieces):
        start, stop = shard_bounds(n, parts, index)
        assert stop - start == len(piece)
        assert list(range(start, stop)) == piece.tolist()


def _softmax_attention(q, k, v, scale, causal):
    """float64 attention of q [B,H,S,D] over k, v [B,H,S,*] written out directly."""
    s = q @ k.swapaxes(-1, -2) * scale
    if causal:
        s = numpy.where(numpy.triu(numpy.ones(s.shape[-2:], dtype=bool), 1), -numpy.inf, s)
    p = numpy.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v, numpy.log(numpy.exp(s - s.max(-1, keepdims=True)).sum(-1)) + \
        s.max(-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_blocks_merged_by_lse_equal_attention_over_the_whole_sequence(causal, order):
    rng = numpy.random.default_rng(3)
    B, Hk, G, S, D, Dv = 2, 2, 2, 9, 4, 3
    q = rng.standard_normal((B, Hk * G, S, D))
    k, v = rng.standard_normal((B, Hk, S, D)), rng.standard_normal((B, Hk, S, Dv))
    expected, expected_lse = _softmax_attention(q, numpy.repeat(k, G, 1), numpy.repeat(v, G, 1), 0.4, causal)
    # Queries are positions 3..5 (the middle shard); key blocks [0,3) [3,6) [6,9): under causal masking the last
    # block is entirely in the future and the middle one is the diagonal.
    q_local = q[:, :, 3:6].reshape(B, Hk, G, 3, D)
    out = numpy.zeros((B, Hk, G, 3, Dv))
    lse = numpy.full((B, Hk, G, 3), -numpy.inf)
    for block in order:
        lo = 3 * block
        block_out, block_lse = attention_block_lse(numpy, q_local, k[:, :, lo:lo + 3], v[:, :, lo:lo + 3], 0.4, 3,
                                                   lo, causal)
        if causal and block == 2:  # every key after every query: nothing visible, nothing added
            assert numpy.isneginf(block_lse).all() and not block_out.any()
        out, lse = merge_lse(numpy, out, lse, block_out, block_lse)
    assert_allclose(out.reshape(B, Hk * G, 3, Dv), expected[:, :, 3:6], rtol=1e-12, atol=1e-14)
    assert_allclose(lse.reshape(B, Hk * G, 3), expected_lse[:, :, 3:6], rtol=1e-12)


def test_a_plain_sum_of_block_outputs_would_be_wrong():
    """The seed sums per-block outputs; the merge must not (guards the test above against a trivial merge)."""
    rng = numpy.random.default_rng(4)
    q, k, v = rng.standard_normal((1, 1, 1, 2, 4)), rng.standard_normal((1, 1, 6, 4)), rng.standard_normal((1, 1, 6, 3))
    halves = [attention_block_lse(numpy, q, k[:, :, i:i + 3], v[:, :, i:i + 3], 0.5, 0, 0, False) for i in (0, 3)]
    merged, _ = merge_lse(numpy, *halves[0], *halves[1])
    whole, _ = attention_block_lse(numpy, q, k, v, 0.5, 0, 0, False)
    assert_allclose(merged, whole, rtol=1e-12)
    assert not numpy.allclose(halves[0][0] + halves[1][0], whole)


def test_mpi_reduces_16_bit_floats_in_f32_and_bool_as_bytes():
    assert _wide_storage(ml_dtypes.bfloat16) == numpy.float32
    assert _wide_storage(numpy.float16) == numpy.float32
    assert _wide_storage(numpy.bool_) == numpy.uint8
    for kept in (numpy.float32, numpy.float64, numpy.int32, numpy.int64, numpy.int8):
        assert _wide_storage(kept) == kept


def test_importing_comm_does_not_initialise_mpi():
    code = "import sys, tessera_cp.comm; assert 'mpi4py.MPI' not in sys.modules, 'MPI was initialised'"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
