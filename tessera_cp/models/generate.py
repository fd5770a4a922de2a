"""Text generation with a LlamaForCausalLM: prefill with the flash-attention kernel, decode one token per sequence
against a paged KV cache, greedy / temperature / top-k / top-p sampling with a seed, stop tokens, max new tokens.

``TextGenerator(model, max_batch=8, max_context=None)`` owns a ``PagedKVCache`` sized for ``max_batch`` sequences
of ``max_context`` tokens and, per batch size, the static arrays of a decode step. On the GPU the decode step is
captured once as a CUDA graph (its allocations come from a memory pool kept with the graph) and replayed for every
later token: the step's first run is eager, the second captures, every run after that replays. ``use_graph=False``
runs every step eagerly with the same kernels, so greedy tokens are identical either way. Greedy decode on the GPU
is pipelined: step t + 1 is queued before the host reads step t's tokens (copied behind it to pinned memory), so
the GPU runs the steps back to back; the one step queued past the last token is discarded.

Batched requests of different lengths: each prompt is prefilled on its own (no padding), then all sequences decode
together; each row of every decode kernel is computed independently of the others (fixed reduction orders and a
split of the keys fixed by ``max_context``), so batching never changes a sequence's tokens.

Sampling: ``temperature == 0`` is greedy (on the GPU the argmax runs inside the graph). Otherwise the logits are
divided by the temperature, restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set whose
probability reaches ``top_p`` (the most likely token is always kept), and a token is drawn by inverting the
cumulative distribution with one uniform number per sequence and step from NumPy's generator seeded with
``(seed, request index)``: the same seed gives the same tokens, on either backend up to the logits' rounding.
"""
import contextlib
import dataclasses
import os
import time

import numpy

from .. import backend, dtypes
from ..errors import ShapeError, TesseraError
from ..nn.kv_cache import PagedKVCache
from ..tensor import Tensor
from .llama import rope_tables

__all__ = ["TextGenerator", "GenerationOutput", "generate", "sample_tokens"]


@dataclasses.dataclass
class GenerationOutput:
    tokens: list                 # per request: the generated token ids (a stop token ends the list, excluded)
    finish_reasons: list         # per request: "stop" or "length"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0       # tokens produced by decode steps (all but each request's first)
    used_graph: bool = False

    @property
    def prefill_tokens_per_second(self):
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self):
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _check_sampling(temperature, top_k, top_p):
    if not temperature >= 0:
        raise TesseraError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
        raise TesseraError(f"top_k must be an int >= 0 (0 keeps every token), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise TesseraError(f"top_p must be in (0, 1], got {top_p}")


def sample_tokens(logits, temperature=0.0, top_k=0, top_p=1.0, uniforms=None):
    """Next tokens [B] (int32, same backend) from logits [B, V] (see the module docstring); ``uniforms`` [B] in
    [0, 1) (NumPy) drive the draws when temperature > 0."""
    _check_sampling(temperature, top_k, top_p)
    xp = backend.array_module(logits)
    if temperature == 0:
        return xp.argmax(logits, axis=-1).astype(numpy.int32)
    B, V = logits.shape
    z = logits.astype(numpy.float64 if logits.dtype == numpy.float64 else numpy.float32) / temperature
    order = xp.argsort(-z, axis=-1, kind="stable") if xp is numpy else xp.argsort(-z, axis=-1)
    zs = xp.take_along_axis(z, order, axis=-1)
    p = xp.exp(zs - zs[:, :1])
    if 0 < top_k < V:
        p[:, top_k:] = 0
    if top_p < 1:
        before = xp.cumsum(p, axis=-1) - p           # probability of the more likely tokens
        p = xp.where(before < top_p * p.sum(axis=-1, keepdims=True), p, 0)
    cdf = xp.cumsum(p, axis=-1)
    u = xp.asarray(numpy.asarray(uniforms, dtype=cdf.dtype).reshape(B, 1))
    idx = xp.minimum((cdf <= u * cdf[:, -1:]).sum(axis=-1), V - 1)
    return xp.take_along_axis(order, idx[:, None], axis=-1)[:, 0].astype(numpy.int32)


class TextGenerator:
    """Generation for one model: a paged KV cache for ``max_batch`` sequences of up to ``max_context`` tokens (prompt
    plus new tokens; default min(max_position_embeddings, 4096)), decode states and CUDA graphs per batch size."""

    def __init__(self, model, max_batch=8, max_context=None, block_size=16, use_graph=True):
        c = model.config
        if int(max_batch) < 1:
            raise TesseraError(f"TextGenerator: max_batch must be >= 1, got {max_batch}")
        if block_size < 1 or block_size & (block_size - 1):
            raise TesseraError(f"TextGenerator: block_size must be a power of two, got {block_size}")
        self.model, self.device = model, model.device
        self.max_batch = int(max_batch)
        self.max_context = int(max_context or min(c.max_position_embeddings, 4096))
        self.block_size = int(block_size)
        self.table_width = -(-self.max_context // self.block_size)
        self.cache = PagedKVCache(self.max_batch * self.table_width, self.block_size,
                                  num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                  num_layers=c.num_hidden_layers, dtype=model.dtype, device=self.device)
        # Graphs need the kernel paths (bf16 weights; the reference ops call cuBLAS, which no capture takes).
        self.use_graph = (bool(use_graph) and self.device == "cuda" and model.dtype is dtypes.bf16
                          and os.environ.get("TESSERA_REFERENCE", "") != "1")
        xp = backend.xp_for(self.device)
        table_dtype = numpy.float64 if model.dtype is dtypes.f64 else numpy.float32
        self._cos = xp.zeros((self.max_context, c.head_dim // 2), dtype=table_dtype)   # static: graphs read them
        self._sin = xp.zeros_like(self._cos)
        self._tables_for = None
        self._states, self._graphs, self._warm, self._no_graph = {}, {}, set(), set()
        self._fingerprint = None
        self.stream = None
        if self.device == "cuda":
            import cupy
            self.stream = cupy.cuda.Stream(non_blocking=True)

    # ------------------------------------------------------------------------------------------ helpers
    def _on_stream(self):
        return self.stream if self.stream is not None else contextlib.nullcontext()

    def _sync(self):
        if self.stream is not None:
            self.stream.synchronize()

    def _set_tables(self, length):
        """RoPE tables for sequences of up to ``length`` tokens into the static arrays ("dynamic" scaling depends
        on it; the others do not)."""
        scaling = self.model.config.rope_scaling or {}
        key = length if scaling.get("rope_type", scaling.get("type")) == "dynamic" else 0
        if key == self._tables_for:
            return
        cos, sin = rope_tables(self.model.config, self.max_context if key == 0 else max(length, 1),
                               self.model.dtype, self.device)
        n = min(cos.shape[0], self.max_context)
        self._cos[:n], self._sin[:n] = cos.data[:n], sin.data[:n]
        self._tables_for = key

    def _weights_fingerprint(self):
        """Pointers of every weight array: a graph replays the arrays it was captured with."""
        ptr = (lambda a: a.data.ptr) if self.device == "cuda" else id
        return tuple(ptr(t.data) for t in self.model._tensors())

    def _state(self, batch):
        if batch not in self._states:
            self._states[batch] = self.model.decode_state(batch, self.table_width, self._cos, self._sin,
                                                          self.max_context)
        return self._states[batch]

    def _step(self, state, greedy):
        """One decode step: eager the first time for a (batch, mode), captured the second, replayed after."""
        key = (state.batch, greedy)
        if not self.use_graph or key in self._no_graph:
            self.model.decode_step(state, self.cache, greedy)
            return False
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._warm:       # compiles the kernels and sets their attributes outside a capture
                self._warm.add(key)
                self.model.decode_step(state, self.cache, greedy)
                return False
            graph = self._capture(state, greedy)
            if graph is None:
                self._no_graph.add(key)
                self.model.decode_step(state, self.cache, greedy)
                return False
        graph[0].launch(self.stream)
        return True

    def _capture(self, state, greedy):
        """The decode step as a CUDA graph, with a private memory pool that only the graph uses (so nothing else
        is ever handed the memory its temporaries live in); None when some op of the step cannot be captured."""
        import cupy
        pool = cupy.cuda.MemoryPool()
        graph, error = None, None
        with cupy.cuda.using_allocator(pool.malloc):
            self.stream.begin_capture()
            try:
                self.model.decode_step(state, self.cache, greedy)
            except Exception as e:  # noqa: BLE001 - e.g. a cuBLAS call of a reference path: fall back to eager
                error = e
            try:
                graph = self.stream.end_capture()
            except Exception as e:  # noqa: BLE001 - an invalidated capture
                error = error or e
        if error is not None:
            import warnings
            warnings.warn(f"TextGenerator: the decode step could not be captured as a CUDA graph ({error}); "
                          "running it eagerly", RuntimeWarning, stacklevel=3)
            return None
        self._graphs[(state.batch, greedy)] = (graph, pool)
        return self._graphs[(state.batch, greedy)]

    def warmup(self, batch=1, greedy=True):
        """Compile the kernels and capture the decode graph for ``batch`` sequences (a 3-token generation from
        short dummy prompts), so that the next generate's timings show steady-state speed."""
        prompts = [[0] for _ in range(min(int(batch), self.max_batch))]
        self.generate(prompts, max(1, min(3, self.max_context - 1)), temperature=0.0 if greedy else 1.0,
                      stop_tokens=[])

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, prompts, max_new_tokens=32, *, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                 stop_tokens=None, on_token=None):
        """Generate for ``prompts`` (a list of token ids, or a list of such lists). ``stop_tokens``: ids that end
        a sequence (default: the config's eos ids; [] for none). ``on_token(request, token)`` is called for every
        generated token as it comes. Returns a GenerationOutput."""
        single = len(prompts) > 0 and isinstance(prompts[0], (int, numpy.integer))
        prompts = [list(map(int, p)) for p in ([prompts] if single else prompts)]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ShapeError("generate: every prompt needs at least one token")
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise TesseraError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        _check_sampling(temperature, top_k, top_p)
        V = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= V:
                raise ShapeError(f"generate: prompt {i} has token ids outside [0, {V})")
            if len(p) + max_new_tokens > self.max_context:
                raise ShapeError(f"generate: prompt {i} ({len(p)} tokens) + max_new_tokens {max_new_tokens} exceeds "
                                 f"max_context {self.max_context}; make a TextGenerator with a larger max_context")
        stop = set(self.model.config.stop_token_ids if stop_tokens is None else map(int, stop_tokens))
        if self.stream is not None:
            # The generator's own stream does not wait for others by itself: what the caller queued before this
            # call (weights written or quantized, this generator's cache cleared) must come first.
            import cupy
            self.stream.wait_event(cupy.cuda.get_current_stream().record())
        total = None
        for start in range(0, len(prompts), self.max_batch):
            part = self._generate_batch(prompts[start:start + self.max_batch], start, int(max_new_tokens),
                                        float(temperature), int(top_k), float(top_p), int(seed), stop, on_token)
            if total is None:
                total = part
            else:
                total.tokens += part.tokens
                total.finish_reasons += part.finish_reasons
                for f in ("prompt_tokens", "generated_tokens", "prefill_seconds", "decode_seconds", "decode_tokens"):
                    setattr(total, f, getattr(total, f) + getattr(part, f))
                total.used_graph = total.used_graph or part.used_graph
        return total

    def _generate_batch(self, prompts, first_index, max_new, temperature, top_k, top_p, seed, stop, on_token):
        model, cache = self.model, self.cache
        B = len(prompts)
        greedy = temperature == 0
        rngs = [numpy.random.default_rng([seed, first_index + b]) for b in range(B)]
        out = GenerationOutput([[] for _ in range(B)], ["length"] * B, prompt_tokens=sum(map(len, prompts)))
        fingerprint = self._weights_fingerprint()
        if fingerprint != self._fingerprint:   # weights replaced (loaded, quantized): captured graphs are stale
            self._graphs.clear()
            self._warm.clear()
            self._no_graph.clear()
            self._fingerprint = fingerprint
        with self._on_stream():
            self._set_tables(max(len(p) for p in prompts) + max_new)
            for sid in cache.sequences:
                cache.free(sid)
            ids = [cache.add_sequence() for _ in range(B)]
            slots = [cache.reserve(sid, len(p) + max_new) for sid, p in zip(ids, prompts)]
            cos, sin = Tensor(self._cos), Tensor(self._sin)

            self._sync()
            t0 = time.perf_counter()
            logits = []
            for p, s in zip(prompts, slots):
                writes = s[:len(p)]
                x = model.hidden_states(numpy.asarray(p)[None], cos, sin,
                                        kv_sink=lambda i, k, v: cache.write(writes, Tensor(k.data[0], k.dtype),
                                                                            Tensor(v.data[0], v.dtype), layer=i))
                logits.append(model.last_logits(x))
            xp = backend.xp_for(self.device)
            logits = xp.concatenate(logits, axis=0)
            tokens = sample_tokens(logits, temperature, top_k, top_p, [r.random() for r in rngs])
            host = numpy.asarray(backend.to_device(tokens, "cpu"))
            out.prefill_seconds = time.perf_counter() - t0

            active = [True] * B
            self._emit(out, host, active, stop, on_token, max_new)
            if any(active):
                t0 = time.perf_counter()
                st = self._state(B)
                st.tokens[...] = tokens
                st.pos[...] = xp.asarray(numpy.asarray([len(p) for p in prompts], dtype=numpy.int32))
                st.table[...] = cache.block_table(ids, self.table_width).data
                if greedy and self.stream is not None:
                    out.used_graph |= self._greedy_pipelined(st, out, active, stop, on_token, max_new)
                else:
                    for _ in range(1, max_new):
                        out.used_graph |= self._step(st, greedy)
                        if not greedy:
                            st.tokens[...] = sample_tokens(st.logits, temperature, top_k, top_p,
                                                           [r.random() for r in rngs])
                        host = numpy.asarray(backend.to_device(st.tokens, "cpu"))
                        out.decode_tokens += sum(active)
                        self._emit(out, host, active, stop, on_token, max_new)
                        if not any(active):
                            break
                self._sync()
                out.decode_seconds = time.perf_counter() - t0
        out.generated_tokens = sum(len(t) for t in out.tokens)
        return out

    def _greedy_pipelined(self, st, out, active, stop, on_token, max_new):
        """Greedy decode steps with the GPU never waiting for the host: each step's tokens (argmax on the GPU,
        read by the next step's embedding there) are copied to pinned host memory behind it, and the next step is
        queued before the host waits for that copy. When every sequence has stopped, the one step queued past it
        is discarded (its cache row lies beyond the sequence's end). Returns whether a graph ran."""
        import cupy
        nbytes = st.tokens.nbytes
        buffers = [numpy.frombuffer(cupy.cuda.alloc_pinned_memory(nbytes), dtype=st.tokens.dtype,
                                    count=st.tokens.size) for _ in range(2)]
        used_graph, pending = False, None
        try:
            for i in range(1, max_new):
                used_graph |= self._step(st, True)
                host = buffers[i % 2]
                cupy.cuda.runtime.memcpyAsync(host.ctypes.data, st.tokens.data.ptr, nbytes,
                                              cupy.cuda.runtime.memcpyDeviceToHost, self.stream.ptr)
                ready = (self.stream.record(), host)
                if pending is not None and not self._emit_when_ready(pending, out, active, stop, on_token,
                                                                     max_new):
                    return used_graph
                pending = ready
            if pending is not None:
                self._emit_when_ready(pending, out, active, stop, on_token, max_new)
            return used_graph
        finally:   # however it ends (a stop, an on_token error), no copy may still be landing in a freed buffer
            self.stream.synchronize()

    def _emit_when_ready(self, pending, out, active, stop, on_token, max_new):
        event, host = pending
        event.synchronize()
        out.decode_tokens += sum(active)
        self._emit(out, host.copy(), active, stop, on_token, max_new)
        return any(active)

    @staticmethod
    def _emit(out, host_tokens, active, stop, on_token, max_new):
        for b, tok in enumerate(host_tokens.tolist()):
            if not active[b]:
                continue
            if tok in stop:
                active[b] = False
                out.finish_reasons[b] = "stop"
                continue
            out.tokens[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
            if len(out.tokens[b]) >= max_new:
                active[b] = False


def generate(model, prompts, max_new_tokens=32, **kwargs):
    """One-off generation: a TextGenerator sized for these prompts, then ``generate`` (see TextGenerator)."""
    many = len(prompts) > 0 and not isinstance(prompts[0], (int, numpy.integer))
    longest = max(map(len, prompts)) if many else len(prompts)
    options = {k: kwargs.pop(k) for k in ("use_graph", "block_size") if k in kwargs}
    gen = TextGenerator(model, max_batch=len(prompts) if many else 1, max_context=longest + max_new_tokens,
                        **options)
    return gen.generate(prompts, max_new_tokens, **kwargs)
