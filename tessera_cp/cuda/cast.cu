// fp8 casts: float / __half / __nv_bfloat16 <-> fp8 e4m3 (OCP float8_e4m3fn) and e5m2, fp8 held as uint8 bits.
// Launched by tessera_cp/fp8.py, whose reference computes the same codes on NumPy or CuPy.
//
// Bit-exact with ml_dtypes: round to nearest even, subnormals kept, signed zero kept, any NaN becomes the canonical
// NaN with the input's sign (e4m3 0x7F, e5m2 0x7E), overflow gives NaN (e4m3, which has no inf) or inf (e5m2).
// With `saturate` (CUDA's SATFINITE), overflow and +-inf give +-max finite and NaN stays NaN.
// Own code rather than cuda_fp8.h's __nv_cvt_float_to_fp8: that one canonicalizes a NaN input to 0x7FFFFFFF
// before converting, so a negative NaN loses its sign and e5m2 NaN comes out as 0x7F, where ml_dtypes gives 0x7E.
// The encode works on the input widened to float (exact) and is branch-free: about 19 instructions an element
// (sm_90 SASS) where the per-field integer rounding of the reference took about 44, which left the kernel
// compute-bound (64M bf16 on the H100: 126 us before, 73 us now, the copy of the same bytes about 67).
//
// Grid-stride loops with 64-bit indices (n may exceed 2^31). Encode: each thread takes ENCODE_UNROLL 16-byte
// vectors of x per step (all loads issued before the first is used), storing 16 / sizeof(T) codes per vector;
// decode: 4 codes per step. Both need their pointers aligned for the vectors; otherwise (views with an offset),
// and for the elements past the last whole vector, one element at a time. Any grid size is correct.
//
// tessera-instantiate: encode_e4m3<float>; encode_e4m3<__half>; encode_e4m3<__nv_bfloat16>
// tessera-instantiate: encode_e5m2<float>; encode_e5m2<__half>; encode_e5m2<__nv_bfloat16>
// tessera-instantiate: decode_e4m3<float>; decode_e4m3<__half>; decode_e4m3<__nv_bfloat16>
// tessera-instantiate: decode_e5m2<float>; decode_e5m2<__half>; decode_e5m2<__nv_bfloat16>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// The unsigned integer holding a float type's bits, and its exponent and mantissa widths.
template <typename T> struct FloatBits;
template <> struct FloatBits<float> { typedef unsigned int U; static constexpr int EXP = 8, MAN = 23; };
template <> struct FloatBits<__half> { typedef unsigned short U; static constexpr int EXP = 5, MAN = 10; };
template <> struct FloatBits<__nv_bfloat16> { typedef unsigned short U; static constexpr int EXP = 8, MAN = 7; };

// The fp8 layouts: mantissa bits, exponent bias, largest finite code, what overflow gives without saturation
// (e4m3 has no inf, so NaN), and the canonical NaN (all without the sign bit). e4m3's only NaN is 0x7F; e5m2 has
// inf at 0x7C and NaNs above it.
struct E4M3 {
    static constexpr int MAN = 3, BIAS = 7;
    static constexpr unsigned MAX = 0x7E, OVERFLOW = 0x7F, QNAN = 0x7F;
    static constexpr bool HAS_INF = false;
};
struct E5M2 {
    static constexpr int MAN = 2, BIAS = 15;
    static constexpr unsigned MAX = 0x7B, OVERFLOW = 0x7C, QNAN = 0x7E;
    static constexpr bool HAS_INF = true;
};

template <typename U> struct alignas(4 * sizeof(U)) Vec4 { U v[4]; };

constexpr int ENCODE_UNROLL = 2;  // 16-byte vectors of x a thread loads per step (fp8.py's ENCODE_UNROLL)

template <typename T> __device__ __forceinline__ float widen(typename FloatBits<T>::U u);
template <> __device__ __forceinline__ float widen<float>(unsigned int u) { return __uint_as_float(u); }
// f16 -> float is exact except that the conversion returns a NaN without its sign (measured on the H100): the sign
// bit is put back, a no-op for every other value.
template <> __device__ __forceinline__ float widen<__half>(unsigned short u) {
    const float f = __half2float(__ushort_as_half(u));
    return __uint_as_float(__float_as_uint(f) | ((unsigned)(u & 0x8000u) << 16));
}
template <> __device__ __forceinline__ float widen<__nv_bfloat16>(unsigned short u) {
    return __uint_as_float((unsigned)u << 16);
}

// The fp8 code of v (any float; f16 and bf16 arrive widened, exactly). a = |v|'s bits.
//   normal fp8 range: round a's 23-bit mantissa to F::MAN bits (nearest even: add half a step less one, plus the
//     kept lowest bit) and rebias the exponent; a mantissa carry rolls into the exponent as rounding up should;
//   below it the fp8 step is 2^(EMIN8 - F::MAN): adding 2^(EMIN8 - F::MAN + 23) in float rounds |v| to that step
//     (one IEEE round to nearest even, no flush) and leaves the step count, the code, in the low bits;
//   then overflow (inf included) and NaN, and the sign.
template <typename F> __device__ __forceinline__ unsigned encode_float(float v, bool saturate) {
    constexpr int SH = 23 - F::MAN, EMIN8 = 1 - F::BIAS;
    constexpr unsigned MAGIC = (unsigned)(EMIN8 - F::MAN + 23 + 127) << 23, MIN_NORMAL = (unsigned)(EMIN8 + 127) << 23;
    const unsigned b = __float_as_uint(v), a = b & 0x7FFFFFFFu;
    const unsigned normal = ((a + ((1u << (SH - 1)) - 1u) + ((a >> SH) & 1u)) >> SH) - ((127u - F::BIAS) << F::MAN);
    const unsigned small = __float_as_uint(__fadd_rn(__uint_as_float(a), __uint_as_float(MAGIC))) - MAGIC;
    unsigned code = a < MIN_NORMAL ? small : normal;
    code = code > F::MAX ? (saturate ? F::MAX : F::OVERFLOW) : code;
    code = a > 0x7F800000u ? F::QNAN : code;
    return code | ((b >> 24) & 0x80u);
}

template <typename T> __device__ __forceinline__ typename FloatBits<T>::U bits_of(float v);
template <> __device__ __forceinline__ unsigned int bits_of<float>(float v) { return __float_as_uint(v); }
template <> __device__ __forceinline__ unsigned short bits_of<__half>(float v) { return __half_as_ushort(__float2half_rn(v)); }
template <> __device__ __forceinline__ unsigned short bits_of<__nv_bfloat16>(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

template <typename T, typename F>
__device__ __forceinline__ typename FloatBits<T>::U decode_one(unsigned c) {
    typedef typename FloatBits<T>::U U;
    constexpr int EXP = FloatBits<T>::EXP, MAN = FloatBits<T>::MAN;
    const unsigned mag = c & 0x7Fu;
    const bool neg = (c & 0x80u) != 0;
    if (F::HAS_INF ? mag > 0x7Cu : mag == 0x7Fu) {  // NaN: the canonical quiet NaN of T, sign kept
        const U qnan = (U)((((1u << EXP) - 1) << MAN) | (1u << (MAN - 1)));
        return (U)(qnan | (neg ? (U)(1u << (EXP + MAN)) : (U)0));
    }
    const int E = (int)(mag >> F::MAN), m = (int)(mag & ((1u << F::MAN) - 1));
    float v;
    if (F::HAS_INF && mag == 0x7Cu) {
        v = __int_as_float(0x7F800000);  // e5m2 inf
    } else {
        // |v| = M * 2^k with M < 16 and -16 <= k <= 13: both exact in float, so is the product.
        const int M = E > 0 ? (m | (1 << F::MAN)) : m;
        const int k = (E > 0 ? E : 1) - F::BIAS - F::MAN;
        v = (float)M * __int_as_float((k + 127) << 23);
    }
    // Every fp8 value is exactly representable in T, so the round-to-nearest conversion is exact.
    return bits_of<T>(neg ? -v : v);
}

template <typename T, typename F>
__device__ __forceinline__ void encode_body(const T* __restrict__ x, unsigned char* __restrict__ y, long long n,
                                            bool saturate) {
    typedef typename FloatBits<T>::U U;
    constexpr int EV = 16 / int(sizeof(T));  // elements (and output bytes) of one vector
    const U* xb = reinterpret_cast<const U*>(x);
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if ((unsigned long long)x % 16 == 0 && (unsigned long long)y % EV == 0) {
        const long long nv = n / EV;
        for (long long i = tid; i < nv; i += ENCODE_UNROLL * stride) {
            uint4 in[ENCODE_UNROLL];  // every load of the step in flight before the first conversion
#pragma unroll
            for (int k = 0; k < ENCODE_UNROLL; ++k)
                if (i + k * stride < nv) in[k] = reinterpret_cast<const uint4*>(x)[i + k * stride];
#pragma unroll
            for (int k = 0; k < ENCODE_UNROLL; ++k) {
                if (i + k * stride >= nv) break;
                const unsigned in_word[4] = {in[k].x, in[k].y, in[k].z, in[k].w};
                unsigned word[EV / 4];  // 4 codes a word
#pragma unroll
                for (int w = 0; w < EV / 4; ++w) {
                    word[w] = 0;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int el = 4 * w + j;  // element el of the vector: its bits in in_word
                        const U u = sizeof(U) == 4 ? (U)in_word[el] : (U)(in_word[el >> 1] >> (16 * (el & 1)));
                        word[w] |= encode_float<F>(widen<T>(u), saturate) << (8 * j);
                    }
                }
                if constexpr (EV == 8)
                    reinterpret_cast<uint2*>(y)[i + k * stride] = make_uint2(word[0], word[1]);
                else
                    reinterpret_cast<unsigned*>(y)[i + k * stride] = word[0];
            }
        }
        done = nv * EV;
    }
    for (long long i = done + tid; i < n; i += stride)
        y[i] = (unsigned char)encode_float<F>(widen<T>(xb[i]), saturate);
}

template <typename T, typename F>
__device__ __forceinline__ void decode_body(const unsigned char* __restrict__ x, T* __restrict__ y, long long n) {
    typedef typename FloatBits<T>::U U;
    U* yb = reinterpret_cast<U*>(y);
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if ((unsigned long long)x % sizeof(uchar4) == 0 && (unsigned long long)y % sizeof(Vec4<U>) == 0) {
        const long long n4 = n / 4;
        for (long long i = tid; i < n4; i += stride) {
            const uchar4 a = reinterpret_cast<const uchar4*>(x)[i];
            Vec4<U> b;
            b.v[0] = decode_one<T, F>(a.x);
            b.v[1] = decode_one<T, F>(a.y);
            b.v[2] = decode_one<T, F>(a.z);
            b.v[3] = decode_one<T, F>(a.w);
            reinterpret_cast<Vec4<U>*>(yb)[i] = b;
        }
        done = n4 * 4;
    }
    for (long long i = done + tid; i < n; i += stride) yb[i] = decode_one<T, F>(x[i]);
}

template <typename T>
__global__ void encode_e4m3(const T* __restrict__ x, unsigned char* __restrict__ y, long long n, int saturate) {
    encode_body<T, E4M3>(x, y, n, saturate != 0);
}

template <typename T>
__global__ void encode_e5m2(const T* __restrict__ x, unsigned char* __restrict__ y, long long n, int saturate) {
    encode_body<T, E5M2>(x, y, n, saturate != 0);
}

template <typename T>
__global__ void decode_e4m3(const unsigned char* __restrict__ x, T* __restrict__ y, long long n) {
    decode_body<T, E4M3>(x, y, n);
}

template <typename T>
__global__ void decode_e5m2(const unsigned char* __restrict__ x, T* __restrict__ y, long long n) {
    decode_body<T, E5M2>(x, y, n);
}
