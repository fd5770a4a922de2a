// Quantization kernels: per-token (per-row) dynamic int8 quantization of activations, and the gathers of
// CastedEmbedding and CastedSparseEmbedding, which dequantize stored rows (fp8 e4m3 / e5m2, int8 or bf16) into
// float / __half / __nv_bfloat16. Launched by tessera_cp/quant.py and tessera_cp/nn/casted.py, whose references
// run the same float32 operations in the same order (no FMA contraction: __fmul_rn), so results match bit for bit.
//
// quantize_rows_int8: one block per row. Pass 1 takes the row's absmax (NaN ignored, as fmaxf does); the scale is
// absmax / 127 (1 for an all-zero row); pass 2 writes q = clamp(rint(x / scale), -127, 127) (IEEE division; a
// NaN quotient gives 0) and zeros in the padding columns [cols, ldq), so the GEMM may read ldq-wide rows.
// With `vec` (cols and ldq multiples of 8, rows 16-byte aligned) each thread moves 8 elements per step.
//
// embedding_gather: one block per lookup; out[i, :] = T(decode(table[idx[i], :]) * scale[idx[i] * stride] *
// scale_factor). An index outside [0, V) writes a zero row and sets *error (never reads out of bounds).
// sparse_embedding_gather: one block per lookup over a block-CSR table (row_ptr, block_cols, block_data,
// block_scales); the row is zeroed, then (after a barrier, so the later write wins) each stored block is written as
// decode(q) * block_scale * weight[i]. Indices are checked the same way.
//
// tessera-instantiate: quantize_rows_int8<float>; quantize_rows_int8<__half>; quantize_rows_int8<__nv_bfloat16>
// tessera-instantiate: embedding_gather<E4M3, __nv_bfloat16, long long>; embedding_gather<E5M2, __nv_bfloat16, long long>
// tessera-instantiate: embedding_gather<I8, __nv_bfloat16, long long>; embedding_gather<BF16, __nv_bfloat16, long long>
// tessera-instantiate: embedding_gather<E4M3, __nv_bfloat16, int>; embedding_gather<E4M3, __half, long long>
// tessera-instantiate: embedding_gather<E4M3, float, long long>; embedding_gather<I8, float, long long>
// tessera-instantiate: sparse_embedding_gather<E4M3, __nv_bfloat16, long long>; sparse_embedding_gather<E5M2, __nv_bfloat16, long long>
// tessera-instantiate: sparse_embedding_gather<I8, __nv_bfloat16, long long>; sparse_embedding_gather<BF16, float, long long>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

constexpr int QUANT_THREADS = 256;   // quantize_rows_int8 block size (a multiple of 32, at most 1024)
constexpr int GATHER_THREADS = 128;  // embedding gathers: 8 elements per thread per step, 1024 per block step
constexpr int GATHER_LOADS = 4;      // embedding_gather: vector loads a thread has in flight (a 4096-wide row: all)

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements moved by one vector load or store (N * sizeof(T) is 8, 16 or 32 bytes).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

// Storage formats of the embedding tables: the element type and an exact decode to float.
// fp8 is decoded from its bit fields (e4m3: bias 7, no inf, 0x7F/0xFF NaN; e5m2: bias 15, IEEE-like specials).
struct E4M3 {
    typedef unsigned char Storage;
    static __device__ __forceinline__ float decode(unsigned char b) {
        const unsigned sign = (unsigned)(b >> 7) << 31, e = (b >> 3) & 15u, m = b & 7u;
        if ((b & 0x7Fu) == 0x7Fu) return __uint_as_float(sign | 0x7FC00000u);
        if (e == 0) return __uint_as_float(sign | __float_as_uint((float)m * 0.001953125f));  // m * 2^-9
        return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
    }
};
struct E5M2 {  // e5m2 is the upper byte of an f16 (same exponent bias and specials): exact through f16
    typedef unsigned char Storage;
    static __device__ __forceinline__ float decode(unsigned char b) {
        return __half2float(__ushort_as_half((unsigned short)(b << 8)));
    }
};
struct I8 {
    typedef signed char Storage;
    static __device__ __forceinline__ float decode(signed char v) { return (float)v; }
};
struct BF16 {
    typedef __nv_bfloat16 Storage;
    static __device__ __forceinline__ float decode(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// The maximum over the block of one value per thread; every thread gets it. 1-D blocks, a multiple of 32 threads.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    __syncthreads();  // partial may be reused by a later call
    return v;
}

__device__ __forceinline__ signed char quantize_int8(float x, float scale) {
    const int q = __float2int_rn(x / scale);  // round to nearest even; NaN gives 0
    return (signed char)max(-127, min(127, q));
}

template <typename T>
__global__ void __launch_bounds__(QUANT_THREADS)
quantize_rows_int8(const T* __restrict__ x, signed char* __restrict__ q, float* __restrict__ scale, int cols,
                   int ldq, int vec) {
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    signed char* qr = q + row * ldq;
    float amax = 0.0f;
    if (vec) {
        for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
            const Pack<T, 8> p = *reinterpret_cast<const Pack<T, 8>*>(xr + c);
#pragma unroll
            for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(to_float(p.v[j])));
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) amax = fmaxf(amax, fabsf(to_float(xr[c])));
    }
    amax = block_max(amax);
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    if (threadIdx.x == 0) scale[row] = s;
    if (vec) {  // the second read of the row hits L1/L2
        for (int c = threadIdx.x * 8; c < ldq; c += blockDim.x * 8) {
            Pack<signed char, 8> out;
            if (c < cols) {
                const Pack<T, 8> p = *reinterpret_cast<const Pack<T, 8>*>(xr + c);
#pragma unroll
                for (int j = 0; j < 8; ++j) out.v[j] = quantize_int8(to_float(p.v[j]), s);
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) out.v[j] = 0;
            }
            *reinterpret_cast<Pack<signed char, 8>*>(qr + c) = out;
        }
    } else {
        for (int c = threadIdx.x; c < ldq; c += blockDim.x) qr[c] = c < cols ? quantize_int8(to_float(xr[c]), s) : 0;
    }
}

template <typename T> __device__ __forceinline__ T scaled(float decoded, float scale, float factor) {
    return from_float<T>(__fmul_rn(__fmul_rn(decoded, scale), factor));
}
template <typename S, typename T>
__device__ __forceinline__ T dequant(typename S::Storage v, float scale, float factor) {
    return scaled<T>(S::decode(v), scale, factor);
}

// Eight stored values decoded to float (the gathers' vector path).
template <typename S> __device__ __forceinline__ void decode8(const Pack<typename S::Storage, 8> &p, float (&f)[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = S::decode(p.v[j]);
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
// sm_89+: the hardware converts pairs of e4m3 to f16, exactly (every e4m3 value is an f16 value), in one
// instruction instead of the bit-field decode's dozen: the fp8 gather was bound by them at 58-76% of copy.
template <> __device__ __forceinline__ void decode8<E4M3>(const Pack<unsigned char, 8> &p, float (&f)[8]) {
    const unsigned short *two = reinterpret_cast<const unsigned short *>(p.v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        unsigned h2;
        asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(two[j]));  // low byte -> low half
        const float2 v = __half22float2(*reinterpret_cast<const __half2 *>(&h2));
        f[2 * j] = v.x;
        f[2 * j + 1] = v.y;
    }
}
#endif

template <typename S, typename T, typename Idx>
__global__ void __launch_bounds__(GATHER_THREADS)
embedding_gather(const typename S::Storage* __restrict__ table, const Idx* __restrict__ idx,
                 const float* __restrict__ scale, long long scale_stride, float scale_factor, T* __restrict__ out,
                 int dim, long long rows, int vec, int* __restrict__ error) {
    typedef typename S::Storage Storage;
    const long long i = blockIdx.x;
    const long long row = (long long)idx[i];
    T* o = out + i * dim;
    if (row < 0 || row >= rows) {  // the whole block takes this branch
        for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = from_float<T>(0.0f);
        if (threadIdx.x == 0) atomicOr(error, 1);
        return;
    }
    const float s = scale[row * scale_stride];
    const Storage* src = table + row * dim;
    if (vec) {
        // GATHER_LOADS packs of 8 are loaded before any is converted and stored: one row is a few KB, so the bytes
        // in flight, not the instructions, set the speed (one pack at a time read 73-76% of copy at D = 4096).
        constexpr int STEP = GATHER_THREADS * 8;
        for (int c0 = threadIdx.x * 8; c0 < dim; c0 += STEP * GATHER_LOADS) {
            Pack<Storage, 8> p[GATHER_LOADS];
#pragma unroll
            for (int u = 0; u < GATHER_LOADS; ++u)
                if (c0 + u * STEP < dim) p[u] = *reinterpret_cast<const Pack<Storage, 8>*>(src + c0 + u * STEP);
#pragma unroll
            for (int u = 0; u < GATHER_LOADS; ++u) {
                if (c0 + u * STEP >= dim) break;
                float f[8];
                decode8<S>(p[u], f);
                Pack<T, 8> r;
#pragma unroll
                for (int j = 0; j < 8; ++j) r.v[j] = scaled<T>(f[j], s, scale_factor);
                *reinterpret_cast<Pack<T, 8>*>(o + c0 + u * STEP) = r;
            }
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = dequant<S, T>(src[c], s, scale_factor);
    }
}

template <typename S, typename T, typename Idx>
__global__ void __launch_bounds__(GATHER_THREADS)
sparse_embedding_gather(const long long* __restrict__ row_ptr, const int* __restrict__ block_cols,
                        const typename S::Storage* __restrict__ block_data, const float* __restrict__ block_scales,
                        const Idx* __restrict__ idx, const float* __restrict__ weights, int has_weights,
                        T* __restrict__ out, int dim, int block_size, long long rows, int* __restrict__ error) {
    const long long i = blockIdx.x;
    const long long row = (long long)idx[i];
    T* o = out + i * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = from_float<T>(0.0f);
    if (row < 0 || row >= rows) {
        if (threadIdx.x == 0) atomicOr(error, 1);
        return;
    }
    __syncthreads();  // the zeros land before the stored blocks overwrite some of them
    const long long start = row_ptr[row];
    const int stored = (int)(row_ptr[row + 1] - start) * block_size;
    const float w = has_weights ? weights[i] : 1.0f;
    for (int f = threadIdx.x; f < stored; f += blockDim.x) {
        const int j = f / block_size, e = f - j * block_size;
        const long long b = start + j;
        o[(long long)block_cols[b] * block_size + e] =
            dequant<S, T>(block_data[b * block_size + e], block_scales[b], w);
    }
}
