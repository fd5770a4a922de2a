"""Generate text with a Llama-family model in the Hugging Face layout, framework-free.

    python examples/generate.py                      # a small random checkpoint, built once under .cache/
    python examples/generate.py path/to/TinyLlama-1.1B-Chat-v1.0 "The capital of France is" --int8

The folder needs config.json and *.safetensors (tokenizer.json is used when the `tokenizers` package is there).
"""
import sys
import time

from tessera_cp import backend
from tessera_cp.models import (LlamaForCausalLM, StreamDecoder, TextGenerator, ensure_tiny_checkpoint,
                               load_tokenizer)


def main(folder=None, prompt="Once upon a time", int8=False, max_new_tokens=64):
    folder = folder or ensure_tiny_checkpoint()              # .cache/tiny-llama
    model = LlamaForCausalLM.from_pretrained(folder, quantize="int8" if int8 else None)   # bf16 on a GPU
    tokenizer = load_tokenizer(folder, model.config)
    generator = TextGenerator(model, max_batch=1, max_context=1024)

    decoder = StreamDecoder(tokenizer)                       # prints whole characters as tokens arrive
    print(prompt, end="", flush=True)
    start = time.perf_counter()
    out = generator.generate(tokenizer.encode(prompt), max_new_tokens,
                             temperature=0.7, top_p=0.9, seed=0,   # temperature=0 for greedy
                             on_token=lambda i, tok: print(decoder.push(tok), end="", flush=True))
    print(decoder.flush())
    print(f"[{backend.default_device()}] prefill {out.prefill_tokens_per_second:.0f} tokens/s, "
          f"decode {out.decode_tokens_per_second:.0f} tokens/s, total {time.perf_counter() - start:.2f} s, "
          f"CUDA graph: {out.used_graph}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--int8"]
    main(args[0] if args else None, args[1] if len(args) > 1 else "Once upon a time", "--int8" in sys.argv)
