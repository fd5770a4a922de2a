// Cross-entropy over rows of logits (float / __half / __nv_bfloat16 storage, float math), launched by
// tessera_cp/nn/loss.py, whose reference computes the same quantities with the array module.
//
// Per row with target t (label smoothing eps, V classes, q = (1 - eps) * onehot(t) + eps / V):
//   m = max_j x_j,  log_s = log sum_j exp(x_j - m)            (so logsumexp = m + log_s)
//   loss = log_s + (1 - eps) * (m - x_t) + eps * (m - mean_j x_j)
//   grad_j = (exp((x_j - m) - log_s) - q_j) * scale
// Keeping m and log_s apart (rather than one logsumexp) keeps x_j - m exact, so logits near +-1e4 in bf16 or
// +-1e30 in f32 lose no precision to the size of m.
//
// cross_entropy_fwd: one block per row. Pass 1 reads the row once, each thread keeping an online (max, sum of
// exp) pair and the row sum (for smoothing), merged across the block. With write_grad, pass 2 walks the row again
// in the reverse order, so that it first re-reads what pass 1 read last (most likely still in L2), and writes the
// gradient; `grad` may be the logits themselves (each element is read, then written, by the same thread, after
// the block has finished pass 1). Rows whose target is ignore_index give loss 0 and a zero gradient row and read
// no logits. A target outside [0, V) (the host checks before launching; this is the last line of defence) gives a
// NaN loss and gradient row and is never used as an index.
// cross_entropy_bwd: the gradient from saved (m, log_s), for columns [col0, col0 + n_cols) of a V-class row (a
// vocabulary slice of the fused linear cross-entropy), scaled by base_scale * row_scale[row * scale_stride].
// scale_rows: x[row, :] *= g[row * g_stride] in place; a row whose factor is exactly 1 is left untouched (no
// memory traffic), so the common upstream gradient of 1 costs one tiny launch and no host synchronisation.
//
// Vector access: 16-byte loads/stores in the row's aligned middle, scalar for the unaligned head and the tail, so
// any row length (odd vocabularies such as 50257, or 1) and any row offset works. Indices are 64-bit: rows * V may
// exceed 2^31. Block size: a multiple of 32, at most MAX_THREADS; the grid has one block per row.
//
// tessera-instantiate: cross_entropy_fwd<float>; cross_entropy_fwd<__half>; cross_entropy_fwd<__nv_bfloat16>
// tessera-instantiate: cross_entropy_bwd<float>; cross_entropy_bwd<__half>; cross_entropy_bwd<__nv_bfloat16>
// tessera-instantiate: scale_rows<float>; scale_rows<__half>; scale_rows<__nv_bfloat16>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace tessera_loss {

constexpr int MAX_THREADS = 1024;
constexpr int WARP = 32;
constexpr int VEC_BYTES = 16;
constexpr int LOADS_IN_FLIGHT = 4;  // packs each thread loads before using any: memory parallelism for pass 1
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ float exp_(float x) { return exp2f(x * LOG2E); }

using tessera::from_float;
using tessera::neg_inf;
using tessera::to_float;

// 16 bytes of T: loaded raw (so that several loads can be in flight before any is converted), used as floats.
template <typename T> struct Pack {
    static constexpr int N = VEC_BYTES / sizeof(T);
    uint4 raw;
    __device__ __forceinline__ void load(const T *p) { raw = *reinterpret_cast<const uint4 *>(p); }
    __device__ __forceinline__ void to_float(float (&v)[N]) const {
        const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = tessera::to_float(e[i]);
    }
    __device__ __forceinline__ void from_float(const float (&v)[N]) {
        T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) e[i] = tessera::from_float<T>(v[i]);
    }
    __device__ __forceinline__ void store(T *p) const { *reinterpret_cast<uint4 *>(p) = raw; }
};

// How a row of n elements at p splits into an unaligned head, whole 16-byte packs, and a tail.
template <typename T> struct RowSplit {
    long long head, packs, tail_start;
    __device__ __forceinline__ RowSplit(const T *p, long long n) {
        constexpr long long N = Pack<T>::N;
        const long long mis = (long long)((reinterpret_cast<unsigned long long>(p) % VEC_BYTES) / sizeof(T));
        head = mis == 0 ? 0 : (N - mis < n ? N - mis : n);
        packs = (n - head) / N;
        tail_start = head + packs * N;
    }
};

// Running (max, sum of exp(x - max)) of the values seen, plus their plain sum.
struct RowStats {
    float m = neg_inf(), s = 0.0f, sum = 0.0f;

    __device__ __forceinline__ void add(float x) {
        sum += x;
        if (x > m) {
            s = s * exp_(m - x) + 1.0f;  // m = -inf gives s * 0 (s is 0 then)
            m = x;
        } else if (x != neg_inf()) {
            s += exp_(x - m);
        }
    }
    template <int N> __device__ __forceinline__ void add(const float (&x)[N]) {
        float top = x[0], part = 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) { top = fmaxf(top, x[i]); part += x[i]; }
        sum += part;
        if (top > m) { s *= exp_(m - top); m = top; }
        if (m != neg_inf()) {  // all -inf so far: nothing to add, and x - m would be NaN
#pragma unroll
            for (int i = 0; i < N; ++i) s += exp_(x[i] - m);
        }
    }
    __device__ __forceinline__ void merge(float m2, float s2, float sum2) {
        const float top = fmaxf(m, m2);
        sum += sum2;
        if (top == neg_inf()) return;  // both empty so far
        s = (m == top ? s : s * exp_(m - top)) + (m2 == top ? s2 : s2 * exp_(m2 - top));
        m = top;
    }
};

// Every thread gets the block's merged stats. Block size: a multiple of 32.
__device__ __forceinline__ RowStats block_merge(RowStats st) {
    __shared__ float sm[WARP], ss[WARP], ssum[WARP];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
#pragma unroll
    for (int off = WARP / 2; off > 0; off >>= 1)
        st.merge(__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
                 __shfl_xor_sync(0xffffffffu, st.sum, off));
    if (lane == 0) { sm[warp] = st.m; ss[warp] = st.s; ssum[warp] = st.sum; }
    __syncthreads();
    RowStats out;
    if (lane < warps) { out.m = sm[lane]; out.s = ss[lane]; out.sum = ssum[lane]; }
#pragma unroll
    for (int off = WARP / 2; off > 0; off >>= 1)
        out.merge(__shfl_xor_sync(0xffffffffu, out.m, off), __shfl_xor_sync(0xffffffffu, out.s, off),
                  __shfl_xor_sync(0xffffffffu, out.sum, off));
    return out;  // every warp reduced the same partials, so every thread holds the same result
}

// Thread k takes packs k, k + blockDim, k + 2 blockDim, ... (write_grad_row walks the same ones backwards).
template <typename T> __device__ RowStats row_stats(const T *x, long long n) {
    constexpr int N = Pack<T>::N;
    RowStats st;
    const RowSplit<T> split(x, n);
    const long long tail = n - split.tail_start, step = blockDim.x;
    if (threadIdx.x < split.head) st.add(to_float(x[threadIdx.x]));
    const T *body = x + split.head;
    for (long long i0 = threadIdx.x; i0 < split.packs; i0 += LOADS_IN_FLIGHT * step) {
        Pack<T> p[LOADS_IN_FLIGHT];
#pragma unroll
        for (int u = 0; u < LOADS_IN_FLIGHT; ++u)
            if (i0 + u * step < split.packs) p[u].load(body + (i0 + u * step) * N);
#pragma unroll
        for (int u = 0; u < LOADS_IN_FLIGHT; ++u) {
            if (i0 + u * step < split.packs) {
                float v[N];
                p[u].to_float(v);
                st.add(v);
            }
        }
    }
    if (threadIdx.x < tail) st.add(to_float(x[split.tail_start + threadIdx.x]));
    return block_merge(st);
}

// grad[j] = (exp(x[j] - m - log_s) - eps_v - (col0 + j == target ? hit : 0)) * scale for j in [0, n).
// Walks the packs in the reverse of row_stats' order. grad may alias x (same element, same thread).
template <typename T>
__device__ void write_grad_row(const T *x, T *grad, long long n, long long col0, long long target, float m,
                               float log_s, float eps_v, float hit, float scale) {
    auto value = [&](float xj, long long j) {
        const float q = eps_v + (col0 + j == target ? hit : 0.0f);
        return (exp_((xj - m) - log_s) - q) * scale;
    };
    const RowSplit<T> split(x, n);
    const bool same_alignment =
        reinterpret_cast<unsigned long long>(x) % VEC_BYTES == reinterpret_cast<unsigned long long>(grad) % VEC_BYTES;
    if (!same_alignment) {  // a gradient buffer offset differently from the logits: one element at a time
        for (long long j = threadIdx.x; j < n; j += blockDim.x) grad[j] = from_float<T>(value(to_float(x[j]), j));
        return;
    }
    const long long tail = n - split.tail_start;
    if (threadIdx.x < tail) {
        const long long j = split.tail_start + threadIdx.x;
        grad[j] = from_float<T>(value(to_float(x[j]), j));
    }
    if ((long long)threadIdx.x < split.packs) {
        // Two packs per step (both loaded before either is stored: they are distinct elements, so this is safe
        // when grad aliases x), from this thread's last pack down to its first.
        constexpr int N = Pack<T>::N;
        const long long step = blockDim.x, first = threadIdx.x;
        for (long long i = first + ((split.packs - 1 - first) / step) * step; i >= first; i -= 2 * step) {
            const bool second = i - step >= first;
            Pack<T> p[2];
            p[0].load(x + split.head + i * N);
            if (second) p[1].load(x + split.head + (i - step) * N);
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                if (u == 1 && !second) break;
                const long long j0 = split.head + (i - u * step) * N;
                float v[N];
                p[u].to_float(v);
#pragma unroll
                for (int k = 0; k < N; ++k) v[k] = value(v[k], j0 + k);
                p[u].from_float(v);
                p[u].store(grad + j0);
            }
        }
    }
    if (threadIdx.x < split.head) grad[threadIdx.x] = from_float<T>(value(to_float(x[threadIdx.x]), threadIdx.x));
}

template <typename T> __device__ void fill_row(T *row, long long n, float v) {
    const T t = from_float<T>(v);
    for (long long j = threadIdx.x; j < n; j += blockDim.x) row[j] = t;
}

}  // namespace tessera_loss

// logits [n_rows, vocab] row-major; targets [n_rows] int64; loss, row_max, row_logsum [n_rows] float.
// With write_grad != 0, grad [n_rows, vocab] (may be logits) gets (softmax - q) * grad_scale.
template <typename T>
__global__ void __launch_bounds__(tessera_loss::MAX_THREADS)
cross_entropy_fwd(const T *logits, const long long *targets, float *loss, float *row_max, float *row_logsum,
                  T *grad, long long n_rows, long long vocab, long long ignore_index, float smoothing,
                  float grad_scale, int write_grad) {
    using namespace tessera_loss;
    const long long row = blockIdx.x;
    if (row >= n_rows) return;
    const T *x = logits + row * vocab;
    T *g = grad + row * vocab;
    const long long t = targets[row];
    if (t == ignore_index || t < 0 || t >= vocab) {
        const float v = t == ignore_index ? 0.0f : quiet_nan();
        if (threadIdx.x == 0) { loss[row] = v; row_max[row] = v; row_logsum[row] = v; }
        if (write_grad) fill_row(g, vocab, v);
        return;
    }
    const float xt = to_float(x[t]);  // read before pass 2 may overwrite the row
    const RowStats st = row_stats(x, vocab);
    const float log_s = logf(st.s);
    if (threadIdx.x == 0) {
        float l = log_s + (1.0f - smoothing) * (st.m - xt);
        if (smoothing != 0.0f) l += smoothing * (st.m - st.sum / (float)vocab);
        loss[row] = l;
        row_max[row] = st.m;
        row_logsum[row] = log_s;
    }
    if (write_grad)
        write_grad_row(x, g, vocab, 0, t, st.m, log_s, smoothing / (float)vocab, 1.0f - smoothing, grad_scale);
}

// logits [n_rows, n_cols] row-major: columns col0 .. col0 + n_cols - 1 of rows with `vocab` classes.
// grad [n_rows, n_cols] (may be logits) = (softmax - q) * base_scale * row_scale[row * scale_stride].
template <typename T>
__global__ void __launch_bounds__(tessera_loss::MAX_THREADS)
cross_entropy_bwd(const T *logits, const long long *targets, const float *row_max, const float *row_logsum,
                  const float *row_scale, T *grad, long long n_rows, long long n_cols, long long col0,
                  long long vocab, long long ignore_index, float smoothing, float base_scale,
                  long long scale_stride) {
    using namespace tessera_loss;
    const long long row = blockIdx.x;
    if (row >= n_rows) return;
    const T *x = logits + row * n_cols;
    T *g = grad + row * n_cols;
    const long long t = targets[row];
    if (t == ignore_index || t < 0 || t >= vocab) {
        fill_row(g, n_cols, t == ignore_index ? 0.0f : quiet_nan());
        return;
    }
    const float scale = base_scale * row_scale[row * scale_stride];
    write_grad_row(x, g, n_cols, col0, t, row_max[row], row_logsum[row], smoothing / (float)vocab,
                   1.0f - smoothing, scale);
}

// x [n_rows, n_cols] row-major; x[row, :] *= g[row * g_stride], skipped where the factor is exactly 1.
template <typename T>
__global__ void scale_rows(T *x, const float *g, long long n_rows, long long n_cols, long long g_stride) {
    using namespace tessera_loss;
    const long long row = blockIdx.x;
    if (row >= n_rows) return;
    const float s = g[row * g_stride];
    if (s == 1.0f) return;
    T *r = x + row * n_cols;
    const RowSplit<T> split(r, n_cols);
    if (threadIdx.x < split.head) r[threadIdx.x] = from_float<T>(to_float(r[threadIdx.x]) * s);
    T *body = r + split.head;
    for (long long i = threadIdx.x; i < split.packs; i += blockDim.x) {
        constexpr int N = Pack<T>::N;
        Pack<T> p;
        p.load(body + i * N);
        float v[N];
        p.to_float(v);
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] *= s;
        p.from_float(v);
        p.store(body + i * N);
    }
    const long long j = split.tail_start + threadIdx.x;
    if (j < n_cols) r[j] = from_float<T>(to_float(r[j]) * s);
}
