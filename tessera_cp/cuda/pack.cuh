// Packed 16-bit vectors: VEC elements of float, __half or __nv_bfloat16 held as 32-bit words, loaded and stored
// as single aligned accesses, and the conversions they need. Shared by norm.cu, rope.cu and gemv.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tessera {

template <typename T> __device__ __forceinline__ float half_to_float(unsigned bits);  // bits: the low 16
template <> __device__ __forceinline__ float half_to_float<__nv_bfloat16>(unsigned bits) {
    return __uint_as_float(bits << 16);
}
template <> __device__ __forceinline__ float half_to_float<__half>(unsigned bits) {
    return __half2float(__ushort_as_half((unsigned short)bits));
}

template <typename T> __device__ __forceinline__ unsigned float2_to_bits(float lo, float hi);
template <> __device__ __forceinline__ unsigned float2_to_bits<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned *>(&h);
}
template <> __device__ __forceinline__ unsigned float2_to_bits<__half>(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned *>(&h);
}
__device__ __forceinline__ unsigned short to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned short to_bits(__half v) { return __half_as_ushort(v); }

// VEC elements of T (float, __half or __nv_bfloat16) as loaded: 32-bit words, two 16-bit elements to a word, so
// a 16-byte vector takes 4 registers whatever T is (an array of 16-bit elements would take a register each).
// Loads and stores are aligned accesses of sizeof(T) * VEC bytes (32: two of 16); element indices must be
// compile-time constants.
template <typename T, int VEC> struct Pack {
    static constexpr int BYTES = int(sizeof(T)) * VEC, WORDS = BYTES < 4 ? 1 : BYTES / 4;
    unsigned w[WORDS];

    __device__ __forceinline__ static Pack zero() {
        Pack p;
#pragma unroll
        for (int i = 0; i < WORDS; ++i) p.w[i] = 0u;
        return p;
    }
    __device__ __forceinline__ static Pack load(const T *base, long long v) {  // vector v of base
        Pack p;
        if constexpr (BYTES % 16 == 0) {  // 16 bytes, or 32 (8 floats): one or two 16-byte accesses
#pragma unroll
            for (int i = 0; i < BYTES / 16; ++i) {
                const uint4 u = reinterpret_cast<const uint4 *>(base)[v * (BYTES / 16) + i];
                p.w[4 * i] = u.x; p.w[4 * i + 1] = u.y; p.w[4 * i + 2] = u.z; p.w[4 * i + 3] = u.w;
            }
        } else if constexpr (BYTES == 8) {
            const uint2 u = reinterpret_cast<const uint2 *>(base)[v];
            p.w[0] = u.x; p.w[1] = u.y;
        } else if constexpr (BYTES == 4) {
            p.w[0] = reinterpret_cast<const unsigned *>(base)[v];
        } else {
            static_assert(BYTES == 2, "a vector is 2, 4, 8, 16 or 32 bytes");
            p.w[0] = reinterpret_cast<const unsigned short *>(base)[v];
        }
        return p;
    }
    __device__ __forceinline__ void store(T *base, long long v) const {
        if constexpr (BYTES % 16 == 0) {
#pragma unroll
            for (int i = 0; i < BYTES / 16; ++i)
                reinterpret_cast<uint4 *>(base)[v * (BYTES / 16) + i] =
                    make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
        } else if constexpr (BYTES == 8) {
            reinterpret_cast<uint2 *>(base)[v] = make_uint2(w[0], w[1]);
        } else if constexpr (BYTES == 4) {
            reinterpret_cast<unsigned *>(base)[v] = w[0];
        } else {
            reinterpret_cast<unsigned short *>(base)[v] = (unsigned short)w[0];
        }
    }
    __device__ __forceinline__ float get(int j) const {
        if constexpr (sizeof(T) == 4) {
            return __uint_as_float(w[j]);
        } else {
            const unsigned word = w[j >> 1];
            return half_to_float<T>((j & 1) ? word >> 16 : word & 0xffffu);
        }
    }
    // Elements j and j + 1 (j even; hi is ignored when j + 1 == VEC) from floats, rounded to nearest.
    __device__ __forceinline__ void set(int j, float lo, float hi) {
        if constexpr (sizeof(T) == 4) {
            w[j] = __float_as_uint(lo);
            if (j + 1 < VEC) w[j + 1] = __float_as_uint(hi);
        } else if constexpr (VEC == 1) {
            w[0] = to_bits(T(lo));  // T(float) rounds to nearest
        } else {
            w[j >> 1] = float2_to_bits<T>(lo, hi);
        }
    }
};

}  // namespace tessera
