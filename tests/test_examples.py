"""The examples run (they are what `make run` and the README point users to)."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformer_block_runs_on_cpu(capsys):
    _load("transformer_block").main(batch=1, seq=17, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96)
    out = capsys.readouterr().out
    assert "backend numpy" in out and "nan" not in out


@pytest.mark.gpu
def test_transformer_block_runs_on_gpu():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "transformer_block.py")], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TESSERA_DEVICE": "cuda",
                            "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "backend cupy" in result.stdout and "nan" not in result.stdout


@pytest.mark.gpu
def test_custom_kernel_example_runs_on_gpu():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_kernel.py")], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    # out = x * w in f32: one rounding of the exact product, so at most half an f32 ulp of |x * w| (< 1e-5 here).
    error = float(result.stdout.split("max error against float64 NumPy = ")[1].split()[0])
    assert error < 1e-5
    assert "ShapeError" in result.stdout  # the example's deliberate bad call is caught before launching
