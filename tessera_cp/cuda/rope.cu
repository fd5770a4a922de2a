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
// Tiling: a token (b, s) is served by blockDim.x = lanes * slots threads, blockDim.y tokens per block, grid-stride
// over tokens. A half is read as nv = half / VEC vectors (VEC 8, 4, 2 or 1 divides half, every stride and every
// pointer's alignment: the host's choice, so all accesses are aligned vectors of at most 16 bytes). Thread x owns
// chunk x % lanes (and every lanes-th after it, when nv > lanes) of heads x / lanes, x / lanes + slots, ...: it
// reads the chunk's cos/sin once per token and reuses them for all its heads, and it issues the loads of
// HEADS_PER_STEP heads before its first store, so several 16-byte loads per thread are in flight at once.
// The host checks 0 <= p < positions.
//
// tessera-instantiate: rope_apply<float, 4>; rope_apply<float, 2>; rope_apply<float, 1>
// tessera-instantiate: rope_apply<__half, 8>; rope_apply<__half, 4>; rope_apply<__half, 2>; rope_apply<__half, 1>
// tessera-instantiate: rope_apply<__nv_bfloat16, 8>; rope_apply<__nv_bfloat16, 4>
// tessera-instantiate: rope_apply<__nv_bfloat16, 2>; rope_apply<__nv_bfloat16, 1>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "pack.cuh"

namespace {

constexpr int HEADS_PER_STEP = 2;   // heads whose loads a thread issues together
constexpr int BLOCK_THREADS = 256;  // threads per block (the host's BLOCK_THREADS)
constexpr int MIN_BLOCKS = 4;       // resident blocks per SM the register budget must allow (64 registers)

using tessera::Pack;

}  // namespace

template <typename T, int VEC>
__global__ void __launch_bounds__(BLOCK_THREADS, MIN_BLOCKS)
rope_apply(const T *q, long long q_sb, long long q_ss, long long q_sh,
           T *q_out, long long qo_sb, long long qo_ss, long long qo_sh, int hq,
           const T *k, long long k_sb, long long k_ss, long long k_sh,
           T *k_out, long long ko_sb, long long ko_ss, long long ko_sh, int hk,
           const float *__restrict__ cos_table, const float *__restrict__ sin_table,
           const long long *__restrict__ pos, long long pos_sb, long long pos_ss,
           long long batch, long long seq, int half, int lanes, float sign) {
    using TP = Pack<T, VEC>;
    using FP = Pack<float, VEC>;
    const int nv = half / VEC, heads = hq + hk, slots = blockDim.x / lanes;
    const int lane = threadIdx.x % lanes, slot = threadIdx.x / lanes;
    const long long tokens = batch * seq;
    if (slot >= slots) return;  // blockDim.x is a multiple of lanes (the host's choice): never taken
    for (long long t = (long long)blockIdx.x * blockDim.y + threadIdx.y; t < tokens;
         t += (long long)gridDim.x * blockDim.y) {
        const long long b = t / seq, s = t - b * seq;
        const long long p = pos[b * pos_sb + s * pos_ss];
        const T *qs = q + b * q_sb + s * q_ss, *ks = k + b * k_sb + s * k_ss;
        T *qd = q_out + b * qo_sb + s * qo_ss, *kd = k_out + b * ko_sb + s * ko_ss;
        for (int v = lane; v < nv; v += lanes) {
            FP c, sn;
            for (int h0 = slot; h0 < heads; h0 += HEADS_PER_STEP * slots) {
                TP x1[HEADS_PER_STEP], x2[HEADS_PER_STEP];
#pragma unroll
                for (int u = 0; u < HEADS_PER_STEP; ++u) {
                    const int h = h0 + u * slots;
                    const bool is_q = h < hq;  // selects, not branches: one address computation
                    const T *src = (is_q ? qs : ks) + (is_q ? h : h - hq) * (is_q ? q_sh : k_sh);
                    if (h < heads) {
                        x1[u] = TP::load(src, v);
                        x2[u] = TP::load(src + half, v);
                    }
                }
                if (h0 == slot) {  // first step: this chunk's angles (issued after the first heads' loads)
                    c = FP::load(cos_table + p * half, v);
                    sn = FP::load(sin_table + p * half, v);
                }
#pragma unroll
                for (int u = 0; u < HEADS_PER_STEP; ++u) {
                    const int h = h0 + u * slots;
                    if (h < heads) {
                        float o1[VEC + 1], o2[VEC + 1];  // [VEC]: the unused partner of an odd last element
                        o1[VEC] = o2[VEC] = 0.0f;
#pragma unroll
                        for (int j = 0; j < VEC; ++j) {
                            const float a = x1[u].get(j), bb = x2[u].get(j), sj = sign * sn.get(j);
                            o1[j] = a * c.get(j) - bb * sj;
                            o2[j] = bb * c.get(j) + a * sj;
                        }
                        TP y1, y2;
#pragma unroll
                        for (int j = 0; j < VEC; j += 2) {
                            y1.set(j, o1[j], o1[j + 1]);
                            y2.set(j, o2[j], o2[j + 1]);
                        }
                        const bool is_q = h < hq;
                        T *dst = (is_q ? qd : kd) + (is_q ? h : h - hq) * (is_q ? qo_sh : ko_sh);
                        y1.store(dst, v);
                        y2.store(dst + half, v);
                    }
                }
            }
        }
    }
}
