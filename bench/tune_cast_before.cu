// The cast.cu encode before the branch-free rewrite, kept for bench/tune_norm.py to time against (same run).
// fp8 casts: float / __half / __nv_bfloat16 <-> fp8 e4m3 (OCP float8_e4m3fn) and e5m2, fp8 held as uint8 bits.
// Launched by tessera_cp/fp8.py, whose reference runs the same integer algorithm on NumPy or CuPy.
//
// Bit-exact with ml_dtypes: round to nearest even, subnormals kept, signed zero kept, any NaN becomes the canonical
// NaN with the input's sign (e4m3 0x7F, e5m2 0x7E), overflow gives NaN (e4m3, which has no inf) or inf (e5m2).
// With `saturate` (CUDA's SATFINITE), overflow and +-inf give +-max finite and NaN stays NaN.
// Integer code rather than cuda_fp8.h's __nv_cvt_float_to_fp8: that one canonicalizes a NaN input to 0x7FFFFFFF
// before converting, so a negative NaN loses its sign and e5m2 NaN comes out as 0x7F, where ml_dtypes gives 0x7E.
//
// Grid-stride loops with 64-bit indices (n may exceed 2^31). Each thread handles 4 consecutive elements per step with
// one vector load and one vector store when both pointers are aligned for that; otherwise (views with an offset) and
// for the last n % 4 elements, one element at a time. Any grid size is correct.
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

template <typename T, typename F>
__device__ __forceinline__ unsigned char encode_one(typename FloatBits<T>::U u, bool saturate) {
    constexpr int EXP = FloatBits<T>::EXP, MAN = FloatBits<T>::MAN, BIAS = (1 << (EXP - 1)) - 1;
    constexpr int EMIN8 = 1 - F::BIAS;  // exponent of the smallest normal fp8
    const unsigned sign = (unsigned)(u >> (EXP + MAN)) << 7;
    const int e = (int)((u >> MAN) & ((1u << EXP) - 1));
    const int m = (int)(u & ((1u << MAN) - 1));
    if (e == (1 << EXP) - 1)  // inf or NaN
        return (unsigned char)(sign | (m != 0 ? F::QNAN : saturate ? F::MAX : F::OVERFLOW));
    // |x| = M * 2^(ex - MAN). Below the fp8 normal range the fp8 step stays 2^(EMIN8 - F::MAN), so d more bits
    // go; past MAN + 2 bits everything left is under half a step and rounds to zero, so the shift stops there.
    const int M = e > 0 ? (m | (1 << MAN)) : m;
    const int ex = (e > 0 ? e : 1) - BIAS;
    const int d = ex < EMIN8 ? EMIN8 - ex : 0;
    const int shift = min(MAN - F::MAN + d, MAN + 2);
    int q = M >> shift;
    const int rem = M & ((1 << shift) - 1), half = 1 << (shift - 1);
    q += (rem > half || (rem == half && (q & 1))) ? 1 : 0;
    // q still holds the implicit bit, so adding it carries into the exponent field exactly as rounding up should.
    const unsigned code = (unsigned)(((ex - EMIN8 + d) << F::MAN) + q);
    return (unsigned char)(sign | (code > F::MAX ? (saturate ? F::MAX : F::OVERFLOW) : code));
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
    const U* xb = reinterpret_cast<const U*>(x);
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if ((unsigned long long)x % sizeof(Vec4<U>) == 0 && (unsigned long long)y % sizeof(uchar4) == 0) {
        const long long n4 = n / 4;
        for (long long i = tid; i < n4; i += stride) {
            const Vec4<U> a = reinterpret_cast<const Vec4<U>*>(xb)[i];
            reinterpret_cast<uchar4*>(y)[i] = make_uchar4(
                encode_one<T, F>(a.v[0], saturate), encode_one<T, F>(a.v[1], saturate),
                encode_one<T, F>(a.v[2], saturate), encode_one<T, F>(a.v[3], saturate));
        }
        done = n4 * 4;
    }
    for (long long i = done + tid; i < n; i += stride) y[i] = encode_one<T, F>(xb[i], saturate);
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
