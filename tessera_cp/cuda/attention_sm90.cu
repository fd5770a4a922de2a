// Flash attention forward for Hopper (sm_90a): wgmma tensor cores, TMA loads, warp specialization. Launched by
// tessera_cp/nn/attention.py on compute capability 9.0 for bf16/f16, D = 64 or 128, without mask, ALiBi or
// dropout (those, decode-shaped calls and other GPUs take attention.cu's mma.sync kernels, which stay the fallback).
//
// attn_fwd_sm90<T, D, CAUSAL>: persistent blocks of 384 threads (grid = at most one a multiprocessor). The work
// items are BM = 128 query rows of one head, ordered row blocks fastest (the blocks at work at once share a few
// heads' K and V, which then stay in L2, instead of each reading its own head from HBM; within a head the longest
// causal rows first), dealt to the blocks in snake order (below); a block walks each item's key tiles of BN = 128.
//   * Warpgroup 0 is the producer: after giving registers back (setmaxnreg), one thread issues TMA loads of each
//     item's Q (once the consumers' last S product of the item before is done: the "empty_q" mbarrier) and of the
//     K and V tiles into a ring of STAGES stages that runs on across items, each completing on a "full" mbarrier;
//     it waits on the stage's "empty" mbarrier (one arrival per consumer warp) before reusing it. So the next
//     item's loads overlap the end of the last.
//   * Warpgroups 1 and 2 are consumers, 64 query rows each. Per key tile: S = Q K^T (wgmma, both operands from
//     shared memory), masks on the diagonal / tail tiles only, online softmax in registers (log2 units), P packed
//     to T in registers, O += P V (wgmma with A = P from registers, B = V read MN-major). The product for the next
//     tile's S is issued before this tile's P V completes, so the softmax of one tile runs beside the tensor cores;
//     and the two warpgroups take turns to issue (ping-pong), so one's softmax runs while the other's products do.
//   * Shared memory holds each operand as TMA writes it with the 128-byte swizzle: 64-column boxes of rows of 128
//     bytes. The wgmma descriptors read that layout directly: K-major (Q, K) with an 8-row group stride of 1024
//     bytes, stepping 32 bytes per 16 columns; MN-major (V) with the same 8-row stride along the keys and the box
//     size between 64-column halves of D.
//   * An item's end: O / rowsum is written into the consumer's own rows of an O buffer in the same swizzled layout,
//     then TMA stores it (rows past Sq are clipped by the tensor map) while the next item runs; the natural-log
//     LSE goes to `lse` per row.
// Semantics are those of attention.cu: row i sees key j under CAUSAL when j <= i + Sk - Sq; a row that sees no key
// gets O = 0 and LSE = +inf; keys past Sk and rows past Sq come in as zeros from the TMA (out of bounds) and are
// masked or not stored. Tensor maps (tessera_cp.cuda.tma, 4-D over [B, H, S, D]): q with a box of (1, 1, BM, 64),
// k and v (1, 1, BN, 64), o (1, 1, 64, 64), all with the 128-byte swizzle. Dynamic shared memory: see Tiles
// below. Needs scale > 0 (the row max is taken before scaling).
//
// tessera-instantiate: attn_fwd_sm90<__nv_bfloat16, 128, false>; attn_fwd_sm90<__nv_bfloat16, 128, true>
// tessera-instantiate: attn_fwd_sm90<__nv_bfloat16, 64, false>; attn_fwd_sm90<__nv_bfloat16, 64, true>
// tessera-instantiate: attn_fwd_sm90<__half, 128, false>; attn_fwd_sm90<__half, 128, true>
// tessera-instantiate: attn_fwd_sm90<__half, 64, false>; attn_fwd_sm90<__half, 64, true>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "pack.cuh"

namespace tessera_attn90 {

using tessera::exp2_approx;
using tessera::neg_inf;
using tessera::LN2;
using tessera::LOG2E;

constexpr int BM = 128, BN = 128, STAGES = 2, THREADS = 384;
constexpr int WG_ROWS = 64;     // query rows of one consumer warpgroup
constexpr int BOX_COLS = 64;    // 128 bytes of a 2-byte type: the span of the 128-byte swizzle
constexpr int LINE = 128;       // bytes of one box row in shared memory

struct alignas(64) TensorMap { unsigned char bytes[128]; };  // CUtensorMap, passed by value

template <int D> struct Tiles {
    static constexpr int BOXES = D / BOX_COLS;
    static constexpr int Q_BOX = BM * LINE, KV_BOX = BN * LINE;  // bytes of one 64-column box
    static constexpr int Q_BYTES = BOXES * Q_BOX, KV_BYTES = BOXES * KV_BOX;
    static constexpr int BARRIERS = 2 + 4 * STAGES;  // full_q, empty_q, full_k, full_v, empty_k, empty_v
};
// The dynamic shared memory a launch needs (attention.py's _sm90_smem): Q and O buffers of Q_BYTES, 2 * STAGES *
// KV_BYTES, 8 bytes a barrier, and 1024 to align the base.

template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// ---- mbarriers, TMA, named barriers -----------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {  // the phase of this parity completed
    asm volatile("{\n.reg .pred done;\nwait_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra wait_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_load(unsigned dst, const TensorMap *map, unsigned bar, int c0, int c1, int c2,
                                         int c3) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4, %5, %6}], [%2];\n"
                 ::"r"(dst), "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}
__device__ __forceinline__ void tma_store(const TensorMap *map, unsigned src, int c0, int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n"
                 ::"l"(map), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- wgmma ------------------------------------------------------------------------------------------------
// A shared-memory matrix descriptor for the 128-byte swizzle: start address, leading and stride byte offsets
// (16-byte units), layout type 1 (SWIZZLE_128B) in bits 62-63.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr, unsigned lead_bytes, unsigned stride_bytes) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lead_bytes >> 4) << 16) |
           ((unsigned long long)(stride_bytes >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Registers an in-flight wgmma reads or writes: no access may move across this point (CUTLASS's
// warpgroup_fence_operand).
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(unsigned (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// d (64 x N f32 accumulators of a warpgroup) (+)= A (64 x 16) B (16 x N). SS: A and B from shared memory, both
// K-major. RS: A from registers (a: the mma.sync m16n8k16 A fragment of the warp's 16 rows), B MN-major.
#define TESSERA_WGMMA_SS_64(TY) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"  \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"  \
                 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"  \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate))

#define TESSERA_WGMMA_RS_64(TY) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"  \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"  \
                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"  \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

#define TESSERA_WGMMA_SS_128(TY) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"  \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"  \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"  \
                 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"  \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate))

#define TESSERA_WGMMA_RS_128(TY) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"  \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"  \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"  \
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"  \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], unsigned long long desc_a, unsigned long long desc_b,
                                         int accumulate) {
    if constexpr (N == 128) {
        if constexpr (IsBf16<T>::value) TESSERA_WGMMA_SS_128("bf16"); else TESSERA_WGMMA_SS_128("f16");
    } else {
        if constexpr (IsBf16<T>::value) TESSERA_WGMMA_SS_64("bf16"); else TESSERA_WGMMA_SS_64("f16");
    }
}
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc_b,
                                         int accumulate) {
    if constexpr (N == 128) {
        if constexpr (IsBf16<T>::value) TESSERA_WGMMA_RS_128("bf16"); else TESSERA_WGMMA_RS_128("f16");
    } else {
        if constexpr (IsBf16<T>::value) TESSERA_WGMMA_RS_64("bf16"); else TESSERA_WGMMA_RS_64("f16");
    }
}

#endif  // sm_90a

template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(THREADS, 1)
attn_fwd_sm90(const __grid_constant__ TensorMap tm_q, const __grid_constant__ TensorMap tm_k,
              const __grid_constant__ TensorMap tm_v, const __grid_constant__ TensorMap tm_o,
              float *__restrict__ lse, int B, int Hq, int Hkv, int Sq, int Sk, float scale) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using L = Tiles<D>;
    constexpr int NS = BN / 2;   // S accumulators a thread holds (64 x BN over 128 threads)
    constexpr int NO = D / 2;    // O accumulators
    constexpr int KSTEPS_S = D / 16, KSTEPS_O = BN / 16;
    extern __shared__ unsigned char smem_raw[];
    const unsigned base = (static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
    const unsigned sQ = base, sO = sQ + L::Q_BYTES, sK = sO + L::Q_BYTES, sV = sK + STAGES * L::KV_BYTES;
    const unsigned bars = sV + STAGES * L::KV_BYTES;
    const unsigned full_q = bars, empty_q = bars + 8u;
    auto full_k = [&](int s) { return bars + 8u * (2 + s); };
    auto full_v = [&](int s) { return bars + 8u * (2 + STAGES + s); };
    auto empty_k = [&](int s) { return bars + 8u * (2 + 2 * STAGES + s); };
    auto empty_v = [&](int s) { return bars + 8u * (2 + 3 * STAGES + s); };

    // Work items: (batch, head, row block), row blocks fastest (the blocks at work at once share a few heads' K/V
    // in L2), a head's longest causal rows first. They are dealt in rounds of gridDim.x, in snake order: block i
    // takes item i of the even rounds and item gridDim.x - 1 - i of the odd ones, so its long and short causal
    // items even out (a plain i, i + gridDim.x, ... gives some blocks about 20% more work in a model of the lengths,
    // and measured 491 TFLOP/s against 502 with a block an item at B4 H32 S4096 D128 causal; snake order 536 against
    // 509). The producer and the consumers walk the same sequence.
    const int m_blocks = (Sq + BM - 1) / BM, items = m_blocks * Hq * B;
    const int diag = Sk - Sq;  // row i sees keys j <= i + diag under CAUSAL
    auto item_index = [&](int r) {  // block blockIdx.x's item of round r
        return r * (int)gridDim.x + ((r & 1) ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x);
    };
    struct Item { int b, h, hk, m0, n_tiles; };
    auto item = [&](int w) {
        Item it;
        const int bh = w / m_blocks;
        it.b = bh / Hq;
        it.h = bh % Hq;
        it.hk = it.h / (Hq / Hkv);
        it.m0 = (m_blocks - 1 - w % m_blocks) * BM;
        it.n_tiles = (Sk + BN - 1) / BN;
        if (CAUSAL) {
            const int last_key = min(it.m0 + BM, Sq) - 1 + diag;  // the block's last row sees up to this key
            it.n_tiles = last_key < 0 ? 0 : min(it.n_tiles, last_key / BN + 1);
        }
        return it;
    };

    if (threadIdx.x == 0) {
        mbar_init(full_q, 1);
        mbar_init(empty_q, 8);  // one arrival per consumer warp
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_k(s), 1);
            mbar_init(full_v(s), 1);
            mbar_init(empty_k(s), 8);
            mbar_init(empty_v(s), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int wg = threadIdx.x / 128;
    if (wg == 0) {  // ---------------------------------------------------------------------------- producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x == 0) {
            int q_uses = 0, g = 0;  // items with key tiles so far; key tiles so far (the ring position)
            for (int r = 0; r * (int)gridDim.x < items; ++r) {
                const int w = item_index(r);
                if (w >= items) continue;  // (the last round may be short)
                const Item it = item(w);
                if (it.n_tiles == 0) continue;
                if (q_uses > 0) mbar_wait(empty_q, (q_uses - 1) & 1);  // the last item's S products are done
                mbar_expect_tx(full_q, L::Q_BYTES);
                for (int x = 0; x < L::BOXES; ++x)
                    tma_load(sQ + x * L::Q_BOX, &tm_q, full_q, x * BOX_COLS, it.m0, it.h, it.b);
                for (int t = 0; t < it.n_tiles; ++t, ++g) {
                    const int s = g % STAGES;
                    const unsigned parity = ((g / STAGES) & 1) ^ 1;  // the consumers' release of the stage's last use
                    if (g >= STAGES) mbar_wait(empty_k(s), parity);
                    mbar_expect_tx(full_k(s), L::KV_BYTES);
                    for (int x = 0; x < L::BOXES; ++x)
                        tma_load(sK + s * L::KV_BYTES + x * L::KV_BOX, &tm_k, full_k(s), x * BOX_COLS, t * BN, it.hk,
                                 it.b);
                    if (g >= STAGES) mbar_wait(empty_v(s), parity);
                    mbar_expect_tx(full_v(s), L::KV_BYTES);
                    for (int x = 0; x < L::BOXES; ++x)
                        tma_load(sV + s * L::KV_BYTES + x * L::KV_BOX, &tm_v, full_v(s), x * BOX_COLS, t * BN, it.hk,
                                 it.b);
                }
                ++q_uses;
            }
        }
        return;
    }
    // ------------------------------------------------------------------------------------------------ consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int cw = wg - 1;                       // consumer warpgroup: rows [m0 + 64 cw, m0 + 64 cw + 64)
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const float c = scale * LOG2E;
    const unsigned q_rows = sQ + cw * WG_ROWS * LINE;  // this warpgroup's rows of every Q box
    const unsigned o_rows = sO + cw * WG_ROWS * LINE;  // and of every O box
    int wg_first, row0;  // the current item's first row of this warpgroup, this thread's rows (row0, row0 + 8)

    float o[NO], s[NS];
    unsigned p[KSTEPS_O][4];
    float row_max[2], row_sum[2];

    // S = Q K^T of tile t (stage st), issued and committed, not waited for.
    auto issue_s = [&](int st) {
        const unsigned k_base = sK + st * L::KV_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KSTEPS_S; ++kk) {
            const unsigned off = (kk % 4) * 32;  // 16 columns = 32 bytes inside a 128-byte line
            const unsigned long long da = smem_desc(q_rows + (kk / 4) * L::Q_BOX + off, 16, 1024);
            const unsigned long long db = smem_desc(k_base + (kk / 4) * L::KV_BOX + off, 16, 1024);
            wgmma_ss<T, BN>(s, da, db, kk > 0);
        }
        wgmma_commit();
    };
    // O += P V of stage st, issued and committed.
    auto issue_pv = [&](int st) {
        const unsigned v_base = sV + st * L::KV_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KSTEPS_O; ++kk)  // 16 keys = 16 lines of 128 bytes
            wgmma_rs<T, D>(o, p[kk], smem_desc(v_base + kk * 16 * LINE, L::KV_BOX, 1024), 1);
        wgmma_commit();
    };
    // Masks (diagonal and tail tiles), online softmax of S in place (S becomes P, unnormalised); returns the
    // factors the O accumulators must be scaled by.
    auto softmax = [&](int t, float (&alpha)[2]) {
        const bool masked = (t + 1) * BN > Sk || (CAUSAL && (t + 1) * BN - 1 > wg_first + diag);
        if (masked) {
            const int j0 = t * BN + 2 * (lane % 4);
#pragma unroll
            for (int n = 0; n < NS / 4; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = j0 + n * 8 + (e & 1), i = row0 + 8 * (e >> 1);
                    if (j >= Sk || (CAUSAL && j > i + diag)) s[4 * n + e] = neg_inf();
                }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float m = neg_inf();
#pragma unroll
            for (int n = 0; n < NS / 4; ++n) m = fmaxf(m, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            const float mx = fmaxf(row_max[r], m * c);
            const float base_r = mx == neg_inf() ? 0.0f : mx;  // a row that has seen nothing yet
            alpha[r] = exp2_approx(row_max[r] - base_r);
            row_max[r] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < NS / 4; ++n) {
                s[4 * n + 2 * r] = exp2_approx(fmaf(s[4 * n + 2 * r], c, -base_r));
                s[4 * n + 2 * r + 1] = exp2_approx(fmaf(s[4 * n + 2 * r + 1], c, -base_r));
                sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
            }
            row_sum[r] = row_sum[r] * alpha[r] + sum;
        }
    };
    // P (f32 in s) -> T A-fragments: key step kk is S's column groups 2kk and 2kk + 1.
    auto pack_p = [&]() {
#pragma unroll
        for (int kk = 0; kk < KSTEPS_O; ++kk) {
            p[kk][0] = tessera::float2_to_bits<T>(s[8 * kk + 0], s[8 * kk + 1]);
            p[kk][1] = tessera::float2_to_bits<T>(s[8 * kk + 2], s[8 * kk + 3]);
            p[kk][2] = tessera::float2_to_bits<T>(s[8 * kk + 4], s[8 * kk + 5]);
            p[kk][3] = tessera::float2_to_bits<T>(s[8 * kk + 6], s[8 * kk + 7]);
        }
    };
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int n = 0; n < NO / 4; ++n) {
            o[4 * n + 0] *= alpha[0];
            o[4 * n + 1] *= alpha[0];
            o[4 * n + 2] *= alpha[1];
            o[4 * n + 3] *= alpha[1];
        }
    };
    auto release = [&](unsigned bar) {
        if (lane == 0) mbar_arrive(bar);
    };
    // Ping-pong: the two consumer warpgroups take turns to issue their products (named barriers 3 and 4), so one
    // warpgroup's softmax runs while the other's products hold the tensor cores.
    auto my_turn = [&]() { named_sync(3 + cw, 256); };
    auto your_turn = [&]() { asm volatile("bar.arrive %0, 256;\n" ::"r"(3 + (cw ^ 1)) : "memory"); };

    int q_uses = 0, g0 = 0;  // items with key tiles so far; key tiles so far (the ring position of this item's first)
    for (int r = 0; r * (int)gridDim.x < items; ++r) {
        const int w = item_index(r);
        if (w >= items) continue;
        const Item it = item(w);
        wg_first = it.m0 + cw * WG_ROWS;
        row0 = wg_first + warp * 16 + lane / 4;
#pragma unroll
        for (int i = 0; i < NO; ++i) o[i] = 0.0f;
        row_max[0] = row_max[1] = neg_inf();
        row_sum[0] = row_sum[1] = 0.0f;
        if (it.n_tiles > 0) {
            const int n_tiles = it.n_tiles;
            auto stage = [&](int t) { return (g0 + t) % STAGES; };
            auto parity = [&](int t) { return unsigned((g0 + t) / STAGES) & 1u; };
            if (cw == 1 && q_uses == 0) your_turn();  // the first warpgroup goes first
            mbar_wait(full_q, q_uses & 1);
            float alpha[2];
            // Tile 0: S, softmax, P.
            mbar_wait(full_k(stage(0)), parity(0));
            my_turn();
            issue_s(stage(0));
            your_turn();
            wgmma_wait<0>();
            fence_regs(s);
            release(empty_k(stage(0)));
            if (n_tiles == 1) release(empty_q);  // this item's last S product is done: Q may be replaced
            softmax(0, alpha);
            pack_p();
            for (int t = 1; t < n_tiles; ++t) {
                mbar_wait(full_k(stage(t)), parity(t));
                mbar_wait(full_v(stage(t - 1)), parity(t - 1));
                fence_regs(s);
                fence_regs(o);
                fence_regs(p);
                my_turn();
                issue_s(stage(t));                 // S of tile t ...
                issue_pv(stage(t - 1));            // ... while O += P V of tile t - 1 queues behind it
                your_turn();
                wgmma_wait<1>();                   // S done
                fence_regs(s);
                release(empty_k(stage(t)));
                if (t == n_tiles - 1) release(empty_q);
                softmax(t, alpha);                 // beside the P V product
                wgmma_wait<0>();                   // P V done: P and V of tile t - 1 are free
                fence_regs(o);
                fence_regs(p);
                release(empty_v(stage(t - 1)));
                rescale_o(alpha);
                pack_p();
            }
            mbar_wait(full_v(stage(n_tiles - 1)), parity(n_tiles - 1));
            fence_regs(o);
            fence_regs(p);
            my_turn();
            issue_pv(stage(n_tiles - 1));
            your_turn();
            wgmma_wait<0>();
            fence_regs(o);
            release(empty_v(stage(n_tiles - 1)));
            g0 += n_tiles;
            ++q_uses;
        }

        // ---- the item's end: O / rowsum into this warpgroup's rows of the O buffer (swizzled as TMA wants), TMA
        // store (it overlaps the next item); LSE.
        float inv[2], row_lse[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float sum = row_sum[r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
            row_lse[r] = sum > 0.0f ? (row_max[r] + __log2f(sum)) * LN2 : __int_as_float(0x7f800000);
        }
        if (threadIdx.x % 128 == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // last store
        named_sync(1 + cw, 128);  // has read the O buffer
#pragma unroll
        for (int n = 0; n < NO / 4; ++n)   // column group n: columns 8n .. 8n + 7 of D
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int line = warp * 16 + lane / 4 + 8 * r;  // row inside the warpgroup's 64; line % 8 = lane / 4
                const int chunk = (n % 8) ^ (line % 8);          // the 128-byte swizzle of 16-byte chunks
                const unsigned addr = o_rows + (n / 8) * L::Q_BOX + line * LINE + chunk * 16 + 4 * (lane % 4);
                const unsigned v =
                    tessera::float2_to_bits<T>(o[4 * n + 2 * r] * inv[r], o[4 * n + 2 * r + 1] * inv[r]);
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
            }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the writes above, seen by the TMA engine
        named_sync(1 + cw, 128);
        if (threadIdx.x % 128 == 0) {
            for (int x = 0; x < L::BOXES; ++x)
                tma_store(&tm_o, o_rows + x * L::Q_BOX, x * BOX_COLS, wg_first, it.h, it.b);
            asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        }
        if (lane % 4 == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = row0 + 8 * r;
                if (i < Sq) lse[(static_cast<long long>(it.b) * Hq + it.h) * Sq + i] = row_lse[r];
            }
        }
    }
    // The second warpgroup's last turn went unclaimed: take it, so both named barriers end with nothing pending.
    if (cw == 0 && q_uses > 0) my_turn();
    if (threadIdx.x % 128 == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // before the exit
#endif
}

}  // namespace tessera_attn90

using tessera_attn90::attn_fwd_sm90;
