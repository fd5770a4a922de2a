"""Hugging Face transformers as an extra oracle (skipped where torch or transformers is missing): the same
checkpoint folder read by ``AutoModelForCausalLM`` gives the logits tessera_cp gives, for every config variant of
test_llama.py (RoPE scalings, biases, GQA/MQA, tied embeddings); on the GPU, tessera_cp's bf16 logits are within
the low-precision rule with HF's own bf16 run as the same-precision reference."""
import numpy
import pytest

from tessera_cp import backend
from tessera_cp.models import LlamaForCausalLM
from tessera_cp.testing import assert_low_precision_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VARIANTS = {
    "gqa": {},
    "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "llama_bias": {"attention_bias": True, "mlp_bias": True},
    "qwen2_bias": {"model_type": "qwen2"},
    "rope_linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "rope_dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 8},
    "rope_yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}},
    "rope_llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
}
IDS = [1, 7, 33, 60, 5, 12, 9, 41, 0, 22, 18, 3]


def _hf_logits(folder, dtype, device):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype, attn_implementation="eager")
    model = model.to(device).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS], device=device)).logits[0].double().cpu().numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_float32_agrees_with_tessera_float64(ref, tmp_path, variant):
    cfg = dict(ref.SMALL, **VARIANTS[variant])
    folder = ref.write_checkpoint(tmp_path / "m", cfg, ref.draw_weights(cfg))
    ours = LlamaForCausalLM.from_pretrained(folder, dtype="f64", device="cpu")(numpy.asarray([IDS])).numpy()[0]
    theirs = _hf_logits(folder, torch.float32, "cpu")
    numpy.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_bf16_logits_within_rule_against_hf_bf16(ref, tmp_path):
    if not backend.cuda_available():
        pytest.skip("needs a GPU")
    from tessera_cp.models import build_tiny_checkpoint
    folder = build_tiny_checkpoint(tmp_path / "tiny", seed=1)
    exact = LlamaForCausalLM.from_pretrained(folder, dtype="f64", device="cpu")(numpy.asarray([IDS])).numpy()[0]
    ours = LlamaForCausalLM.from_pretrained(folder, device="cuda")(numpy.asarray([IDS])).numpy()[0]
    theirs = _hf_logits(folder, torch.bfloat16, "cuda")
    assert_low_precision_close(ours.astype(numpy.float64), exact, theirs, atol=1e-2)
