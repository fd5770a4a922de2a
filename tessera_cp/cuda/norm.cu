// Fused RMSNorm, forward and backward: y = x * rsqrt(mean(x^2) + eps) * w over the last dimension (size D).
// x, y, dy, dx are float, __half or __nv_bfloat16; the weight w is float or the input's type; all math in float.
//
// Tiling (the same in both row kernels): a row is owned by blockDim.x threads, a multiple of 32.
//   blockDim.x == 32: one warp per row, blockDim.y rows per block, reductions by shuffles only;
//   blockDim.x  > 32: one block per row (blockDim.y must be 1), one __syncthreads per row.
// A row is read as D / VEC vectors of VEC elements (one aligned load of at most 16 bytes): the host picks the
// largest VEC in {8, 4, 2, 1} that divides D and every pointer's alignment, so there is no tail element. Thread t
// owns vectors t + k * blockDim.x, k < NV, and keeps them in registers as loaded (packed, not widened to float);
// vectors beyond NV * blockDim.x (only rows longer than the host's threads can hold) are read twice, the second
// time mostly from L2.
// Blocks are persistent: the host launches about one wave of resident blocks (the forward up to eight: blocks of
// later waves even out SMs that stream slower; norm.py's FORWARD_WAVES) and each walks its rows grid-stride.
// So a block reads its weight vectors once, and it loads the rows after the current one while the current row is
// reduced and written: a memory-bound kernel needs those bytes in flight, and a reduction between the load and the
// store of a row would otherwise leave the memory idle. The rows ahead wait in registers (STAGES - 1 of them), or,
// in the forward with one 16-byte vector per thread, in a shared-memory ring filled by cp.async (ASYNC_STAGES - 1
// rows ahead, no registers spent; the host sizes the ring). Row offsets are 64-bit.
//
// The backward writes dx, and for dw one partial sum per row group (a block, or a warp's row slot) into
// dw_partial[groups, D] (f32); rms_norm_dw_reduce then sums the groups in a fixed order: no atomics, so dw is
// bitwise reproducible. (The instantiations compiled up front are listed at the end of the file.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "pack.cuh"

namespace {

constexpr int ROW_THREADS = 512;      // most threads per row (a block) for NV == 1; see launch_bounds below
constexpr int REDUCE_COLS = 32;       // rms_norm_dw_reduce: columns per block (one per lane)
constexpr int REDUCE_SLICES = 32;     // rms_norm_dw_reduce: threads summing one column's groups

// The forward with one 16-byte vector per thread (NV == 1, the common case) stages rows in shared memory instead:
// each thread copies its own vector of the next ASYNC_STAGES - 1 rows with cp.async and reads back only what it
// copied itself (no barrier needed), so four rows are in flight per thread without costing registers.
constexpr int ASYNC_STAGES = 5;

// Rows a thread holds in registers: the current one and those being loaded. With NV == 1 two rows are loaded
// ahead, so two vectors per thread (of x, and of dy in the backward) stay in flight while a row is reduced.
template <int NV> struct Stages { static constexpr int value = NV == 1 ? 3 : 2; };

// Register budgets (__launch_bounds__): the NV == 1 forward fits 32 registers, so 4 blocks of 512 threads (a full
// SM) are resident; the backward holds twice the data and gets 64 (2 blocks); NV == 4 kernels get fewer threads.
template <int NV> struct FwdBounds {
    static constexpr int threads = ROW_THREADS, blocks = NV == 1 ? 4 : 1;
};
template <int NV> struct BwdBounds {
    static constexpr int threads = NV == 1 ? ROW_THREADS : 256, blocks = NV == 1 ? 2 : 1;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

using tessera::Pack;

// An empty asm that claims to change the words, so the compiler widens 16-bit values to float where they are used
// (one instruction an element) rather than once and holds the VEC floats (twice the registers) across the row
// loop or the reduction: that would cost the forward its full occupancy.
template <typename T, int VEC, int NV> __device__ __forceinline__ void keep_packed(Pack<T, VEC> (&p)[NV]) {
    if constexpr (sizeof(T) == 2) {
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
            for (int i = 0; i < Pack<T, VEC>::WORDS; ++i) asm volatile("" : "+r"(p[k].w[i]));
    }
}

// 16 bytes global -> shared without passing through registers (sm_80+); src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void copy_async16(void *dst, const void *src, int src_bytes) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight (their data then visible to it).
template <int N> __device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Every thread of a row group gets the group's sums of its N values. With blockDim.x > 32 all threads of the
// block must call it (they do: the row is uniform across such a block). One barrier per call: the partials of
// consecutive calls alternate between two buffers (`parity`), and a thread writes a buffer again only after the
// next call's barrier, which no thread passes before every thread has read that buffer.
template <int N> __device__ __forceinline__ void row_sum(float (&v)[N], int &parity) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
    if (blockDim.x == 32) return;
    __shared__ float partial[2][N][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) partial[parity][i][warp] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < warps ? partial[parity][i][lane] : 0.0f);
    parity ^= 1;
}

// This thread's NV vectors of row `row` of a [rows, nvec]-vector array (zeros past the row's end or for a
// row >= rows).
template <typename T, int VEC, int NV>
__device__ __forceinline__ void load_row(Pack<T, VEC> (&dst)[NV], const T *base, long long row, long long rows,
                                         int nvec) {
    const bool live = row < rows;
    const T *src = base + (live ? row : 0) * nvec * VEC;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        dst[k] = live && v < nvec ? Pack<T, VEC>::load(src, v) : Pack<T, VEC>::zero();
    }
}

}  // namespace

template <typename T, typename W, int VEC, int NV>
__global__ void __launch_bounds__(FwdBounds<NV>::threads, FwdBounds<NV>::blocks)
rms_norm_fwd(const T *__restrict__ x, const W *__restrict__ w, T *__restrict__ y, long long rows, int D, float eps) {
    using TP = Pack<T, VEC>;
    using WP = Pack<W, VEC>;
    constexpr int STAGES = Stages<NV>::value;
    const int nvec = D / VEC, tid = threadIdx.x, nthreads = blockDim.x;
    const long long stride = (long long)gridDim.x * blockDim.y;
    const long long first = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    WP wr[NV];
    load_row(wr, w, 0, 1, nvec);
    if constexpr (NV == 1 && TP::BYTES == 16) {
        // ring[s * threads + thread]: this thread's vector of the row in stage s (dynamic shared memory of
        // ASYNC_STAGES * blockDim.x * blockDim.y * 16 bytes, the host's launch).
        extern __shared__ uint4 ring[];
        const int threads = blockDim.x * blockDim.y;
        uint4 *mine = ring + threadIdx.y * blockDim.x + tid;
        const auto fetch = [&](int stage, long long row) {  // one commit group per row, empty or not
            const bool live = row < rows && tid < nvec;
            copy_async16(mine + stage * threads, x + (live ? row * D + tid * VEC : 0), live ? 16 : 0);
            copy_async_commit();
        };
#pragma unroll
        for (int s = 0; s < ASYNC_STAGES - 1; ++s) fetch(s, first + s * stride);
        int parity = 0, stage = 0;
        for (long long row = first; row < rows; row += stride) {
            fetch(stage == 0 ? ASYNC_STAGES - 1 : stage - 1, row + (ASYNC_STAGES - 1) * stride);
            copy_async_wait<ASYNC_STAGES - 1>();  // this row's group is complete
            const uint4 u = mine[stage * threads];
            const TP a = {{u.x, u.y, u.z, u.w}};
            keep_packed(wr);
            float ss[1] = {0.0f};
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss[0] += a.get(j) * a.get(j);
            row_sum(ss, parity);
            const float r = rsqrtf(ss[0] / D + eps);
            if (tid < nvec) {
                TP o;
#pragma unroll
                for (int j = 0; j < VEC; j += 2)
                    o.set(j, a.get(j) * r * wr[0].get(j), a.get(j + 1) * r * wr[0].get(j + 1));
                o.store(y + row * D, tid);
            }
            stage = stage == ASYNC_STAGES - 1 ? 0 : stage + 1;
        }
        copy_async_wait<0>();  // nothing in flight when the block exits
        return;
    }
    TP buf[STAGES][NV];  // buf[0]: the current row; buf[s]: the row s strides ahead
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) load_row(buf[s], x, first + s * stride, rows, nvec);
    int parity = 0;
    for (long long row = first; row < rows; row += stride) {
        load_row(buf[STAGES - 1], x, row + (STAGES - 1) * stride, rows, nvec);
        keep_packed(wr);
        const T *xr = x + row * D;
        T *yr = y + row * D;
        float ss[1] = {0.0f};
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss[0] += buf[0][k].get(j) * buf[0][k].get(j);
        if constexpr (NV > 1) {
            for (int v = tid + NV * nthreads; v < nvec; v += nthreads) {
                const TP a = TP::load(xr, v);
#pragma unroll
                for (int j = 0; j < VEC; ++j) ss[0] += a.get(j) * a.get(j);
            }
        }
        keep_packed(buf[0]);  // widen x again after the reduction rather than hold it as floats across it
        row_sum(ss, parity);
        const float r = rsqrtf(ss[0] / D + eps);
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int v = tid + k * nthreads;
            if (v < nvec) {
                TP o;
#pragma unroll
                for (int j = 0; j < VEC; j += 2)
                    o.set(j, buf[0][k].get(j) * r * wr[k].get(j),
                          j + 1 < VEC ? buf[0][k].get(j + 1) * r * wr[k].get(j + 1) : 0.0f);
                o.store(yr, v);
            }
        }
        if constexpr (NV > 1) {
            for (int v = tid + NV * nthreads; v < nvec; v += nthreads) {
                const TP a = TP::load(xr, v);
                const WP wk = WP::load(w, v);
                TP o;
#pragma unroll
                for (int j = 0; j < VEC; j += 2)
                    o.set(j, a.get(j) * r * wk.get(j), j + 1 < VEC ? a.get(j + 1) * r * wk.get(j + 1) : 0.0f);
                o.store(yr, v);
            }
        }
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s)
#pragma unroll
            for (int k = 0; k < NV; ++k) buf[s][k] = buf[s + 1][k];
    }
}

// dx = r * (dy * w - x * r^2 * mean(dy * w * x)),  dw = sum over rows of dy * x * r,  r = rsqrt(mean(x^2) + eps).
// r is recomputed from x (the forward keeps nothing): both row sums come from one pass and one reduction.
// dw_partial row g (g = blockIdx.x * blockDim.y + threadIdx.y, gridDim.x * blockDim.y rows) gets the dw sum of
// the rows this group visited; every element of it is written by the one thread that owns that column.
template <typename T, typename W, int VEC, int NV>
__global__ void __launch_bounds__(BwdBounds<NV>::threads, BwdBounds<NV>::blocks)
rms_norm_bwd(const T *__restrict__ x, const W *__restrict__ w, const T *__restrict__ dy, T *__restrict__ dx,
             float *__restrict__ dw_partial, long long rows, int D, float eps) {
    using TP = Pack<T, VEC>;
    using WP = Pack<W, VEC>;
    using FP = Pack<float, VEC>;
    constexpr int STAGES = Stages<NV>::value;
    const int nvec = D / VEC, tid = threadIdx.x, nthreads = blockDim.x;
    const long long stride = (long long)gridDim.x * blockDim.y;
    const long long first = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    float *dwp = dw_partial + first * D;
    WP wr[NV];
    load_row(wr, w, 0, 1, nvec);
    float dw_acc[NV][VEC];
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) dw_acc[k][j] = 0.0f;
    if constexpr (NV > 1)
        for (int v = tid + NV * nthreads; v < nvec; v += nthreads) FP::zero().store(dwp, v);  // beyond registers

    TP xb[STAGES][NV], gb[STAGES][NV];  // [0]: the current row; [s]: the row s strides ahead
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        load_row(xb[s], x, first + s * stride, rows, nvec);
        load_row(gb[s], dy, first + s * stride, rows, nvec);
    }
    int parity = 0;
    for (long long row = first; row < rows; row += stride) {
        load_row(xb[STAGES - 1], x, row + (STAGES - 1) * stride, rows, nvec);
        load_row(gb[STAGES - 1], dy, row + (STAGES - 1) * stride, rows, nvec);
        keep_packed(wr);
        const T *xr = x + row * D, *gr = dy + row * D;
        T *dxr = dx + row * D;
        float sums[2] = {0.0f, 0.0f};  // sum x^2, sum dy * w * x
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float xf = xb[0][k].get(j);
                sums[0] += xf * xf;
                sums[1] += gb[0][k].get(j) * wr[k].get(j) * xf;
            }
        if constexpr (NV > 1) {
            for (int v = tid + NV * nthreads; v < nvec; v += nthreads) {
                const TP a = TP::load(xr, v), g = TP::load(gr, v);
                const WP wk = WP::load(w, v);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const float xf = a.get(j);
                    sums[0] += xf * xf;
                    sums[1] += g.get(j) * wk.get(j) * xf;
                }
            }
        }
        keep_packed(xb[0]);
        keep_packed(gb[0]);
        row_sum(sums, parity);
        const float r = rsqrtf(sums[0] / D + eps);
        const float c = sums[1] * r * r / D;
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int v = tid + k * nthreads;
            if (v < nvec) {
                float o[VEC + 1];  // o[VEC]: the unused partner of an odd last element
                o[VEC] = 0.0f;
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const float xf = xb[0][k].get(j), gf = gb[0][k].get(j);
                    o[j] = r * (gf * wr[k].get(j) - xf * c);
                    dw_acc[k][j] += gf * xf * r;
                }
                TP out;
#pragma unroll
                for (int j = 0; j < VEC; j += 2) out.set(j, o[j], o[j + 1]);
                out.store(dxr, v);
            }
        }
        if constexpr (NV > 1) {
            for (int v = tid + NV * nthreads; v < nvec; v += nthreads) {
                const TP a = TP::load(xr, v), g = TP::load(gr, v);
                const WP wk = WP::load(w, v);
                FP p = FP::load(dwp, v);
                float o[VEC + 1];
                o[VEC] = 0.0f;
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const float xf = a.get(j), gf = g.get(j);
                    o[j] = r * (gf * wk.get(j) - xf * c);
                    p.w[j] = __float_as_uint(p.get(j) + gf * xf * r);
                }
                TP out;
#pragma unroll
                for (int j = 0; j < VEC; j += 2) out.set(j, o[j], o[j + 1]);
                out.store(dxr, v);
                p.store(dwp, v);
            }
        }
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s)
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                xb[s][k] = xb[s + 1][k];
                gb[s][k] = gb[s + 1][k];
            }
    }
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int v = tid + k * nthreads;
        if (v < nvec) {
            FP p;
#pragma unroll
            for (int j = 0; j < VEC; ++j) p.w[j] = __float_as_uint(dw_acc[k][j]);
            p.store(dwp, v);
        }
    }
}

// dw[c] = sum over g of partial[g, c], in a fixed order. Block (REDUCE_COLS, REDUCE_SLICES): lane x owns column
// blockIdx.x * REDUCE_COLS + x; slice y sums groups y, y + REDUCE_SLICES, ... (unrolled: several loads in
// flight); the slices are then added in order.
template <typename W>
__global__ void rms_norm_dw_reduce(const float *__restrict__ partial, W *__restrict__ dw, int groups, int D) {
    __shared__ float slice_sums[REDUCE_SLICES][REDUCE_COLS + 1];
    const int col = blockIdx.x * REDUCE_COLS + threadIdx.x;
    float s = 0.0f;
    if (col < D) {
#pragma unroll 4
        for (int g = threadIdx.y; g < groups; g += REDUCE_SLICES) s += partial[(long long)g * D + col];
    }
    slice_sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < D) {
        float total = 0.0f;
#pragma unroll
        for (int i = 0; i < REDUCE_SLICES; ++i) total += slice_sums[i][threadIdx.x];
        dw[col] = W(total);
    }
}

// Instantiations compiled up front: rms_norm_fwd/bwd<T, W, VEC, NV> for NV 1 (rows of at most 512 vectors: one
// per thread) and 4 (longer rows), every storage pair and vector width.
// tessera-instantiate: rms_norm_fwd<float, float, 4, 1>; rms_norm_fwd<float, float, 4, 4>
// tessera-instantiate: rms_norm_fwd<float, float, 2, 1>; rms_norm_fwd<float, float, 2, 4>
// tessera-instantiate: rms_norm_fwd<float, float, 1, 1>; rms_norm_fwd<float, float, 1, 4>
// tessera-instantiate: rms_norm_fwd<__half, __half, 8, 1>; rms_norm_fwd<__half, __half, 8, 4>
// tessera-instantiate: rms_norm_fwd<__half, __half, 4, 1>; rms_norm_fwd<__half, __half, 4, 4>
// tessera-instantiate: rms_norm_fwd<__half, __half, 2, 1>; rms_norm_fwd<__half, __half, 2, 4>
// tessera-instantiate: rms_norm_fwd<__half, __half, 1, 1>; rms_norm_fwd<__half, __half, 1, 4>
// tessera-instantiate: rms_norm_fwd<__half, float, 8, 1>; rms_norm_fwd<__half, float, 8, 4>
// tessera-instantiate: rms_norm_fwd<__half, float, 4, 1>; rms_norm_fwd<__half, float, 4, 4>
// tessera-instantiate: rms_norm_fwd<__half, float, 2, 1>; rms_norm_fwd<__half, float, 2, 4>
// tessera-instantiate: rms_norm_fwd<__half, float, 1, 1>; rms_norm_fwd<__half, float, 1, 4>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 8, 1>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 8, 4>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 4, 1>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 4, 4>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 2, 1>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 2, 4>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 1, 1>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 1, 4>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, float, 8, 1>; rms_norm_fwd<__nv_bfloat16, float, 8, 4>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, float, 4, 1>; rms_norm_fwd<__nv_bfloat16, float, 4, 4>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, float, 2, 1>; rms_norm_fwd<__nv_bfloat16, float, 2, 4>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, float, 1, 1>; rms_norm_fwd<__nv_bfloat16, float, 1, 4>
// tessera-instantiate: rms_norm_bwd<float, float, 4, 1>; rms_norm_bwd<float, float, 4, 4>
// tessera-instantiate: rms_norm_bwd<float, float, 2, 1>; rms_norm_bwd<float, float, 2, 4>
// tessera-instantiate: rms_norm_bwd<float, float, 1, 1>; rms_norm_bwd<float, float, 1, 4>
// tessera-instantiate: rms_norm_bwd<__half, __half, 8, 1>; rms_norm_bwd<__half, __half, 8, 4>
// tessera-instantiate: rms_norm_bwd<__half, __half, 4, 1>; rms_norm_bwd<__half, __half, 4, 4>
// tessera-instantiate: rms_norm_bwd<__half, __half, 2, 1>; rms_norm_bwd<__half, __half, 2, 4>
// tessera-instantiate: rms_norm_bwd<__half, __half, 1, 1>; rms_norm_bwd<__half, __half, 1, 4>
// tessera-instantiate: rms_norm_bwd<__half, float, 8, 1>; rms_norm_bwd<__half, float, 8, 4>
// tessera-instantiate: rms_norm_bwd<__half, float, 4, 1>; rms_norm_bwd<__half, float, 4, 4>
// tessera-instantiate: rms_norm_bwd<__half, float, 2, 1>; rms_norm_bwd<__half, float, 2, 4>
// tessera-instantiate: rms_norm_bwd<__half, float, 1, 1>; rms_norm_bwd<__half, float, 1, 4>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 8, 1>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 8, 4>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 4, 1>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 4, 4>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 2, 1>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 2, 4>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 1, 1>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 1, 4>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, float, 8, 1>; rms_norm_bwd<__nv_bfloat16, float, 8, 4>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, float, 4, 1>; rms_norm_bwd<__nv_bfloat16, float, 4, 4>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, float, 2, 1>; rms_norm_bwd<__nv_bfloat16, float, 2, 4>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, float, 1, 1>; rms_norm_bwd<__nv_bfloat16, float, 1, 4>
// tessera-instantiate: rms_norm_dw_reduce<float>; rms_norm_dw_reduce<__half>; rms_norm_dw_reduce<__nv_bfloat16>
