"""A small model trains on the CPU (and, marked gpu, on the GPU) until its held-out loss is low."""
import importlib.util
import pathlib

import pytest

_spec = importlib.util.spec_from_file_location(
    "train_mlp", pathlib.Path(__file__).parents[1] / "examples" / "train_mlp.py")
train_mlp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_mlp)

# The target's variance is about 1.4 (sin(x0) + x1*x2 with unit normals); a fitted MLP gets under 0.05.
THRESHOLD = 0.05


def test_mlp_trains_on_cpu():
    first, final = train_mlp.train(steps=300, device="cpu")
    assert first > 0.5
    assert final < THRESHOLD


@pytest.mark.gpu
def test_mlp_trains_on_gpu():
    first, final = train_mlp.train(steps=300, device="cuda")
    assert first > 0.5
    assert final < THRESHOLD
