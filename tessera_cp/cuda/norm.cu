// Fused RMSNorm, forward and backward: y = x * rsqrt(mean(x^2) + eps) * w over the last dimension (size D).
// x, y, dy, dx are float, __half or __nv_bfloat16; the weight w is float or the input's type; all math in float.
//
// Tiling (the same in every kernel of this file): a row is owned by blockDim.x threads.
//   blockDim.x == 32: one warp per row, blockDim.y rows per block, reductions by shuffles only;
//   blockDim.x  > 32: one block per row (blockDim.y must be 1), reductions through shared memory.
// The host makes blockDim.x a multiple of 32. A row is read as D / VEC vectors of VEC elements (one aligned
// load of at most 16 bytes): the host picks the largest VEC in {8, 4, 2, 1} that divides D and every pointer's
// alignment, so every row starts on a vector boundary and there is no tail. Thread t owns vectors t,
// t + blockDim.x, ...; its first ITEMS vectors stay in registers between the two passes over a row, the rest
// (only rows longer than ITEMS * blockDim.x * VEC elements) are re-read, mostly from L2.
// Rows are visited grid-stride, so any grid covers any number of rows; row offsets are 64-bit.
//
// The backward writes dx, and for dw one partial sum per row group (one per warp row slot or per block) into
// dw_partial[groups, D] (f32); rms_norm_dw_reduce then sums the groups in a fixed order: no atomics, so dw is
// bitwise reproducible.
//
// tessera-instantiate: rms_norm_fwd<float, float, 4>; rms_norm_fwd<float, float, 2>; rms_norm_fwd<float, float, 1>
// tessera-instantiate: rms_norm_fwd<__half, __half, 8>; rms_norm_fwd<__half, __half, 4>; rms_norm_fwd<__half, __half, 2>; rms_norm_fwd<__half, __half, 1>
// tessera-instantiate: rms_norm_fwd<__half, float, 8>; rms_norm_fwd<__half, float, 4>; rms_norm_fwd<__half, float, 2>; rms_norm_fwd<__half, float, 1>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 8>; rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 4>; rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 2>; rms_norm_fwd<__nv_bfloat16, __nv_bfloat16, 1>
// tessera-instantiate: rms_norm_fwd<__nv_bfloat16, float, 8>; rms_norm_fwd<__nv_bfloat16, float, 4>; rms_norm_fwd<__nv_bfloat16, float, 2>; rms_norm_fwd<__nv_bfloat16, float, 1>
// tessera-instantiate: rms_norm_bwd<float, float, 4>; rms_norm_bwd<float, float, 2>; rms_norm_bwd<float, float, 1>
// tessera-instantiate: rms_norm_bwd<__half, __half, 8>; rms_norm_bwd<__half, __half, 4>; rms_norm_bwd<__half, __half, 2>; rms_norm_bwd<__half, __half, 1>
// tessera-instantiate: rms_norm_bwd<__half, float, 8>; rms_norm_bwd<__half, float, 4>; rms_norm_bwd<__half, float, 2>; rms_norm_bwd<__half, float, 1>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 8>; rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 4>; rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 2>; rms_norm_bwd<__nv_bfloat16, __nv_bfloat16, 1>
// tessera-instantiate: rms_norm_bwd<__nv_bfloat16, float, 8>; rms_norm_bwd<__nv_bfloat16, float, 4>; rms_norm_bwd<__nv_bfloat16, float, 2>; rms_norm_bwd<__nv_bfloat16, float, 1>
// tessera-instantiate: rms_norm_dw_reduce<float>; rms_norm_dw_reduce<__half>; rms_norm_dw_reduce<__nv_bfloat16>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int ITEMS = 4;              // vectors per thread kept in registers between the two passes of a row
constexpr int REDUCE_COLS = 32;       // rms_norm_dw_reduce: columns per block (one per lane)
constexpr int REDUCE_SLICES = 16;     // rms_norm_dw_reduce: threads summing one column's groups

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Every thread of a row group gets the group's sums of its N values. With blockDim.x > 32 it synchronizes the
// block, so all threads of the block must call it (they do: the row is uniform across such a block).
template <int N> __device__ __forceinline__ void row_sum(float (&v)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
    if (blockDim.x == 32) return;
    __shared__ float partial[N][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // the previous row's readers of `partial` are done
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) partial[i][warp] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < warps ? partial[i][lane] : 0.0f);
}

}  // namespace

template <typename T, typename W, int VEC>
__global__ void rms_norm_fwd(const T *__restrict__ x, const W *__restrict__ w, T *__restrict__ y,
                             long long rows, int D, float eps) {
    using TV = Vec<T, VEC>;
    using WV = Vec<W, VEC>;
    const int nvec = D / VEC, tid = threadIdx.x, nthreads = blockDim.x;
    const WV *wv = reinterpret_cast<const WV *>(w);
    for (long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y; row < rows;
         row += (long long)gridDim.x * blockDim.y) {
        const TV *xr = reinterpret_cast<const TV *>(x + row * D);
        TV *yr = reinterpret_cast<TV *>(y + row * D);
        float cache[ITEMS][VEC];
        float ss[1] = {0.0f};
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
            const int v = tid + k * nthreads;
            const TV a = v < nvec ? xr[v] : TV{};
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                cache[k][j] = v < nvec ? to_float(a.v[j]) : 0.0f;
                ss[0] += cache[k][j] * cache[k][j];
            }
        }
        for (int v = tid + ITEMS * nthreads; v < nvec; v += nthreads) {
            const TV a = xr[v];
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss[0] += to_float(a.v[j]) * to_float(a.v[j]);
        }
        row_sum(ss);
        const float r = rsqrtf(ss[0] / D + eps);
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
            const int v = tid + k * nthreads;
            if (v < nvec) {
                const WV wk = wv[v];
                TV o;
#pragma unroll
                for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(cache[k][j] * r * to_float(wk.v[j]));
                yr[v] = o;
            }
        }
        for (int v = tid + ITEMS * nthreads; v < nvec; v += nthreads) {
            const TV a = xr[v];
            const WV wk = wv[v];
            TV o;
#pragma unroll
            for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(to_float(a.v[j]) * r * to_float(wk.v[j]));
            yr[v] = o;
        }
    }
}

// dx = r * (dy * w - x * r^2 * mean(dy * w * x)),  dw = sum over rows of dy * x * r,  r = rsqrt(mean(x^2) + eps).
// r is recomputed from x (the forward keeps nothing): both row sums come from one pass and one reduction.
// dw_partial row g (g = blockIdx.x * blockDim.y + threadIdx.y, gridDim.x * blockDim.y rows) gets the dw sum of
// the rows this group visited; every element of it is written by the one thread that owns that column.
template <typename T, typename W, int VEC>
__global__ void rms_norm_bwd(const T *__restrict__ x, const W *__restrict__ w, const T *__restrict__ dy,
                             T *__restrict__ dx, float *__restrict__ dw_partial, long long rows, int D, float eps) {
    using TV = Vec<T, VEC>;
    using WV = Vec<W, VEC>;
    using FV = Vec<float, VEC>;
    const int nvec = D / VEC, tid = threadIdx.x, nthreads = blockDim.x;
    const WV *wv = reinterpret_cast<const WV *>(w);
    FV *dwp = reinterpret_cast<FV *>(dw_partial + ((long long)blockIdx.x * blockDim.y + threadIdx.y) * D);
    float dw_acc[ITEMS][VEC];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) dw_acc[k][j] = 0.0f;
    for (int v = tid + ITEMS * nthreads; v < nvec; v += nthreads) dwp[v] = FV{};  // columns beyond the registers

    for (long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y; row < rows;
         row += (long long)gridDim.x * blockDim.y) {
        const TV *xr = reinterpret_cast<const TV *>(x + row * D);
        const TV *gr = reinterpret_cast<const TV *>(dy + row * D);
        TV *dxr = reinterpret_cast<TV *>(dx + row * D);
        float xc[ITEMS][VEC], gc[ITEMS][VEC];
        float sums[2] = {0.0f, 0.0f};  // sum x^2, sum dy * w * x
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
            const int v = tid + k * nthreads;
            const TV a = v < nvec ? xr[v] : TV{};
            const TV g = v < nvec ? gr[v] : TV{};
            const WV wk = v < nvec ? wv[v] : WV{};
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                xc[k][j] = v < nvec ? to_float(a.v[j]) : 0.0f;
                gc[k][j] = v < nvec ? to_float(g.v[j]) : 0.0f;
                sums[0] += xc[k][j] * xc[k][j];
                sums[1] += gc[k][j] * (v < nvec ? to_float(wk.v[j]) : 0.0f) * xc[k][j];
            }
        }
        for (int v = tid + ITEMS * nthreads; v < nvec; v += nthreads) {
            const TV a = xr[v], g = gr[v];
            const WV wk = wv[v];
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float xf = to_float(a.v[j]);
                sums[0] += xf * xf;
                sums[1] += to_float(g.v[j]) * to_float(wk.v[j]) * xf;
            }
        }
        row_sum(sums);
        const float r = rsqrtf(sums[0] / D + eps);
        const float c = sums[1] * r * r / D;
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
            const int v = tid + k * nthreads;
            if (v < nvec) {
                const WV wk = wv[v];
                TV o;
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    o.v[j] = from_float<T>(r * (gc[k][j] * to_float(wk.v[j]) - xc[k][j] * c));
                    dw_acc[k][j] += gc[k][j] * xc[k][j] * r;
                }
                dxr[v] = o;
            }
        }
        for (int v = tid + ITEMS * nthreads; v < nvec; v += nthreads) {
            const TV a = xr[v], g = gr[v];
            const WV wk = wv[v];
            FV p = dwp[v];
            TV o;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float xf = to_float(a.v[j]), gf = to_float(g.v[j]);
                o.v[j] = from_float<T>(r * (gf * to_float(wk.v[j]) - xf * c));
                p.v[j] += gf * xf * r;
            }
            dxr[v] = o;
            dwp[v] = p;
        }
    }
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
        const int v = tid + k * nthreads;
        if (v < nvec) {
            FV p;
#pragma unroll
            for (int j = 0; j < VEC; ++j) p.v[j] = dw_acc[k][j];
            dwp[v] = p;
        }
    }
}

// dw[c] = sum over g of partial[g, c], in a fixed order. Block (REDUCE_COLS, REDUCE_SLICES): lane x owns column
// blockIdx.x * REDUCE_COLS + x; slice y sums groups y, y + REDUCE_SLICES, ...; the slices are then added in order.
template <typename W>
__global__ void rms_norm_dw_reduce(const float *__restrict__ partial, W *__restrict__ dw, int groups, int D) {
    __shared__ float slice_sums[REDUCE_SLICES][REDUCE_COLS + 1];
    const int col = blockIdx.x * REDUCE_COLS + threadIdx.x;
    float s = 0.0f;
    if (col < D)
        for (int g = threadIdx.y; g < groups; g += REDUCE_SLICES) s += partial[(long long)g * D + col];
    slice_sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < D) {
        float total = 0.0f;
#pragma unroll
        for (int i = 0; i < REDUCE_SLICES; ++i) total += slice_sums[i][threadIdx.x];
        dw[col] = from_float<W>(total);
    }
}
