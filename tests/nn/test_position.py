"""ALiBi slopes and biases against the paper's values, and the learned absolute position embedding."""
import ml_dtypes
import numpy as np
import pytest

import tessera_cp as tc
from tessera_cp import dtypes
from tessera_cp.errors import DTypeError, IndexOutOfRangeError, ShapeError
from tessera_cp.nn.position import LearnedPositionalEmbedding, alibi_bias, alibi_slopes


@pytest.mark.parametrize("heads, expected", [
    (1, [2 ** -8]),
    (2, [2 ** -4, 2 ** -8]),
    (8, [2.0 ** -k for k in range(1, 9)]),
    (16, [2.0 ** (-k / 2) for k in range(1, 17)]),
    # not powers of two: the 4 (resp. 8) slopes of the power below, then every other slope of the power above
    (6, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]),
    (12, [2.0 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]),
])
def test_slopes(heads, expected):
    np.testing.assert_allclose(alibi_slopes(heads), expected, rtol=1e-15)


def test_bias_is_minus_slope_times_distance():
    bias = alibi_bias(5, 3, dtype="f64")
    assert bias.shape == (3, 5, 5) and bias.dtype is dtypes.f64
    slopes = [2 ** -4, 2 ** -8, 2 ** -2]   # 3 heads: the 2-head slopes, then the first odd one of 4 heads
    for h in range(3):
        for i in range(5):
            for j in range(5):
                assert bias.numpy()[h, i, j] == pytest.approx(-slopes[h] * abs(i - j), rel=1e-15)


def test_bias_with_more_keys_aligns_queries_to_the_last_keys():
    bias = alibi_bias(3, 2, key_len=5, dtype="f64").numpy()
    assert bias.shape == (2, 3, 5)
    for h, slope in enumerate([2 ** -4, 2 ** -8]):
        for i in range(3):
            for j in range(5):
                assert bias[h, i, j] == pytest.approx(-slope * abs(i + 2 - j), rel=1e-15)


def test_bias_dtypes_and_empty():
    assert alibi_bias(4, 2).dtype is dtypes.f32
    b = alibi_bias(7, 5, dtype="bf16")
    assert b.dtype is dtypes.bf16
    np.testing.assert_array_equal(b.numpy(), alibi_bias(7, 5, dtype="f64").numpy().astype(ml_dtypes.bfloat16))
    assert alibi_bias(0, 4).shape == (4, 0, 0)


def test_bad_arguments():
    with pytest.raises(ShapeError):
        alibi_slopes(0)
    with pytest.raises(ShapeError):
        alibi_bias(-1, 4)
    with pytest.raises(DTypeError):
        alibi_bias(4, 4, dtype="int32")


def test_learned_positional_embedding_gathers_rows_and_accumulates_gradients():
    m = LearnedPositionalEmbedding(10, 4, dtype="f64", generator=tc.Generator(0))
    table = m.embeddings.weight.numpy()
    ids = np.array([[0, 1, 1, 9], [2, 1, 0, 3]])
    out = m(tc.tensor(ids))
    assert out.shape == (2, 4, 4)
    np.testing.assert_array_equal(out.numpy(), table[ids])
    g = np.arange(32, dtype=np.float64).reshape(2, 4, 4)
    out.backward(tc.tensor(g))
    grad = m.embeddings.weight.grad.numpy()
    np.testing.assert_array_equal(grad[1], g[0, 1] + g[0, 2] + g[1, 1])   # position 1 used three times
    np.testing.assert_array_equal(grad[5], np.zeros(4))
    with pytest.raises(IndexOutOfRangeError):
        m(tc.tensor([[10]]))


def test_learned_positional_embedding_init_scale():
    m = LearnedPositionalEmbedding(512, 64, generator=tc.Generator(1))
    assert [n for n, _ in m.named_parameters()] == ["embeddings.weight"]
    assert abs(m.embeddings.weight.numpy().std() - 0.02) < 0.002


@pytest.mark.gpu
def test_gpu_alibi_and_embedding_match_cpu():
    pytest.importorskip("cupy")
    if not tc.backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    np.testing.assert_array_equal(alibi_bias(33, 12, device="cuda").numpy(), alibi_bias(33, 12).numpy())
    m = LearnedPositionalEmbedding(64, 8, device="cuda")
    ids = np.array([[3, 63, 3]])
    np.testing.assert_array_equal(m(tc.tensor(ids, device="cuda")).numpy(), m.embeddings.weight.numpy()[ids])
