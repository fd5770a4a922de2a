"""tessera_cp.models: a Llama-family model in the Hugging Face layout, its fused layer, text generation (prefill,
paged KV cache, CUDA-graph decode, sampling), tokenizers and a random tiny checkpoint."""
from .generate import GenerationOutput, TextGenerator, generate, sample_tokens
from .llama import FusedTransformerLayer, LlamaConfig, LlamaForCausalLM, hf_tensor_shapes, rope_tables, save_checkpoint
from .tiny import build_tiny_checkpoint, ensure_tiny_checkpoint, tiny_config
from .tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer

__all__ = ["LlamaConfig", "LlamaForCausalLM", "FusedTransformerLayer", "rope_tables", "hf_tensor_shapes",
           "save_checkpoint", "TextGenerator", "GenerationOutput", "generate", "sample_tokens",
           "build_tiny_checkpoint", "ensure_tiny_checkpoint", "tiny_config", "ByteTokenizer", "HFTokenizer",
           "StreamDecoder", "load_tokenizer"]
