"""Runs every kernel of cuda/gemv.cu once on a small case, then a few decode steps of a tiny random Llama, for
compute-sanitizer (not collected by pytest):

    compute-sanitizer --tool memcheck  python tests/models/gpu_sanitize_llama.py
    compute-sanitizer --tool racecheck python tests/models/gpu_sanitize_llama.py
"""
import tempfile

import cupy
import ml_dtypes
import numpy

from tessera_cp.models import LlamaForCausalLM, TextGenerator, build_tiny_checkpoint, gemv

BF16 = ml_dtypes.bfloat16


def main():
    rng = numpy.random.default_rng(0)
    for int8 in (False, True):
        for B in (1, 3, 16):
            N, K = 37, 272
            x = cupy.asarray(rng.standard_normal((B, 2 * K)).astype(BF16))
            w = cupy.asarray(rng.integers(-127, 128, (N, K)).astype(numpy.int8) if int8 else
                             rng.standard_normal((N, K)).astype(BF16))
            scale = cupy.asarray(rng.random(N).astype(numpy.float32)) if int8 else None
            g = cupy.asarray(rng.standard_normal(K).astype(BF16))
            bias = cupy.asarray(rng.standard_normal(N).astype(BF16))
            res = cupy.asarray(rng.standard_normal((B, N)).astype(BF16))
            gemv.rows_linear(x[:, :K], w, scale=scale, bias=bias, residual=res, out=res)
            gemv.rows_linear(x[:, :K], w, scale=scale, norm=g)
            gemv.rows_linear(x, w, scale=scale, swiglu=True)
            if not int8:
                gemv.rows_linear(x[:, :K], w, norm=g, out=cupy.empty((B, N), numpy.float32))
    tokens = cupy.zeros(3, numpy.int32)
    gemv.argmax_rows(cupy.asarray(rng.standard_normal((3, 1001)).astype(numpy.float32)), tokens)
    gemv.embed_rows(cupy.asarray(rng.standard_normal((50, 64)).astype(BF16)), tokens % 50,
                    cupy.empty((3, 64), BF16))
    with tempfile.TemporaryDirectory() as tmp:
        model = LlamaForCausalLM.from_pretrained(build_tiny_checkpoint(tmp + "/tiny", num_hidden_layers=2))
        for quantize in (False, True):
            if quantize:
                model.quantize_int8()
            gen = TextGenerator(model, max_batch=2, max_context=64, use_graph=False)
            gen.generate([[256, 1, 2], [256, 9, 8, 7, 6, 5, 4]], 4, stop_tokens=[])
    cupy.cuda.get_current_stream().synchronize()
    print("gpu_sanitize_llama: done")


if __name__ == "__main__":
    main()
