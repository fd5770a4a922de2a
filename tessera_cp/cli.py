"""The ``tessera-cp`` command.

* ``tessera-cp info``: backend, GPU, CuPy/CUDA versions, MPI (mpi4py, the library, CUDA-awareness) and the kernel
  cache (where compiled kernels are kept, how many, how large).
* ``tessera-cp generate --model DIR --prompt TEXT --max-new-tokens N``: load a Hugging Face Llama-family folder
  (default: a small random checkpoint built once under .cache/), stream the generated text, report prefill and
  decode tokens/s. ``--quantize int8`` loads the projections as weight-only int8.
* ``tessera-cp bench [PYTEST ARGS]``: the benchmark suite (pytest on the checkout's bench/ folder).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


# ------------------------------------------------------------------------------------------------ info
def _mpi_info():
    try:
        import mpi4py
        mpi4py.rc.initialize = False   # asking for versions needs no MPI_Init (and no mpirun)
        from mpi4py import MPI
    except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}
    out = {"available": True, "mpi4py": mpi4py.__version__,
           "library": MPI.Get_library_version().strip().splitlines()[0], "standard": "%d.%d" % MPI.Get_version()}
    launched = any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"))
    forced = os.environ.get("TESSERA_MPI_CUDA_AWARE", "").strip() in ("0", "1")
    if not (MPI.Is_initialized() or launched or forced):
        # The library answers the CUDA-awareness query only once initialised (MPICH aborts otherwise).
        out["cuda_aware"] = "not queried (run under mpiexec, or set TESSERA_MPI_CUDA_AWARE)"
        return out
    try:
        if launched and not MPI.Is_initialized():
            MPI.Init()
        from .comm.transport import mpi_cuda_aware
        out["cuda_aware"] = mpi_cuda_aware()
    except Exception as e:  # noqa: BLE001
        out["cuda_aware"] = f"unknown ({e})"
    return out


def _kernel_cache_info():
    from .cuda import runtime
    folder = Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    lib = runtime.nvrtc()
    return {"cupy_cache_dir": str(folder), "files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "sources": sorted(p.name for p in runtime.SOURCE_DIR.glob("*.cu")),
            "modules_in_this_process": len(runtime._modules),
            "nvrtc": getattr(lib, "path", None), "cuda_include": str(runtime.cuda_include())}


def info():
    import tessera_cp
    out = dict(tessera_cp.info())
    out["mpi"] = _mpi_info()
    out["kernel_cache"] = _kernel_cache_info()
    return out


# ------------------------------------------------------------------------------------------------ generate
class _Progress:
    """A one-line progress bar on stderr (only where stderr is a terminal that the text does not go to)."""

    def __init__(self, total, enabled):
        self.total, self.enabled, self.count = total, enabled, 0

    def step(self):
        self.count += 1
        if self.enabled:
            done = int(30 * self.count / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {self.count}/{self.total} tokens")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def _load(args):
    from . import backend
    from .models import LlamaForCausalLM, ensure_tiny_checkpoint
    folder = Path(args.model) if args.model else ensure_tiny_checkpoint(Path(args.cache) / "tiny-llama")
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=args.dtype,
                                             device=args.device or backend.default_device(),
                                             quantize=args.quantize)
    if model.device == "cuda":
        backend.xp_for("cuda").cuda.get_current_stream().synchronize()
    return folder, model, time.perf_counter() - t0


def generate(args):
    from . import backend
    from .models import StreamDecoder, TextGenerator, load_tokenizer
    folder, model, load_seconds = _load(args)
    tok = load_tokenizer(folder, model.config)
    prompts = [tok.encode(p) for p in args.prompt]
    longest = max(map(len, prompts))
    gen = TextGenerator(model, max_batch=len(prompts), max_context=max(longest + args.max_new_tokens, 16),
                        use_graph=not args.no_graph)
    info = backend.info() if model.device == "cuda" else {"backend": "numpy", "device": "CPU"}
    t0 = time.perf_counter()
    gen.warmup(len(prompts), greedy=args.temperature == 0)   # kernels compiled, graph captured: steady timings
    print(f"# {folder} on {info['device']} ({info['backend']}), {model.dtype.name}"
          f"{', int8 weights' if args.quantize else ''}; loaded in {load_seconds:.2f} s, warmed up in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    stream = len(prompts) == 1
    decoders = [StreamDecoder(tok) for _ in prompts]
    bar = _Progress(args.max_new_tokens, sys.stderr.isatty() and not sys.stdout.isatty())
    if stream:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()

    def on_token(request, token):
        text = decoders[request].push(token)
        if stream and text:
            sys.stdout.write(text)
            sys.stdout.flush()
        if request == 0:
            bar.step()

    stop = [] if args.ignore_eos else None
    out = gen.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, stop_tokens=stop, on_token=on_token)
    bar.close()
    if stream:
        print(decoders[0].flush())
    else:
        for prompt, ids in zip(args.prompt, out.tokens):
            print(prompt + tok.decode(ids))
    print(f"# prefill: {out.prompt_tokens} tokens in {out.prefill_seconds * 1e3:.1f} ms "
          f"({out.prefill_tokens_per_second:.1f} tokens/s); decode: {out.decode_tokens} tokens in "
          f"{out.decode_seconds * 1e3:.1f} ms ({out.decode_tokens_per_second:.1f} tokens/s, batch {len(prompts)}"
          f"{', CUDA graph' if out.used_graph else ''}); backend {info['backend']}; finish: "
          f"{', '.join(out.finish_reasons)}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ bench
def bench(extra):
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "conftest.py").is_file():
        print(f"tessera-cp bench: no bench/ folder beside the package ({root}); run it from a checkout",
              file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", str(root / "bench"), *extra]
    return subprocess.call(cmd, cwd=root, env=env)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    parser = argparse.ArgumentParser(prog="tessera-cp", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backend, device, CuPy/CUDA versions, MPI, kernel cache")
    g = commands.add_parser("generate", help="generate text with a Llama-family model folder")
    g.add_argument("--model", help="Hugging Face model folder (config.json + safetensors); default: a random "
                                   "tiny checkpoint built once under --cache")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quantize", choices=["int8"], help="weight-only int8 projections")
    g.add_argument("--dtype", help="weights' dtype (default bf16 on the GPU, f32 on the CPU)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: the GPU when there is one")
    g.add_argument("--no-graph", action="store_true", help="run decode steps eagerly (no CUDA graph)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's eos tokens")
    g.add_argument("--cache", default=".cache", help="folder for the tiny checkpoint (default .cache)")
    commands.add_parser("bench", help="run the benchmark suite (pytest bench/); extra args go to pytest")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "info":
        json.dump(info(), sys.stdout, indent=2, default=str)
        print()
        return 0
    if args.command == "generate":
        if not args.prompt:
            args.prompt = ["Once upon a time"]
        return generate(args)
    return bench(extra)


if __name__ == "__main__":
    sys.exit(main())
