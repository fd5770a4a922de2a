"""The Llama model on the CPU: logits of checkpoints in the Hugging Face layout against the float64 NumPy forward
of conftest.py (every config variant), the loader's errors, shards, save/load, the fused layer, int8 weights."""
import json

import numpy
import pytest

import tessera_cp as tc
from tessera_cp.errors import ShapeError, TesseraError
from tessera_cp.models import FusedTransformerLayer, LlamaConfig, LlamaForCausalLM

pytest.importorskip("safetensors")

IDS = [1, 7, 33, 60, 5, 12, 9, 41, 0, 22, 18, 3]

VARIANTS = {
    "gqa": {},
    "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "mqa_head_dim": {"num_key_value_heads": 1, "head_dim": 16},
    "llama_bias": {"attention_bias": True, "mlp_bias": True},
    "qwen2_bias": {"model_type": "qwen2"},
    "rope_linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "rope_dynamic": {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 8},
    "rope_yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}},
    "rope_llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
}


def _checkpoint(ref, tmp_path, overrides=(), seed=0, shards=1):
    cfg = dict(ref.SMALL, **dict(overrides))
    weights = ref.draw_weights(cfg, seed)
    return cfg, weights, ref.write_checkpoint(tmp_path / "model", cfg, weights, shards)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_float64_numpy(ref, tmp_path, variant):
    cfg, weights, folder = _checkpoint(ref, tmp_path, VARIANTS[variant])
    model = LlamaForCausalLM.from_pretrained(folder, dtype="f64", device="cpu")
    logits = model(numpy.asarray([IDS])).numpy()[0]
    expected = ref.forward(weights, cfg, IDS)
    assert logits.shape == (len(IDS), cfg["vocab_size"])
    numpy.testing.assert_allclose(logits, expected, rtol=1e-9, atol=1e-9)


def test_f32_model_and_batch_rows(ref, tmp_path):
    cfg, weights, folder = _checkpoint(ref, tmp_path)
    model = LlamaForCausalLM.from_pretrained(folder, device="cpu")
    assert model.dtype is tc.f32
    other = IDS[::-1]
    logits = model(numpy.asarray([IDS, other])).numpy()
    for row, ids in zip(logits, (IDS, other)):
        numpy.testing.assert_allclose(row, ref.forward(weights, cfg, ids), rtol=2e-4, atol=2e-4)


def test_rope_scaling_changes_the_logits(ref, tmp_path):
    """Guards the variant tests: each scaling must give logits the default RoPE does not."""
    cfg, weights, _ = _checkpoint(ref, tmp_path)
    plain = ref.forward(weights, cfg, IDS)
    for name in ("rope_linear", "rope_dynamic", "rope_yarn", "rope_llama3"):
        scaled = ref.forward(weights, dict(cfg, **VARIANTS[name]), IDS)
        assert numpy.abs(scaled - plain).max() > 1e-3, name


def test_sharded_checkpoint_gives_the_same_logits(ref, tmp_path):
    cfg, weights, folder = _checkpoint(ref, tmp_path, shards=3)
    assert (folder / "model.safetensors.index.json").is_file()
    model = LlamaForCausalLM.from_pretrained(folder, dtype="f64", device="cpu")
    numpy.testing.assert_allclose(model(numpy.asarray([IDS])).numpy()[0], ref.forward(weights, cfg, IDS),
                                  rtol=1e-9, atol=1e-9)


def test_save_pretrained_round_trip(ref, tmp_path):
    cfg, weights, folder = _checkpoint(ref, tmp_path, {"attention_bias": True, "mlp_bias": True})
    model = LlamaForCausalLM.from_pretrained(folder, dtype="f64", device="cpu")
    model.save_pretrained(tmp_path / "saved", max_shard_bytes=20_000)
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    again = LlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype="f64", device="cpu")
    numpy.testing.assert_array_equal(again(numpy.asarray([IDS])).numpy(), model(numpy.asarray([IDS])).numpy())
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["attention_bias"] is True and saved["num_key_value_heads"] == cfg["num_key_value_heads"]


def test_bf16_checkpoint_is_read_as_bf16_values(tmp_path):
    from tessera_cp.models import build_tiny_checkpoint
    from tessera_cp.models.tiny import random_weights
    folder = build_tiny_checkpoint(tmp_path / "tiny", seed=3, num_hidden_layers=1)
    model = LlamaForCausalLM.from_pretrained(folder, device="cpu")
    expected = random_weights(LlamaConfig.from_json(folder / "config.json"), 3)
    w = expected["model.layers.0.self_attn.k_proj.weight"].astype(tc.bf16.storage).astype(numpy.float32)
    Hq, Hkv, D = 4, 2, 64
    numpy.testing.assert_array_equal(model.layers[0].qkv.weight.numpy()[Hq * D:(Hq + Hkv) * D], w)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_tensor_is_named(ref, tmp_path):
    cfg = dict(ref.SMALL)
    weights = ref.draw_weights(cfg)
    del weights["model.layers.1.mlp.up_proj.weight"]
    folder = ref.write_checkpoint(tmp_path / "m", cfg, weights)
    with pytest.raises(TesseraError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        LlamaForCausalLM.from_pretrained(folder, device="cpu")


def test_misshaped_tensor_is_named(ref, tmp_path):
    cfg = dict(ref.SMALL)
    weights = ref.draw_weights(cfg)
    weights["model.layers.0.self_attn.k_proj.weight"] = numpy.zeros((30, 48), numpy.float32)
    folder = ref.write_checkpoint(tmp_path / "m", cfg, weights)
    with pytest.raises(TesseraError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: \(30, 48\), expected "
                                           r"\(24, 48\)"):
        LlamaForCausalLM.from_pretrained(folder, device="cpu")


def test_missing_bias_of_a_bias_config_is_named(ref, tmp_path):
    cfg = dict(ref.SMALL)
    folder = ref.write_checkpoint(tmp_path / "m", dict(cfg, model_type="qwen2"), ref.draw_weights(cfg))
    with pytest.raises(TesseraError, match=r"self_attn\.q_proj\.bias"):
        LlamaForCausalLM.from_pretrained(folder, device="cpu")


def test_folder_errors(ref, tmp_path):
    with pytest.raises(TesseraError, match="no config.json"):
        LlamaForCausalLM.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(ref.SMALL))
    with pytest.raises(TesseraError, match="no \\*.safetensors"):
        LlamaForCausalLM.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(TesseraError, match="gone.safetensors"):
        LlamaForCausalLM.from_pretrained(tmp_path, device="cpu")


def test_config_errors(ref):
    with pytest.raises(ShapeError, match="multiple of num_key_value_heads"):
        LlamaConfig.from_dict(dict(ref.SMALL, num_key_value_heads=3))
    with pytest.raises(TesseraError, match="rope_scaling type 'su'"):
        from tessera_cp.models import rope_tables
        rope_tables(LlamaConfig.from_dict(dict(ref.SMALL, rope_scaling={"type": "su", "factor": 2.0})), 8)
    with pytest.raises(TesseraError, match="quantize"):
        LlamaForCausalLM.from_pretrained("x", quantize="int4")
    with pytest.raises(TesseraError, match="hidden_act 'gelu'"):
        LlamaConfig.from_dict(dict(ref.SMALL, hidden_act="gelu"))


def test_transformers5_rope_parameters(ref):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    c = LlamaConfig.from_dict(dict(ref.SMALL, rope_theta=None, rope_parameters=dict(scaling, rope_theta=5e5)))
    assert c.rope_theta == 5e5 and c.rope_scaling == scaling
    plain = LlamaConfig.from_dict(dict(ref.SMALL, rope_parameters={"rope_type": "default", "rope_theta": 7.0}))
    assert plain.rope_theta == 10000.0 and plain.rope_scaling is None   # rope_theta given beside it wins


def test_input_ids_are_checked(ref, tmp_path):
    _, _, folder = _checkpoint(ref, tmp_path)
    model = LlamaForCausalLM.from_pretrained(folder, device="cpu")
    with pytest.raises(ShapeError, match=r"\[0, 61\)"):
        model(numpy.asarray([[1, 61]]))


# ------------------------------------------------------------------------------------------------ the layer
def test_fused_layer_against_numpy():
    rng = numpy.random.default_rng(5)
    layer = FusedTransformerLayer(32, 4, mlp_ratio=2.5, num_kv_heads=2, dtype="f64", device="cpu",
                                  generator=tc.Generator(1))
    assert layer.hidden_dim == 80 and layer.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    for p in (layer.attn_norm, layer.mlp_norm):
        p.data[...] = 1 + 0.1 * rng.standard_normal(32)
    x = rng.standard_normal((2, 5, 32))
    from tessera_cp.nn.rope import rope_cache
    cos, sin = rope_cache(8, 8, 10000.0, tc.f64, "cpu")
    out, k, v = layer(tc.tensor(x), cos, sin)
    # The same layer written out in NumPy float64.
    wq, wo, wgu, wd = (m.weight.numpy() for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
    g1, g2 = layer.attn_norm.numpy(), layer.mlp_norm.numpy()

    def norm(t, g):
        return t / numpy.sqrt((t * t).mean(-1, keepdims=True) + 1e-6) * g

    ang = numpy.arange(5)[:, None] / 10000.0 ** (numpy.arange(0, 8, 2) / 8)
    c, s = numpy.cos(ang)[:, None], numpy.sin(ang)[:, None]

    def rope(t):
        return numpy.concatenate([t[..., :4] * c - t[..., 4:] * s, t[..., 4:] * c + t[..., :4] * s], -1)

    qkv = norm(x, g1) @ wq.T
    q = rope(qkv[..., :32].reshape(2, 5, 4, 8))
    kk = rope(qkv[..., 32:48].reshape(2, 5, 2, 8))
    vv = qkv[..., 48:].reshape(2, 5, 2, 8)
    ke, ve = numpy.repeat(kk, 2, axis=2), numpy.repeat(vv, 2, axis=2)
    sc = numpy.einsum("bshd,bthd->bhst", q, ke) / numpy.sqrt(8)
    sc = numpy.where(numpy.tril(numpy.ones((5, 5), bool)), sc, -numpy.inf)
    pr = numpy.exp(sc - sc.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    h = x + numpy.einsum("bhst,bthd->bshd", pr, ve).reshape(2, 5, 32) @ wo.T
    gu = norm(h, g2) @ wgu.T
    expected = h + (gu[..., :80] / (1 + numpy.exp(-gu[..., :80])) * gu[..., 80:]) @ wd.T
    numpy.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)
    numpy.testing.assert_allclose(k.numpy(), kk, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(v.numpy(), vv, rtol=1e-12, atol=1e-12)


def test_fused_layer_rejects_bad_sizes():
    with pytest.raises(ShapeError, match="multiple of num_kv_heads"):
        FusedTransformerLayer(32, 4, num_kv_heads=3, device="cpu")


# ------------------------------------------------------------------------------------------------ int8
def test_int8_weight_only_logits(ref, tmp_path):
    """int8 weights (per-output-channel absmax) change the logits by about the quantization's relative error."""
    cfg, weights, folder = _checkpoint(ref, tmp_path)
    model = LlamaForCausalLM.from_pretrained(folder, device="cpu", quantize="int8")
    assert all(layer.quantized for layer in model.layers)
    w = model.layers[0].qkv.weight
    assert w.dtype is tc.int8 and w.shape == (96, 48)
    logits = model(numpy.asarray([IDS])).numpy()[0]
    expected = ref.forward(weights, cfg, IDS)
    rel = numpy.linalg.norm(logits - expected) / numpy.linalg.norm(expected)
    assert 1e-4 < rel < 2e-2   # quantized (not the float weights), and close


def test_int8_model_refuses_f64(ref, tmp_path):
    _, _, folder = _checkpoint(ref, tmp_path)
    with pytest.raises(tc.DTypeError, match="int8 weights need"):
        LlamaForCausalLM.from_pretrained(folder, dtype="f64", device="cpu", quantize="int8")
