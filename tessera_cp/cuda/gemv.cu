// The decode step of tessera_cp/models (launched by tessera_cp/models/gemv.py): one token per sequence, so every
// weight matrix is read once per step and the step is bound by memory bandwidth. Plain CUDA (no cuBLAS), so the
// whole step can be captured in a CUDA graph.
//
// gemv_rows<WT, OutT, PRO, MAXB, ROWS>: out[b, n] = epilogue(sum_k xe[b, k] * W[n, k]) for b < B <= MAXB rows.
//   W [N, K] is bf16 (WT = __nv_bfloat16, 8 elements per 16-byte chunk) or int8 with one float scale per output row
//   (WT = signed char, 16 elements per chunk). A block owns ROWS consecutive rows of W and all of K: thread t takes
//   chunks t, t + 256, ... of each of its rows (16-byte streaming loads that skip L1: every weight byte is read
//   exactly once per step), so a warp reads 512 contiguous bytes of a row per load. Each W chunk is converted to
//   float once and used for every b. Partial sums meet in shared memory: a warp sum, then the 8 warps in a fixed
//   order, so a row's result never depends on B (batching does not change any sequence's output).
//   The prologue PRO builds the effective input xe on the fly (x rows are small and stay in L1/L2):
//     0: xe = x;   1: xe = rms_norm(x) * g (the sum of squares rides along the main loop, the 1/rms factor is
//     applied in the epilogue);   2: xe = silu(x[:, :K]) * x[:, K:2K] (SwiGLU of the packed [gate | up]).
//   Epilogue: s * (1/rms) * w_scale[n] + bias[n] + residual[b, n], stored as OutT (bf16, or float for logits).
//   residual may alias out (x += proj(...)): each output element is read and written by one thread.
//   Limits (checked by the launcher): K % (elements per chunk) == 0, x rows (stride ldx, a multiple of 8) and W,
//   g 16-byte aligned, B <= MAXB.
// rope_append (bf16): RoPE of the new token's q and k heads (half-split layout, f32 cos/sin tables [P, D/2]) at
//   position pos[b], q written to q_out [B, Hq, D]; k and v stored into the paged cache at that position (block
//   table[b, pos >> log2_block], row pos & (block - 1)); lens[b] = pos[b] + 1. Grid B, any block size.
// argmax_rows: tokens[b] = argmax over V of logits[b] (float; the first index among equal maxima; NaN ignored).
// embed_rows (bf16): out[b] = table[tokens[b]] (rows of H elements, H % 8 == 0, 16-byte copies).
//
// tessera-instantiate: gemv_rows<__nv_bfloat16, __nv_bfloat16, 0, 1, 8>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 1, 1, 8>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 2, 1, 8>
// tessera-instantiate: gemv_rows<__nv_bfloat16, __nv_bfloat16, 0, 4, 8>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 1, 4, 8>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 2, 4, 8>
// tessera-instantiate: gemv_rows<__nv_bfloat16, __nv_bfloat16, 0, 16, 4>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 1, 16, 4>; gemv_rows<__nv_bfloat16, __nv_bfloat16, 2, 16, 4>
// tessera-instantiate: gemv_rows<signed char, __nv_bfloat16, 0, 1, 4>; gemv_rows<signed char, __nv_bfloat16, 1, 1, 4>; gemv_rows<signed char, __nv_bfloat16, 2, 1, 4>
// tessera-instantiate: gemv_rows<signed char, __nv_bfloat16, 0, 4, 4>; gemv_rows<signed char, __nv_bfloat16, 1, 4, 4>; gemv_rows<signed char, __nv_bfloat16, 2, 4, 4>
// tessera-instantiate: gemv_rows<signed char, __nv_bfloat16, 0, 16, 2>; gemv_rows<signed char, __nv_bfloat16, 1, 16, 2>; gemv_rows<signed char, __nv_bfloat16, 2, 16, 2>
// tessera-instantiate: gemv_rows<__nv_bfloat16, float, 1, 1, 8>; gemv_rows<__nv_bfloat16, float, 1, 4, 8>; gemv_rows<__nv_bfloat16, float, 1, 16, 4>
#include <cuda_bf16.h>

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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

template <typename T> __device__ __forceinline__ T store_as(float v);
template <> __device__ __forceinline__ float store_as<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

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

using bf16_t = __nv_bfloat16;

extern "C" __global__ void rope_append(const bf16_t *__restrict__ qkv, long long ld_qkv, const float *__restrict__ cos_t,
                            const float *__restrict__ sin_t, const int *__restrict__ pos,
                            const int *__restrict__ table, long long table_stride, int log2_block, bf16_t *k_cache,
                            bf16_t *v_cache, long long c_sb, long long c_sh, long long c_sr, bf16_t *__restrict__ q_out,
                            int *__restrict__ lens, int Hq, int Hkv, int D) {
    const int b = blockIdx.x, half = D / 2;
    const int p = pos[b];
    const long long blk = table[(long long)b * table_stride + (p >> log2_block)];
    const long long slot = blk * c_sb + (long long)(p & ((1 << log2_block) - 1)) * c_sr;
    const bf16_t *src = qkv + (long long)b * ld_qkv;
    const int total = (Hq + 2 * Hkv) * half;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
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
    if (threadIdx.x == 0) lens[b] = p + 1;
}

extern "C" __global__ void argmax_rows(const float *__restrict__ logits, long long ld, int V, int *__restrict__ tokens) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const float *row = logits + (long long)blockIdx.x * ld;
    float v = __int_as_float(0xff800000);
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float x = row[i];
        if (x > v) { v = x; idx = i; }   // i grows: the first maximum of this thread's elements stays
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
    const uint4 *src = reinterpret_cast<const uint4 *>(table + (long long)tokens[blockIdx.x] * H);
    uint4 *dst = reinterpret_cast<uint4 *>(out + (long long)blockIdx.x * ld_out);
    for (int i = threadIdx.x; i < H / 8; i += blockDim.x) dst[i] = src[i];
}
