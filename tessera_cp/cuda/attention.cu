// Flash attention forward on tensor cores (mma.sync m16n8k16, bf16/f16 in, f32 accumulate), launched by
// tessera_cp/nn/attention.py. The backward kernels (attention_bwd.cu) include this file for its tile helpers.
//
// attn_fwd<T, D, NWARPS, MT, BN, MINB, STAGES, EXTRA>: one block owns BM = 16 * MT * NWARPS query rows of one head
// (or, with `pack`, of the G query heads that share one KV head: decode packs its few queries of a group into one
// tile, so each K/V byte is read once per group); each warp owns 16 * MT rows. The block walks the key tiles of BN
// keys:
//   * K and V tiles go global -> shared with 16-byte cp.async, STAGES deep, one barrier per tile (after it, tile t
//     is visible and the stage of tile t - 1 is free for the prefetch of tile t + STAGES - 1);
//   * Q goes through shared memory once; its mma A-fragments stay in registers when they fit beside the
//     accumulators, else they are re-read from shared memory at each tile (MT = 2 halves the K/V fragment reads
//     per MMA instead);
//   * S = Q K^T and O += P V run on mma.sync; fragments come from ldmatrix (.trans for V) at per-lane shared
//     addresses computed once, plus compile-time offsets;
//   * the online softmax (running max and sum per row) lives in registers, in log2 units. Tiles that no mask
//     touches (every key exists, every row of the block sees it) run a variant with no index arithmetic: the
//     scale is folded into the exponent, exp2(s * scale * log2 e - max), and the rescale of O is skipped when no
//     row's max moved. Only the diagonal and tail tiles (and all tiles with EXTRA) run the masked variant;
//   * masks (key tail, bottom-right causal, additive f32 or boolean mask broadcast through strides, ALiBi);
//     EXTRA = false compiles no mask/ALiBi code at all.
// Row i sees key j under `causal` when j <= i + Sk - Sq. A row that sees no key gets O = 0 and LSE = +inf (so the
// backward's exp(s - LSE) is 0 there). The natural-log LSE is stored per row for the backward.
// grid = (heads * B, row blocks, splits); row blocks run in reverse order (the longest causal rows first).
// Split-KV (flash-decoding): with n_splits > 1, split s covers key tiles [s * tiles_per_split, (s + 1) *
// tiles_per_split); each writes an f32 partial O (normalised by its own sum) and its LSE (-inf when it saw nothing)
// into o_part / lse_part; the split of a row block that finishes last (a ticket in `counters`, one zeroed int per
// row block, which it resets) merges them by log-sum-exp in a fixed order, in the same launch.
// Shared rows are padded by 16 bytes (row stride D + 8 elements): the 8 rows one ldmatrix phase reads then fall in
// distinct bank groups. Limits: D % 32 == 0; rows of q/k/v contiguous (stride 1 along D) with 16-byte aligned rows.
// MINB is the __launch_bounds__ minimum of blocks per SM (it sets the register budget). With masks or ALiBi
// (EXTRA) the Python side picks MT = 1: MT = 2 spills heavily there.
// Dropout (DROP, with EXTRA): after the online-softmax bookkeeping of a tile (the normaliser is that of the undropped
// P, as in FlashAttention) the dropped elements of P are zeroed before P V, and 1 / (1 - p) is folded into the final
// 1 / sum. The mask is a function of (seed, offset, b, h, i, j) only (Philox4x32-10, see Dropout below), so the
// backward kernels regenerate it and the array reference (attention.py's dropout_keep_mask) reproduces it.
// DROP = false compiles none of it (the PTX of those variants is unchanged by it).
//
// tessera-instantiate: attn_fwd<__nv_bfloat16, 128, 4, 2, 32, 2, 2, false>; attn_fwd<__nv_bfloat16, 64, 4, 2, 64, 2, 2, false>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 128, 4, 1, 64, 2, 2, false>; attn_fwd<__nv_bfloat16, 128, 4, 1, 64, 2, 2, true>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 64, 4, 1, 64, 2, 2, false>; attn_fwd<__nv_bfloat16, 64, 4, 1, 64, 2, 2, true>
// tessera-instantiate: attn_fwd<__half, 128, 4, 2, 32, 2, 2, false>; attn_fwd<__half, 64, 4, 2, 64, 2, 2, false>
// tessera-instantiate: attn_fwd<__half, 128, 4, 1, 64, 2, 2, false>; attn_fwd<__half, 128, 4, 1, 64, 2, 2, true>
// tessera-instantiate: attn_fwd<__half, 64, 4, 1, 64, 2, 2, false>; attn_fwd<__half, 64, 4, 1, 64, 2, 2, true>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 32, 4, 1, 64, 2, 2, false>; attn_fwd<__nv_bfloat16, 96, 8, 1, 64, 1, 2, false>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 96, 4, 1, 64, 2, 2, false>; attn_fwd<__nv_bfloat16, 256, 8, 1, 32, 1, 2, false>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 128, 4, 2, 64, 2, 2, false>
// tessera-instantiate: attn_fwd<__nv_bfloat16, 128, 4, 1, 64, 2, 2, true, true>; attn_fwd<__nv_bfloat16, 64, 4, 1, 64, 2, 2, true, true>
// tessera-instantiate: attn_fwd<__half, 128, 4, 1, 64, 2, 2, true, true>; attn_fwd<__half, 64, 4, 1, 64, 2, 2, true, true>
#ifndef TESSERA_ATTENTION_CU  // attention_bwd.cu includes this file
#define TESSERA_ATTENTION_CU

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "mma_sm80.cuh"

namespace tessera_attn {

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

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

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


// ---- shared-memory movement ---------------------------------------------------------------------------------
// The same by shared address: always 16 bytes, or zero-filled when !valid.
__device__ __forceinline__ void cp_async16(unsigned dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m; lane l receives, of each matrix,
// (row l/4, columns 2(l%4), 2(l%4)+1) -- or with .trans (rows 2(l%4), 2(l%4)+1, column l/4). Addresses are in the
// shared space (bytes): kernels keep one base address per lane and add compile-time offsets.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// A bool as a type: a generic lambda called with Flag<true>() or Flag<false>() compiles two variants.
template <bool V> struct Flag { static constexpr bool value = V; };

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

// ---- dropout ------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11): 10 rounds of two 32 x 32 -> 64-bit products, the key bumped by the Weyl
// constants after each round. The same function as attention.py's philox4x32 (checked against Random123's
// known answers on both).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, unsigned k0, unsigned k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned long long p0 = static_cast<unsigned long long>(c.x) * 0xD2511F53u;
        const unsigned long long p1 = static_cast<unsigned long long>(c.z) * 0xCD9E8D57u;
        c = make_uint4(static_cast<unsigned>(p1 >> 32) ^ c.y ^ k0, static_cast<unsigned>(p1),
                       static_cast<unsigned>(p0 >> 32) ^ c.w ^ k1, static_cast<unsigned>(p0));
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c;
}

// Dropout of P (attention.py's dropout_keep_mask is the same rule, written for arrays): element (b, h, i, j) of
// [B, Hq, Sq, Sk] takes 16 bits of the Philox call with key (seed low, seed high) and counter
//   (4 (j / 16) + (j % 8) / 2,  8 (i / 16) + i % 8,  b Hq + h,  offset):
// word 2 ((i / 8) % 2) + (j / 8) % 2, its low half for even j, high half for odd j; kept when those bits >= thr
// (thr = round(p 2^16)). One call covers rows i, i + 8 and keys j, j + 1, j + 8, j + 9: exactly the 8 elements of
// a 16-key step that an mma.sync accumulator thread holds in the forward and dQ kernels (dK/dV's transposed tiles
// use 4 of them). The kept values are scaled by `scale` = 1 / (1 - thr / 2^16): the expectation is preserved.
struct Dropout {
    unsigned k0, k1, offset, thr;
    float scale;
};

__device__ __forceinline__ uint4 drop_bits(const Dropout &d, unsigned key_quad, unsigned row_pair, unsigned head) {
    return philox4x32_10(make_uint4(key_quad, row_pair, head, d.offset), d.k0, d.k1);
}

// Whether the element that takes word `word` (a compile-time constant), half `half` of `w` is kept.
__device__ __forceinline__ bool drop_keep(const uint4 &w, int word, int half, unsigned thr) {
    const unsigned x = word == 0 ? w.x : word == 1 ? w.y : word == 2 ? w.z : w.w;
    return (half ? x >> 16 : x & 0xffffu) >= thr;
}

}  // namespace tessera_attn

// ---- the forward kernel ---------------------------------------------------------------------------------------
using namespace tessera_attn;

// MT = m16 row tiles per warp: with MT = 2 each K/V fragment read from shared memory serves two row tiles (half the
// shared-memory traffic per MMA, two independent MMA chains); Q's A-fragments then come from shared memory at each
// tile unless they fit in registers beside the accumulators (Q_IN_REGS, decided from the register budget).
// DROP (dropout, see Dropout above) needs EXTRA (every tile masked) and no packing; DROP = false compiles none of it.
template <typename T, int D, int NWARPS, int MT, int BN, int MINB, int STAGES, bool EXTRA, bool DROP = false>
__global__ void __launch_bounds__(NWARPS * 32, MINB)
attn_fwd(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ o,
         float *__restrict__ lse, float *__restrict__ o_part, float *__restrict__ lse_part, int *__restrict__ counters,
         const float *__restrict__ mask_f, const unsigned char *__restrict__ mask_b,
         const float *__restrict__ slopes, int Hq, int Hkv, int Sq, int Sk, long long q_sb, long long q_sh,
         long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb, long long v_sh,
         long long v_ss, long long m_sb, long long m_sh, long long m_si, long long m_sj, int slopes_sb,
         float scale, int causal, int mask_kind, int alibi, int pack, int n_splits, int tiles_per_split,
         unsigned drop_k0, unsigned drop_k1, unsigned drop_offset, unsigned drop_thr, float drop_scale) {
    constexpr int WR = 16 * MT;  // rows per warp
    constexpr int BM = WR * NWARPS, NTHREADS = 32 * NWARPS, SROW = D + 8;
    constexpr int RB = SROW * static_cast<int>(sizeof(T));  // bytes per shared row
    constexpr int STAGE = BN * RB;                          // bytes of one K (or V) stage
    constexpr int KSTEPS = D / 16;                          // k16 steps of S = Q K^T
    constexpr int NS = BN / 8;                              // n8 tiles of S per row tile
    constexpr int NO = D / 8;                               // n8 tiles of O per row tile
    constexpr int CH = D / 8;                               // 16-byte pieces per row
    constexpr int REG_CAP = 65536 / (NTHREADS * MINB) > 255 ? 255 : 65536 / (NTHREADS * MINB);
    // Q fragments stay in registers when they fit beside O, S and ~40 registers of addresses and state.
    constexpr bool Q_IN_REGS = MT * D <= 128 && MT * D / 2 + MT * BN / 2 + MT * D / 4 + 40 <= REG_CAP;
    // Every thread copies the same column of RPI rows apart at each step when the tile divides evenly.
    constexpr bool FAST_LOAD = NTHREADS % CH == 0 && (BN * CH) % NTHREADS == 0;
    constexpr int RPI = FAST_LOAD ? NTHREADS / CH : 1, LOAD_IT = FAST_LOAD ? BN / RPI : 1;
    static_assert(D % 32 == 0 && BN % 16 == 0 && STAGES >= 2, "tile shape");
    static_assert(!DROP || EXTRA, "dropout runs in the masked variant");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BM * SROW;           // STAGES stages of BN x SROW
    T *sV = sK + STAGES * BN * SROW;  // STAGES stages of BN x SROW
    const unsigned sQa = smem_addr(sQ), sKa = smem_addr(sK), sVa = smem_addr(sV);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int G = Hq / Hkv, heads = pack ? Hkv : Hq;
    // grid = (heads * B, row blocks, splits): row blocks vary slowest, longest causal rows first.
    const int hx = blockIdx.x % heads, b = blockIdx.x / heads, B = gridDim.x / heads;
    const int m_block = gridDim.y - 1 - blockIdx.y, split = blockIdx.z;
    const int hk = pack ? hx : hx / G;
    const int rows_total = pack ? G * Sq : Sq;
    const int m0 = m_block * BM, w0 = warp * WR;  // first row of the block, and of this warp within it
    const int diag = Sk - Sq;

    MaskArgs ma{mask_f, mask_b, slopes, m_sb, m_sh, m_si, m_sj, slopes_sb, mask_kind, alibi, causal, diag};

    // The rows this thread holds in every accumulator fragment: lane / 4 and lane / 4 + 8 of each row tile.
    // lim = the last key the row may see (-1: a padding row); warp_lim = the largest over the warp's rows.
    // (Head and index of a row are recomputed where needed: registers are scarce in the main loop.)
    auto row_head = [&](int row) { return pack ? hk * G + row / Sq : hx; };
    auto row_index = [&](int row) { return pack ? row % Sq : row; };
    int lim[MT][2];
    RowInfo ri[MT][2];
    int warp_lim = -1;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m0 + w0 + mt * 16 + lane / 4 + 8 * r;
            const bool valid = row < rows_total;
            if constexpr (EXTRA) ri[mt][r] = row_info(ma, b, row_head(row), row_index(row), valid);
            lim[mt][r] = !valid ? -1 : causal ? min(row_index(row) + diag, Sk - 1) : Sk - 1;
            warp_lim = max(warp_lim, lim[mt][r]);
        }
    warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, 4));
    warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, 8));
    warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, 16));

    // Key tiles this block visits; tiles [t_begin, t_plain) need no mask at all (every key exists and every
    // valid row of the block sees it): they run the unmasked variant of the tile code.
    int n_tiles = (Sk + BN - 1) / BN;
    if (causal) {
        const int last_key = (pack ? Sq - 1 : min(m0 + BM, Sq) - 1) + diag;
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
    }
    const int t_begin = split * tiles_per_split;
    const int t_end = min(n_tiles, t_begin + tiles_per_split);
    // (A scale <= 0 takes the masked variant everywhere: the unmasked one takes the max of the raw scores.)
    int t_plain = EXTRA || !(scale > 0.0f) ? t_begin : min(t_end, Sk / BN);
    if (!EXTRA && causal) {
        const int lim0 = (pack ? 0 : m0) + diag;  // the smallest limit among the block's rows
        t_plain = min(t_plain, lim0 + 1 <= 0 ? 0 : (lim0 + 1) / BN);
    }

    const T *kg = k + b * k_sb + hk * k_sh;
    const T *vg = v + b * v_sb + hk * v_sh;

    // K/V tile t into `stage`: 16-byte cp.async, rows past Sk zero-filled (only the last tile checks).
    const int ld_r = tid / CH, ld_c = (tid % CH) * 8;
    const unsigned ld_dst = (ld_r * SROW + ld_c) * sizeof(T);
    auto load_kv = [&](int t, int stage) {
        const int key0 = t * BN;
        if constexpr (FAST_LOAD) {
            const T *ks = kg + (key0 + ld_r) * k_ss + ld_c, *vs = vg + (key0 + ld_r) * v_ss + ld_c;
            const unsigned kd = sKa + stage * STAGE + ld_dst, vd = sVa + stage * STAGE + ld_dst;
            if (key0 + BN <= Sk) {
#pragma unroll
                for (int it = 0; it < LOAD_IT; ++it) {
                    cp_async16(kd + it * RPI * RB, ks + it * RPI * k_ss);
                    cp_async16(vd + it * RPI * RB, vs + it * RPI * v_ss);
                }
            } else {
#pragma unroll
                for (int it = 0; it < LOAD_IT; ++it) {
                    const bool ok = key0 + ld_r + it * RPI < Sk;
                    cp_async16(kd + it * RPI * RB, ok ? ks + it * RPI * k_ss : kg, ok);
                    cp_async16(vd + it * RPI * RB, ok ? vs + it * RPI * v_ss : vg, ok);
                }
            }
        } else {
            load_rows<T, BN, D, SROW, NTHREADS>(sK + stage * BN * SROW, kg + key0 * k_ss, k_ss, Sk - key0);
            load_rows<T, BN, D, SROW, NTHREADS>(sV + stage * BN * SROW, vg + key0 * v_ss, v_ss, Sk - key0);
        }
    };

    // Per-lane ldmatrix addresses (bytes, shared space); fragments add compile-time offsets and the stage.
    const unsigned q_ld = sQa + ((w0 + (lane & 15)) * SROW + (lane >> 4) * 8) * sizeof(T);  // A of Q
    const unsigned k_ld = sKa + ((lane & 7) * SROW + (lane >> 3) * 8) * sizeof(T);          // B of K (rows)
    const unsigned v_ld = sVa + ((lane & 15) * SROW + (lane >> 4) * 8) * sizeof(T);         // B of V (.trans)

    float acc[MT][NO][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < NO; ++t) acc[mt][t][0] = acc[mt][t][1] = acc[mt][t][2] = acc[mt][t][3] = 0.0f;
    float row_max[MT][2], row_sum[MT][2];  // running max in log2 units (scaled, biased), running sum
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) row_max[mt][0] = row_max[mt][1] = neg_inf(), row_sum[mt][0] = row_sum[mt][1] = 0.0f;
    const float scale_log2 = scale * LOG2E;
    unsigned qf[Q_IN_REGS ? MT : 1][Q_IN_REGS ? KSTEPS : 1][4];

    // One key tile: S = Q K^T, (MASKED: bias and masks), online softmax, O += P V. Unmasked tiles fold the scale
    // into the exponent (exp2(s * scale_log2 - max)) and touch no index.
    auto tile = [&](auto masked_flag, int t, int stage) {
        constexpr bool MASKED = decltype(masked_flag)::value;
        const unsigned kb = k_ld + stage * STAGE, vb = v_ld + stage * STAGE;
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
                if constexpr (Q_IN_REGS) {
#pragma unroll
                    for (int x = 0; x < 4; ++x) a0[mt][x] = qf[mt][kk][x], a1[mt][x] = qf[mt][kk + 1][x];
                } else {
                    ldsm_x4(a0[mt], q_ld + mt * 16 * RB + kk * 16 * sizeof(T));
                    ldsm_x4(a1[mt], q_ld + mt * 16 * RB + (kk + 1) * 16 * sizeof(T));
                }
            }
#pragma unroll
            for (int n = 0; n < NS; ++n) {
                unsigned bk[4];
                ldsm_x4(bk, kb + n * 8 * RB + kk * 16 * sizeof(T));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma<T>(s[mt][n], a0[mt], bk[0], bk[1]);
                    mma<T>(s[mt][n], a1[mt], bk[2], bk[3]);
                }
            }
        }
        float c = scale_log2;  // the factor applied inside the exponent
        if constexpr (MASKED) {
            const int j0 = t * BN + 2 * (lane & 3);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NS; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[mt][n][e] * scale_log2;
                        if constexpr (EXTRA) x = masked_score<true>(x, ma, ri[mt][e >> 1], j0 + n * 8 + (e & 1), Sk);
                        else if (j0 + n * 8 + (e & 1) > lim[mt][e >> 1]) x = neg_inf();
                        s[mt][n][e] = x;
                    }
            c = 1.0f;
        }
        // Online softmax: new running max per row (the 4 lanes of a quad share a row).
        float alpha[MT][2];
        bool changed = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float m = neg_inf();  // the largest scaled score is c (> 0) times the largest raw one
#pragma unroll
                for (int n = 0; n < NS; ++n) m = fmaxf(m, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
                const float mx = fmaxf(row_max[mt][r], MASKED ? m : m * c);
                const float base = mx == neg_inf() ? 0.0f : mx;  // a row that has seen nothing yet
                alpha[mt][r] = exp2_approx(row_max[mt][r] - base);
                changed |= alpha[mt][r] != 1.0f;
                row_max[mt][r] = mx;
                const float nb = -base;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < NS; ++n) {
                    s[mt][n][2 * r] = exp2_approx(fmaf(s[mt][n][2 * r], c, nb));
                    s[mt][n][2 * r + 1] = exp2_approx(fmaf(s[mt][n][2 * r + 1], c, nb));
                    sum += s[mt][n][2 * r] + s[mt][n][2 * r + 1];
                }
                row_sum[mt][r] = row_sum[mt][r] * alpha[mt][r] + sum;
            }
        if (__any_sync(0xffffffffu, changed)) {  // once the maxima settle, most tiles skip the rescale
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int d = 0; d < NO; ++d) {
                    acc[mt][d][0] *= alpha[mt][0];
                    acc[mt][d][1] *= alpha[mt][0];
                    acc[mt][d][2] *= alpha[mt][1];
                    acc[mt][d][3] *= alpha[mt][1];
                }
        }
        // Dropout after the bookkeeping (the sums above are of the undropped P, as in FlashAttention): one Philox
        // call per 16-key step and row tile. Unpacked rows (the host never packs with dropout): head = blockIdx.x.
        if constexpr (DROP) {
            const Dropout drop{drop_k0, drop_k1, drop_offset, drop_thr, drop_scale};
            const unsigned quad0 = t * (BN / 4) + (lane & 3), pair0 = (m0 + w0) / 2 + lane / 4;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kt = 0; kt < BN / 16; ++kt) {
                    const uint4 w = drop_bits(drop, quad0 + 4 * kt, pair0 + 8 * mt, blockIdx.x);
#pragma unroll
                    for (int jn = 0; jn < 2; ++jn)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (!drop_keep(w, 2 * (e >> 1) + jn, e & 1, drop.thr)) s[mt][2 * kt + jn][e] = 0.0f;
                }
        }
        // O += P V: the S accumulators of key groups 2kt, 2kt+1 are the A-fragment of key step kt (packed first:
        // half the registers of S).
        unsigned p[MT][BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kt = 0; kt < BN / 16; ++kt) {
                p[mt][kt][0] = Pack<T>::two(s[mt][2 * kt][0], s[mt][2 * kt][1]);
                p[mt][kt][1] = Pack<T>::two(s[mt][2 * kt][2], s[mt][2 * kt][3]);
                p[mt][kt][2] = Pack<T>::two(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
                p[mt][kt][3] = Pack<T>::two(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
            }
#pragma unroll
        for (int kt = 0; kt < BN / 16; ++kt)
#pragma unroll
            for (int d = 0; d < NO; d += 2) {
                unsigned bv[4];
                ldsm_x4_t(bv, vb + kt * 16 * RB + d * 8 * sizeof(T));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma<T>(acc[mt][d], p[mt][kt], bv[0], bv[1]);
                    mma<T>(acc[mt][d + 1], p[mt][kt], bv[2], bv[3]);
                }
            }
    };

    if (t_begin < t_end) {
        // Q rows (per-row addresses: packed rows span heads), then the first K/V tile.
        for (int c = tid; c < BM * CH; c += NTHREADS) {
            const int r = c / CH, ch = c % CH, row = m0 + r;
            const bool ok = row < rows_total;
            const int h = pack ? hk * G + row / Sq : hx, i = pack ? row % Sq : row;
            const T *src = ok ? q + b * q_sb + h * q_sh + i * q_ss + ch * 8 : q;
            cp_async16(sQ + r * SROW + ch * 8, src, ok);
        }
#pragma unroll
        for (int st = 0; st < STAGES - 1; ++st) {  // one commit group per tile, empty past the end
            if (t_begin + st < t_end) load_kv(t_begin + st, st);
            cp_async_commit();
        }
        // One barrier per tile: after it, tile t is visible to all and every warp is done with tile t - 1, whose
        // stage the prefetch of tile t + STAGES - 1 then overwrites while tile t is computed.
        int stage = 0;
        for (int t = t_begin; t < t_end; ++t) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();
            {
                const int next_stage = stage == 0 ? STAGES - 1 : stage - 1;
                if (t + STAGES - 1 < t_end) load_kv(t + STAGES - 1, next_stage);
                cp_async_commit();
            }
            if constexpr (Q_IN_REGS) {
                if (t == t_begin) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int s = 0; s < KSTEPS; ++s)
                            ldsm_x4(qf[mt][s], q_ld + mt * 16 * RB + s * 16 * sizeof(T));
                }
            }
            if (t * BN <= warp_lim) {  // else no row of this warp sees any key of the tile (or the warp has none)
                if (t < t_plain) tile(Flag<false>(), t, stage);
                else tile(Flag<true>(), t, stage);
            }
            stage = stage == STAGES - 1 ? 0 : stage + 1;
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
            inv[mt][r] = seen ? (DROP ? drop_scale : 1.0f) / sum : 0.0f;
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
                    ((static_cast<long long>(split) * B + b) * Hq + row_head(row)) * Sq + row_index(row);
#pragma unroll
                for (int d = 0; d < NO; ++d) {
                    float2 val = make_float2(acc[mt][d][2 * r] * inv[mt][r], acc[mt][d][2 * r + 1] * inv[mt][r]);
                    *reinterpret_cast<float2 *>(o_part + base * D + d * 8 + 2 * (lane % 4)) = val;
                }
                if (lane % 4 == 0) lse_part[base] = row_lse[mt][r];
            }
        // The split of this row block that finishes last merges all of them (no second launch): partials made
        // visible device-wide, then a ticket per row block; the counter goes back to 0 for the next launch.
        __shared__ int last_split;
        __threadfence();
        __syncthreads();
        int *ticket = counters + blockIdx.y * gridDim.x + blockIdx.x;
        if (tid == 0) last_split = atomicAdd(ticket, 1) == n_splits - 1;
        __syncthreads();
        if (!last_split) return;
        __threadfence();
        const long long rows = static_cast<long long>(B) * Hq * Sq;
        constexpr int V4 = D / 4, PER = (V4 + 31) / 32;  // float4 columns of a row, and per lane
        for (int rr = warp; rr < BM; rr += NWARPS) {  // a warp per row, splits in order: deterministic
            const int row = m0 + rr;
            if (row >= rows_total) break;
            const long long at = (static_cast<long long>(b) * Hq + row_head(row)) * Sq + row_index(row);
            float mx = neg_inf();
            for (int sp = lane; sp < n_splits; sp += 32) mx = fmaxf(mx, __ldcg(lse_part + sp * rows + at));
            mx = warp_max(mx);
            float4 out[PER];
#pragma unroll
            for (int p = 0; p < PER; ++p) out[p] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            float total = 0.0f;
            if (mx != neg_inf()) {
                // 32 splits at a time: lane i holds split i's weight (0 when it saw nothing), broadcast by shuffle;
                // each split's partial row is one 16-byte load per lane, many in flight.
                for (int base = 0; base < n_splits; base += 32) {
                    const int count = min(32, n_splits - base);
                    const float my_w =
                        lane < count ? exp2_approx((__ldcg(lse_part + (base + lane) * rows + at) - mx) * LOG2E) : 0.0f;
                    total += my_w;
#pragma unroll 8
                    for (int i = 0; i < count; ++i) {
                        const float w = __shfl_sync(0xffffffffu, my_w, i);
                        const float4 *src = reinterpret_cast<const float4 *>(o_part + ((base + i) * rows + at) * D);
#pragma unroll
                        for (int p = 0; p < PER; ++p) {
                            if (V4 % 32 != 0 && lane + 32 * p >= V4) break;
                            const float4 x = __ldcg(src + lane + 32 * p);
                            out[p].x += w * x.x, out[p].y += w * x.y, out[p].z += w * x.z, out[p].w += w * x.w;
                        }
                    }
                }
                total = warp_sum(total);
            }
            const float scale_out = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
            for (int p = 0; p < PER; ++p) {
                if (V4 % 32 != 0 && lane + 32 * p >= V4) break;
                const uint2 packed = make_uint2(Pack<T>::two(out[p].x * scale_out, out[p].y * scale_out),
                                                Pack<T>::two(out[p].z * scale_out, out[p].w * scale_out));
                *reinterpret_cast<uint2 *>(o + at * D + 4 * (lane + 32 * p)) = packed;
            }
            if (lane == 0) lse[at] = total > 0.0f ? mx + __logf(total) : pos_inf();
        }
        if (tid == 0) *ticket = 0;
        return;
    }
    // Stage this warp's rows of O in its own rows of sQ (no other warp reads them), then 16-byte stores. (The
    // __syncwarp orders the lanes' last ldmatrix reads of those rows before the writes: with one tile there is no
    // barrier in between.)
    __syncwarp();
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
    for (int c = lane; c < WR * CH; c += 32) {
        const int rr = c / CH, ch = c % CH, row = m0 + w0 + rr;
        if (row >= rows_total) continue;
        const int h = row_head(row), i = row_index(row);
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
                    lse[(static_cast<long long>(b) * Hq + row_head(row)) * Sq + row_index(row)] = row_lse[mt][r];
            }
    }
}

#endif  // TESSERA_ATTENTION_CU
