// Flash attention backward (FlashAttention-2 manner) on tensor cores, launched by tessera_cp/nn/attention.py.
// The probabilities are recomputed from the forward's saved LSE (P = exp(scale * q.k + bias - LSE)); nothing of
// size S x S is stored. Three kernels, none with atomics, so the result is deterministic:
//   attn_bwd_dot:  per row, stats = (LSE * log2(e), Dr = sum_d dO * O) as one float2 (16-byte loads, 8 lanes a
//                  row for D = 64);
//   attn_bwd_dq:   one block per BM = 16 * MT * NWARPS query rows of a head (the forward's tiling): dQ = scale *
//                  dS K with dS = P * (dO V^T - Dr), K/V tiles double-buffered through shared memory;
//   attn_bwd_dkdv: one block per BNK = 16 * NWARPS keys of a KV head, each warp 16 keys; it walks the query
//                  tiles of every query head of the KV head's group (GQA/MQA: dK, dV summed over the group inside
//                  the block), Q/dO/stats tiles double-buffered with cp.async: dV += P^T dO, dK += scale * dS^T Q;
//                  its warps keep their K/V fragments in registers when they fit (KV_IN_REGS).
// As in the forward, tiles that no mask touches run a variant with no index arithmetic (exp2 with the scale folded
// in); masks, causal alignment and ALiBi are the forward's (masked_score) on the others. dkdv needs no masking
// for padding rows: padding queries have zero Q and dO rows and zero stats (P = 1, dP = Dr = 0: no contribution),
// padding keys only touch their own accumulators, which are never stored. Dropout (DROP, with EXTRA) regenerates
// the forward's mask from the seed (attention.cu's Dropout): dP of a dropped element is 0, of a kept one
// dP / (1 - p); dV sums the dropped P (scaled when stored); Dr = rowsum(dO * O) is unchanged, since O is made of
// the dropped P. DROP = false compiles none of it. Per-lane shared addresses are computed
// once (ldmatrix with immediate offsets). Row-major [.., S, D] tiles as in the forward; dO, O, dQ, dK, dV
// contiguous. Limits: D % 32 == 0 and D <= 128 (dK and dV accumulators live in registers).
//
// tessera-instantiate: attn_bwd_dot<__nv_bfloat16, 64>; attn_bwd_dot<__nv_bfloat16, 128>
// tessera-instantiate: attn_bwd_dot<__half, 64>; attn_bwd_dot<__half, 128>
// tessera-instantiate: attn_bwd_dot<__nv_bfloat16, 32>; attn_bwd_dot<__nv_bfloat16, 96>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 64, 4, 2, 32, false>; attn_bwd_dq<__nv_bfloat16, 64, 4, 2, 32, true>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 128, 4, 2, 32, false>; attn_bwd_dq<__nv_bfloat16, 128, 4, 2, 32, true>
// tessera-instantiate: attn_bwd_dq<__half, 64, 4, 2, 32, false>; attn_bwd_dq<__half, 64, 4, 2, 32, true>
// tessera-instantiate: attn_bwd_dq<__half, 128, 4, 2, 32, false>; attn_bwd_dq<__half, 128, 4, 2, 32, true>
// tessera-instantiate: attn_bwd_dkdv<__nv_bfloat16, 64, 4, 64, false>; attn_bwd_dkdv<__nv_bfloat16, 64, 4, 64, true>
// tessera-instantiate: attn_bwd_dkdv<__nv_bfloat16, 128, 4, 32, false>; attn_bwd_dkdv<__nv_bfloat16, 128, 4, 32, true>
// tessera-instantiate: attn_bwd_dkdv<__half, 64, 4, 64, false>; attn_bwd_dkdv<__half, 64, 4, 64, true>
// tessera-instantiate: attn_bwd_dkdv<__half, 128, 4, 32, false>; attn_bwd_dkdv<__half, 128, 4, 32, true>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 32, 4, 1, 64, false>; attn_bwd_dkdv<__nv_bfloat16, 32, 8, 32, false>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 96, 8, 1, 32, false>; attn_bwd_dkdv<__nv_bfloat16, 96, 8, 32, false>
// tessera-instantiate: attn_bwd_dq<__nv_bfloat16, 64, 4, 1, 64, true, true>; attn_bwd_dq<__nv_bfloat16, 128, 4, 1, 32, true, true>
// tessera-instantiate: attn_bwd_dq<__half, 64, 4, 1, 64, true, true>; attn_bwd_dq<__half, 128, 4, 1, 32, true, true>
// tessera-instantiate: attn_bwd_dkdv<__nv_bfloat16, 64, 4, 32, true, true>; attn_bwd_dkdv<__nv_bfloat16, 128, 4, 16, true, true>
// tessera-instantiate: attn_bwd_dkdv<__half, 64, 4, 32, true, true>; attn_bwd_dkdv<__half, 128, 4, 16, true, true>
#include "attention.cu"

// stats[row] = (LSE * log2(e), sum_d dO[row, d] * O[row, d]); rows = B * Hq * Sq, dO and O contiguous [rows, D].
// D / 8 lanes per row, 16 bytes each.
template <typename T, int D>
__global__ void attn_bwd_dot(const T *__restrict__ dout, const T *__restrict__ out, const float *__restrict__ lse,
                             float2 *__restrict__ stats, long long rows) {
    constexpr int LPR = D / 8;  // lanes per row (4, 8, 12 or 16); 32 / LPR rows per warp, rounded down
    constexpr int RPW = 32 / LPR;
    const int lane = threadIdx.x % 32, sub = lane / LPR, part = lane % LPR;
    const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x / 32 + threadIdx.x / 32) * RPW + sub;
    float sum = 0.0f;
    if (sub < RPW && row < rows) {
        const uint4 a = *reinterpret_cast<const uint4 *>(dout + row * D + part * 8);
        const uint4 c = *reinterpret_cast<const uint4 *>(out + row * D + part * 8);
        const T *x = reinterpret_cast<const T *>(&a), *y = reinterpret_cast<const T *>(&c);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += to_f32(x[e]) * to_f32(y[e]);
    }
    // Sum over the LPR lanes of a row (LPR = 12 is no power of two: gather the group's values one by one).
    if constexpr ((LPR & (LPR - 1)) == 0) {
#pragma unroll
        for (int off = LPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    } else {
        float total = 0.0f;
#pragma unroll
        for (int e = 0; e < LPR; ++e) {
            const int src = sub * LPR + e;
            total += __shfl_sync(0xffffffffu, sum, src < 32 ? src : 0);
        }
        sum = total;
    }
    if (sub < RPW && part == 0 && row < rows) stats[row] = make_float2(lse[row] * LOG2E, sum);
}

// Store a warp's rows (MT row tiles) of f32 fragments (scaled) as T through the warp's own shared rows, 16 bytes a
// lane; rows >= valid_rows are skipped. The first __syncwarp orders the lanes' last ldmatrix reads of those rows
// before the writes.
template <typename T, int D, int SROW, int MT>
__device__ __forceinline__ void store_warp_rows(T *dst, T *stage, const float (&acc)[MT][D / 8][4], float mul,
                                                int valid_rows, int lane) {
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int d = 0; d < D / 8; ++d)
                *reinterpret_cast<unsigned *>(stage + (mt * 16 + lane / 4 + 8 * r) * SROW + d * 8 + 2 * (lane % 4)) =
                    Pack<T>::two(acc[mt][d][2 * r] * mul, acc[mt][d][2 * r + 1] * mul);
    __syncwarp();
    constexpr int CH = D / 8;
    for (int c = lane; c < 16 * MT * CH; c += 32) {
        const int rr = c / CH, ch = c % CH;
        if (rr < valid_rows)
            *reinterpret_cast<uint4 *>(dst + static_cast<long long>(rr) * D + ch * 8) =
                *reinterpret_cast<const uint4 *>(stage + rr * SROW + ch * 8);
    }
}

// ---- dQ ---------------------------------------------------------------------------------------------------------
template <typename T, int D, int NWARPS, int MT, int BN, bool EXTRA, bool DROP = false>
__global__ void __launch_bounds__(NWARPS * 32, (NWARPS <= 4 ? 2 : 1))
attn_bwd_dq(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, const T *__restrict__ dout,
            const float2 *__restrict__ stats, T *__restrict__ dq, const float *__restrict__ mask_f,
            const unsigned char *__restrict__ mask_b, const float *__restrict__ slopes, int Hq, int Hkv, int Sq,
            int Sk, long long q_sb, long long q_sh, long long q_ss, long long k_sb, long long k_sh, long long k_ss,
            long long v_sb, long long v_sh, long long v_ss, long long m_sb, long long m_sh, long long m_si,
            long long m_sj, int slopes_sb, float scale, int causal, int mask_kind, int alibi, unsigned drop_k0,
            unsigned drop_k1, unsigned drop_offset, unsigned drop_thr, float drop_scale) {
    constexpr int MINB = NWARPS <= 4 ? 2 : 1;
    constexpr int WR = 16 * MT, BM = WR * NWARPS, NTHREADS = 32 * NWARPS, SROW = D + 8;
    constexpr int RB = SROW * static_cast<int>(sizeof(T)), STAGE = BN * RB;
    constexpr int KSTEPS = D / 16, NS = BN / 8, NO = D / 8, CH = D / 8;
    constexpr int REG_CAP = 65536 / (NTHREADS * MINB) > 255 ? 255 : 65536 / (NTHREADS * MINB);
    // Q and dO fragments in registers when they fit beside dQ, S, dP and ~40 others.
    constexpr bool QD_IN_REGS = MT * D <= 128 && MT * D / 2 + MT * D / 2 + MT * BN + 40 <= REG_CAP;
    constexpr bool FAST_LOAD = NTHREADS % CH == 0 && (BN * CH) % NTHREADS == 0;
    constexpr int RPI = FAST_LOAD ? NTHREADS / CH : 1, LOAD_IT = FAST_LOAD ? BN / RPI : 1;
    static_assert(D % 32 == 0 && D <= 128 && BN % 16 == 0, "tile shape");
    static_assert(!DROP || EXTRA, "dropout runs in the masked variant");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sdO = sQ + BM * SROW;
    T *sK = sdO + BM * SROW;     // two stages
    T *sV = sK + 2 * BN * SROW;  // two stages
    const unsigned sQa = smem_addr(sQ), sdOa = smem_addr(sdO), sKa = smem_addr(sK), sVa = smem_addr(sV);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int h = blockIdx.x % Hq, b = blockIdx.x / Hq;
    const int m_block = gridDim.y - 1 - blockIdx.y;  // longest causal rows first
    const int hk = h / (Hq / Hkv), m0 = m_block * BM, w0 = warp * WR, diag = Sk - Sq;
    MaskArgs ma{mask_f, mask_b, slopes, m_sb, m_sh, m_si, m_sj, slopes_sb, mask_kind, alibi, causal, diag};

    const long long row_base = (static_cast<long long>(b) * Hq + h) * Sq;  // of stats, dout, dq
    RowInfo ri[MT][2];
    float lse2[MT][2], drow[MT][2];
    int lim[MT][2], warp_lim = -1;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = m0 + w0 + mt * 16 + lane / 4 + 8 * r;
            const bool valid = i < Sq;
            if constexpr (EXTRA) ri[mt][r] = row_info(ma, b, h, i, valid);
            const float2 st = valid ? stats[row_base + i] : make_float2(pos_inf(), 0.0f);
            lse2[mt][r] = st.x;
            drow[mt][r] = st.y;
            lim[mt][r] = !valid ? -1 : causal ? min(i + diag, Sk - 1) : Sk - 1;
            warp_lim = max(warp_lim, lim[mt][r]);
        }
    warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, 4));
    warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, 8));
    warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, 16));

    int n_tiles = (Sk + BN - 1) / BN;
    if (causal) {
        const int last_key = min(m0 + BM, Sq) - 1 + diag;
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
    }
    // Tiles [0, t_plain) need no mask (all keys exist, every valid row sees them). Padding keys must be masked
    // here: P = exp2(-LSE) of a zero score could overflow.
    int t_plain = EXTRA ? 0 : min(n_tiles, Sk / BN);
    if (!EXTRA && causal) t_plain = min(t_plain, m0 + diag + 1 <= 0 ? 0 : (m0 + diag + 1) / BN);

    const T *kg = k + b * k_sb + hk * k_sh;
    const T *vg = v + b * v_sb + hk * v_sh;
    const int ld_r = tid / CH, ld_c = (tid % CH) * 8;
    const unsigned ld_dst = (ld_r * SROW + ld_c) * sizeof(T);
    auto load_kv = [&](int t, int stage) {
        const int key0 = t * BN;
        if constexpr (FAST_LOAD) {
            const T *ks = kg + (key0 + ld_r) * k_ss + ld_c, *vs = vg + (key0 + ld_r) * v_ss + ld_c;
            const unsigned kd = sKa + stage * STAGE + ld_dst, vd = sVa + stage * STAGE + ld_dst;
#pragma unroll
            for (int it = 0; it < LOAD_IT; ++it) {
                const bool ok = key0 + BN <= Sk || key0 + ld_r + it * RPI < Sk;
                cp_async16(kd + it * RPI * RB, ok ? ks + it * RPI * k_ss : kg, ok);
                cp_async16(vd + it * RPI * RB, ok ? vs + it * RPI * v_ss : vg, ok);
            }
        } else {
            load_rows<T, BN, D, SROW, NTHREADS>(sK + stage * BN * SROW, kg + key0 * k_ss, k_ss, Sk - key0);
            load_rows<T, BN, D, SROW, NTHREADS>(sV + stage * BN * SROW, vg + key0 * v_ss, v_ss, Sk - key0);
        }
    };

    const unsigned a_off = ((w0 + (lane & 15)) * SROW + (lane >> 4) * 8) * sizeof(T);  // A of Q, dO
    const unsigned br_off = ((lane & 7) * SROW + (lane >> 3) * 8) * sizeof(T);         // B of K, V (rows)
    const unsigned bc_off = ((lane & 15) * SROW + (lane >> 4) * 8) * sizeof(T);        // B of K (.trans)

    float acc[MT][NO][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < NO; ++t) acc[mt][t][0] = acc[mt][t][1] = acc[mt][t][2] = acc[mt][t][3] = 0.0f;
    const float scale_log2 = scale * LOG2E;
    unsigned qf[QD_IN_REGS ? MT : 1][QD_IN_REGS ? KSTEPS : 1][4], df[QD_IN_REGS ? MT : 1][QD_IN_REGS ? KSTEPS : 1][4];

    auto tile = [&](auto masked_flag, int t, int stage) {
        constexpr bool MASKED = decltype(masked_flag)::value;
        const unsigned kb = sKa + stage * STAGE, vb = sVa + stage * STAGE;
        // S = Q K^T, then dP = dO V^T (one operand set live at a time).
        float s[MT][NS][4], dp[MT][NS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][n][e] = dp[mt][n][e] = 0.0f;
#pragma unroll
        for (int pass = 0; pass < 2; ++pass) {
            const unsigned abase = (pass == 0 ? sQa : sdOa) + a_off, bbase = (pass == 0 ? kb : vb) + br_off;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk += 2) {
                unsigned a0[MT][4], a1[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (QD_IN_REGS) {
#pragma unroll
                        for (int x = 0; x < 4; ++x) {
                            a0[mt][x] = pass == 0 ? qf[mt][kk][x] : df[mt][kk][x];
                            a1[mt][x] = pass == 0 ? qf[mt][kk + 1][x] : df[mt][kk + 1][x];
                        }
                    } else {
                        ldsm_x4(a0[mt], abase + mt * 16 * RB + kk * 16 * sizeof(T));
                        ldsm_x4(a1[mt], abase + mt * 16 * RB + (kk + 1) * 16 * sizeof(T));
                    }
                }
#pragma unroll
                for (int n = 0; n < NS; ++n) {
                    unsigned bf[4];
                    ldsm_x4(bf, bbase + n * 8 * RB + kk * 16 * sizeof(T));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        float(&d)[4] = pass == 0 ? s[mt][n] : dp[mt][n];
                        mma<T>(d, a0[mt], bf[0], bf[1]);
                        mma<T>(d, a1[mt], bf[2], bf[3]);
                    }
                }
            }
        }
        // P = exp2(scaled, masked score - LSE log2); dS = P * (dP - Dr), packed as the A-fragments of dQ += dS K.
        // With dropout, dP of a dropped element is 0 and of a kept one dP / (1 - p): the forward's mask (Dropout),
        // one Philox call per 16-key step and row tile as there.
        const int j0 = t * BN + 2 * (lane & 3);
        unsigned dsf[MT][BN / 16][4];
        const Dropout drop{drop_k0, drop_k1, drop_offset, drop_thr, drop_scale};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NS; ++n) {
                float ds[4];
                [[maybe_unused]] uint4 dw;
                if constexpr (DROP) {
                    if (n % 2 == 0)
                        dw = drop_bits(drop, t * (BN / 4) + 4 * (n / 2) + (lane & 3), (m0 + w0) / 2 + 8 * mt + lane / 4,
                                       blockIdx.x);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float p;
                    if constexpr (MASKED) {
                        float x = s[mt][n][e] * scale_log2;
                        if constexpr (EXTRA) x = masked_score<true>(x, ma, ri[mt][e >> 1], j0 + n * 8 + (e & 1), Sk);
                        else if (j0 + n * 8 + (e & 1) > lim[mt][e >> 1]) x = neg_inf();
                        p = exp2_approx(x - lse2[mt][e >> 1]);
                    } else {
                        p = exp2_approx(fmaf(s[mt][n][e], scale_log2, -lse2[mt][e >> 1]));
                    }
                    float dpe = dp[mt][n][e];
                    if constexpr (DROP)
                        dpe = drop_keep(dw, 2 * (e >> 1) + n % 2, e & 1, drop.thr) ? dpe * drop.scale : 0.0f;
                    ds[e] = p * (dpe - drow[mt][e >> 1]);
                }
                dsf[mt][n / 2][(n & 1) * 2] = Pack<T>::two(ds[0], ds[1]);
                dsf[mt][n / 2][(n & 1) * 2 + 1] = Pack<T>::two(ds[2], ds[3]);
            }
        // dQ += dS K: K read as [k = key][n = d].
#pragma unroll
        for (int kt = 0; kt < BN / 16; ++kt)
#pragma unroll
            for (int d = 0; d < NO; d += 2) {
                unsigned bf[4];
                ldsm_x4_t(bf, kb + bc_off + kt * 16 * RB + d * 8 * sizeof(T));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma<T>(acc[mt][d], dsf[mt][kt], bf[0], bf[1]);
                    mma<T>(acc[mt][d + 1], dsf[mt][kt], bf[2], bf[3]);
                }
            }
    };

    if (n_tiles > 0) {
        load_rows<T, BM, D, SROW, NTHREADS>(sQ, q + b * q_sb + h * q_sh + m0 * q_ss, q_ss, Sq - m0);
        load_rows<T, BM, D, SROW, NTHREADS>(sdO, dout + (row_base + m0) * D, D, Sq - m0);
        load_kv(0, 0);
        cp_async_commit();
        for (int t = 0; t < n_tiles; ++t) {
            const int stage = t & 1;
            cp_async_wait<0>();
            __syncthreads();  // tile t visible; every warp done with tile t - 1, whose stage is refilled next
            if (t + 1 < n_tiles) {
                load_kv(t + 1, stage ^ 1);
                cp_async_commit();
            }
            if constexpr (QD_IN_REGS) {
                if (t == 0) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int s = 0; s < KSTEPS; ++s) {
                            ldsm_x4(qf[mt][s], sQa + a_off + mt * 16 * RB + s * 16 * sizeof(T));
                            ldsm_x4(df[mt][s], sdOa + a_off + mt * 16 * RB + s * 16 * sizeof(T));
                        }
                }
            }
            if (t * BN <= warp_lim) {
                if (t < t_plain) tile(Flag<false>(), t, stage);
                else tile(Flag<true>(), t, stage);
            }
        }
    }
    store_warp_rows<T, D, SROW, MT>(dq + (row_base + m0 + w0) * D, sQ + w0 * SROW, acc, scale, Sq - m0 - w0, lane);
}

// ---- dK, dV -----------------------------------------------------------------------------------------------------
template <typename T, int D, int NWARPS, int BMQ, bool EXTRA, bool DROP = false>
__global__ void __launch_bounds__(NWARPS * 32, (NWARPS <= 4 ? 2 : 1))
attn_bwd_dkdv(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
              const T *__restrict__ dout, const float2 *__restrict__ stats, T *__restrict__ dk, T *__restrict__ dv,
              const float *__restrict__ mask_f, const unsigned char *__restrict__ mask_b,
              const float *__restrict__ slopes, int Hq, int Hkv, int Sq, int Sk, long long q_sb, long long q_sh,
              long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb, long long v_sh,
              long long v_ss, long long m_sb, long long m_sh, long long m_si, long long m_sj, int slopes_sb,
              float scale, int causal, int mask_kind, int alibi, unsigned drop_k0, unsigned drop_k1,
              unsigned drop_offset, unsigned drop_thr, float drop_scale) {
    constexpr int MINB = NWARPS <= 4 ? 2 : 1;
    constexpr int BNK = 16 * NWARPS, NTHREADS = 32 * NWARPS, SROW = D + 8;
    constexpr int RB = SROW * static_cast<int>(sizeof(T)), QSTAGE = BMQ * RB;
    constexpr int KSTEPS = D / 16, NQ = BMQ / 8, NO = D / 8, CH = D / 8;
    constexpr int REG_CAP = 65536 / (NTHREADS * MINB) > 255 ? 255 : 65536 / (NTHREADS * MINB);
    // K and V fragments in registers when they fit beside dK, dV, S^T, dP^T and ~40 others (and the query tile
    // is wide enough for it to matter).
    constexpr bool KV_IN_REGS = BMQ >= 64 && D / 2 + D + BMQ + 40 <= REG_CAP;
    constexpr bool FAST_LOAD = NTHREADS % CH == 0 && (BMQ * CH) % NTHREADS == 0;
    constexpr int RPI = FAST_LOAD ? NTHREADS / CH : 1, LOAD_IT = FAST_LOAD ? BMQ / RPI : 1;
    static_assert(D % 32 == 0 && D <= 128 && BMQ % 16 == 0, "tile shape");
    static_assert(!DROP || EXTRA, "dropout runs in the masked variant");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sK = reinterpret_cast<T *>(smem_raw);
    T *sV = sK + BNK * SROW;
    T *sQ = sV + BNK * SROW;                                        // two stages of BMQ x SROW
    T *sdO = sQ + 2 * BMQ * SROW;                                   // two stages
    float2 *sS = reinterpret_cast<float2 *>(sdO + 2 * BMQ * SROW);  // two stages of BMQ stats
    const unsigned sKa = smem_addr(sK), sVa = smem_addr(sV), sQa = smem_addr(sQ), sdOa = smem_addr(sdO);
    const unsigned sSa = smem_addr(sS);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int hk = blockIdx.x % Hkv, b = blockIdx.x / Hkv, G = Hq / Hkv;
    const int n0 = blockIdx.y * BNK;  // first key of the block (low keys see the most queries: they go first)
    const int diag = Sk - Sq;
    MaskArgs ma{mask_f, mask_b, slopes, m_sb, m_sh, m_si, m_sj, slopes_sb, mask_kind, alibi, causal, diag};

    // Query tiles that can see any key of this block: under causal, query i sees key j when i >= j - diag.
    const int q_tiles = (Sq + BMQ - 1) / BMQ;
    const int first_q = causal ? max(0, n0 - diag) : 0;
    const int qt_begin = first_q < Sq ? first_q / BMQ : q_tiles;
    const int per_head = q_tiles - qt_begin, n_items = G * per_head;

    const int kw0 = n0 + warp * 16;  // this warp's first key
    const int key_r[2] = {kw0 + lane / 4, kw0 + lane / 4 + 8};
    float acc_dk[NO][4], acc_dv[NO][4];
#pragma unroll
    for (int t = 0; t < NO; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[t][e] = acc_dv[t][e] = 0.0f;
    const float scale_log2 = scale * LOG2E;

    // Item `it` = (query head h, query tile): Q, dO rows and stats of that tile into stage `st`.
    const int ld_r = tid / CH, ld_c = (tid % CH) * 8;
    const unsigned ld_dst = (ld_r * SROW + ld_c) * sizeof(T);
    auto load_item = [&](int it, int st) {
        const int h = hk * G + it / per_head, m0 = (qt_begin + it % per_head) * BMQ;
        const long long row_base = (static_cast<long long>(b) * Hq + h) * Sq;
        if constexpr (FAST_LOAD) {
            const T *qs = q + b * q_sb + h * q_sh + (m0 + ld_r) * q_ss + ld_c;
            const T *ds = dout + (row_base + m0 + ld_r) * D + ld_c;
            const unsigned qd = sQa + st * QSTAGE + ld_dst, dd = sdOa + st * QSTAGE + ld_dst;
#pragma unroll
            for (int i = 0; i < LOAD_IT; ++i) {
                const bool ok = m0 + ld_r + i * RPI < Sq;
                cp_async16(qd + i * RPI * RB, ok ? qs + i * RPI * q_ss : q, ok);
                cp_async16(dd + i * RPI * RB, ok ? ds + static_cast<long long>(i * RPI) * D : dout, ok);
            }
        } else {
            load_rows<T, BMQ, D, SROW, NTHREADS>(sQ + st * BMQ * SROW, q + b * q_sb + h * q_sh + m0 * q_ss, q_ss,
                                                 Sq - m0);
            load_rows<T, BMQ, D, SROW, NTHREADS>(sdO + st * BMQ * SROW, dout + (row_base + m0) * D, D, Sq - m0);
        }
        for (int r = tid; r < BMQ; r += NTHREADS) {  // 8 bytes a row (rows start 8-byte aligned only)
            const bool ok = m0 + r < Sq;                // rows past Sq read nothing and stay zero
            asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(sSa + (st * BMQ + r) * 8),
                         "l"(ok ? stats + row_base + m0 + r : stats), "r"(ok ? 8 : 0)
                         : "memory");
        }
    };

    const unsigned a_off = ((warp * 16 + (lane & 15)) * SROW + (lane >> 4) * 8) * sizeof(T);  // A of K, V
    const unsigned br_off = ((lane & 7) * SROW + (lane >> 3) * 8) * sizeof(T);  // B of Q, dO (rows)
    const unsigned bc_off = ((lane & 15) * SROW + (lane >> 4) * 8) * sizeof(T);  // B of Q, dO (.trans)
    unsigned kf[KV_IN_REGS ? KSTEPS : 1][4], vf[KV_IN_REGS ? KSTEPS : 1][4];

    auto item = [&](auto masked_flag, int it, int st) {
        constexpr bool MASKED = decltype(masked_flag)::value;
        const int h = hk * G + it / per_head, m0 = (qt_begin + it % per_head) * BMQ;
        const unsigned qb = sQa + st * QSTAGE, db = sdOa + st * QSTAGE;
        const float2 *tS = sS + st * BMQ;
        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and the tile's BMQ queries.
        float s[NQ][4], dp[NQ][4];
#pragma unroll
        for (int n = 0; n < NQ; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
        for (int pass = 0; pass < 2; ++pass) {
            const unsigned abase = (pass == 0 ? sKa : sVa) + a_off, bbase = (pass == 0 ? qb : db) + br_off;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk += 2) {
                unsigned a0[4], a1[4];
                if constexpr (KV_IN_REGS) {
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        a0[x] = pass == 0 ? kf[kk][x] : vf[kk][x];
                        a1[x] = pass == 0 ? kf[kk + 1][x] : vf[kk + 1][x];
                    }
                } else {
                    ldsm_x4(a0, abase + kk * 16 * sizeof(T));
                    ldsm_x4(a1, abase + (kk + 1) * 16 * sizeof(T));
                }
#pragma unroll
                for (int n = 0; n < NQ; ++n) {
                    unsigned bf[4];
                    ldsm_x4(bf, bbase + n * 8 * RB + kk * 16 * sizeof(T));
                    float(&d)[4] = pass == 0 ? s[n] : dp[n];
                    mma<T>(d, a0, bf[0], bf[1]);
                    mma<T>(d, a1, bf[2], bf[3]);
                }
            }
        }
        // Element (key_r[e >> 1], query m0 + c) with c = 8n + 2(lane % 4) + (e & 1): P^T and dS^T, packed.
        // With dropout (the forward's mask, see Dropout): P^T of a dropped element is 0 (dV is scaled by 1 / (1 - p)
        // when stored) and its dP 0, of a kept one dP / (1 - p). This thread's keys are one key quad (both in one
        // half of the 16 bits), its queries c and c + 1 two row pairs: two Philox calls per 16 queries.
        unsigned pa[BMQ / 16][4], da[BMQ / 16][4];
        const int rel0 = key_r[0] - diag - m0 - 2 * (lane & 3);  // masked when 8n + (e & 1) < rel (causal)
        const Dropout drop{drop_k0, drop_k1, drop_offset, drop_thr, drop_scale};
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
            const float4 st2 = *reinterpret_cast<const float4 *>(tS + n * 8 + 2 * (lane & 3));  // rows c, c + 1
            const float l2[2] = {st2.x, st2.z}, dr[2] = {st2.y, st2.w};
            float p[4], ds[4];
            [[maybe_unused]] uint4 dw[2];
            if constexpr (DROP) {
                if (n % 2 == 0) {
                    const unsigned quad = kw0 / 4 + lane / 8, head = b * Hq + h;
                    const unsigned pair = m0 / 2 + 8 * (n / 2) + 2 * (lane & 3);
                    dw[0] = drop_bits(drop, quad, pair, head);
                    dw[1] = drop_bits(drop, quad, pair + 1, head);
                }
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if constexpr (MASKED) {
                    float x = s[n][e] * scale_log2;
                    if constexpr (EXTRA) {
                        const int i = m0 + n * 8 + 2 * (lane & 3) + (e & 1);
                        x = masked_score<true>(x, ma, row_info(ma, b, h, i, i < Sq), key_r[e >> 1], Sk);
                    } else if (n * 8 + (e & 1) < rel0 + 8 * (e >> 1)) {
                        x = neg_inf();
                    }
                    p[e] = exp2_approx(x - l2[e & 1]);
                } else {
                    p[e] = exp2_approx(fmaf(s[n][e], scale_log2, -l2[e & 1]));
                }
                float dpe = dp[n][e];
                if constexpr (DROP) {
                    if (!drop_keep(dw[e & 1], 2 * (n % 2) + (e >> 1), (lane >> 2) & 1, drop.thr)) {
                        ds[e] = -p[e] * dr[e & 1];
                        p[e] = 0.0f;
                        continue;
                    }
                    dpe *= drop.scale;
                }
                ds[e] = p[e] * (dpe - dr[e & 1]);
            }
            pa[n / 2][(n & 1) * 2] = Pack<T>::two(p[0], p[1]);
            pa[n / 2][(n & 1) * 2 + 1] = Pack<T>::two(p[2], p[3]);
            da[n / 2][(n & 1) * 2] = Pack<T>::two(ds[0], ds[1]);
            da[n / 2][(n & 1) * 2 + 1] = Pack<T>::two(ds[2], ds[3]);
        }
        // dV += P^T dO and dK += dS^T Q: dO and Q read as [k = query][n = d].
#pragma unroll
        for (int kt = 0; kt < BMQ / 16; ++kt)
#pragma unroll
            for (int d = 0; d < NO; d += 2) {
                unsigned bf[4];
                ldsm_x4_t(bf, db + bc_off + kt * 16 * RB + d * 8 * sizeof(T));
                mma<T>(acc_dv[d], pa[kt], bf[0], bf[1]);
                mma<T>(acc_dv[d + 1], pa[kt], bf[2], bf[3]);
                ldsm_x4_t(bf, qb + bc_off + kt * 16 * RB + d * 8 * sizeof(T));
                mma<T>(acc_dk[d], da[kt], bf[0], bf[1]);
                mma<T>(acc_dk[d + 1], da[kt], bf[2], bf[3]);
            }
    };

    if (n_items > 0) {
        load_rows<T, BNK, D, SROW, NTHREADS>(sK, k + b * k_sb + hk * k_sh + n0 * k_ss, k_ss, Sk - n0);
        load_rows<T, BNK, D, SROW, NTHREADS>(sV, v + b * v_sb + hk * v_sh + n0 * v_ss, v_ss, Sk - n0);
        load_item(0, 0);
        cp_async_commit();
        for (int it = 0; it < n_items; ++it) {
            const int stage = it & 1;
            cp_async_wait<0>();
            __syncthreads();  // item it visible; every warp done with item it - 1, whose stage is refilled next
            if (it + 1 < n_items) {
                load_item(it + 1, stage ^ 1);
                cp_async_commit();
            }
            if constexpr (KV_IN_REGS) {
                if (it == 0) {
#pragma unroll
                    for (int s = 0; s < KSTEPS; ++s) {
                        ldsm_x4(kf[s], sKa + a_off + s * 16 * sizeof(T));
                        ldsm_x4(vf[s], sVa + a_off + s * 16 * sizeof(T));
                    }
                }
            }
            const int m0 = (qt_begin + it % per_head) * BMQ;
            // Skip a warp none of whose keys any query of the tile sees (causal), or that has no keys.
            const int last_seen = causal ? min(m0 + BMQ, Sq) - 1 + diag : Sk - 1;
            if (kw0 < Sk && kw0 <= last_seen) {
                if (EXTRA || (causal && kw0 + 15 > m0 + diag)) item(Flag<true>(), it, stage);
                else item(Flag<false>(), it, stage);
            }
        }
    }
    const long long kv_base = (static_cast<long long>(b) * Hkv + hk) * Sk + kw0;
    const int valid = Sk - kw0;
    store_warp_rows<T, D, SROW, 1>(dk + kv_base * D, sK + warp * 16 * SROW,
                                   reinterpret_cast<const float(&)[1][NO][4]>(acc_dk), scale, valid, lane);
    store_warp_rows<T, D, SROW, 1>(dv + kv_base * D, sV + warp * 16 * SROW,
                                   reinterpret_cast<const float(&)[1][NO][4]>(acc_dv), DROP ? drop_scale : 1.0f,
                                   valid, lane);
}
