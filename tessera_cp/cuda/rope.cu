// Rotary position embedding in the half-split layout (Hugging Face Llama's rotate_half): for each head vector
// x = [x1 | x2] of D = 2 * half elements and position p,
//     out1 = x1 * cos[p] - sign * x2 * sin[p],   out2 = x2 * cos[p] + sign * x1 * sin[p]
// with cos/sin f32 tables [positions, half]. sign = +1 rotates; sign = -1 applies the transpose (the inverse
// rotation when the tables hold plain cos/sin), which is the backward.
// q and k are rotated in one launch: "heads" 0 .. hq-1 are q's, hq .. hq+hk-1 are k's (hk = 0: q only).
// Each tensor is addressed by element strides of its batch, sequence and head dimensions (the last dimension
// is contiguous), so [B, S, H, D] and [B, H, S, D] layouts and strided views all work, and the output may be the
// input (in place: each thread reads its pair of vectors before writing them, and no other thread touches them).
// Positions are int64, addressed by (batch, sequence) strides (a stride of 0 broadcasts one row of positions).
//
// Tiling: one token (b, s) per blockDim.x threads, blockDim.y tokens per block, grid-stride over tokens; thread x
// walks the token's (hq + hk) * half / VEC vector pairs. VEC (8, 4, 2 or 1) divides half, every stride and every
// pointer's alignment (host's choice), so all accesses are aligned vectors. The host checks 0 <= p < positions.
//
// tessera-instantiate: rope_apply<float, 4>; rope_apply<float, 2>; rope_apply<float, 1>
// tessera-instantiate: rope_apply<__half, 8>; rope_apply<__half, 4>; rope_apply<__half, 2>; rope_apply<__half, 1>
// tessera-instantiate: rope_apply<__nv_bfloat16, 8>; rope_apply<__nv_bfloat16, 4>; rope_apply<__nv_bfloat16, 2>; rope_apply<__nv_bfloat16, 1>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace

template <typename T, int VEC>
__global__ void rope_apply(const T *q, long long q_sb, long long q_ss, long long q_sh,
                           T *q_out, long long qo_sb, long long qo_ss, long long qo_sh, int hq,
                           const T *k, long long k_sb, long long k_ss, long long k_sh,
                           T *k_out, long long ko_sb, long long ko_ss, long long ko_sh, int hk,
                           const float *__restrict__ cos_table, const float *__restrict__ sin_table,
                           const long long *__restrict__ pos, long long pos_sb, long long pos_ss,
                           long long batch, long long seq, int half, float sign) {
    using TV = Vec<T, VEC>;
    using FV = Vec<float, VEC>;
    const int nv = half / VEC, items = (hq + hk) * nv;
    const long long tokens = batch * seq;
    for (long long t = (long long)blockIdx.x * blockDim.y + threadIdx.y; t < tokens;
         t += (long long)gridDim.x * blockDim.y) {
        const long long b = t / seq, s = t - b * seq;
        const long long p = pos[b * pos_sb + s * pos_ss];
        const FV *cr = reinterpret_cast<const FV *>(cos_table + p * half);
        const FV *sr = reinterpret_cast<const FV *>(sin_table + p * half);
        for (int i = threadIdx.x; i < items; i += blockDim.x) {
            const int head = i / nv, v = i - head * nv;
            const bool is_q = head < hq;
            const int h = is_q ? head : head - hq;
            const T *src = is_q ? q + b * q_sb + s * q_ss + h * q_sh : k + b * k_sb + s * k_ss + h * k_sh;
            T *dst = is_q ? q_out + b * qo_sb + s * qo_ss + h * qo_sh : k_out + b * ko_sb + s * ko_ss + h * ko_sh;
            const TV x1 = reinterpret_cast<const TV *>(src)[v];
            const TV x2 = reinterpret_cast<const TV *>(src + half)[v];
            const FV c = cr[v], sn = sr[v];
            TV o1, o2;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float a = to_float(x1.v[j]), bb = to_float(x2.v[j]), sj = sign * sn.v[j];
                o1.v[j] = from_float<T>(a * c.v[j] - bb * sj);
                o2.v[j] = from_float<T>(bb * c.v[j] + a * sj);
            }
            reinterpret_cast<TV *>(dst)[v] = o1;
            reinterpret_cast<TV *>(dst + half)[v] = o2;
        }
    }
}
