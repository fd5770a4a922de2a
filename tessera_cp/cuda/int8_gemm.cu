// int8 GEMMs of CastedLinear (launched by tessera_cp/nn/casted.py):
//   C[m, n] = sum_k A[m, k] * B[n, k]      A: activations [M, K], B: weights [N, K] (PyTorch's [out, in]), int8
// with int32 accumulation. OutT = int writes the raw accumulators (what the tests compare bit for bit with an exact
// int32 reference); a float OutT applies the fused epilogue
//   out[m, n] = OutT(((float)acc * x_scale[m]) * w_scale[n] + bias[n])
// in exactly that order with __fmul_rn/__fadd_rn (no FMA contraction), which the Python reference repeats.
//
// Contract (the launcher pads on the host): K, lda and ldb are multiples of 16 and A, B are 16-byte aligned, with
// zeros in any padding columns, so every 16-byte chunk of a row is wholly inside or outside K. M and N are free.
// Sums wrap modulo 2^32 past |acc| >= 2^31 (possible from K = 2^17 on), as int32 arithmetic does.
//
// w8a8_gemm_mma: tensor cores through mma.sync.m16n8k32.s8 (sm_80+). Block tile 128 x 128, 64-deep K stages,
// 3-stage cp.async pipeline (48 KiB of shared memory), 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 4 mma
// tiles, 64 int32 accumulators per thread. Shared tiles keep 64-byte rows of four 16-byte chunks; chunk c of row r
// sits at slot c ^ ((r >> 1) & 3), so the 8 rows an ldmatrix phase reads hit 8 distinct 16-byte bank groups.
// Rows past M / N and chunks past K are zero-filled by cp.async (src-size 0), so the mma loop has no bounds checks.
// A 1-D grid of tiles_m * tiles_n blocks walks the output in groups of MMA_GROUP_M tile rows, column by column
// within a group, so the blocks running at once share A and B tiles in L2.
//
// w8a8_gemm_dp4a: the fallback for GPUs without int8 tensor cores (sm_61+): 64 x 64 block tile through shared
// memory, 256 threads with 4 x 4 outputs each, __dp4a on 4 packed int8 per instruction.
//
// The weight-only (bf16 x int8) product of CastedLinear lives in gemv.cu (gemv_mma), shared with the decode step.
//
// tessera-instantiate: w8a8_gemm_mma<int>; w8a8_gemm_mma<__nv_bfloat16>; w8a8_gemm_mma<__half>; w8a8_gemm_mma<float>
// tessera-instantiate: w8a8_gemm_dp4a<int>; w8a8_gemm_dp4a<__nv_bfloat16>; w8a8_gemm_dp4a<__half>; w8a8_gemm_dp4a<float>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

constexpr int MMA_BM = 128, MMA_BN = 128, MMA_BK = 64, MMA_STAGES = 3, MMA_THREADS = 256;
constexpr int MMA_WARP_M = 64, MMA_WARP_N = 32;  // 8 warps: 2 along M x 4 along N
constexpr int MMA_GROUP_M = 8;                    // tile rows per rasterization group
constexpr int MMA_STAGE_BYTES = (MMA_BM + MMA_BN) * MMA_BK;
constexpr int DP4A_TILE = 64, DP4A_BK = 64, DP4A_THREADS = 256;

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One output element: the raw accumulator, or the fused epilogue.
__device__ __forceinline__ void store_result(int* C, long long ldc, int m, int n, int acc, const float*, const float*,
                                             const float*, int) {
    C[m * ldc + n] = acc;
}
template <typename T>
__device__ __forceinline__ void store_result(T* C, long long ldc, int m, int n, int acc, const float* x_scale,
                                             const float* w_scale, const float* bias, int has_bias) {
    float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), x_scale[m]), w_scale[n]);
    if (has_bias) v = __fadd_rn(v, bias[n]);
    C[m * ldc + n] = from_float<T>(v);
}

#ifndef TESSERA_EMULATE  // the PTX wrappers (a host emulator may supply its own)
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared, asynchronously; with pred false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 matrices of 16-bit elements (here: 8 rows x 16 int8); lanes 8i..8i+7 give the row addresses of
// matrix i; register i of lane l gets bytes 4(l%4)..4(l%4)+3 of row l/4 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif

// Byte offset of 16-byte chunk `chunk` (0..3) of row `row` in a 64-byte-row shared tile (see the swizzle above).
__device__ __forceinline__ int tile_offset(int row, int chunk) { return row * MMA_BK + ((chunk ^ ((row >> 1) & 3)) << 4); }

template <typename OutT>
__global__ void __launch_bounds__(MMA_THREADS, 2)
w8a8_gemm_mma(const signed char* __restrict__ A, const signed char* __restrict__ B, OutT* __restrict__ C,
              const float* __restrict__ x_scale, const float* __restrict__ w_scale, const float* __restrict__ bias,
              int has_bias, int M, int N, int K, int lda, int ldb, int ldc) {
    __shared__ __align__(128) signed char smem[MMA_STAGES * MMA_STAGE_BYTES];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp >> 2, warp_n = warp & 3;
    const int tiles_m = (M + MMA_BM - 1) / MMA_BM, tiles_n = (N + MMA_BN - 1) / MMA_BN;
    const int per_group = MMA_GROUP_M * tiles_n, first_m = (int)(blockIdx.x / per_group) * MMA_GROUP_M;
    const int group_rows = min(tiles_m - first_m, MMA_GROUP_M), in_group = (int)(blockIdx.x % per_group);
    const int m0 = (first_m + in_group % group_rows) * MMA_BM, n0 = (in_group / group_rows) * MMA_BN;
    const int k_tiles = (K + MMA_BK - 1) / MMA_BK;

    // Each thread copies 2 of the 512 16-byte chunks of each operand's stage.
    auto load_stage = [&](int stage, int kt) {
        signed char* sa = smem + stage * MMA_STAGE_BYTES;
        signed char* sb = sa + MMA_BM * MMA_BK;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * MMA_THREADS, row = c >> 2, chunk = c & 3;
            const int k = kt * MMA_BK + chunk * 16;
            const bool pa = m0 + row < M && k < K, pb = n0 + row < N && k < K;
            cp_async_16(sa + tile_offset(row, chunk), pa ? A + (long long)(m0 + row) * lda + k : A, pa);
            cp_async_16(sb + tile_offset(row, chunk), pb ? B + (long long)(n0 + row) * ldb + k : B, pb);
        }
    };

    int acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; ++s) {  // one commit per stage, even when empty, keeps the group count
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<MMA_STAGES - 2>();  // tile kt has landed (for this thread) ...
        __syncthreads();                   // ... for every thread, and all are done with tile kt - 1's stage
        if (kt + MMA_STAGES - 1 < k_tiles) load_stage((kt + MMA_STAGES - 1) % MMA_STAGES, kt + MMA_STAGES - 1);
        cp_async_commit();
        const signed char* sa = smem + (kt % MMA_STAGES) * MMA_STAGE_BYTES;
        const signed char* sb = sa + MMA_BM * MMA_BK;
#pragma unroll
        for (int kk = 0; kk < MMA_BK / 32; ++kk) {
            unsigned af[4][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {  // matrices: rows 0-7 / 8-15 x k 0-15 / 16-31 -> a0..a3
                const int row = warp_m * MMA_WARP_M + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(af[mi], sa + tile_offset(row, kk * 2 + (lane >> 4)));
            }
#pragma unroll
            for (int p = 0; p < 2; ++p) {  // matrices: n 0-7 k 0-15, n 0-7 k 16-31, n 8-15 k 0-15, n 8-15 k 16-31
                unsigned r[4];
                const int row = warp_n * MMA_WARP_N + p * 16 + (lane & 7) + (lane >> 4) * 8;
                ldmatrix_x4(r, sb + tile_offset(row, kk * 2 + ((lane >> 3) & 1)));
                bf[2 * p][0] = r[0];
                bf[2 * p][1] = r[1];
                bf[2 * p + 1][0] = r[2];
                bf[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_s8(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
    }
    cp_async_wait<0>();

    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // accumulators 0,1: row g; 2,3: row g + 8; columns 2t, 2t + 1
                const int m = m0 + warp_m * MMA_WARP_M + mi * 16 + g + h * 8;
                const int n = n0 + warp_n * MMA_WARP_N + ni * 8 + t * 2;
                if (m < M) {
                    if (n < N) store_result(C, ldc, m, n, acc[mi][ni][2 * h], x_scale, w_scale, bias, has_bias);
                    if (n + 1 < N) store_result(C, ldc, m, n + 1, acc[mi][ni][2 * h + 1], x_scale, w_scale, bias, has_bias);
                }
            }
}

template <typename OutT>
__global__ void __launch_bounds__(DP4A_THREADS)
w8a8_gemm_dp4a(const signed char* __restrict__ A, const signed char* __restrict__ B, OutT* __restrict__ C,
               const float* __restrict__ x_scale, const float* __restrict__ w_scale, const float* __restrict__ bias,
               int has_bias, int M, int N, int K, int lda, int ldb, int ldc) {
    // Tiles of 64 rows x 16 words (4 int8 each); the +1 keeps the 16 rows a half-warp reads in distinct banks.
    __shared__ int sa[DP4A_TILE][DP4A_BK / 4 + 1], sb[DP4A_TILE][DP4A_BK / 4 + 1];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * DP4A_TILE, n0 = blockIdx.x * DP4A_TILE;
    const int row = tid >> 2, chunk = tid & 3;  // each thread copies one 16-byte chunk of each tile
    int acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += DP4A_BK) {
        const int k = k0 + chunk * 16;
        int4 va = make_int4(0, 0, 0, 0), vb = make_int4(0, 0, 0, 0);
        if (m0 + row < M && k < K) va = *reinterpret_cast<const int4*>(A + (long long)(m0 + row) * lda + k);
        if (n0 + row < N && k < K) vb = *reinterpret_cast<const int4*>(B + (long long)(n0 + row) * ldb + k);
        sa[row][chunk * 4 + 0] = va.x; sa[row][chunk * 4 + 1] = va.y;
        sa[row][chunk * 4 + 2] = va.z; sa[row][chunk * 4 + 3] = va.w;
        sb[row][chunk * 4 + 0] = vb.x; sb[row][chunk * 4 + 1] = vb.y;
        sb[row][chunk * 4 + 2] = vb.z; sb[row][chunk * 4 + 3] = vb.w;
        __syncthreads();
#pragma unroll
        for (int w = 0; w < DP4A_BK / 4; ++w) {
            int a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a[i] = sa[ty + 16 * i][w];
                b[i] = sb[tx + 16 * i][w];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < M && n < N) store_result(C, ldc, m, n, acc[i][j], x_scale, w_scale, bias, has_bias);
        }
}
