"""Casted layers on the GPU against what a user would pick instead, measured in the same run.

Counts (written next to each benchmark too):
* GEMMs: operations = 2 * M * N * K (the fixture prints them as "TFLOP/s"; for int8 read TOP/s).
* Weight-only decode: bytes = N * K, the int8 weight bytes read (the issue's measure against the copy ceiling;
  x, the scales and the output add under 0.5% at these shapes). Baselines read their own weights (bf16: 2 N K).
* Gathers: bytes = n * D * (storage itemsize + output itemsize) + 8 n (indices): read plus written.
Small kernels are replayed from a CUDA graph of REPEAT launches (the figures are per launch) so that host launch
overhead, which is not what is measured, does not starve the GPU; PyTorch baselines run REPEAT times in a loop.
"""
import pytest

import tessera_cp as tc
from tessera_cp import dtypes, quant
from tessera_cp.nn import casted

REPEAT = 20


def _torch():
    return pytest.importorskip("torch")


def _graph(fn, repeat=REPEAT):
    """fn() run ``repeat`` times as one CUDA graph launch on the current stream (a Python loop if capture fails)."""
    import cupy
    fn()  # compile and warm up outside the capture
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            stream.begin_capture()
            for _ in range(repeat):
                fn()
            graph = stream.end_capture()
    except Exception as e:  # pragma: no cover - depends on the CuPy build
        print(f"CUDA graph capture failed ({e}); timing a Python loop instead")
        return lambda: [fn() for _ in range(repeat)]
    stream.synchronize()
    return lambda: graph.launch()


def _loop(fn, repeat=REPEAT):
    return lambda: [fn() for _ in range(repeat)]


def _add(baselines, name, fn):
    """Add a PyTorch baseline after one trial call: an op this torch build lacks is reported, not fatal."""
    try:
        fn()
    except (RuntimeError, TypeError, NotImplementedError, IndexError) as e:
        print(f"baseline {name} unavailable: {e}")
        return
    baselines[name] = fn


@pytest.mark.gpu
@pytest.mark.parametrize("size", [4096, 8192])
def test_w8a8_casted_linear(cuda_bench, size):
    """CastedLinear W8A8 forward (per-token quantization + int8 GEMM + epilogue; on Hopper with the CUTLASS headers
    the sm90 GEMM and a separate epilogue kernel, else mma.sync with the fused epilogue), M = N = K = size.
    Operations: 2 * M * N * K. Against cuBLAS bf16 (torch.matmul) and torch._int_mm on int8 operands."""
    m = n = k = size
    layer = casted.CastedLinear(k, n, mode="w8a8", generator=tc.Generator(0)).cuda()
    x = tc.randn(m, k, dtype=tc.bf16, device="cuda")
    baselines = {}
    try:
        torch = _torch()
        xt = torch.from_dlpack(x.data)
        wt = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        a8 = torch.from_dlpack(quant.quantize_rows_int8(x.data)[0])
        w8 = torch.from_dlpack(layer.weight.data)
        _add(baselines, "cuBLAS bf16", lambda: xt @ wt.T)
        _add(baselines, "torch._int_mm", lambda: torch._int_mm(a8, w8.t()))
    except pytest.skip.Exception:
        pass
    cuda_bench(f"W8A8 CastedLinear fwd {m}^3", lambda: layer(x), flops=2 * m * n * k, baselines=baselines)
    q, _ = quant.quantize_rows_int8(x.data, pad_to=16)
    out = tc.empty(m, n, dtype=tc.int32, device="cuda").data
    w = layer.weight.data
    cuda_bench(f"int8 mma GEMM only (raw int32) {m}^3", lambda: casted.int8_matmul(q, w, gemm="mma", out=out),
               flops=2 * m * n * k)


@pytest.mark.gpu
@pytest.mark.parametrize("size", [4096, 8192])
def test_sm90_gemms(cuda_bench, size):
    """gemm_sm90.cu (CUTLASS wgmma, Hopper only), M = N = K = size. Operations: 2 * M * N * K.
    int8 -> int32 against torch._int_mm and the mma.sync kernel; fp8 e4m3 with per-tensor scales -> bf16 (scales
    fused) against torch._scaled_mm and cuBLAS bf16, with and without fast accumulation."""
    import cupy
    if not casted.sm90_supported(cupy.zeros(1)):
        pytest.skip("needs an sm_90 GPU and the CUTLASS headers")
    m = n = k = size
    a = tc.randint(-128, 128, (m, k), dtype=tc.int8, device="cuda").data
    b = tc.randint(-128, 128, (n, k), dtype=tc.int8, device="cuda").data
    out = tc.empty(m, n, dtype=tc.int32, device="cuda").data
    fa = quant.quantize(tc.randn(m, k, device="cuda").data, dtypes.fp8_e4m3)[0]
    fb = quant.quantize(tc.randn(n, k, device="cuda").data, dtypes.fp8_e4m3)[0]
    one = cupy.ones((1,), dtype="float32")
    obf = tc.empty(m, n, dtype=tc.bf16, device="cuda").data
    int_baselines, fp8_baselines = {"int8 mma": lambda: casted.int8_matmul(a, b, gemm="mma", out=out)}, {}
    fast_baselines = {}
    try:
        torch = _torch()
        at, bt = torch.from_dlpack(a), torch.from_dlpack(b)
        _add(int_baselines, "torch._int_mm", lambda: torch._int_mm(at, bt.t()))
        f8a, f8b = torch.from_dlpack(fa).view(torch.float8_e4m3fn), torch.from_dlpack(fb).view(torch.float8_e4m3fn)
        st = torch.ones((), device="cuda")
        _add(fp8_baselines, "torch._scaled_mm", lambda: torch._scaled_mm(f8a, f8b.t(), st, st,
                                                                           out_dtype=torch.bfloat16))
        _add(fast_baselines, "torch._scaled_mm fast_accum",
             lambda: torch._scaled_mm(f8a, f8b.t(), st, st, out_dtype=torch.bfloat16, use_fast_accum=True))
        xb = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        wb = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        _add(fp8_baselines, "cuBLAS bf16", lambda: xb @ wb.T)
    except pytest.skip.Exception:
        pass
    cuda_bench(f"int8 sm90 GEMM (raw int32) {m}^3", lambda: casted.int8_matmul(a, b, gemm="sm90", out=out),
               flops=2 * m * n * k, baselines=int_baselines)
    cuda_bench(f"fp8 e4m3 sm90 GEMM -> bf16 {m}^3", lambda: casted.fp8_matmul(fa, fb, one, one, out=obf),
               flops=2 * m * n * k, baselines=fp8_baselines)
    cuda_bench(f"fp8 e4m3 sm90 GEMM -> bf16 {m}^3, fast_accum",
               lambda: casted.fp8_matmul(fa, fb, one, one, out=obf, fast_accum=True),
               flops=2 * m * n * k, baselines=fast_baselines)


@pytest.mark.gpu
def test_w8a8_dp4a_fallback(cuda_bench):
    """The dp4a fallback GEMM (raw int32), 4096^3. Operations: 2 * M * N * K. Against torch._int_mm."""
    size = 4096
    a = tc.randint(-128, 128, (size, size), dtype=tc.int8, device="cuda").data
    b = tc.randint(-128, 128, (size, size), dtype=tc.int8, device="cuda").data
    out = tc.empty(size, size, dtype=tc.int32, device="cuda").data
    baselines = {}
    try:
        torch = _torch()
        at, bt = torch.from_dlpack(a), torch.from_dlpack(b)
        _add(baselines, "torch._int_mm", lambda: torch._int_mm(at, bt.t()))
    except pytest.skip.Exception:
        pass
    cuda_bench(f"int8 dp4a GEMM {size}^3", lambda: casted.int8_matmul(a, b, gemm="dp4a", out=out),
               flops=2 * size ** 3, baselines=baselines)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(m, n, k) for n, k in [(8192, 8192), (28672, 8192)] for m in (1, 4, 16)] +
                         [(1, 14336, 4096)])
def test_weight_only_decode(cuda_bench, m, n, k):
    """Weight-only int8 x bf16 for decode batches. Bytes = N * K (int8 weight bytes read, per launch).
    Against cuBLAS bf16 with bf16 weights and torch._weight_int8pack_mm. 1 x 4096 @ 4096 x 14336 is issue 13's
    GEMV figure (>= 2.5 TB/s of weight bytes)."""
    layer = casted.CastedLinear(k, n, mode="weight_only", generator=tc.Generator(1)).cuda()
    x = tc.randn(m, k, dtype=tc.bf16, device="cuda").data
    w, ws, b32 = layer.weight.data, layer.weight_scale.data, layer.bias.data.astype("float32")
    out = tc.empty(m, n, dtype=tc.bf16, device="cuda").data
    ours = _graph(lambda: casted.weight_only_linear(x, w, ws, b32, weight_padded=w, out=out))
    baselines = {}
    try:
        torch = _torch()
        xt = torch.from_dlpack(x)
        wt = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        _add(baselines, "cuBLAS bf16", _loop(lambda: xt @ wt.T))
        w8, s16 = torch.from_dlpack(w), torch.from_dlpack(ws).to(torch.bfloat16)
        _add(baselines, "torch._weight_int8pack_mm", _loop(lambda: torch._weight_int8pack_mm(xt, w8, s16)))
    except pytest.skip.Exception:
        pass
    cuda_bench(f"weight-only int8 M={m} N={n} K={k} (x{REPEAT})", ours, bytes=REPEAT * n * k,
               baselines=baselines)


@pytest.mark.gpu
@pytest.mark.parametrize("storage", [dtypes.fp8_e4m3, dtypes.int8])
def test_casted_embedding_gather(cuda_bench, storage):
    """CastedEmbedding lookup of 65536 rows of 4096 from a 128256-row table, into bf16.
    Bytes = n * D * (1 + 2) + 8 n (read storage, write bf16, read indices). The index check is off (check=False:
    it costs one device-to-host read per call, which is not the kernel's speed). Against torch F.embedding on a
    bf16 table (reads 2 bytes per element) and torch's fp8 gather + cast + scale."""
    vocab, dim, n = 128256, 4096, 65536
    layer = casted.CastedEmbedding(vocab, dim, storage_dtype=storage, generator=tc.Generator(2)).cuda()
    idx = tc.randint(0, vocab, (n,), device="cuda").data
    table, scale = layer.weight.data, layer.weight_scale.data
    out = tc.empty(n, dim, dtype=tc.bf16, device="cuda").data
    ours = lambda: casted.embedding_gather(idx, table, scale, storage, dtypes.bf16, check=False, out=out)  # noqa: E731
    baselines = {}
    try:
        torch = _torch()
        it = torch.from_dlpack(idx)
        dense = torch.randn(vocab, dim, dtype=torch.bfloat16, device="cuda")
        _add(baselines, "torch F.embedding bf16", lambda: torch.nn.functional.embedding(it, dense))
        if storage is dtypes.fp8_e4m3:
            t8 = torch.from_dlpack(table).view(torch.float8_e4m3fn)
            st = torch.from_dlpack(scale)
            _add(baselines, "torch fp8 gather+cast",
                 lambda: (t8[it].to(torch.float32) * st[it, None]).to(torch.bfloat16))
    except pytest.skip.Exception:
        pass
    cuda_bench(f"CastedEmbedding {storage.name}->bf16 {n}x{dim}", ours, bytes=n * dim * 3 + 8 * n,
               baselines=baselines)


@pytest.mark.gpu
def test_casted_sparse_embedding_gather(cuda_bench):
    """CastedSparseEmbedding (90% sparse, blocks of 16, e4m3) lookup of 65536 rows of 4096 into bf16, against the
    dense CastedEmbedding gather. Bytes = n * D * 2 (written) + n * D * 0.1 * (1 + 8 / 16) (stored blocks, their
    scales and columns read) + 8 n."""
    vocab, dim, n = 32768, 4096, 65536
    sparse = casted.CastedSparseEmbedding(vocab, dim, sparsity=0.9, generator=tc.Generator(3)).cuda()
    dense = casted.CastedEmbedding(vocab, dim, generator=tc.Generator(3)).cuda()
    idx = tc.randint(0, vocab, (n,), device="cuda")
    print(f"memory: {sparse.memory_bytes()}")
    nbytes = int(n * dim * 2 + n * dim * 0.1 * 1.5 + 8 * n)
    cuda_bench(f"CastedSparseEmbedding 90% e4m3 {n}x{dim}", lambda: sparse(idx, check_indices=False),
               bytes=nbytes, baselines={"dense CastedEmbedding": lambda: dense(idx, check_indices=False)})


@pytest.mark.gpu
def test_quantize_rows_int8(cuda_bench):
    """Per-token int8 quantization of bf16 activations, 8192 x 8192. Bytes = 2 M K (read) + M K (write) + 4 M.
    Against the same formula in torch eager."""
    m = k = 8192
    x = tc.randn(m, k, dtype=tc.bf16, device="cuda").data
    baselines = {}
    try:
        torch = _torch()
        xt = torch.from_dlpack(x)

        def torch_quant():
            s = xt.abs().amax(dim=1, keepdim=True).float() / 127
            return torch.clamp(torch.round(xt.float() / s), -127, 127).to(torch.int8), s
        _add(baselines, "torch eager", torch_quant)
    except pytest.skip.Exception:
        pass
    cuda_bench(f"quantize_rows_int8 bf16 {m}x{k}", lambda: quant.quantize_rows_int8(x, pad_to=16),
               bytes=3 * m * k + 4 * m, baselines=baselines)
