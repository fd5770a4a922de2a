// Flash attention forward on tensor cores (mma.sync m16n8k16, bf16/f16 in, f32 accumulate), launched by
// tessera_cp/nn/attention.py. The backward kernels (attention_bwd.cu) include this file for its tile helpers.
//
// attn_fwd<T, D, NWARPS, MT, BN, MINB, EXTRA>: one block owns BM = 16 * MT * NWARPS query rows of one head (or,
// with `pack`, of the G query heads that share one KV head: decode packs its few queries of a group into one tile,
// so each K/V byte is read once per group); each warp owns 16 * MT rows. The block walks the key tiles of BN keys:
//   * K and V tiles go global -> shared with cp.async, two stages (tile n+1 loads while tile n is computed);
//   * Q goes through shared memory once into mma A-fragments held in registers, unless they do not fit
//     (MT * D > 128, or MINB * NWARPS > 8 warps per SM, which caps registers at 128): then they are re-read from
//     shared memory at each tile;
//   * S = Q K^T and O += P V run on mma.sync; fragments come from ldmatrix (.trans for V);
//   * the online softmax (running max and sum per row) lives in registers, in log2 units (exp2 of scaled scores);
//   * masks (key tail, bottom-right causal, additive f32 or boolean mask broadcast through strides, ALiBi) are
//     applied to a tile only when it needs them; EXTRA = false compiles no mask/ALiBi code at all.
// Row i sees key j under `causal` when j <= i + Sk - Sq. A row that sees no key gets O = 0 and LSE = +inf (so the
// backward's exp(s - LSE) is 0 there). The natural-log LSE is stored per row for the backward.
// Split-KV (flash-decoding): with n_splits > 1, grid.z = B * n_splits and split s covers key tiles
// [s * tiles_per_split, (s + 1) * tiles_per_split); each writes an f32 partial O (normalised by its own sum) and its
// LSE (-inf when it saw nothing) into o_part / lse_part, and attn_combine merges them by log-sum-exp.
// Shared rows are padded by 16 bytes (row stride D + 8 elements): the 8 rows one ldmatrix phase reads then fall in
// distinct bank groups. Limits: D % 32 == 0; rows of q/k/v contiguous (stride 1 along D) with 16-byte aligned rows.
// MINB is the __launch_bounds__ minimum of blocks per SM (it sets the register budget).
//
// tessera-instantiate: attn_fwd<__nv_bfloat16, 64, 4, 1, 64, 4, false>; attn_fwd<__nv_bfloat16, 64, 4, 1, 64, 4, true>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 128, 8, 1, 32, 2, false>; attn_fwd<__nv_bfloat16, 128, 8, 1, 32, 2, true>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 64, 4, 1, 64, 2, false>; attn_fwd<__nv_bfloat16, 64, 4, 1, 64, 2, true>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 128, 4, 1, 64, 2, false>; attn_fwd<__nv_bfloat16, 128, 4, 1, 64, 2, true>
// tessera-instantiate: attn_fwd<__half, 64, 4, 1, 64, 4, false>; attn_fwd<__half, 64, 4, 1, 64, 4, true>
// tessera-instantiate: attn_fwd<__half, 128, 8, 1, 32, 2, false>; attn_fwd<__half, 128, 8, 1, 32, 2, true>
// tessera-instantiate: attn_fwd<__half, 64, 4, 1, 64, 2, false>; attn_fwd<__half, 64, 4, 1, 64, 2, true>
// tessera-instantiate: attn_fwd<__half, 128, 4, 1, 64, 2, false>; attn_fwd<__half, 128, 4, 1, 64, 2, true>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 32, 4, 1, 64, 2, false>; attn_fwd<__nv_bfloat16, 96, 8, 1, 64, 1, false>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 256, 8, 1, 32, 1, false>; attn_fwd<__nv_bfloat16, 96, 4, 1, 64, 2, false>
// tessera-instantiate: attn_combine<__nv_bfloat16, 64>; attn_combine<__half, 64>
// tessera-instantiate: attn_combine<__nv_bfloat16, 128>; attn_combine<__half, 128>
// tessera-instantiate: attn_combine<__nv_bfloat16, 32>; attn_combine<__nv_bfloat16, 96>; attn_combine<__nv_bfloat16, 256>
#ifndef TESSERA_ATTENTION_CU  // attention_bwd.cu includes this file
#define TESSERA_ATTENTION_CU

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tessera_attn {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// 2^x with the hardware approximation (relative error ~2^-22); 2^-inf = 0.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ---- storage types ------------------------------------------------------------------------------------------
template <typename T> struct Pack;
template <> struct Pack<__nv_bfloat16> {
    __device__ __forceinline__ static unsigned two(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned *>(&v);
    }
};
template <> struct Pack<__half> {
    __device__ __forceinline__ static unsigned two(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned *>(&v);
    }
};
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

// D += A(16x16, row) * B(16x8, col), f32 accumulators.
template <typename T> __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                          unsigned b1);
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                               unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                        unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- shared-memory movement ---------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_addr(const void *p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, bypassing L1; when !valid the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m; lane l receives, of each matrix,
// (row l/4, columns 2(l%4), 2(l%4)+1) -- or with .trans (rows 2(l%4), 2(l%4)+1, column l/4).
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

// ROWS rows of D elements, rows `stride` elements apart, into shared rows of SROW elements; rows >= valid_rows
// are zero-filled (never read). All NTHREADS threads take part.
template <typename T, int ROWS, int D, int SROW, int NTHREADS>
__device__ __forceinline__ void load_rows(T *dst, const T *src, long long stride, int valid_rows) {
    constexpr int CHUNKS = D / 8;  // 16-byte pieces per row
#pragma unroll
    for (int it = 0; it < (ROWS * CHUNKS + NTHREADS - 1) / NTHREADS; ++it) {
        const int c = threadIdx.x + it * NTHREADS;
        if (ROWS * CHUNKS % NTHREADS != 0 && c >= ROWS * CHUNKS) break;
        const int r = c / CHUNKS, ch = c % CHUNKS;
        const bool ok = r < valid_rows;
        cp_async16(dst + r * SROW + ch * 8, src + (ok ? r * stride + ch * 8 : 0), ok);
    }
}

// A-fragment (16x16 row-major, rows `rows`, columns col..col+15) of a shared tile.
template <int SROW, typename T>
__device__ __forceinline__ void load_a(unsigned (&a)[4], const T *tile, int row0, int col, int lane) {
    ldsm_x4(a[0], a[1], a[2], a[3], tile + (row0 + (lane & 15)) * SROW + col + (lane >> 4) * 8);
}
// B-fragments for two k16 steps (columns col..col+31 of the shared rows row0..row0+7): the B operand is the tile
// read as [k = column][n = row] (K for S = Q K^T).
template <int SROW, typename T>
__device__ __forceinline__ void load_b_rows(unsigned &b0, unsigned &b1, unsigned &b2, unsigned &b3, const T *tile,
                                            int row0, int col, int lane) {
    ldsm_x4(b0, b1, b2, b3, tile + (row0 + (lane & 7)) * SROW + col + (lane >> 3) * 8);
}
// B-fragments for one k16 step over rows row0..row0+15 and two n8 column groups col, col+8: the B operand is the
// tile read as [k = row][n = column] (V for O = P V). b0,b1 serve columns col..col+7; b2,b3 col+8..col+15.
template <int SROW, typename T>
__device__ __forceinline__ void load_b_cols(unsigned &b0, unsigned &b1, unsigned &b2, unsigned &b3, const T *tile,
                                            int row0, int col, int lane) {
    ldsm_x4_t(b0, b1, b2, b3, tile + (row0 + (lane & 15)) * SROW + col + (lane >> 4) * 8);
}

// Where a score lands: everything the masks of one row need, computed once per thread and row.
struct RowInfo {
    int i;               // query index within its head (-1: a padding row past the end)
    float slope_log2;    // ALiBi slope * log2(e) of the row's head (0 without ALiBi)
    long long mask_off;  // offset of mask[b, h, i, 0]
};

struct MaskArgs {
    const float *mask_f;          // additive mask (f32), used when kind == 1
    const unsigned char *mask_b;  // boolean mask (1 = attend), used when kind == 2
    const float *slopes;          // ALiBi slopes [B or 1, Hq], used when alibi
    long long sb, sh, si, sj;     // mask strides in elements (0 along broadcast dimensions)
    int slopes_sb;                // 0 when the slopes are shared by the batch, else Hq
    int kind, alibi, causal, diag;  // diag = Sk - Sq
};

__device__ __forceinline__ RowInfo row_info(const MaskArgs &m, int b, int h, int i, bool valid) {
    RowInfo r;
    r.i = valid ? i : -1;
    r.slope_log2 = (valid && m.alibi) ? m.slopes[b * m.slopes_sb + h] * LOG2E : 0.0f;
    r.mask_off = valid ? b * m.sb + h * m.sh + i * m.si : 0;
    return r;
}

// A score x (already scaled, log2 units) of row `r` and key j, with every mask applied. EXTRA = false compiles
// only the key-tail and causal tests (no mask, no ALiBi): fewer registers for the common case.
template <bool EXTRA>
__device__ __forceinline__ float masked_score(float x, const MaskArgs &m, const RowInfo &r, int j, int Sk) {
    if (j >= Sk || r.i < 0) return neg_inf();
    if (m.causal && j > r.i + m.diag) return neg_inf();
    if (!EXTRA) return x;
    if (m.alibi) x -= r.slope_log2 * fabsf(static_cast<float>(r.i + m.diag - j));
    if (m.kind == 1) x += m.mask_f[r.mask_off + j * m.sj] * LOG2E;
    else if (m.kind == 2 && !m.mask_b[r.mask_off + j * m.sj]) x = neg_inf();
    return x;
}

}  // namespace tessera_attn

// ---- the forward kernel ---------------------------------------------------------------------------------------
using namespace tessera_attn;

// MT = m16 row tiles per warp: with MT = 2 each B-fragment of K and V read from shared memory serves two row tiles
// (half the shared-memory traffic per FLOP, two independent MMA chains), at the price of re-reading Q's
// A-fragments from shared memory when they no longer fit in registers (MT * D > 128).
template <typename T, int D, int NWARPS, int MT, int BN, int MINB, bool EXTRA>
__global__ void __launch_bounds__(NWARPS * 32, MINB)
attn_fwd(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ o,
         float *__restrict__ lse, float *__restrict__ o_part, float *__restrict__ lse_part,
         const float *__restrict__ mask_f, const unsigned char *__restrict__ mask_b,
         const float *__restrict__ slopes, int Hq, int Hkv, int Sq, int Sk, long long q_sb, long long q_sh,
         long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb, long long v_sh,
         long long v_ss, long long m_sb, long long m_sh, long long m_si, long long m_sj, int slopes_sb,
         float scale, int causal, int mask_kind, int alibi, int pack, int n_splits, int tiles_per_split) {
    constexpr int WR = 16 * MT;  // rows per warp
    constexpr int BM = WR * NWARPS, NTHREADS = 32 * NWARPS, SROW = D + 8;
    constexpr int KSTEPS = D / 16;             // k16 steps of S = Q K^T
    constexpr int NS = BN / 8;                 // n8 tiles of S per row tile
    constexpr int NO = D / 8;                  // n8 tiles of O per row tile
    // Q's A-fragments stay in registers unless they do not fit (see the header).
    constexpr bool Q_IN_REGS = MT * D <= 128 && NWARPS * MINB <= 8;
    static_assert(D % 32 == 0 && BN % 16 == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BM * SROW;      // two stages of BN x SROW
    T *sV = sK + 2 * BN * SROW;  // two stages of BN x SROW

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int G = Hq / Hkv;
    const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal rows first
    const int split = blockIdx.z % n_splits, b = blockIdx.z / n_splits, B = gridDim.z / n_splits;
    const int hk = pack ? blockIdx.y : blockIdx.y / G;
    const int rows_total = pack ? G * Sq : Sq;
    const int m0 = m_block * BM, w0 = warp * WR;  // first row of the block, and of this warp within it

    MaskArgs ma{mask_f, mask_b, slopes, m_sb, m_sh, m_si, m_sj, slopes_sb, mask_kind, alibi, causal, Sk - Sq};

    // The rows this thread holds in every accumulator fragment: lane / 4 and lane / 4 + 8 of each row tile.
    int row_h[MT][2], row_i[MT][2];
    RowInfo ri[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m0 + w0 + mt * 16 + lane / 4 + 8 * r;
            row_h[mt][r] = pack ? hk * G + row / Sq : blockIdx.y;
            row_i[mt][r] = pack ? row % Sq : row;
            ri[mt][r] = row_info(ma, b, row_h[mt][r], row_i[mt][r], row < rows_total);
        }

    // Key tiles this block visits.
    int n_tiles = (Sk + BN - 1) / BN;
    if (causal) {
        const int last_i = pack ? Sq - 1 : min(m0 + BM, Sq) - 1;
        const int last_key = last_i + Sk - Sq;
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
    }
    const int t_begin = split * tiles_per_split;
    const int t_end = min(n_tiles, t_begin + tiles_per_split);
    const int first_i = pack ? 0 : m0;  // smallest query index among the block's rows

    const T *kg = k + b * k_sb + hk * k_sh;
    const T *vg = v + b * v_sb + hk * v_sh;

    float acc[MT][NO][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < NO; ++t) acc[mt][t][0] = acc[mt][t][1] = acc[mt][t][2] = acc[mt][t][3] = 0.0f;
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) row_max[mt][0] = row_max[mt][1] = neg_inf(), row_sum[mt][0] = row_sum[mt][1] = 0.0f;
    const float scale_log2 = scale * LOG2E;
    const bool warp_has_rows = m0 + w0 < rows_total;

    if (t_begin < t_end) {
        // Q rows (per-row addresses: packed rows span heads), then the first K/V tile.
        constexpr int CH = D / 8;
        for (int c = tid; c < BM * CH; c += NTHREADS) {
            const int r = c / CH, ch = c % CH, row = m0 + r;
            const bool ok = row < rows_total;
            const int h = pack ? hk * G + row / Sq : blockIdx.y, i = pack ? row % Sq : row;
            const T *src = ok ? q + b * q_sb + h * q_sh + i * q_ss + ch * 8 : q;
            cp_async16(sQ + r * SROW + ch * 8, src, ok);
        }
        cp_async_commit();
        {
            const int key0 = t_begin * BN;
            load_rows<T, BN, D, SROW, NTHREADS>(sK, kg + key0 * k_ss, k_ss, Sk - key0);
            load_rows<T, BN, D, SROW, NTHREADS>(sV, vg + key0 * v_ss, v_ss, Sk - key0);
            cp_async_commit();
        }

        unsigned qf[Q_IN_REGS ? MT : 1][Q_IN_REGS ? KSTEPS : 1][4];
        for (int t = t_begin; t < t_end; ++t) {
            const int stage = (t - t_begin) & 1;
            if (t + 1 < t_end) {  // prefetch the next tile into the other stage (freed by the last barrier)
                const int key0 = (t + 1) * BN;
                load_rows<T, BN, D, SROW, NTHREADS>(sK + (stage ^ 1) * BN * SROW, kg + key0 * k_ss, k_ss, Sk - key0);
                load_rows<T, BN, D, SROW, NTHREADS>(sV + (stage ^ 1) * BN * SROW, vg + key0 * v_ss, v_ss, Sk - key0);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const T *tK = sK + stage * BN * SROW, *tV = sV + stage * BN * SROW;
            if (Q_IN_REGS && t == t_begin) {
#pragma unroll
                for (int mt = 0; mt < (Q_IN_REGS ? MT : 1); ++mt)
#pragma unroll
                    for (int s = 0; s < (Q_IN_REGS ? KSTEPS : 1); ++s)
                        load_a<SROW>(qf[mt][s], sQ, w0 + mt * 16, s * 16, lane);
            }
            if (warp_has_rows) {
                // S = Q K^T for this warp's rows and the tile's BN keys; each K fragment serves MT row tiles.
                float s[MT][NS][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KSTEPS; kk += 2) {
                    unsigned a0[MT][4], a1[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        if (Q_IN_REGS) {
#pragma unroll
                            for (int x = 0; x < 4; ++x) {
                                a0[mt][x] = qf[Q_IN_REGS ? mt : 0][Q_IN_REGS ? kk : 0][x];
                                a1[mt][x] = qf[Q_IN_REGS ? mt : 0][Q_IN_REGS ? kk + 1 : 0][x];
                            }
                        } else {
                            load_a<SROW>(a0[mt], sQ, w0 + mt * 16, kk * 16, lane);
                            load_a<SROW>(a1[mt], sQ, w0 + mt * 16, kk * 16 + 16, lane);
                        }
                    }
#pragma unroll
                    for (int n = 0; n < NS; ++n) {
                        unsigned b0, b1, b2, b3;
                        load_b_rows<SROW>(b0, b1, b2, b3, tK, n * 8, kk * 16, lane);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma<T>(s[mt][n], a0[mt], b0, b1);
                            mma<T>(s[mt][n], a1[mt], b2, b3);
                        }
                    }
                }
                // Scale (log2 units) and mask.
                const int key0 = t * BN;
                const bool need_mask = EXTRA || key0 + BN > Sk ||
                                       (causal && key0 + BN - 1 > first_i + Sk - Sq);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NS; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            float x = s[mt][n][e] * scale_log2;
                            if (need_mask)
                                x = masked_score<EXTRA>(x, ma, ri[mt][e >> 1],
                                                        key0 + n * 8 + 2 * (lane % 4) + (e & 1), Sk);
                            s[mt][n][e] = x;
                        }
                // Online softmax: new running max per row (the 4 lanes of a quad share a row).
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        float mx = row_max[mt][r];
#pragma unroll
                        for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                        const float base = mx == neg_inf() ? 0.0f : mx;  // a row that has seen nothing yet
                        const float alpha = exp2_approx(row_max[mt][r] - base);
                        row_max[mt][r] = mx;
                        float sum = 0.0f;
#pragma unroll
                        for (int n = 0; n < NS; ++n) {
                            s[mt][n][2 * r] = exp2_approx(s[mt][n][2 * r] - base);
                            s[mt][n][2 * r + 1] = exp2_approx(s[mt][n][2 * r + 1] - base);
                            sum += s[mt][n][2 * r] + s[mt][n][2 * r + 1];
                        }
                        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
                        for (int d = 0; d < NO; ++d) { acc[mt][d][2 * r] *= alpha; acc[mt][d][2 * r + 1] *= alpha; }
                    }
                // O += P V: the S accumulators of key groups 2kt, 2kt+1 are the A-fragment of key step kt.
#pragma unroll
                for (int kt = 0; kt < BN / 16; ++kt) {
                    unsigned a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        a[mt][0] = Pack<T>::two(s[mt][2 * kt][0], s[mt][2 * kt][1]);
                        a[mt][1] = Pack<T>::two(s[mt][2 * kt][2], s[mt][2 * kt][3]);
                        a[mt][2] = Pack<T>::two(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
                        a[mt][3] = Pack<T>::two(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
                    }
#pragma unroll
                    for (int d = 0; d < NO; d += 2) {
                        unsigned b0, b1, b2, b3;
                        load_b_cols<SROW>(b0, b1, b2, b3, tV, kt * 16, d * 8, lane);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma<T>(acc[mt][d], a[mt], b0, b1);
                            mma<T>(acc[mt][d + 1], a[mt], b2, b3);
                        }
                    }
                }
            }
            __syncthreads();  // every warp is done with this stage before it is refilled
        }
    }

    // Finish: full row sums, then O / sum and the LSE.
    float inv[MT][2], row_lse[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float sum = row_sum[mt][r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const bool seen = sum > 0.0f;
            inv[mt][r] = seen ? 1.0f / sum : 0.0f;
            row_lse[mt][r] = seen ? (row_max[mt][r] + __log2f(sum)) * LN2 : (n_splits > 1 ? neg_inf() : pos_inf());
        }
    if (n_splits > 1) {  // f32 partials, straight from the fragments (decode: few rows)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = m0 + w0 + mt * 16 + lane / 4 + 8 * r;
                if (row >= rows_total) continue;
                const long long base =
                    ((static_cast<long long>(split) * B + b) * Hq + row_h[mt][r]) * Sq + row_i[mt][r];
#pragma unroll
                for (int d = 0; d < NO; ++d) {
                    float2 val = make_float2(acc[mt][d][2 * r] * inv[mt][r], acc[mt][d][2 * r + 1] * inv[mt][r]);
                    *reinterpret_cast<float2 *>(o_part + base * D + d * 8 + 2 * (lane % 4)) = val;
                }
                if (lane % 4 == 0) lse_part[base] = row_lse[mt][r];
            }
        return;
    }
    // Stage this warp's rows of O in its own rows of sQ (no other warp reads them), then 16-byte stores.
    T *sO = sQ + w0 * SROW;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int d = 0; d < NO; ++d) {
                const unsigned packed =
                    Pack<T>::two(acc[mt][d][2 * r] * inv[mt][r], acc[mt][d][2 * r + 1] * inv[mt][r]);
                T *dst = sO + (mt * 16 + lane / 4 + 8 * r) * SROW + d * 8 + 2 * (lane % 4);
                *reinterpret_cast<unsigned *>(dst) = packed;
            }
    __syncwarp();
    constexpr int CH = D / 8;
    for (int c = lane; c < WR * CH; c += 32) {
        const int rr = c / CH, ch = c % CH, row = m0 + w0 + rr;
        if (row >= rows_total) continue;
        const int h = pack ? hk * G + row / Sq : blockIdx.y, i = pack ? row % Sq : row;
        const long long off = ((static_cast<long long>(b) * Hq + h) * Sq + i) * D + ch * 8;
        *reinterpret_cast<uint4 *>(o + off) = *reinterpret_cast<const uint4 *>(sO + rr * SROW + ch * 8);
    }
    if (lane % 4 == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = m0 + w0 + mt * 16 + lane / 4 + 8 * r;
                if (row < rows_total)
                    lse[(static_cast<long long>(b) * Hq + row_h[mt][r]) * Sq + row_i[mt][r]] = row_lse[mt][r];
            }
    }
}

// Merge split-KV partials: O = sum_s w_s O_s / sum_s w_s with w_s = exp(lse_s - max lse); LSE = log-sum-exp.
// One warp per output row (rows = B * Hq * Sq); partials are [n_splits, rows, D] and [n_splits, rows]. The lanes
// take the splits' maximum together; the weighted sum is unrolled so that several splits' loads are in flight.
template <typename T, int D>
__global__ void attn_combine(const float *__restrict__ o_part, const float *__restrict__ lse_part,
                             T *__restrict__ o, float *__restrict__ lse, long long rows, int n_splits) {
    constexpr int PER_LANE = D / 32;
    const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float mx = neg_inf();
    for (int s = lane; s < n_splits; s += 32) mx = fmaxf(mx, lse_part[s * rows + row]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float out[PER_LANE];
#pragma unroll
    for (int x = 0; x < PER_LANE; ++x) out[x] = 0.0f;
    float total = 0.0f;
    if (mx != neg_inf()) {
#pragma unroll 4
        for (int s = 0; s < n_splits; ++s) {
            const float w = __expf(lse_part[s * rows + row] - mx);  // 0 for a split that saw nothing
            total += w;
            const float *src = o_part + (s * rows + row) * D;
#pragma unroll
            for (int x = 0; x < PER_LANE; ++x) out[x] += w * src[lane + 32 * x];
        }
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
    for (int x = 0; x < PER_LANE; ++x) o[row * D + lane + 32 * x] = T(out[x] * inv);
    if (lane == 0) lse[row] = total > 0.0f ? mx + __logf(total) : pos_inf();
}

#endif  // TESSERA_ATTENTION_CU
