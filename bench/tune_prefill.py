"""Where a TinyLlama-shaped prefill of 2048 tokens spends its time (issue 9): the whole prefill, each step of one
layer (GPU time by CUDA events, host time by the wall clock without synchronising), the GEMM shapes alone against
torch, and the attention call against torch SDPA. Run on the GPU: ``PYTHONPATH=. python3 bench/tune_prefill.py``."""
import statistics
import time

import cupy
import numpy

import tessera_cp as tc
from tessera_cp.functions.matmul import linear_rows
from tessera_cp.models import LlamaConfig, LlamaForCausalLM, rope_tables

CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
          "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
S = 2048


def gpu_ms(fn, reps=10, warm=3):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def host_ms(fn, reps=10):
    """Wall time of the calls alone (no synchronisation inside): the host's share when it exceeds the GPU's."""
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        cupy.cuda.Device().synchronize()
    return statistics.median(times)


def main():
    import torch
    import torch.nn.functional as F
    config = LlamaConfig.from_dict(CONFIG)
    model = LlamaForCausalLM(config, device="cuda", generator=tc.Generator(0))
    ids = numpy.random.default_rng(1).integers(3, 32000, size=(1, S))
    cos, sin = rope_tables(config, S, model.dtype, "cuda")
    rows = []

    def prefill():
        model.last_logits(model.hidden_states(ids, cos, sin))
    total = gpu_ms(prefill, reps=5)
    rows.append(("prefill 2048 (whole)", total, host_ms(prefill, reps=3)))

    # One layer, step by step (the steps of FusedTransformerLayer.forward).
    llama = __import__("tessera_cp.models.llama", fromlist=["x"])
    layer = model.layers[0]
    x = tc.Tensor(model.embed_tokens.data[cupy.asarray(ids)], model.dtype)
    B, Hq, Hkv, D = 1, layer.num_heads, layer.num_kv_heads, layer.head_dim
    st = {}

    def s_norm1():
        st["n1"] = llama.rms_norm(x, layer.attn_norm, layer.eps)

    def s_qkv():
        st["qkv"] = llama._project(st["n1"], layer.qkv)

    def s_split_rope():
        qkv = st["qkv"]
        q = qkv[..., :Hq * D].reshape(B, S, Hq, D)
        k = qkv[..., Hq * D:(Hq + Hkv) * D].reshape(B, S, Hkv, D)
        v = qkv[..., (Hq + Hkv) * D:].reshape(B, S, Hkv, D)
        st["q"], st["k"] = llama.apply_rope(q, k, cos, sin, None)
        st["v"] = v

    def s_attn():
        st["o"] = llama.attention(st["q"].transpose(1, 2), st["k"].transpose(1, 2), st["v"].transpose(1, 2),
                                  is_causal=True)

    def s_oproj():
        st["x1"] = x + llama._project(st["o"].transpose(1, 2).reshape(B, S, Hq * D), layer.o_proj)

    def s_norm2():
        st["n2"] = llama.rms_norm(st["x1"], layer.mlp_norm, layer.eps)

    def s_gate_up():
        st["gu"] = llama._project(st["n2"], layer.gate_up)

    def s_swiglu():
        st["h"] = llama.swiglu_activation(st["gu"])

    def s_down():
        st["x2"] = st["x1"] + llama._project(st["h"], layer.down)

    with tc.no_grad():
        steps = [("rms_norm 1", s_norm1), ("qkv GEMM", s_qkv), ("split + rope", s_split_rope),
                 ("attention (transposed views)", s_attn), ("o-proj + residual", s_oproj), ("rms_norm 2", s_norm2),
                 ("gate_up GEMM", s_gate_up), ("swiglu act", s_swiglu), ("down GEMM + residual", s_down)]
        for _, fn in steps:
            fn()
        layer_sum = 0.0
        for name, fn in steps:
            g = gpu_ms(fn)
            layer_sum += g
            rows.append(("  " + name, g, host_ms(fn)))
        rows.append(("  layer sum x 22", layer_sum * 22, float("nan")))
        whole_layer = gpu_ms(lambda: layer(x, cos, sin))
        rows.append(("  layer() x 22", whole_layer * 22, host_ms(lambda: layer(x, cos, sin)) * 22))
        from tessera_cp.nn.rope import _positions
        pos = _positions(None, 1, S, cos.shape[0], "cuda", "tune")
        xa = x.data.copy()
        lean = lambda: layer.prefill(xa, cos.data, sin.data, pos)  # noqa: E731
        rows.append(("  layer.prefill() x 22", gpu_ms(lean) * 22, host_ms(lean) * 22))

        # Attention with contiguous [B, H, S, D] inputs, and torch SDPA on the same.
        qc = tc.Tensor(cupy.ascontiguousarray(st["q"].data.transpose(0, 2, 1, 3)), model.dtype)
        kc = tc.Tensor(cupy.ascontiguousarray(st["k"].data.transpose(0, 2, 1, 3)), model.dtype)
        vc = tc.Tensor(cupy.ascontiguousarray(st["v"].data.transpose(0, 2, 1, 3)), model.dtype)
        rows.append(("attention contiguous BHSD", gpu_ms(lambda: llama.attention(qc, kc, vc, is_causal=True)),
                     host_ms(lambda: llama.attention(qc, kc, vc, is_causal=True))))
    tq, tk, tv = (torch.from_dlpack(t.data) for t in (qc, kc, vc))
    for backend_name, be in (("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                             ("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION)):
        try:
            with torch.nn.attention.sdpa_kernel(be):
                fn = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)  # noqa
                rows.append((f"torch SDPA {backend_name} GQA", gpu_ms(fn), host_ms(fn)))
        except Exception as e:  # a backend may refuse GQA
            rows.append((f"torch SDPA {backend_name}: {type(e).__name__}", float("nan"), float("nan")))

    # GEMMs alone: our matmul path against torch on the same arrays.
    xs = cupy.random.standard_normal((S, 2048), dtype=numpy.float32).astype(x.data.dtype)
    hs = cupy.random.standard_normal((S, 5632), dtype=numpy.float32).astype(x.data.dtype)
    gemm_sum = 0.0
    for name, a, w in (("qkv", xs, layer.qkv.weight.data), ("o", xs, layer.o_proj.weight.data),
                       ("gate_up", xs, layer.gate_up.weight.data), ("down", hs, layer.down.weight.data)):
        ta, tw = torch.from_dlpack(a), torch.from_dlpack(w)
        flops = 2 * a.shape[0] * a.shape[1] * w.shape[0]
        cp_ms = gpu_ms(lambda: cupy.matmul(a, w.T))
        out = cupy.empty((a.shape[0], w.shape[0]), dtype=a.dtype)
        ours = gpu_ms(lambda: linear_rows(a, w, out=out))
        theirs = gpu_ms(lambda: ta @ tw.T)
        want = numpy.asarray((ta.float() @ tw.float().T).cpu(), dtype=numpy.float64)
        got = numpy.asarray(linear_rows(a, w).get(), dtype=numpy.float64)
        err = numpy.linalg.norm(got - want) / numpy.linalg.norm(want)
        gemm_sum += ours
        rows.append((f"GEMM {name} {a.shape[0]}x{a.shape[1]}x{w.shape[0]}: linear_rows {flops / ours / 1e9:.0f}, "
                     f"cupy {flops / cp_ms / 1e9:.0f}, torch {flops / theirs / 1e9:.0f} TF/s, err {err:.1e}",
                     ours, theirs))
    rows.append(("GEMM sum x 22 (linear_rows)", gemm_sum * 22, float("nan")))

    # Host time of the raw-array prefill by function (cProfile adds its own overhead; the ranking is what matters).
    import cProfile
    import pstats
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        prefill()
    cupy.cuda.Device().synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)

    print(f"\n{'step':70s} {'GPU ms':>9s} {'host ms':>9s}")
    for name, g, h in rows:
        print(f"{name:70s} {g:9.3f} {h:9.3f}")


if __name__ == "__main__":
    main()
