// Decode attention over a KV cache read through a block table (paged) or over contiguous caches, launched by
// tessera_cp/nn/kv_cache.py; multi-latent attention (MLA) decode uses the same kernel with keys = values = latent
// rows (tessera_cp/nn/mla.py).
//
// paged_decode<T, DK, DV, MT, BN, NWARPS, STAGES, SHARED_KV, PAGED>: one query token per sequence.
//   grid (n_splits, Hkv * head_groups, B), 32 * NWARPS threads. A block owns R = 16 * MT query heads of one KV head
//   (the query heads of a GQA group, padded with zero rows; a group larger than R is cut into head_groups) and the
//   keys [split * keys_per_split, min(len, (split + 1) * keys_per_split)) of one sequence. Each K/V byte is
//   therefore read once per head group, not once per query head.
//   * Key tiles of BN rows go global -> shared with cp.async, STAGES deep; the row of key j is found through the
//     block table (physical block table[j >> log2_block], position j & (block_size - 1)) when PAGED, else it is
//     row j of sequence b. Rows past the sequence end are zero-filled (so 0 * V stays 0).
//   * Phase A: S = Q K^T on mma.sync m16n8k16 (f32 accumulate); a warp owns a 16 x 16 piece of S over a part of
//     DK (the parts are summed in phase B when warps outnumber pieces). S goes to shared memory.
//   * Phase B: one warp per query row: mask keys past the end, online softmax in log2 units (running max and sum
//     in shared memory), P rounded to T into shared memory with the row's rescale factor.
//   * Phase C: O += P V on mma.sync; warp w owns output columns [w * DV / NWARPS, (w + 1) * DV / NWARPS) of every
//     row, in registers. SHARED_KV: V is the first DV columns of the K tile (MLA latents), nothing more is read.
//   With n_splits == 1 the block writes O / l in T; otherwise an f32 partial (normalised by its own sum) and its
//   natural-log LSE, which paged_decode_combine merges. A sequence of length 0 gives zeros.
// Shared rows are padded by 16 bytes so that the 8 rows an ldmatrix phase reads fall in distinct bank groups.
// Limits (checked by the launcher): DK % 16 == 0, rows of the caches contiguous with 16-byte aligned starts,
// block_size a power of two, q and out contiguous [B, Hq, D]. The kernel traps if given less dynamic shared
// memory than its layout needs (a launcher bug must not become a silent overflow).
//
// paged_decode_combine<T>: one warp per (sequence, head) row; merges the splits that saw keys by log-sum-exp
// (ceil(len / keys_per_split) of them; none gives zeros).
//
// tessera-instantiate: paged_decode<__nv_bfloat16, 128, 128, 1, 64, 4, 2, false, true>; paged_decode<__nv_bfloat16, 128, 128, 1, 64, 4, 2, false, false>
// tessera-instantiate: paged_decode<__nv_bfloat16, 64, 64, 1, 64, 4, 2, false, true>; paged_decode<__nv_bfloat16, 64, 64, 1, 64, 4, 2, false, false>
// tessera-instantiate: paged_decode<__half, 128, 128, 1, 64, 4, 2, false, true>; paged_decode<__half, 128, 128, 1, 64, 4, 2, false, false>
// tessera-instantiate: paged_decode<__half, 64, 64, 1, 64, 4, 2, false, true>; paged_decode<__half, 64, 64, 1, 64, 4, 2, false, false>
// tessera-instantiate: paged_decode<__nv_bfloat16, 576, 512, 2, 32, 8, 3, true, true>; paged_decode<__nv_bfloat16, 576, 512, 2, 32, 8, 3, true, false>
// tessera-instantiate: paged_decode<__half, 576, 512, 2, 32, 8, 3, true, true>; paged_decode<__half, 576, 512, 2, 32, 8, 3, true, false>
// tessera-instantiate: paged_decode_combine<__nv_bfloat16>; paged_decode_combine<__half>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "mma_sm80.cuh"

namespace tessera_paged {

using tessera::cp_async16;
using tessera::cp_async_commit;
using tessera::cp_async_wait;
using tessera::exp2_approx;
using tessera::mma;
using tessera::neg_inf;
using tessera::smem_addr;
using tessera::warp_max;
using tessera::warp_sum;

using tessera::LOG2E;
using tessera::LN2;
constexpr int PAD = 8;              // elements of padding per shared row (16 bytes)
constexpr int SPAD = 4;             // floats of padding per row of S
constexpr int COMBINE_WARPS = 8;
constexpr int COMBINE_BATCH = 8;     // paged_decode_combine: loads of partial outputs in flight per lane
constexpr int MAX_SPLITS = 256;     // the launcher never asks for more


template <typename T> struct Num;
template <> struct Num<__nv_bfloat16> {
    __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
    __device__ __forceinline__ static unsigned two(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned *>(&v);
    }
};
template <> struct Num<__half> {
    __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
    __device__ __forceinline__ static unsigned two(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned *>(&v);
    }
};


// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m; lane l receives, of each matrix,
// (row l/4, columns 2(l%4), 2(l%4)+1), or with .trans (rows 2(l%4), 2(l%4)+1, column l/4).
__device__ __forceinline__ void ldsm_x4(unsigned &r0, unsigned &r1, unsigned &r2, unsigned &r3, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(unsigned &r0, unsigned &r1, unsigned &r2, unsigned &r3, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p))
                 : "memory");
}

// The shared-memory layout of paged_decode, in bytes (the launcher computes the same sum).
template <typename T, int DK, int DV, int MT, int BN, int NWARPS, int STAGES, bool SHARED_KV> struct Layout {
    static constexpr int R = 16 * MT;
    static constexpr int UNITS = MT * (BN / 16);                 // 16 x 16 pieces of S
    static constexpr int KSPLIT = UNITS >= NWARPS ? 1 : NWARPS / UNITS;
    static constexpr int QROW = DK + PAD, KROW = DK + PAD, VROW = SHARED_KV ? KROW : DV + PAD;
    static constexpr int PROW = BN + PAD, SROW = BN + SPAD;
    static constexpr int Q_BYTES = R * QROW * (int)sizeof(T);
    static constexpr int K_BYTES = STAGES * BN * KROW * (int)sizeof(T);
    static constexpr int V_BYTES = SHARED_KV ? 0 : STAGES * BN * VROW * (int)sizeof(T);
    static constexpr int S_BYTES = KSPLIT * R * SROW * 4;
    static constexpr int P_BYTES = R * PROW * (int)sizeof(T);
    static constexpr int STAT_BYTES = 3 * R * 4;
    static constexpr int TOTAL = Q_BYTES + K_BYTES + V_BYTES + S_BYTES + P_BYTES + STAT_BYTES;
};

}  // namespace tessera_paged

template <typename T, int DK, int DV, int MT, int BN, int NWARPS, int STAGES, bool SHARED_KV, bool PAGED>
__global__ void __launch_bounds__(NWARPS * 32)
paged_decode(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
             const int *__restrict__ block_tables, const int *__restrict__ seq_lens, T *__restrict__ out,
             float *__restrict__ o_part, float *__restrict__ lse_part, int Hq, int Hkv, int head_groups,
             long long table_stride, int log2_block, long long k_sb, long long k_sh, long long k_sr, long long v_sb,
             long long v_sh, long long v_sr, float scale_log2, int keys_per_split, int n_splits) {
    using namespace tessera_paged;
    using L = Layout<T, DK, DV, MT, BN, NWARPS, STAGES, SHARED_KV>;
    constexpr int NT = NWARPS * 32;
    constexpr int R = L::R, UNITS = L::UNITS, KSPLIT = L::KSPLIT;
    constexpr int QROW = L::QROW, KROW = L::KROW, VROW = L::VROW, PROW = L::PROW, SROW = L::SROW;
    constexpr int KSTEPS = DK / 16;
    constexpr int WCOLS = DV / NWARPS, NTW = WCOLS / 8;   // output columns and n-tiles per warp
    static_assert(DK % 16 == 0 && BN % 32 == 0, "DK must be a multiple of 16 and BN of 32");
    static_assert(SHARED_KV ? DV <= DK : DV == DK, "separate V needs DV == DK; shared V reads DV <= DK columns");
    static_assert(WCOLS % 16 == 0, "each warp owns whole pairs of 8-column tiles");
    static_assert(UNITS >= NWARPS ? UNITS % NWARPS == 0 : NWARPS % UNITS == 0, "S pieces must share out evenly");
    static_assert(KSTEPS % KSPLIT == 0, "the DK parts of a piece of S must be equal");

    extern __shared__ __align__(16) unsigned char smem[];
    {
        unsigned dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < static_cast<unsigned>(L::TOTAL)) __trap();
    }
    T *Qs = reinterpret_cast<T *>(smem);
    T *Ks = reinterpret_cast<T *>(smem + L::Q_BYTES);
    T *Vs = reinterpret_cast<T *>(smem + L::Q_BYTES + L::K_BYTES);
    float *Ss = reinterpret_cast<float *>(smem + L::Q_BYTES + L::K_BYTES + L::V_BYTES);
    T *Ps = reinterpret_cast<T *>(smem + L::Q_BYTES + L::K_BYTES + L::V_BYTES + L::S_BYTES);
    float *row_m = reinterpret_cast<float *>(smem + L::TOTAL - L::STAT_BYTES);
    float *row_l = row_m + R, *row_a = row_m + 2 * R;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int split = blockIdx.x, b = blockIdx.z;
    const int kvh = blockIdx.y / head_groups, hg = blockIdx.y % head_groups;
    const int G = Hq / Hkv;
    const int head0 = kvh * G + hg * R;
    const int nrows = min(R, G - hg * R);
    const int len = seq_lens[b];
    const int start = split * keys_per_split;
    const int end = min(len, start + keys_per_split);
    const long long row0 = static_cast<long long>(b) * Hq + head0;   // first output row of this block

    if (start >= end) {
        if (n_splits == 1)   // an empty sequence: zeros (the split launch leaves this to the combine)
            for (int i = tid; i < nrows * DV; i += NT) out[row0 * DV + i] = Num<T>::from(0.0f);
        return;
    }
    const int *table = block_tables + static_cast<long long>(b) * table_stride;
    const int block_mask = (1 << log2_block) - 1;

    // Query rows (zero rows past the group) and the first tiles.
    for (int c = tid; c < R * (DK / 8); c += NT) {
        const int r = c / (DK / 8), col = (c % (DK / 8)) * 8;
        const bool valid = r < nrows;
        cp_async16(Qs + r * QROW + col, q + (valid ? (row0 + r) * DK + col : 0), valid);
    }
    auto load_tile = [&](int tile, int stage) {
        const int key0 = start + tile * BN;
        T *ks = Ks + stage * BN * KROW;
        T *vs = Vs + stage * BN * VROW;
        for (int c = tid; c < BN * (DK / 8); c += NT) {
            const int j = c / (DK / 8), col = (c % (DK / 8)) * 8;
            const int key = key0 + j;
            const bool valid = key < end;
            long long rk = 0, rv = 0;
            if (valid) {
                long long phys = b;
                int pos = key;
                if (PAGED) {
                    phys = __ldg(table + (key >> log2_block));
                    pos = key & block_mask;
                }
                rk = phys * k_sb + kvh * k_sh + pos * k_sr;
                rv = phys * v_sb + kvh * v_sh + pos * v_sr;
            }
            cp_async16(ks + j * KROW + col, k + rk + col, valid);
            if (!SHARED_KV) cp_async16(vs + j * VROW + col, v + rv + col, valid);
        }
    };
    const int n_tiles = (end - start + BN - 1) / BN;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_tiles) load_tile(s, s);
        cp_async_commit();
    }
    for (int r = tid; r < R; r += NT) {
        row_m[r] = neg_inf();
        row_l[r] = 0.0f;
        row_a[r] = 1.0f;   // rows past the group keep P = 0 and factor 1: their accumulators stay 0
    }
    for (int i = tid; i < R * PROW; i += NT) Ps[i] = Num<T>::from(0.0f);

    float acc[MT][NTW][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NTW; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.0f;

    for (int tile = 0; tile < n_tiles; ++tile) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();   // tile visible; every warp is done with the stage the next load overwrites
        {
            const int next = tile + STAGES - 1;
            if (next < n_tiles) load_tile(next, next % STAGES);
            cp_async_commit();
        }
        const int stage = tile % STAGES;
        const T *ks = Ks + stage * BN * KROW;
        const T *vs = SHARED_KV ? ks : Vs + stage * BN * VROW;

        // Phase A: S pieces (16 query rows x 16 keys) over a DK part each.
        {
            const int part = KSPLIT > 1 ? warp / UNITS : 0;
            constexpr int PART_STEPS = KSTEPS / KSPLIT;
            for (int u = KSPLIT > 1 ? warp % UNITS : warp; u < UNITS; u += KSPLIT > 1 ? UNITS : NWARPS) {
                const int mt = u / (BN / 16), np = u % (BN / 16);
                float c0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                const T *qa = Qs + (mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * QROW + (lane >> 4) * 8;
                const T *kb = ks + (np * 16 + (lane & 7) + (lane >> 4) * 8) * KROW + ((lane >> 3) & 1) * 8;
#pragma unroll 4
                for (int kk = part * PART_STEPS; kk < (part + 1) * PART_STEPS; ++kk) {
                    unsigned a[4], b0, b1, b2, b3;
                    ldsm_x4(a[0], a[1], a[2], a[3], qa + kk * 16);
                    ldsm_x4(b0, b1, b2, b3, kb + kk * 16);
                    mma<T>(c0, a, b0, b1);
                    mma<T>(c1, a, b2, b3);
                }
                float *s = Ss + (part * R + mt * 16 + g) * SROW + np * 16 + 2 * t4;
                s[0] = c0[0];
                s[1] = c0[1];
                s[8] = c1[0];
                s[9] = c1[1];
                s += 8 * SROW;
                s[0] = c0[2];
                s[1] = c0[3];
                s[8] = c1[2];
                s[9] = c1[3];
            }
        }
        __syncthreads();

        // Phase B: online softmax of each query row over this tile.
        {
            const int valid = min(BN, end - (start + tile * BN));
            for (int r = warp; r < nrows; r += NWARPS) {
                float sc[BN / 32];
                float mx = neg_inf();
#pragma unroll
                for (int i = 0; i < BN / 32; ++i) {
                    const int j = lane + 32 * i;
                    float x = 0.0f;
#pragma unroll
                    for (int p = 0; p < KSPLIT; ++p) x += Ss[(p * R + r) * SROW + j];
                    x = j < valid ? x * scale_log2 : neg_inf();
                    sc[i] = x;
                    mx = fmaxf(mx, x);
                }
                mx = warp_max(mx);
                const float m_old = row_m[r];
                const float m_new = fmaxf(m_old, mx);          // finite: a tile holds at least one key
                const float alpha = exp2_approx(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                float sum = 0.0f;
#pragma unroll
                for (int i = 0; i < BN / 32; ++i) {
                    const float p = exp2_approx(sc[i] - m_new);
                    sum += p;
                    Ps[r * PROW + lane + 32 * i] = Num<T>::from(p);
                }
                sum = warp_sum(sum);
                __syncwarp();          // every lane has read row_m / row_l before lane 0 rewrites them
                if (lane == 0) {
                    row_m[r] = m_new;
                    row_l[r] = row_l[r] * alpha + sum;
                    row_a[r] = alpha;
                }
            }
        }
        __syncthreads();

        // Phase C: rescale this warp's columns, then O += P V.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float lo = row_a[mt * 16 + g], hi = row_a[mt * 16 + g + 8];
#pragma unroll
            for (int j = 0; j < NTW; ++j) {
                acc[mt][j][0] *= lo;
                acc[mt][j][1] *= lo;
                acc[mt][j][2] *= hi;
                acc[mt][j][3] *= hi;
            }
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                        Ps + (mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PROW + kk * 16 + (lane >> 4) * 8);
            const T *vb = vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VROW + warp * WCOLS + (lane >> 4) * 8;
#pragma unroll
            for (int jp = 0; jp < NTW / 2; ++jp) {
                unsigned b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, vb + jp * 16);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma<T>(acc[mt][2 * jp], a[mt], b0, b1);
                    mma<T>(acc[mt][2 * jp + 1], a[mt], b2, b3);
                }
            }
        }
    }
    cp_async_wait<0>();   // only empty groups can be pending; retire them before the block ends

    // Epilogue: row_m / row_l were last written before the last phase-B barrier.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = mt * 16 + g + 8 * half;
            if (r >= nrows) continue;
            const float inv = 1.0f / row_l[r];
#pragma unroll
            for (int j = 0; j < NTW; ++j) {
                const int col = warp * WCOLS + j * 8 + 2 * t4;
                const float x0 = acc[mt][j][2 * half] * inv, x1 = acc[mt][j][2 * half + 1] * inv;
                if (n_splits == 1) {
                    *reinterpret_cast<unsigned *>(out + (row0 + r) * DV + col) = Num<T>::two(x0, x1);
                } else {
                    const long long prow = (static_cast<long long>(split) * gridDim.z + b) * Hq + head0 + r;
                    *reinterpret_cast<float2 *>(o_part + prow * DV + col) = make_float2(x0, x1);
                }
            }
        }
    if (n_splits > 1 && tid < nrows) {
        const long long prow = (static_cast<long long>(split) * gridDim.z + b) * Hq + head0 + tid;
        lse_part[prow] = (row_m[tid] + log2f(row_l[tid])) * LN2;
    }
}

template <typename T>
__global__ void __launch_bounds__(tessera_paged::COMBINE_WARPS * 32)
paged_decode_combine(const float *__restrict__ o_part, const float *__restrict__ lse_part,
                     const int *__restrict__ seq_lens, T *__restrict__ out, int B, int Hq, int DV,
                     int keys_per_split, int n_splits) {
    using namespace tessera_paged;
    __shared__ float weights[COMBINE_WARPS][MAX_SPLITS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long rows = static_cast<long long>(B) * Hq;
    const long long row = static_cast<long long>(blockIdx.x) * COMBINE_WARPS + warp;
    if (row >= rows) return;
    const int len = seq_lens[row / Hq];
    const int used = min(n_splits, (len + keys_per_split - 1) / keys_per_split);
    float mx = neg_inf();
    for (int s = lane; s < used; s += 32) mx = fmaxf(mx, lse_part[s * rows + row]);
    mx = warp_max(mx);
    float total = 0.0f;
    for (int s = lane; s < used; s += 32) {
        const float w = __expf(lse_part[s * rows + row] - mx);
        weights[warp][s] = w;
        total += w;
    }
    total = warp_sum(total);
    __syncwarp();
    const float inv = used > 0 ? 1.0f / total : 0.0f;
    for (int d = lane; d < DV; d += 32) {
        // COMBINE_BATCH splits' loads issued together, then added in split order (one load at a time made a chain
        // of round trips: 4.5 us a launch over 11 splits in the TinyLlama decode step).
        float x = 0.0f;
        for (int s0 = 0; s0 < used; s0 += COMBINE_BATCH) {
            float part[COMBINE_BATCH];
#pragma unroll
            for (int u = 0; u < COMBINE_BATCH; ++u)
                part[u] = s0 + u < used ? o_part[((s0 + u) * rows + row) * DV + d] : 0.0f;
#pragma unroll
            for (int u = 0; u < COMBINE_BATCH; ++u)
                if (s0 + u < used) x += weights[warp][s0 + u] * part[u];
        }
        out[row * DV + d] = Num<T>::from(x * inv);
    }
}
