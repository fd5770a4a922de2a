// Products of a few rows (decode: one token per sequence) with a weight matrix, and the other kernels of the
// decode step of tessera_cp/models. Plain CUDA, no cuBLAS, so a whole decode step can be captured in a CUDA graph.
// Launched by tessera_cp/models/gemv.py (gemv_rows, rope_append, argmax_rows, embed_rows) and
// tessera_cp/nn/casted.py (gemv_mma: CastedLinear's weight-only path; models/gemv.py's DECODE_KERNEL may pick it).
//
// Both products: out[b, n] = epilogue(sum_k xe[b, k] * W[n, k]) for b < B rows of x, reading every weight byte
// once with 16-byte streaming loads. W [N, K] is bf16, or int8 with one float scale per output row. The prologue
// PRO builds the effective input xe: 0: xe = x;  1: xe = x * g (RMSNorm: the sum of squares of x over K is
// reduced in a fixed order and 1/rms applied in the epilogue);  2: xe = silu(x[:, :K]) * x[:, K:2K] (SwiGLU of
// the packed [gate | up]). Epilogue: s * (1/rms) * w_scale[n] + bias[n] + residual[b, n] in explicit roundings,
// stored as OutT. residual may alias out (x += proj(...)): each output element is read and written by one thread.
// Each kernel's reduction order depends on the shape only, never on B: batching does not change a row's result.
//
// gemv_rows<WT, OutT, PRO, MAXB, ROWS>: latency-lean, for the small matrices of a decode step. A block owns ROWS
//   consecutive rows of W and all of K: thread t takes chunks t, t + 256, ... of each of its rows (a warp reads
//   512 contiguous bytes of a row per load), converts each W chunk to float once and uses it for every b, with x
//   (small, in L1/L2) read directly. Partial sums meet in shared memory: a warp sum, then the 8 warps in a fixed
//   order. bias bf16. Limits: K % (elements per chunk) == 0, x rows (stride ldx, a multiple of 8) and W, g
//   16-byte aligned, B <= MAXB.
// gemv_mma<WT, XT, OutT, PRO>: throughput-lean, for large matrices (CastedLinear's weight-only int8 product;
//   x bf16, or f16 with int8 weights), B <= 16. The tensor cores do the arithmetic: mma m16n8k16 with x as the
//   16-row A operand (rows past B are zeros), a W tile of 8 rows as B, f32 accumulators; int8 W is converted to
//   XT in registers, exactly. Grid (ceil(N / 128), S): block (i, s) owns rows 128i .. 128i + 127 of W and the K
//   slice [s KS, (s + 1) KS). It requests its first W chunks, stages its slice of x (prologue applied) in shared
//   memory, then each of its 8 warps streams 16 rows of W over the slice: lane (g = lane / 4, t = lane % 4) loads
//   16 consecutive k of rows 8j + g (j = 0, 1) per 64-k step, 8 loads in flight per lane; step s' mma uses
//   elements 4s'..4s'+3 of every lane's 16, for x and W alike, so the k order inside the mma is a permutation of
//   the slice's, the same for both operands (no shuffles). Staged x rows are padded by 16 bytes: the fragment
//   loads of a quarter warp hit distinct banks. With a prologue, xe is a float held as hi + lo (two XT values,
//   about 16 significant bits) and each step runs two mmas, so the product keeps float accuracy.
//   S > 1 (split K, so that small matrices still give every SM work): each block writes its partial sums to the
//   workspace `part`, and the last block of a row group to arrive (counted in `counters`, which it resets to zero
//   for the next launch) adds the S partials in split order and applies the epilogue: deterministic, one launch.
//   bias float (bias_kind 1) or bf16 (2). Limits: K % 16 == 0 for int8 W, K % 8 == 0 for bf16; x rows (stride
//   ldx, a multiple of 8), W rows (ldw) and g 16-byte aligned; KS a multiple of the weight type's ITER_K;
//   dynamic shared memory as nn/casted.py's gemv_shared_bytes; `part` and `counters` sized for the grid.
//   Variants (template arguments after PRO, defaults = the kernel above; each computes the same bits, so the
//   choice may depend on B; nn/casted.py's GEMV_VARIANTS names them, bench/tune_gemv_mma.py times them):
//   PIPE 1: a step's W registers are requested again for the next iteration as soon as the step has used them
//     (a lane's loads stay in flight through the arithmetic instead of draining each iteration).
//   XPH 2, 4, 8 (plain x only): x staged in that many cp.async groups, each waited for (one barrier) when the
//     main loop reaches it, so W streams while the rest of x arrives (the whole slice is 64 KB at B = 16).
//   EPI 1: one fence per block instead of one per thread; the last block's threads add up the partials of the
//     accumulators they hold (their own split's from registers, the S loads in flight together) and issue every
//     epilogue load before the first store (the baseline walks B x 128 outputs, one dependent round trip each).
//   LEAN 1: fragment loads at 32-bit shared addresses computed once; rows past B repeat row B - 1 (no
//     predicated loads; the upper 8 rows are not loaded at all when B <= 8); W as a base plus offsets.
//   MC 2 (gemv_mma_mc, plain x, sm_90): clusters of MC blocks along N, which share a K slice, read x once: bulk
//     copies multicast each row's slice into every block of the cluster (x from L2 was 16 MB against 64 MB of
//     weights at N = K = 8192 with 16 rows, and made M = 16 14% slower than M = 1; now 4%). The grid's x is a
//     whole number of clusters; blocks past N only take part in the copies.
// rope_append (bf16): RoPE of the new token's q and k heads (half-split layout, f32 cos/sin tables [P, D/2]) at
//   position pos[b], q written to q_out [B, Hq, D]; k and v stored into the paged cache at that position (block
//   table[b, pos >> log2_block], row pos & (block - 1)); lens[b] = pos[b] + 1. One thread per (head, pair of
//   columns): grid B x ceil((Hq + 2 Hkv) D/2 / blockDim.x) (one block per row looped over 1280 of them at TinyLlama's
//   shape, a chain of dependent round trips that took 4.2 us a step).
// argmax_rows: tokens[b] = argmax over V of logits[b] (float; the first index among equal maxima; NaN ignored).
// embed_rows (bf16): out[b] = table[tokens[b]] (rows of H elements, H % 8 == 0, 16-byte copies).
// gemv_rows, rope_append, argmax_rows and embed_rows may be launched programmatically (common.cuh's pdl_wait:
// models/gemv.py does while a decode step is captured as a CUDA graph).
//
// tessera-instantiate: gemv_rows<__nv_bfloat16, __nv_bfloat16, 0, 1, 4>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 1, 1, 4>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 2, 1, 4>
// tessera-instantiate: gemv_rows<__nv_bfloat16, __nv_bfloat16, 0, 4, 8>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 1, 4, 8>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 2, 4, 8>
// tessera-instantiate: gemv_rows<__nv_bfloat16, __nv_bfloat16, 0, 16, 4>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 1, 16, 4>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 2, 16, 4>
// tessera-instantiate: gemv_rows<signed char, __nv_bfloat16, 0, 1, 8>; gemv_rows<signed char, __nv_bfloat16, 1, 1, 8>; gemv_rows<signed char, __nv_bfloat16, 2, 1, 8>
// tessera-instantiate: gemv_rows<signed char, __nv_bfloat16, 0, 4, 4>; gemv_rows<signed char, __nv_bfloat16, 1, 4, 4>; gemv_rows<signed char, __nv_bfloat16, 2, 4, 4>
// tessera-instantiate: gemv_rows<signed char, __nv_bfloat16, 0, 16, 2>; gemv_rows<signed char, __nv_bfloat16, 1, 16, 2>; gemv_rows<signed char, __nv_bfloat16, 2, 16, 2>
// tessera-instantiate: gemv_rows<__nv_bfloat16, float, 1, 1, 4>; gemv_rows<__nv_bfloat16, float, 1, 4, 8>; gemv_rows<__nv_bfloat16, float, 1, 16, 4>
// tessera-instantiate: gemv_mma<signed char, __nv_bfloat16, __nv_bfloat16, 0>; gemv_mma<signed char, __nv_bfloat16, __nv_bfloat16, 1>; gemv_mma<signed char, __nv_bfloat16, __nv_bfloat16, 2>
// tessera-instantiate: gemv_mma<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, 0>; gemv_mma<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, 1>; gemv_mma<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, 2>
// tessera-instantiate: gemv_mma<__nv_bfloat16, __nv_bfloat16, float, 1>; gemv_mma<signed char, __half, __half, 0>
// tessera-instantiate: gemv_mma<signed char, __nv_bfloat16, __nv_bfloat16, 0, 1, 4, 1, 1>; gemv_mma<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, 0, 1, 4, 1, 1>; gemv_mma<signed char, __half, __half, 0, 1, 4, 1, 1>
// tessera-instantiate: gemv_mma_mc<signed char, __nv_bfloat16, __nv_bfloat16, 0, 1, 1, 1, 1, 2>; gemv_mma_mc<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, 0, 1, 1, 1, 1, 2>; gemv_mma_mc<signed char, __half, __half, 0, 1, 1, 1, 1, 2>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "mma_sm80.cuh"
#include "pack.cuh"

namespace tessera_gemv {

constexpr int THREADS = 256, WARPS = THREADS / 32;

// 16 bytes that are read once: not kept in L1.
__device__ __forceinline__ uint4 load_stream(const void *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}
__device__ __forceinline__ uint4 load_cached(const void *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }

__device__ __forceinline__ unsigned word(const uint4 &v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
// bf16 pairs in a 32-bit word: element 2i is the low half (little endian); bf16 -> float is a shift.
__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// Eight bf16 of a 16-byte chunk as floats.
__device__ __forceinline__ void bf16x8(const uint4 &v, float *f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = bf16_lo(word(v, i));
        f[2 * i + 1] = bf16_hi(word(v, i));
    }
}

// Sixteen int8 of a 16-byte chunk as floats, exactly: byte b + 128 (the xor) sits in the mantissa of 2^23, and
// 2^23 + 128 is subtracted (one byte_perm and one add per element, instead of a slower int -> float conversion).
__device__ __forceinline__ void int8x16(const uint4 &v, float *f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned u = word(v, i) ^ 0x80808080u;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            f[4 * i + j] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 + j)) - 8388736.0f;
    }
}

template <typename WT> struct Chunk;
template <> struct Chunk<__nv_bfloat16> {
    static constexpr int E = 8;
    static __device__ __forceinline__ void to_float(const uint4 &v, float *f) { bf16x8(v, f); }
};
template <> struct Chunk<signed char> {
    static constexpr int E = 16;
    static __device__ __forceinline__ void to_float(const uint4 &v, float *f) { int8x16(v, f); }
};

// E bf16 values at p (E = 8 or 16: one or two 16-byte loads) as floats.
template <int E> __device__ __forceinline__ void load_bf16(const __nv_bfloat16 *p, float *f) {
#pragma unroll
    for (int h = 0; h < E / 8; ++h) bf16x8(load_cached(p + 8 * h), f + 8 * h);
}

using tessera::warp_sum;

template <typename T> __device__ __forceinline__ T store_as(float v);
template <> __device__ __forceinline__ float store_as<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half store_as<__half>(float v) { return __float2half_rn(v); }

// ---- gemv_mma's helpers
__device__ __forceinline__ uint4 zero4() { return make_uint4(0u, 0u, 0u, 0u); }
// 16 bytes of W for gemv_mma: read once, kept out of L1, with a hint that L2 fetch the 256-byte span (each warp
// reads a row's next 256 bytes one iteration later).
__device__ __forceinline__ uint4 load_weights(const void *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}


constexpr int TILES = 2;                              // 8-row mma tiles of W per warp
constexpr int BLOCK_ROWS = 8 * TILES * WARPS;         // rows of W per block (128)
constexpr int STEP_K = 64;                            // k per warp step: 4 lanes x 16
constexpr int MAX_B = 16;                             // rows of x: the mma's M
constexpr int PAD = 8;                                // elements of padding per staged x row (16 bytes)
constexpr int TILE_FLOATS = MAX_B * BLOCK_ROWS + MAX_B;   // workspace per (row group, split): sums, squares
constexpr int STAGE_UNROLL = 4;                       // prologue staging: x chunks loaded before any is stored

// Per weight type: 16-byte loads per lane per tile and step, and steps per main-loop iteration (8 loads per lane
// in flight either way); a split is a multiple of ITER_K = STEPS * STEP_K.
template <typename WT> struct Weights;
template <> struct Weights<signed char> { static constexpr int LOADS = 1, STEPS = 4; };
template <> struct Weights<__nv_bfloat16> { static constexpr int LOADS = 2, STEPS = 2; };




// Pairs of 16-bit values in a 32-bit word: element 2i is the low half. bf16 -> float is a shift.
template <typename XT> __device__ __forceinline__ void pair_to_float(unsigned w, float &lo, float &hi);
template <> __device__ __forceinline__ void pair_to_float<__nv_bfloat16>(unsigned w, float &lo, float &hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}
template <> __device__ __forceinline__ void pair_to_float<__half>(unsigned w, float &lo, float &hi) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&w));
    lo = f.x;
    hi = f.y;
}

template <typename XT> __device__ __forceinline__ void to_floats(const uint4 &v, float (&f)[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) pair_to_float<XT>(word(v, i), f[2 * i], f[2 * i + 1]);
}
// Eight floats as hi + lo pairs of XT: hi = XT(f), lo = XT(f - hi).
template <typename XT> __device__ __forceinline__ void split_hi_lo(const float (&f)[8], uint4 &hi, uint4 &lo) {
    unsigned h[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        h[i] = tessera::float2_to_bits<XT>(f[2 * i], f[2 * i + 1]);
        float a, b;
        pair_to_float<XT>(h[i], a, b);
        l[i] = tessera::float2_to_bits<XT>(f[2 * i] - a, f[2 * i + 1] - b);
    }
    hi = make_uint4(h[0], h[1], h[2], h[3]);
    lo = make_uint4(l[0], l[1], l[2], l[3]);
}

// Four int8 (one word, byte 0 first) as two pairs of XT, exact: lo = (b0, b1), hi = (b2, b3).
template <typename XT> __device__ __forceinline__ void int8x4_to_pairs(unsigned w, unsigned &lo, unsigned &hi);
template <> __device__ __forceinline__ void int8x4_to_pairs<__nv_bfloat16>(unsigned w, unsigned &lo, unsigned &hi) {
    // 2^23 + (v + 128) is a float with v + 128 in its low mantissa bits; subtracting 2^23 + 128 leaves v exactly,
    // and a float with at most 8 significant bits is its bf16 in the upper half.
    const unsigned u = w ^ 0x80808080u;
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.0f;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.0f;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.0f;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.0f;
    lo = __byte_perm(__float_as_uint(f0), __float_as_uint(f1), 0x7632);
    hi = __byte_perm(__float_as_uint(f2), __float_as_uint(f3), 0x7632);
}
template <> __device__ __forceinline__ void int8x4_to_pairs<__half>(unsigned w, unsigned &lo, unsigned &hi) {
    // f16 0x64XX is 1024 + XX for XX < 256: put v + 128 there, then subtract 1152 (both exact).
    const unsigned u = w ^ 0x80808080u;
    const unsigned lb = __byte_perm(u, 0x6464u, 0x5140), hb = __byte_perm(u, 0x6464u, 0x5342);
    const __half2 bias = __halves2half2(__ushort_as_half((unsigned short)0x6480), __ushort_as_half((unsigned short)0x6480));
    const __half2 l = __hsub2(*reinterpret_cast<const __half2 *>(&lb), bias);
    const __half2 h = __hsub2(*reinterpret_cast<const __half2 *>(&hb), bias);
    lo = *reinterpret_cast<const unsigned *>(&l);
    hi = *reinterpret_cast<const unsigned *>(&h);
}

// The B fragment of mma step s (0..3) from a lane's 16 k of one W row: elements 4s, 4s + 1 and 4s + 2, 4s + 3.
template <typename WT, typename XT> struct Fragment;
template <typename XT> struct Fragment<signed char, XT> {
    static __device__ __forceinline__ void get(const uint4 (&w)[1], int s, unsigned &b0, unsigned &b1) {
        int8x4_to_pairs<XT>(word(w[0], s), b0, b1);
    }
};
template <> struct Fragment<__nv_bfloat16, __nv_bfloat16> {
    static __device__ __forceinline__ void get(const uint4 (&w)[2], int s, unsigned &b0, unsigned &b1) {
        b0 = word(w[s >> 1], (2 * s) & 3);
        b1 = word(w[s >> 1], (2 * s + 1) & 3);
    }
};

// gemv_mma_mc's x multicast (sm_90): a one-shot barrier per block, a cluster barrier, bulk copies to every block.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TESSERA_GEMV_CLUSTER(c) __cluster_dims__(c, 1, 1)
__device__ __forceinline__ void mbarrier_init(unsigned bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n"
                 "fence.mbarrier_init.release.cluster;\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_expect(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_multicast(unsigned dst, const void *src, unsigned bytes, unsigned bar,
                                               unsigned short mask) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1], %2, [%3], %4;\n" ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "h"(mask) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(unsigned bar) {   // the barrier's first phase
    asm volatile("{\n.reg .pred done;\nwait_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n"
                 "@!done bra wait_%=;\n}\n" ::"r"(bar) : "memory");
}
#else
#define TESSERA_GEMV_CLUSTER(c)   // no clusters before Hopper: gemv_mma_mc's body is empty there, never launched
__device__ __forceinline__ void mbarrier_init(unsigned) {}
__device__ __forceinline__ void cluster_sync() {}
__device__ __forceinline__ void mbarrier_expect(unsigned, unsigned) {}
__device__ __forceinline__ void bulk_multicast(unsigned, const void *, unsigned, unsigned, unsigned short) {}
__device__ __forceinline__ void mbarrier_wait(unsigned) {}
#endif

// 16 bytes of shared memory at a 32-bit shared address (gemv_mma's LEAN loop: the address is computed once, not
// rebuilt from a generic pointer each step). volatile + memory: never moved across the phase barriers.
__device__ __forceinline__ uint4 lds128(unsigned addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
    return v;
}
// cp.async.wait_group takes an immediate: at most n (0..7) of this thread's latest groups still pending.
__device__ __forceinline__ void cp_async_wait_pending(int n) {
    switch (n) {
    case 0: tessera::cp_async_wait<0>(); break;
    case 1: tessera::cp_async_wait<1>(); break;
    case 2: tessera::cp_async_wait<2>(); break;
    case 3: tessera::cp_async_wait<3>(); break;
    case 4: tessera::cp_async_wait<4>(); break;
    case 5: tessera::cp_async_wait<5>(); break;
    case 6: tessera::cp_async_wait<6>(); break;
    default: tessera::cp_async_wait<7>(); break;
    }
}

}  // namespace tessera_gemv

template <typename WT, typename OutT, int PRO, int MAXB, int ROWS>
__global__ void __launch_bounds__(tessera_gemv::THREADS)
gemv_rows(const __nv_bfloat16 *__restrict__ x, long long ldx, const __nv_bfloat16 *__restrict__ norm_w, float eps,
          const WT *__restrict__ W, const float *__restrict__ w_scale, const __nv_bfloat16 *__restrict__ bias,
          const __nv_bfloat16 *residual, long long ldr, OutT *out, long long ldo, int B, int N, int K) {
    using namespace tessera_gemv;
    constexpr int E = Chunk<WT>::E;
    __shared__ float red[WARPS][ROWS * MAXB + MAXB];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n0 = blockIdx.x * ROWS;
    const int chunks = K / E;

    // Programmatic dependent launch: this launch overlaps the kernel before; x, residual and out wait for it.
    // (Prefetching this block's W into L2 before the wait measured slower: 1175 against 1151 us a decode step.)
    tessera::pdl_launch_dependents();
    tessera::pdl_wait();

    float acc[ROWS][MAXB], ss[MAXB];
#pragma unroll
    for (int b = 0; b < MAXB; ++b) {
        ss[b] = 0.0f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r][b] = 0.0f;
    }

    for (int c = tid; c < chunks; c += THREADS) {
        const int k0 = c * E;
        uint4 wraw[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r)   // all loads of the chunk in flight before any use
            wraw[r] = n0 + r < N ? load_stream(W + (long long)(n0 + r) * K + k0) : make_uint4(0, 0, 0, 0);
        float g[E];
        if (PRO == 1) load_bf16<E>(norm_w + k0, g);
        float wf[ROWS][E];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) Chunk<WT>::to_float(wraw[r], wf[r]);
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
            if (b < B) {
                const __nv_bfloat16 *xb = x + (long long)b * ldx + k0;
                float xe[E];
                load_bf16<E>(xb, xe);
                if (PRO == 1) {
#pragma unroll
                    for (int e = 0; e < E; ++e) {
                        ss[b] = fmaf(xe[e], xe[e], ss[b]);
                        xe[e] *= g[e];
                    }
                } else if (PRO == 2) {
                    float up[E];
                    load_bf16<E>(xb + K, up);
#pragma unroll
                    for (int e = 0; e < E; ++e) xe[e] = xe[e] / (1.0f + __expf(-xe[e])) * up[e];
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    float s = acc[r][b];
#pragma unroll
                    for (int e = 0; e < E; ++e) s = fmaf(wf[r][e], xe[e], s);
                    acc[r][b] = s;
                }
            }
        }
    }

#pragma unroll
    for (int b = 0; b < MAXB; ++b) {
        if (b < B) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float v = warp_sum(acc[r][b]);
                if (lane == 0) red[warp][r * MAXB + b] = v;
            }
            if (PRO == 1) {
                const float v = warp_sum(ss[b]);
                if (lane == 0) red[warp][ROWS * MAXB + b] = v;
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < ROWS * B; i += THREADS) {
        const int r = i / B, b = i % B, n = n0 + r;
        if (n >= N) continue;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += red[w][r * MAXB + b];
        if (PRO == 1) {
            float q = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) q += red[w][ROWS * MAXB + b];
            s = __fmul_rn(s, rsqrtf(__fadd_rn(q / (float)K, eps)));
        }
        // Explicit roundings (no FMA contraction): every instantiation computes the same bits.
        if (w_scale != nullptr) s = __fmul_rn(s, w_scale[n]);
        if (bias != nullptr) s = __fadd_rn(s, __bfloat162float(bias[n]));
        if (residual != nullptr) s = __fadd_rn(s, __bfloat162float(residual[(long long)b * ldr + n]));
        out[(long long)b * ldo + n] = store_as<OutT>(s);
    }
}

// gemv_mma's parameters and arguments, shared by its two kernels (gemv_mma, gemv_mma_mc) and their body
#define GEMV_MMA_PARAMS                                                                                          \
    const XT *__restrict__ x, long long ldx, const XT *__restrict__ norm_w, float eps, const WT *__restrict__ W,  \
        long long ldw, const float *__restrict__ w_scale, const void *__restrict__ bias, int bias_kind,          \
        const __nv_bfloat16 *residual, long long ldr, OutT *out, long long ldo, int B, int N, int K, int KS,      \
        float *__restrict__ part, int *__restrict__ counters
#define GEMV_MMA_ARGS x, ldx, norm_w, eps, W, ldw, w_scale, bias, bias_kind, residual, ldr, out, ldo, B, N, K, KS, part, counters

template <typename WT, typename XT, typename OutT, int PRO, int PIPE, int XPH, int EPI, int LEAN, int MC>
__device__ __forceinline__ void gemv_mma_body(GEMV_MMA_PARAMS) {
    using namespace tessera_gemv;
    constexpr int LOADS = Weights<WT>::LOADS, STEPS = Weights<WT>::STEPS, ITER_K = STEPS * STEP_K;
    constexpr int PARTS = PRO == 0 ? 1 : 2;           // staged x: XT values, or hi and lo parts of floats
    constexpr int PH = PRO == 0 && MC == 1 ? XPH : 1; // phases of x staging (a prologue stages through registers)
    static_assert(MC == 1 || PRO == 0, "MC: plain x only");
    static_assert(PH == 1 || PH == 2 || PH == 4 || PH == 8, "XPH: 1, 2, 4 or 8 phases");
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ float ss_row[MAX_B];
    __shared__ int last_block;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int RS = KS + PAD, CH = KS / 8;
    XT *xs = reinterpret_cast<XT *>(smem);                                  // [PARTS][B][RS]
    float *ssc = reinterpret_cast<float *>(smem + sizeof(XT) * PARTS * B * RS);   // PRO 1: [B][CH]
    const int S = gridDim.y, split = blockIdx.y, k0 = split * KS, kend = min(K, k0 + KS);
    const int row0 = blockIdx.x * BLOCK_ROWS;

    // This warp's 16 rows of W (row pointers clamped into W; rows past N load zeros and are not stored).
    const int wrow = row0 + warp * 8 * TILES;
    const WT *wp[TILES];
    bool wok[TILES];
#pragma unroll
    for (int j = 0; j < TILES; ++j) {
        const int n = wrow + 8 * j + g;
        wok[j] = n < N;
        wp[j] = W + (long long)(wok[j] ? n : 0) * ldw + 16 * t;
    }
    const bool a_lo = g < B, a_hi = g + 8 < B;
    const XT *xa = xs + g * RS + 16 * t, *xb = xa + 8 * RS;
    // LEAN: rows of A past B repeat row B - 1 (row i of the mma's result depends on row i of A only, and rows past
    // B are not stored), so every fragment load is unconditional; with B <= 8 the upper 8 rows are not loaded.
    const unsigned xa_s = tessera::smem_addr(xs + min(g, B - 1) * RS + 16 * t);
    const unsigned xb_s = tessera::smem_addr(xs + min(g + 8, B - 1) * RS + 16 * t);
    const bool hi_rows = B > 8;
    // LEAN: each tile's W address is one base (its row at k0) plus offsets, against one bound (0 past N).
    const WT *wk[TILES];
    int wlim[TILES];
#pragma unroll
    for (int j = 0; j < TILES; ++j) {
        wk[j] = wp[j] + k0;
        wlim[j] = wok[j] ? kend - k0 - 16 * t : 0;
    }
    uint4 w[STEPS][TILES][LOADS];   // one iteration's W chunks; the first is requested before x is staged
    auto load_step = [&](int u, int kk) {
#pragma unroll
        for (int j = 0; j < TILES; ++j)
#pragma unroll
            for (int l = 0; l < LOADS; ++l) {
                if (LEAN) {
                    const int o = kk + u * STEP_K + 8 * l;
                    w[u][j][l] = o < wlim[j] ? load_weights(wk[j] + o) : zero4();
                } else {
                    const int k = k0 + kk + u * STEP_K + 16 * t + 8 * l;
                    w[u][j][l] = wok[j] && k < kend ? load_weights(wp[j] + (k - 16 * t)) : zero4();
                }
            }
    };
    auto load = [&](int kk) {
#pragma unroll
        for (int u = 0; u < STEPS; ++u) load_step(u, kk);
    };
    load(0);
    // Stage x[:, k0 : k0 + KS] (zeros past K), 8 elements per chunk. Plain x is copied with cp.async (every chunk
    // in flight at once), in PH commit groups of whole iterations: phase p holds columns [start(p), start(p + 1))
    // and the main loop waits for it only when it gets there, so W streams while the rest of x arrives. Chunk i
    // of a phase is row i / width, column i % width. A prologue goes through registers.
    const int iters = KS / ITER_K;
    auto phase_start = [&](int p) { return ITER_K * (p * iters / PH); };
    if (PRO == 0 && MC == 1) {
#pragma unroll
        for (int p = 0; p < PH; ++p) {
            const int c0 = phase_start(p) / 8, width = phase_start(p + 1) / 8 - c0, total = B * width;
            for (int i = tid; i < total; i += THREADS) {
                const int b = i / width, c = c0 + i - b * width, k = k0 + 8 * c;
                tessera::cp_async16(xs + b * RS + 8 * c, k < K ? x + b * ldx + k : x, k < K);
            }
            tessera::cp_async_commit();
        }
        if (PH == 1) tessera::cp_async_wait<0>();
    }
    if constexpr (MC > 1) {
        // The MC blocks of a cluster (consecutive row groups, one K slice) share one x slice: each row is read
        // from global memory once and multicast into every block's shared memory by a bulk copy that completes
        // on each block's barrier. Block `rank` issues rows b with b % MC == rank; a block zeroes past K itself.
        __shared__ __align__(8) unsigned long long x_ready;
        const unsigned bar = tessera::smem_addr(&x_ready);
        const int rank = blockIdx.x % MC, valid = kend - k0;
        if (tid == 0) mbarrier_init(bar);
        cluster_sync();   // every block's barrier is set up before any copy lands on it
        if (tid == 0) mbarrier_expect(bar, (unsigned)(B * valid * sizeof(XT)));
        if (tid < B && tid % MC == rank)
            bulk_multicast(tessera::smem_addr(xs + tid * RS), x + tid * ldx + k0, (unsigned)(valid * sizeof(XT)), bar,
                           (unsigned short)((1 << MC) - 1));
        for (int i = tid; i < B * (KS - valid); i += THREADS) {
            const int b = i / (KS - valid);
            xs[b * RS + valid + (i - b * (KS - valid))] = XT(0.0f);
        }
        mbarrier_wait(bar);   // (the zeros: the barrier after the staging)
        if (row0 >= N) return;   // a block past the last row group (the grid is a whole number of clusters)
    }
    const int total = B * CH;
    for (int base = 0; PRO != 0 && base < total; base += STAGE_UNROLL * THREADS) {
        uint4 v[STAGE_UNROLL], extra[STAGE_UNROLL];
#pragma unroll
        for (int r = 0; r < STAGE_UNROLL; ++r) {
            const int i = base + r * THREADS + tid, b = i / CH, k = k0 + 8 * (i - b * CH);
            const bool ok = i < total && k < K;
            const XT *src = x + b * ldx + k;
            v[r] = ok ? load_cached(src) : zero4();
            if (PRO == 1) extra[r] = ok ? load_cached(norm_w + k) : zero4();
            if (PRO == 2) extra[r] = ok ? load_cached(src + K) : zero4();
        }
#pragma unroll
        for (int r = 0; r < STAGE_UNROLL; ++r) {
            const int i = base + r * THREADS + tid;
            if (i >= total) break;
            const int b = i / CH;
            XT *dst = xs + b * RS + 8 * (i - b * CH);
            float f[8], e[8];
            to_floats<XT>(v[r], f);
            to_floats<XT>(extra[r], e);
            if (PRO == 1) {
                float q = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    q = fmaf(f[j], f[j], q);
                    f[j] *= e[j];
                }
                ssc[i] = q;
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = f[j] / (1.0f + __expf(-f[j])) * e[j];
            }
            uint4 hi, lo;
            split_hi_lo<XT>(f, hi, lo);
            *reinterpret_cast<uint4 *>(dst) = hi;
            *reinterpret_cast<uint4 *>(dst + B * RS) = lo;
        }
    }
    if (PH == 1) __syncthreads();
    if (PRO == 1) {   // this slice's sum of squares per row, in a fixed order
        for (int b = warp; b < B; b += WARPS) {
            float q = 0.0f;
            for (int c = lane; c < CH; c += 32) q += ssc[b * CH + c];
            q = warp_sum(q);
            if (lane == 0) ss_row[b] = q;
        }
        __syncthreads();
    }

    float acc[TILES][4];
#pragma unroll
    for (int j = 0; j < TILES; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.0f;

    // Main loop over the slice. PIPE: each step's W registers are requested again for the next iteration as soon
    // as the step has used them, so a lane keeps its loads in flight through the arithmetic (same registers).
    int staged = PH == 1 ? PH : 0, wait_k = PH == 1 ? KS : 0;   // x phases complete; where the next one starts
    for (int kk = 0; kk < KS; kk += ITER_K) {
        if (!PIPE && kk > 0) load(kk);
        if (PH > 1 && kk >= wait_k) {   // uniform over the block: wait for every phase that starts by kk
            while (staged < PH && phase_start(staged) <= kk) ++staged;
            cp_async_wait_pending(PH - staged);
            __syncthreads();
            wait_k = staged < PH ? phase_start(staged) : KS;
        }
#pragma unroll
        for (int u = 0; u < STEPS; ++u) {
            const int xo = kk + u * STEP_K;
            unsigned xl[PARTS][8], xh[PARTS][8];
#pragma unroll
            for (int p = 0; p < PARTS; ++p)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    uint4 l4, h4;
                    if (LEAN) {
                        const unsigned off = sizeof(XT) * (p * B * RS + xo + 8 * h);
                        l4 = lds128(xa_s + off);
                        h4 = hi_rows ? lds128(xb_s + off) : l4;
                    } else {
                        l4 = a_lo ? *reinterpret_cast<const uint4 *>(xa + p * B * RS + xo + 8 * h) : zero4();
                        h4 = a_hi ? *reinterpret_cast<const uint4 *>(xb + p * B * RS + xo + 8 * h) : zero4();
                    }
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        xl[p][4 * h + i] = word(l4, i);
                        xh[p][4 * h + i] = word(h4, i);
                    }
                }
#pragma unroll
            for (int s = 0; s < 4; ++s)
#pragma unroll
                for (int j = 0; j < TILES; ++j) {
                    unsigned b0, b1;
                    Fragment<WT, XT>::get(w[u][j], s, b0, b1);
#pragma unroll
                    for (int p = 0; p < PARTS; ++p) {
                        const unsigned a[4] = {xl[p][2 * s], xh[p][2 * s], xl[p][2 * s + 1], xh[p][2 * s + 1]};
                        tessera::mma<XT>(acc[j], a, b0, b1);
                    }
                }
            if (PIPE) load_step(u, kk + ITER_K);   // past the slice: no load (k >= kend)
        }
    }

    // Epilogue, in explicit roundings (no FMA contraction): each row's result has one definition.
    auto finish = [&](int b, int n, float v, float q) {
        if (PRO == 1) v = __fmul_rn(v, rsqrtf(__fadd_rn(q / (float)K, eps)));
        if (w_scale != nullptr) v = __fmul_rn(v, w_scale[n]);
        if (bias_kind == 1) v = __fadd_rn(v, static_cast<const float *>(bias)[n]);
        if (bias_kind == 2) v = __fadd_rn(v, __bfloat162float(static_cast<const __nv_bfloat16 *>(bias)[n]));
        if (residual != nullptr) v = __fadd_rn(v, __bfloat162float(residual[(long long)b * ldr + n]));
        out[(long long)b * ldo + n] = store_as<OutT>(v);
    };
    // EPI: the epilogue of the elements a thread holds (v[j][h][c]: row b = g + 8h, row n = wrow + 8j + 2t + c),
    // the same operations as finish, with every load issued before the first store (residual may alias out, but
    // each element is read and written by this thread only).
    auto finish_held = [&](const float (&v)[TILES][2][2]) {
        float sc[TILES][2], bi[TILES][2], rs[TILES][2][2];
#pragma unroll
        for (int j = 0; j < TILES; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int n = wrow + 8 * j + 2 * t + c;
                const bool ok = n < N;
                sc[j][c] = w_scale != nullptr && ok ? w_scale[n] : 1.0f;
                bi[j][c] = !ok ? 0.0f
                           : bias_kind == 1 ? static_cast<const float *>(bias)[n]
                           : bias_kind == 2 ? __bfloat162float(static_cast<const __nv_bfloat16 *>(bias)[n])
                                            : 0.0f;
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    rs[j][h][c] = residual != nullptr && ok && g + 8 * h < B
                                      ? __bfloat162float(residual[(long long)(g + 8 * h) * ldr + n]) : 0.0f;
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int b = g + 8 * h;
            if (b >= B) continue;
            const float r = PRO == 1 ? rsqrtf(__fadd_rn(ss_row[b] / (float)K, eps)) : 1.0f;
#pragma unroll
            for (int j = 0; j < TILES; ++j)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int n = wrow + 8 * j + 2 * t + c;
                    if (n >= N) continue;
                    float y = v[j][h][c];
                    if (PRO == 1) y = __fmul_rn(y, r);
                    if (w_scale != nullptr) y = __fmul_rn(y, sc[j][c]);
                    if (bias_kind != 0) y = __fadd_rn(y, bi[j][c]);
                    if (residual != nullptr) y = __fadd_rn(y, rs[j][h][c]);
                    out[(long long)b * ldo + n] = store_as<OutT>(y);
                }
        }
    };
    // Accumulator r of tile j: row b = g + 8 (r / 2) of x, row n = 8j + 2t + r % 2 of this warp's W rows.
    if (S == 1 && EPI) {
        float v[TILES][2][2];
#pragma unroll
        for (int j = 0; j < TILES; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) v[j][r >> 1][r & 1] = acc[j][r];
        finish_held(v);
        return;
    }
    if (S == 1) {
#pragma unroll
        for (int j = 0; j < TILES; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int b = g + 8 * (r >> 1), n = wrow + 8 * j + 2 * t + (r & 1);
                if (b < B && n < N) finish(b, n, acc[j][r], PRO == 1 ? ss_row[b] : 0.0f);
            }
        return;
    }
    float *tile = part + ((long long)blockIdx.x * S + split) * TILE_FLOATS;
#pragma unroll
    for (int j = 0; j < TILES; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int b = g + 8 * h;
            if (b < B)
                *reinterpret_cast<float2 *>(tile + b * BLOCK_ROWS + warp * 8 * TILES + 8 * j + 2 * t) =
                    make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
        }
    if (PRO == 1 && tid < B) tile[MAX_B * BLOCK_ROWS + tid] = ss_row[tid];
    if (EPI) {
        // The barrier orders every thread's partials before thread 0's fence (cumulative), which orders them
        // before the count: one fence a block instead of one a thread.
        __syncthreads();
        if (tid == 0) {
            __threadfence();
            const int arrived = atomicAdd(counters + blockIdx.x, 1);
            last_block = arrived == S - 1;
            if (last_block) counters[blockIdx.x] = 0;   // ready for the next launch
            __threadfence();
        }
    } else {
        __threadfence();   // this block's partials are visible device-wide before it is counted
        __syncthreads();
        if (tid == 0) {
            const int arrived = atomicAdd(counters + blockIdx.x, 1);
            last_block = arrived == S - 1;
            if (last_block) counters[blockIdx.x] = 0;   // ready for the next launch
            __threadfence();
        }
    }
    __syncthreads();
    if (!last_block) return;
    const float *tiles = part + (long long)blockIdx.x * S * TILE_FLOATS;
    if (PRO == 1 && tid < B) {
        float q = 0.0f;
        for (int s = 0; s < S; ++s) q += __ldcg(tiles + (long long)s * TILE_FLOATS + MAX_B * BLOCK_ROWS + tid);
        ss_row[tid] = q;
    }
    __syncthreads();
    if (EPI) {
        // Each thread adds up, in split order, the S partials of the elements it holds (its own split's from its
        // registers): the same sums as below, with every load of a group of splits in flight at once.
        constexpr int G = 4;
        float v[TILES][2][2];
#pragma unroll
        for (int j = 0; j < TILES; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) v[j][h][0] = v[j][h][1] = 0.0f;
        for (int s0 = 0; s0 < S; s0 += G) {
            float2 q[TILES][2][G];
#pragma unroll
            for (int j = 0; j < TILES; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float *src = tiles + (g + 8 * h) * BLOCK_ROWS + warp * 8 * TILES + 8 * j + 2 * t;
#pragma unroll
                    for (int i = 0; i < G; ++i) {
                        const int s = s0 + i;
                        q[j][h][i] = s == split ? make_float2(acc[j][2 * h], acc[j][2 * h + 1])
                                     : s < S && g + 8 * h < B
                                         ? __ldcg(reinterpret_cast<const float2 *>(src + (long long)s * TILE_FLOATS))
                                         : make_float2(0.0f, 0.0f);
                    }
                }
#pragma unroll
            for (int j = 0; j < TILES; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int i = 0; i < G; ++i)
                        if (s0 + i < S) {
                            v[j][h][0] += q[j][h][i].x;
                            v[j][h][1] += q[j][h][i].y;
                        }
        }
        finish_held(v);
        return;
    }
    for (int i = tid; i < B * BLOCK_ROWS; i += THREADS) {
        const int b = i / BLOCK_ROWS, c = i % BLOCK_ROWS, n = row0 + c;
        if (n >= N) continue;
        float v = 0.0f;
        for (int s = 0; s < S; ++s) v += __ldcg(tiles + (long long)s * TILE_FLOATS + i);
        finish(b, n, v, PRO == 1 ? ss_row[b] : 0.0f);
    }
}

template <typename WT, typename XT, typename OutT, int PRO, int PIPE = 0, int XPH = 1, int EPI = 0, int LEAN = 0>
__global__ void __launch_bounds__(tessera_gemv::THREADS, 2) gemv_mma(GEMV_MMA_PARAMS) {
    gemv_mma_body<WT, XT, OutT, PRO, PIPE, XPH, EPI, LEAN, 1>(GEMV_MMA_ARGS);
}

// gemv_mma with its x slice multicast over clusters of MC blocks (grid x a multiple of MC); sm_90 only.
template <typename WT, typename XT, typename OutT, int PRO, int PIPE, int XPH, int EPI, int LEAN, int MC>
__global__ void TESSERA_GEMV_CLUSTER(MC) __launch_bounds__(tessera_gemv::THREADS, 2) gemv_mma_mc(GEMV_MMA_PARAMS) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    gemv_mma_body<WT, XT, OutT, PRO, PIPE, XPH, EPI, LEAN, MC>(GEMV_MMA_ARGS);
#endif
}

using bf16_t = __nv_bfloat16;

extern "C" __global__ void rope_append(const bf16_t *__restrict__ qkv, long long ld_qkv, const float *__restrict__ cos_t,
                            const float *__restrict__ sin_t, const int *__restrict__ pos,
                            const int *__restrict__ table, long long table_stride, int log2_block, bf16_t *k_cache,
                            bf16_t *v_cache, long long c_sb, long long c_sh, long long c_sr, bf16_t *__restrict__ q_out,
                            int *__restrict__ lens, int Hq, int Hkv, int D) {
    tessera::pdl_launch_dependents();
    tessera::pdl_wait();
    const int half = D / 2, total = (Hq + 2 * Hkv) * half;
    const int blocks_per_row = (total + blockDim.x - 1) / blockDim.x;
    const int b = blockIdx.x / blocks_per_row, i = (blockIdx.x % blocks_per_row) * blockDim.x + threadIdx.x;
    const int p = pos[b];
    if (i == 0) lens[b] = p + 1;
    if (i < total) {
        const long long blk = table[(long long)b * table_stride + (p >> log2_block)];
        const long long slot = blk * c_sb + (long long)(p & ((1 << log2_block) - 1)) * c_sr;
        const bf16_t *src = qkv + (long long)b * ld_qkv;
        const int h = i / half, j = i % half;
        const float x1 = __bfloat162float(src[h * D + j]), x2 = __bfloat162float(src[h * D + j + half]);
        float o1 = x1, o2 = x2;
        bf16_t *dst;
        if (h < Hq + Hkv) {
            const float c = cos_t[(long long)p * half + j], s = sin_t[(long long)p * half + j];
            o1 = x1 * c - x2 * s;
            o2 = x2 * c + x1 * s;
            dst = h < Hq ? q_out + ((long long)b * Hq + h) * D : k_cache + slot + (h - Hq) * c_sh;
        } else {
            dst = v_cache + slot + (h - Hq - Hkv) * c_sh;
        }
        dst[j] = __float2bfloat16_rn(o1);
        dst[j + half] = __float2bfloat16_rn(o2);
    }
}

extern "C" __global__ void argmax_rows(const float *__restrict__ logits, long long ld, int V, int *__restrict__ tokens) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    tessera::pdl_launch_dependents();
    tessera::pdl_wait();
    const float *row = logits + (long long)blockIdx.x * ld;
    float v = __int_as_float(0xff800000);
    int idx = 0x7fffffff;
    // i grows: the first maximum of this thread's elements stays. Four loads in flight at a time (one at a time,
    // 32000 logits took 8.6 us).
    int i = threadIdx.x;
    for (; i + 3 * (int)blockDim.x < V; i += 4 * blockDim.x) {
        float x[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) x[u] = row[i + u * blockDim.x];
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (x[u] > v) { v = x[u]; idx = i + u * blockDim.x; }
    }
    for (; i < V; i += blockDim.x) {
        const float x = row[i];
        if (x > v) { v = x; idx = i; }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, off);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) { best_v[warp] = v; best_i[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? best_v[lane] : __int_as_float(0xff800000);
        idx = lane < warps ? best_i[lane] : 0x7fffffff;
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, off);
            const int oi = __shfl_xor_sync(0xffffffffu, idx, off);
            if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
        }
        if (lane == 0) tokens[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;   // all NaN: token 0
    }
}

extern "C" __global__ void embed_rows(const bf16_t *__restrict__ table, const int *__restrict__ tokens,
                                      bf16_t *__restrict__ out, long long ld_out, int H) {
    tessera::pdl_launch_dependents();
    tessera::pdl_wait();
    const uint4 *src = reinterpret_cast<const uint4 *>(table + (long long)tokens[blockIdx.x] * H);
    uint4 *dst = reinterpret_cast<uint4 *>(out + (long long)blockIdx.x * ld_out);
    for (int i = threadIdx.x; i < H / 8; i += blockDim.x) dst[i] = src[i];
}
