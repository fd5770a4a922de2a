// Flash attention backward (FlashAttention-2 manner) on tensor cores, launched by tessera_cp/nn/attention.py.
// The probabilities are recomputed from the forward's saved LSE (P = exp(scale * q.k + bias - LSE)); nothing of
// size S x S is stored. Three kernels, none with atomics, so the result is deterministic:
//   attn_bwd_dot:  Dr[row] = sum_d dO[row, d] * O[row, d] (one warp per row);
//   attn_bwd_dq:   one block per BM query rows of a head (the forward's tiling): dQ = scale * dS K with
//                  dS = P * (dO V^T - Dr), K/V tiles double-buffered through shared memory;
//   attn_bwd_dkdv: one block per BNK = 16 * NWARPS keys of a KV head, each warp 16 keys; it walks the query
//                  tiles of every query head of the KV head's group (GQA/MQA: dK, dV summed over the group inside
//                  the block), Q/dO tiles double-buffered: dV += P^T dO, dK += scale * dS^T Q.
// Masks, causal alignment and ALiBi are the forward's (masked_score). Row-major [.., S, D] tiles as in the forward;
// dO, O, dQ, dK, dV contiguous. Limits: D % 32 == 0 and D <= 128 (dK and dV accumulators live in registers).
//
// tessera-instantiate: attn_bwd_dot<__nv_bfloat16, 64>; attn_bwd_dot<__nv_bfloat16, 128>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 64, 4, 64, false>; attn_bwd_dq<__nv_bfloat16, 64, 4, 64, true>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 128, 4, 32, false>; attn_bwd_dq<__nv_bfloat16, 128, 4, 32, true>
// tessera-instantiate: attn_bwd_dkdv<__nv_bfloat16, 64, 4, 64, false>; attn_bwd_dkdv<__nv_bfloat16, 64, 4, 64, true>
// tessera-instantiate: attn_bwd_dkdv<__nv_bfloat16, 128, 4, 32, false>; attn_bwd_dkdv<__nv_bfloat16, 128, 4, 32, true>
// tessera-instantiate: attn_bwd_dot<__half, 64>; attn_bwd_dot<__half, 128>
// tessera-instantiate: attn_bwd_dq<__half, 64, 4, 64, false>; attn_bwd_dq<__half, 64, 4, 64, true>
// tessera-instantiate: attn_bwd_dq<__half, 128, 4, 32, false>; attn_bwd_dq<__half, 128, 4, 32, true>
// tessera-instantiate: attn_bwd_dkdv<__half, 64, 4, 64, false>; attn_bwd_dkdv<__half, 64, 4, 64, true>
// tessera-instantiate: attn_bwd_dkdv<__half, 128, 4, 32, false>; attn_bwd_dkdv<__half, 128, 4, 32, true>
// tessera-instantiate: attn_bwd_dot<__nv_bfloat16, 32>; attn_bwd_dot<__nv_bfloat16, 96>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 32, 4, 64, false>; attn_bwd_dkdv<__nv_bfloat16, 32, 8, 64, false>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 96, 8, 32, false>; attn_bwd_dkdv<__nv_bfloat16, 96, 8, 32, false>
#include "attention.cu"

// Dr = rowsum(dO * O) in f32; rows = B * Hq * Sq, both inputs contiguous [rows, D].
template <typename T, int D>
__global__ void attn_bwd_dot(const T *__restrict__ dout, const T *__restrict__ out, float *__restrict__ dr,
                             long long rows) {
    const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float sum = 0.0f;
#pragma unroll
    for (int x = 0; x < D / 32; ++x)
        sum += to_f32(dout[row * D + lane + 32 * x]) * to_f32(out[row * D + lane + 32 * x]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) dr[row] = sum;
}

// Store a warp's 16 x D f32 fragment tile (scaled) as T through the warp's own 16 shared rows, 16 bytes a lane.
template <typename T, int D, int SROW>
__device__ __forceinline__ void store_warp_tile(T *dst, T *stage, const float (&acc)[D / 8][4], float mul, int row0,
                                                int valid_rows, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int d = 0; d < D / 8; ++d)
            *reinterpret_cast<unsigned *>(stage + (lane / 4 + 8 * r) * SROW + d * 8 + 2 * (lane % 4)) =
                Pack<T>::two(acc[d][2 * r] * mul, acc[d][2 * r + 1] * mul);
    __syncwarp();
    constexpr int CH = D / 8;
    for (int c = lane; c < 16 * CH; c += 32) {
        const int rr = c / CH, ch = c % CH;
        if (row0 + rr < valid_rows)
            *reinterpret_cast<uint4 *>(dst + static_cast<long long>(row0 + rr) * D + ch * 8) =
                *reinterpret_cast<const uint4 *>(stage + rr * SROW + ch * 8);
    }
}

// ---- dQ ---------------------------------------------------------------------------------------------------------
template <typename T, int D, int NWARPS, int BN, bool EXTRA>
__global__ void __launch_bounds__(NWARPS * 32, (NWARPS <= 4 ? 2 : 1))
attn_bwd_dq(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, const T *__restrict__ dout,
            const float *__restrict__ lse, const float *__restrict__ dr, T *__restrict__ dq,
            const float *__restrict__ mask_f, const unsigned char *__restrict__ mask_b,
            const float *__restrict__ slopes, int Hq, int Hkv, int Sq, int Sk, long long q_sb, long long q_sh,
            long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb, long long v_sh,
            long long v_ss, long long m_sb, long long m_sh, long long m_si, long long m_sj, int slopes_sb,
            float scale, int causal, int mask_kind, int alibi) {
    constexpr int BM = 16 * NWARPS, NTHREADS = 32 * NWARPS, SROW = D + 8;
    constexpr int KSTEPS = D / 16, NS = BN / 8, NO = D / 8;
    static_assert(D % 32 == 0 && D <= 128 && BN % 16 == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sdO = sQ + BM * SROW;
    T *sK = sdO + BM * SROW;     // two stages
    T *sV = sK + 2 * BN * SROW;  // two stages

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (Hq / Hkv), m0 = m_block * BM;
    MaskArgs ma{mask_f, mask_b, slopes, m_sb, m_sh, m_si, m_sj, slopes_sb, mask_kind, alibi, causal, Sk - Sq};

    const long long row_base = (static_cast<long long>(b) * Hq + h) * Sq;  // of lse, dr, dout, dq
    RowInfo ri[2];
    float lse2[2], drow[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = m0 + warp * 16 + lane / 4 + 8 * r;
        const bool valid = i < Sq;
        ri[r] = row_info(ma, b, h, i, valid);
        lse2[r] = valid ? lse[row_base + i] * LOG2E : pos_inf();
        drow[r] = valid ? dr[row_base + i] : 0.0f;
    }

    int n_tiles = (Sk + BN - 1) / BN;
    if (causal) {
        const int last_key = min(m0 + BM, Sq) - 1 + Sk - Sq;
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
    }
    const T *kg = k + b * k_sb + hk * k_sh;
    const T *vg = v + b * v_sb + hk * v_sh;

    float acc[NO][4];
#pragma unroll
    for (int t = 0; t < NO; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    const float scale_log2 = scale * LOG2E;
    const bool warp_has_rows = m0 + warp * 16 < Sq;

    if (n_tiles > 0) {
        load_rows<T, BM, D, SROW, NTHREADS>(sQ, q + b * q_sb + h * q_sh + m0 * q_ss, q_ss, Sq - m0);
        load_rows<T, BM, D, SROW, NTHREADS>(sdO, dout + (row_base + m0) * D, D, Sq - m0);
        load_rows<T, BN, D, SROW, NTHREADS>(sK, kg, k_ss, Sk);
        load_rows<T, BN, D, SROW, NTHREADS>(sV, vg, v_ss, Sk);
        cp_async_commit();

        unsigned qf[KSTEPS][4], df[KSTEPS][4];
        for (int t = 0; t < n_tiles; ++t) {
            const int stage = t & 1;
            if (t + 1 < n_tiles) {
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
            if (t == 0) {
#pragma unroll
                for (int s = 0; s < KSTEPS; ++s) {
                    load_a<SROW>(qf[s], sQ, warp * 16, s * 16, lane);
                    load_a<SROW>(df[s], sdO, warp * 16, s * 16, lane);
                }
            }
            if (warp_has_rows) {
                // S = Q K^T and dP = dO V^T, side by side (same B pattern: rows of K and of V).
                float s[NS][4], dp[NS][4];
#pragma unroll
                for (int n = 0; n < NS; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KSTEPS; kk += 2)
#pragma unroll
                    for (int n = 0; n < NS; ++n) {
                        unsigned b0, b1, b2, b3;
                        load_b_rows<SROW>(b0, b1, b2, b3, tK, n * 8, kk * 16, lane);
                        mma<T>(s[n], qf[kk], b0, b1);
                        mma<T>(s[n], qf[kk + 1], b2, b3);
                        load_b_rows<SROW>(b0, b1, b2, b3, tV, n * 8, kk * 16, lane);
                        mma<T>(dp[n], df[kk], b0, b1);
                        mma<T>(dp[n], df[kk + 1], b2, b3);
                    }
                // P = exp2(scaled, masked score - LSE); dS = P * (dP - Dr).
                const int key0 = t * BN;
                const bool need_mask = EXTRA || key0 + BN > Sk || (causal && key0 + BN - 1 > m0 + Sk - Sq);
#pragma unroll
                for (int n = 0; n < NS; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[n][e] * scale_log2;
                        if (need_mask)
                            x = masked_score<EXTRA>(x, ma, ri[e >> 1], key0 + n * 8 + 2 * (lane % 4) + (e & 1), Sk);
                        const float p = exp2_approx(x - lse2[e >> 1]);
                        s[n][e] = p * (dp[n][e] - drow[e >> 1]);
                    }
                // dQ += dS K: dS accumulators are the A-fragments; K is read as [k = key][n = d].
#pragma unroll
                for (int kt = 0; kt < BN / 16; ++kt) {
                    unsigned a[4];
                    a[0] = Pack<T>::two(s[2 * kt][0], s[2 * kt][1]);
                    a[1] = Pack<T>::two(s[2 * kt][2], s[2 * kt][3]);
                    a[2] = Pack<T>::two(s[2 * kt + 1][0], s[2 * kt + 1][1]);
                    a[3] = Pack<T>::two(s[2 * kt + 1][2], s[2 * kt + 1][3]);
#pragma unroll
                    for (int d = 0; d < NO; d += 2) {
                        unsigned b0, b1, b2, b3;
                        load_b_cols<SROW>(b0, b1, b2, b3, tK, kt * 16, d * 8, lane);
                        mma<T>(acc[d], a, b0, b1);
                        mma<T>(acc[d + 1], a, b2, b3);
                    }
                }
            }
            __syncthreads();
        }
    }
    store_warp_tile<T, D, SROW>(dq + (row_base + m0 + warp * 16) * D, sQ + warp * 16 * SROW, acc, scale, 0,
                                Sq - m0 - warp * 16, lane);
}

// ---- dK, dV -----------------------------------------------------------------------------------------------------
template <typename T, int D, int NWARPS, int BMQ, bool EXTRA>
__global__ void __launch_bounds__(NWARPS * 32, (NWARPS <= 4 ? 2 : 1))
attn_bwd_dkdv(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
              const T *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ dr,
              T *__restrict__ dk, T *__restrict__ dv, const float *__restrict__ mask_f,
              const unsigned char *__restrict__ mask_b, const float *__restrict__ slopes, int Hq, int Hkv, int Sq,
              int Sk, long long q_sb, long long q_sh, long long q_ss, long long k_sb, long long k_sh, long long k_ss,
              long long v_sb, long long v_sh, long long v_ss, long long m_sb, long long m_sh, long long m_si,
              long long m_sj, int slopes_sb, float scale, int causal, int mask_kind, int alibi) {
    constexpr int BNK = 16 * NWARPS, NTHREADS = 32 * NWARPS, SROW = D + 8;
    constexpr int KSTEPS = D / 16, NQ = BMQ / 8, NO = D / 8;
    static_assert(D % 32 == 0 && D <= 128 && BMQ % 16 == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sK = reinterpret_cast<T *>(smem_raw);
    T *sV = sK + BNK * SROW;
    T *sQ = sV + BNK * SROW;        // two stages of BMQ x SROW
    T *sdO = sQ + 2 * BMQ * SROW;   // two stages
    float *sL = reinterpret_cast<float *>(sdO + 2 * BMQ * SROW);  // two stages of BMQ: LSE * log2(e)
    float *sD = sL + 2 * BMQ;                                     // two stages of BMQ: Dr

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int hk = blockIdx.y, b = blockIdx.z, G = Hq / Hkv;
    const int n0 = blockIdx.x * BNK;  // first key of the block
    MaskArgs ma{mask_f, mask_b, slopes, m_sb, m_sh, m_si, m_sj, slopes_sb, mask_kind, alibi, causal, Sk - Sq};

    // Query tiles that can see any key of this block: under causal, query i sees key j when i >= j - (Sk - Sq).
    const int q_tiles = (Sq + BMQ - 1) / BMQ;
    const int first_q = causal ? max(0, n0 - (Sk - Sq)) : 0;
    const int qt_begin = first_q < Sq ? first_q / BMQ : q_tiles;
    const int per_head = q_tiles - qt_begin, n_items = G * per_head;

    const int key_r[2] = {n0 + warp * 16 + lane / 4, n0 + warp * 16 + lane / 4 + 8};
    float acc_dk[NO][4], acc_dv[NO][4];
#pragma unroll
    for (int t = 0; t < NO; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[t][e] = acc_dv[t][e] = 0.0f;
    const float scale_log2 = scale * LOG2E;
    const bool warp_has_keys = n0 + warp * 16 < Sk;

    // Item `it` = (query head h, query tile): Q, dO rows, LSE and Dr of that tile into stage `st`.
    auto load_item = [&](int it, int st) {
        const int h = hk * G + it / per_head, m0 = (qt_begin + it % per_head) * BMQ;
        const long long row_base = (static_cast<long long>(b) * Hq + h) * Sq;
        load_rows<T, BMQ, D, SROW, NTHREADS>(sQ + st * BMQ * SROW, q + b * q_sb + h * q_sh + m0 * q_ss, q_ss,
                                             Sq - m0);
        load_rows<T, BMQ, D, SROW, NTHREADS>(sdO + st * BMQ * SROW, dout + (row_base + m0) * D, D, Sq - m0);
        for (int c = tid; c < BMQ; c += NTHREADS) {
            const bool ok = m0 + c < Sq;  // rows past the end: LSE = +inf makes their P zero
            sL[st * BMQ + c] = ok ? lse[row_base + m0 + c] * LOG2E : pos_inf();
            sD[st * BMQ + c] = ok ? dr[row_base + m0 + c] : 0.0f;
        }
    };

    if (n_items > 0) {
        load_rows<T, BNK, D, SROW, NTHREADS>(sK, k + b * k_sb + hk * k_sh + n0 * k_ss, k_ss, Sk - n0);
        load_rows<T, BNK, D, SROW, NTHREADS>(sV, v + b * v_sb + hk * v_sh + n0 * v_ss, v_ss, Sk - n0);
        load_item(0, 0);
        cp_async_commit();
        for (int it = 0; it < n_items; ++it) {
            const int stage = it & 1;
            if (it + 1 < n_items) {
                load_item(it + 1, stage ^ 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const int h = hk * G + it / per_head, m0 = (qt_begin + it % per_head) * BMQ;
            const T *tQ = sQ + stage * BMQ * SROW, *tdO = sdO + stage * BMQ * SROW;
            const float *tL = sL + stage * BMQ, *tD = sD + stage * BMQ;
            if (warp_has_keys) {
                // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and the tile's BMQ queries.
                float s[NQ][4], dp[NQ][4];
#pragma unroll
                for (int n = 0; n < NQ; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KSTEPS; kk += 2) {
                    unsigned ka0[4], ka1[4], va0[4], va1[4];
                    load_a<SROW>(ka0, sK, warp * 16, kk * 16, lane);
                    load_a<SROW>(ka1, sK, warp * 16, kk * 16 + 16, lane);
                    load_a<SROW>(va0, sV, warp * 16, kk * 16, lane);
                    load_a<SROW>(va1, sV, warp * 16, kk * 16 + 16, lane);
#pragma unroll
                    for (int n = 0; n < NQ; ++n) {
                        unsigned b0, b1, b2, b3;
                        load_b_rows<SROW>(b0, b1, b2, b3, tQ, n * 8, kk * 16, lane);
                        mma<T>(s[n], ka0, b0, b1);
                        mma<T>(s[n], ka1, b2, b3);
                        load_b_rows<SROW>(b0, b1, b2, b3, tdO, n * 8, kk * 16, lane);
                        mma<T>(dp[n], va0, b0, b1);
                        mma<T>(dp[n], va1, b2, b3);
                    }
                }
                // Element (key_r[e >> 1], query m0 + 8n + 2(lane % 4) + (e & 1)): P^T and dS^T.
                const bool need_mask = EXTRA || n0 + BNK > Sk || (causal && n0 + BNK - 1 > m0 + Sk - Sq);
#pragma unroll
                for (int n = 0; n < NQ; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int c = n * 8 + 2 * (lane % 4) + (e & 1);
                        float x = s[n][e] * scale_log2;
                        if (need_mask) {
                            const int i = m0 + c;
                            const RowInfo r = row_info(ma, b, h, i, i < Sq);
                            x = masked_score<EXTRA>(x, ma, r, key_r[e >> 1], Sk);
                        }
                        const float p = exp2_approx(x - tL[c]);
                        s[n][e] = p;
                        dp[n][e] = p * (dp[n][e] - tD[c]);
                    }
                // dV += P^T dO and dK += dS^T Q: accumulators as A-fragments, dO and Q read as [k = query][n = d].
#pragma unroll
                for (int kt = 0; kt < BMQ / 16; ++kt) {
                    unsigned pa[4], da[4];
                    pa[0] = Pack<T>::two(s[2 * kt][0], s[2 * kt][1]);
                    pa[1] = Pack<T>::two(s[2 * kt][2], s[2 * kt][3]);
                    pa[2] = Pack<T>::two(s[2 * kt + 1][0], s[2 * kt + 1][1]);
                    pa[3] = Pack<T>::two(s[2 * kt + 1][2], s[2 * kt + 1][3]);
                    da[0] = Pack<T>::two(dp[2 * kt][0], dp[2 * kt][1]);
                    da[1] = Pack<T>::two(dp[2 * kt][2], dp[2 * kt][3]);
                    da[2] = Pack<T>::two(dp[2 * kt + 1][0], dp[2 * kt + 1][1]);
                    da[3] = Pack<T>::two(dp[2 * kt + 1][2], dp[2 * kt + 1][3]);
#pragma unroll
                    for (int d = 0; d < NO; d += 2) {
                        unsigned b0, b1, b2, b3;
                        load_b_cols<SROW>(b0, b1, b2, b3, tdO, kt * 16, d * 8, lane);
                        mma<T>(acc_dv[d], pa, b0, b1);
                        mma<T>(acc_dv[d + 1], pa, b2, b3);
                        load_b_cols<SROW>(b0, b1, b2, b3, tQ, kt * 16, d * 8, lane);
                        mma<T>(acc_dk[d], da, b0, b1);
                        mma<T>(acc_dk[d + 1], da, b2, b3);
                    }
                }
            }
            __syncthreads();
        }
    }
    const long long kv_base = (static_cast<long long>(b) * Hkv + hk) * Sk + n0 + warp * 16;
    const int valid = Sk - n0 - warp * 16;
    store_warp_tile<T, D, SROW>(dk + kv_base * D, sK + warp * 16 * SROW, acc_dk, scale, 0, valid, lane);
    store_warp_tile<T, D, SROW>(dv + kv_base * D, sV + warp * 16 * SROW, acc_dv, 1.0f, 0, valid, lane);
}
