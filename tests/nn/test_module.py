import numpy
import pytest

import tessera_cp as tc
from tessera_cp import nn
from tessera_cp.testing import gradcheck


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3, bias=False)])
        self.scale = nn.Parameter(tc.ones(3))
        self.cache = nn.Buffer(tc.zeros(2))
        self.scratch = nn.Buffer(tc.zeros(5), persistent=False)

    def forward(self, x):
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x * self.scale


def test_registration_and_names():
    m = Block()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["scale", "proj.weight", "proj.bias", "layers.0.weight", "layers.0.bias", "layers.1.weight"]
    assert list(m.state_dict()) == names + ["cache"]
    assert len(list(m.modules())) == 5
    assert all(p.requires_grad for p in m.parameters())


def test_shared_parameter_listed_once():
    m = nn.Module()
    shared = nn.Linear(2, 2)
    m.a, m.b = shared, shared
    assert len(list(m.parameters())) == 2


def test_linear_matches_numpy_and_has_gradients():
    layer = nn.Linear(5, 3, generator=tc.Generator(0))
    x = tc.randn(7, 5, generator=tc.Generator(1))
    expected = x.numpy().astype(numpy.float64) @ layer.weight.numpy().T.astype(numpy.float64) + layer.bias.numpy()
    assert numpy.allclose(layer(x).numpy(), expected, atol=1e-5)
    layer.to(tc.f64)
    x64 = tc.tensor(numpy.random.default_rng(0).standard_normal((2, 5)), requires_grad=True)
    assert gradcheck(lambda x, w, b: nn.linear(x, w, b), [x64, layer.weight, layer.bias])


def test_linear_init_bounds():
    layer = nn.Linear(100, 50, generator=tc.Generator(3))
    bound = 1 / numpy.sqrt(100)  # kaiming_uniform(a=sqrt(5)) reduces to 1/sqrt(fan_in)
    w = layer.weight.numpy()
    assert numpy.abs(w).max() <= bound and numpy.abs(w).max() > 0.9 * bound


def test_embedding_rows_and_bounds():
    emb = nn.Embedding(10, 4)
    idx = tc.tensor([[1, 9], [0, 1]])
    out = emb(idx)
    assert out.shape == (2, 2, 4)
    assert numpy.array_equal(out.numpy()[0, 1], emb.weight.numpy()[9])
    with pytest.raises(tc.IndexOutOfRangeError):
        emb(tc.tensor([10]))
    with pytest.raises(tc.DTypeError):
        emb(tc.tensor([1.0]))


def test_embedding_gradient_accumulates_repeated_rows():
    emb = nn.Embedding(5, 2)
    emb(tc.tensor([1, 1, 3])).sum().backward()
    grad = emb.weight.grad.numpy()
    assert numpy.array_equal(grad[:, 0], [0, 2, 0, 1, 0])


def test_dropout_train_and_eval():
    drop = nn.Dropout(0.25, generator=tc.Generator(0))
    x = tc.ones(200, 200)
    y = drop(x).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    assert numpy.allclose(y[kept], 1 / 0.75)
    drop.eval()
    assert numpy.array_equal(drop(x).numpy(), x.numpy())
    with pytest.raises(tc.TesseraError):
        nn.Dropout(1.5)


def test_state_dict_round_trip_and_checks(tmp_path):
    a, b = Block(), Block()
    path = tmp_path / "block.safetensors"
    nn.save_safetensors(a, path)
    b.load_state_dict(nn.load_safetensors(path))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert numpy.array_equal(pa.numpy(), pb.numpy()), name
    state = a.state_dict()
    state["proj.weight"] = tc.zeros(4, 4)
    with pytest.raises(tc.ShapeError, match="proj.weight"):
        b.load_state_dict(state)
    state = dict(a.state_dict())
    state["proj.weight"] = a.proj.weight.detach().bfloat16()
    with pytest.raises(tc.DTypeError, match="proj.weight"):
        b.load_state_dict(state)
    del state["proj.weight"]
    with pytest.raises(tc.TesseraError, match="missing keys"):
        b.load_state_dict(state)


def test_safetensors_interoperates_with_the_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "x.safetensors"
    arrays = {"a": numpy.arange(6, dtype=numpy.float32).reshape(2, 3), "b": numpy.array([1, -2], dtype=numpy.int64)}
    safetensors_numpy.save_file(arrays, str(path))
    loaded = nn.load_safetensors(path)
    assert numpy.array_equal(loaded["a"].numpy(), arrays["a"]) and loaded["b"].dtype is tc.int64
    ours = tmp_path / "y.safetensors"
    nn.save_safetensors({"m": tc.tensor([[1.5, 2.5]]).bfloat16()}, ours)
    back = safetensors_numpy.load_file(str(ours))  # its NumPy side has no fp8, so bf16 only here
    assert back["m"].astype(numpy.float32).tolist() == [[1.5, 2.5]]


def test_fp8_round_trips_through_safetensors(tmp_path):
    path = tmp_path / "f.safetensors"
    nn.save_safetensors({"f": tc.tensor([0.5, -448.0, 0.001953125], dtype=tc.fp8_e4m3)}, path)
    back = nn.load_safetensors(path)["f"]
    assert back.dtype is tc.fp8_e4m3
    assert back.float().tolist() == [0.5, -448.0, 0.001953125]


def test_bfloat16_module_cast_and_train_eval_flags():
    m = Block().bfloat16()
    assert all(p.dtype is tc.bf16 for p in m.parameters())
    m.eval()
    assert not any(mod.training for mod in m.modules())
    with pytest.raises(tc.TesseraError, match="super"):
        class Broken(nn.Module):
            def __init__(self):
                self.w = nn.Parameter(tc.ones(1))
        Broken()
