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
// cross_entropy_fwd_cluster (Hopper, the fast path for long rows with a gradient): a row is split over a cluster of
// CLUSTER blocks (1, 2, 4 or 8) of CLUSTER_THREADS threads, each thread holding up to PACKS 16-byte packs of its
// block's contiguous share in registers. PACKS is 8 (32 KiB per block, 4 blocks per SM: registers capped at 64) or
// 16 (64 KiB per block, 2 blocks per SM: capped at 128); a cluster of 8 then holds rows of 256 or 512 KiB (128k or
// 256k bf16 logits). All packs are loaded at once (PACKS independent 16-byte loads per thread in flight), the (max,
// sum of exp, sum) of the share is merged over the block, then over the cluster through distributed shared memory
// (one cluster barrier), and the gradient is written from the registers: the logits are read from memory exactly
// once and the gradient written once, whatever the L2 holds. Several blocks per SM, so one block's loads overlap
// another's reductions and stores. The host picks it on compute capability >= 9.0 for rows of more than
// CLUSTER_MIN_ROW_BYTES whose gradient buffer has the logits' 16-byte alignment, with PACKS 8 when a cluster of 8
// such blocks holds the row (faster at 8192 x 128256 bf16: 1.665 against 1.697 ms in one run), else 16; the cluster
// size is compiled in (__cluster_dims__), so an ordinary launch of n_rows * CLUSTER blocks forms the clusters.
// Without a gradient the fallback below is faster (it streams each row once; measured 0.85 ms against 1.02 ms).
// cross_entropy_fwd: the fallback, one block per row. Pass 1 reads the row once, each thread keeping an online
// (max, sum of exp) pair and the row sum (for smoothing), merged across the block. With write_grad, pass 2 walks
// the row again in the reverse order, so that it first re-reads what pass 1 read last (most likely still in L2),
// and writes the gradient.
// Both: `grad` may be the logits themselves (each element is read, then written, by the same thread, after the
// row's statistics are complete). Rows whose target is ignore_index give loss 0 and a zero gradient row and read
// no logits. A target outside [0, V) gives a NaN loss and gradient row and is never used as an index.
// Both take `check` [2] = (targets counted, of those outside [0, V)), as count_targets wrote it earlier on the same
// stream (or zeros), so that the host can launch them before it has read the count back: when check[1] != 0 they
// write nothing at all (no loss, no gradient: in-place logits stay intact), and the host raises once it reads the
// count. With per_count != 0 the gradient's scale is grad_scale / check[0] (when check[0] > 0): the "mean"
// reduction's factor. The cluster kernel loads check[1] just before its block merge, so that the load's latency
// hides behind the merges (loaded with the row, it stayed live through it and cost a spill at 8 packs).
// cross_entropy_bwd: the gradient from saved (m, log_s), for columns [col0, col0 + n_cols) of a V-class row (a
// chunk of rows of the fused linear cross-entropy, or a vocabulary slice), scaled by
// base_scale * row_scale[row * scale_stride].
// scale_rows: x[row, :] *= g[row * g_stride] in place; a row whose factor is exactly 1 is left untouched (no
// memory traffic), so the common upstream gradient of 1 costs one tiny launch and no host synchronisation. Blocks
// stride over the rows (the host launches fewer blocks than rows when the factor is one scalar).
// count_targets: how many targets are counted (not ignore_index) and how many of those lie outside [0, V), in one
// launch of one block, before the forward kernel on the same stream (which reads them as `check`).
// reduce_loss: the per-row losses summed (and for "mean" divided by check[0]; 0 when nothing is counted) into one
// float, on the device: the host never waits for the count to finish the forward.
//
// Vector access: 16-byte loads/stores in the row's aligned middle, scalar for the unaligned head and the tail, so
// any row length (odd vocabularies such as 50257, or 1) and any row offset works. Indices into the whole array are
// 64-bit: rows * V may exceed 2^31. Block size of the fallbacks: a multiple of 32, at most MAX_THREADS; one block
// per row.
//
// tessera-instantiate: cross_entropy_fwd<float>; cross_entropy_fwd<__half>; cross_entropy_fwd<__nv_bfloat16>
// tessera-instantiate: cross_entropy_fwd_cluster<float, 1, 8>; cross_entropy_fwd_cluster<float, 2, 8>
// tessera-instantiate: cross_entropy_fwd_cluster<float, 4, 8>; cross_entropy_fwd_cluster<float, 8, 8>
// tessera-instantiate: cross_entropy_fwd_cluster<float, 4, 16>; cross_entropy_fwd_cluster<float, 8, 16>
// tessera-instantiate: cross_entropy_fwd_cluster<__half, 1, 8>; cross_entropy_fwd_cluster<__half, 2, 8>
// tessera-instantiate: cross_entropy_fwd_cluster<__half, 4, 8>; cross_entropy_fwd_cluster<__half, 8, 8>
// tessera-instantiate: cross_entropy_fwd_cluster<__half, 4, 16>; cross_entropy_fwd_cluster<__half, 8, 16>
// tessera-instantiate: cross_entropy_fwd_cluster<__nv_bfloat16, 1, 8>; cross_entropy_fwd_cluster<__nv_bfloat16, 2, 8>
// tessera-instantiate: cross_entropy_fwd_cluster<__nv_bfloat16, 4, 8>; cross_entropy_fwd_cluster<__nv_bfloat16, 8, 8>
// tessera-instantiate: cross_entropy_fwd_cluster<__nv_bfloat16, 4, 16>; cross_entropy_fwd_cluster<__nv_bfloat16, 8, 16>
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
using tessera::exp2_approx;
using tessera::LOG2E;

// cross_entropy_fwd_cluster: threads per block, and the 16-byte packs of registers each SM gives the rows it holds
// (PACKS per thread x blocks per SM: 8 x 4 or 16 x 2, so 64 or 128 registers per thread). Measured on the H100
// (bench/tune_loss.py, bf16 8192 x 128256 with the gradient): 256 x 8 at 4 blocks/SM 1.66 / 1.69 / 1.665 ms
// (three runs), 256 x 16 at 2 1.67 / 1.75 / 1.697 ms, 512 x 8 at 2 1.77 / 1.75 ms, 512 x 4 at 3 2.03 ms, 1024 x 4
// at 1 2.39 ms.
constexpr int CLUSTER_THREADS = 256;
constexpr int CLUSTER_SM_PACKS = 32;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// The gradient's scale: grad_scale, or with per_count grad_scale / check[0] (when check[0] > 0). Read where it is
// used (held through the row's loads it cost a spill at 8 packs); a float division, correctly rounded, so for
// counts below 2^24 the same bits as the host's numpy.float32(1.0 / count) (a double division spilled too).
__device__ __forceinline__ float count_scale(float grad_scale, const unsigned long long *check, int per_count) {
    if (!per_count) return grad_scale;
    const unsigned long long count = check[0];
    return count ? grad_scale / (float)count : grad_scale;
}
__device__ __forceinline__ float exp_(float x) { return exp2f(x * LOG2E); }

// Two floats rounded to a 2-byte type, as one 32-bit word (.x in the low half): one conversion instruction.
__device__ __forceinline__ unsigned pair_bits(float a, float b, __nv_bfloat16) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<unsigned *>(&h);
}
__device__ __forceinline__ unsigned pair_bits(float a, float b, __half) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<unsigned *>(&h);
}

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
        if constexpr (sizeof(T) == 2) {
            unsigned *w = reinterpret_cast<unsigned *>(&raw);
#pragma unroll
            for (int i = 0; i < N / 2; ++i) w[i] = pair_bits(v[2 * i], v[2 * i + 1], T());
        } else {
            T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
            for (int i = 0; i < N; ++i) e[i] = tessera::from_float<T>(v[i]);
        }
    }
    // __stwb: an explicit 16-byte store (a plain uint4 assignment was split into four 4-byte stores here).
    __device__ __forceinline__ void store(T *p) const { __stwb(reinterpret_cast<uint4 *>(p), raw); }
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
    const float ls2 = log_s * LOG2E, eps_scaled = eps_v * scale, hit_scaled = hit * scale;
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
                for (int k = 0; k < N; ++k) v[k] = exp2_approx((v[k] - m) * LOG2E - ls2) * scale - eps_scaled;
                const long long at = target - col0 - j0;  // the target's place in this pack, if it is in it
                if (at >= 0 && at < N) {
#pragma unroll
                    for (int k = 0; k < N; ++k)
                        if (k == at) v[k] -= hit_scaled;
                }
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

// r[0:n] *= s, the block's threads striding over the row's packs.
template <typename T> __device__ void scale_row(T *r, long long n, float s) {
    constexpr int N = Pack<T>::N;
    const RowSplit<T> split(r, n);
    if (threadIdx.x < split.head) r[threadIdx.x] = from_float<T>(to_float(r[threadIdx.x]) * s);
    T *body = r + split.head;
    for (long long i = threadIdx.x; i < split.packs; i += blockDim.x) {
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
    if (j < n) r[j] = from_float<T>(to_float(r[j]) * s);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Cluster barrier halves: arrive publishes this block's earlier memory operations (shared memory included) to
// the cluster, wait makes the other blocks' published ones visible. Every thread of every block takes part.
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

// A float in block `rank`'s shared memory, at the place `local` has in this block's.
__device__ __forceinline__ float load_cluster_shared(const float *local, unsigned rank) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(local));
    unsigned remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}
#endif

}  // namespace tessera_loss

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define TESSERA_LOSS_CLUSTER(c)  // no clusters before Hopper: the kernel body is a trap there, never launched
#else
#define TESSERA_LOSS_CLUSTER(c) __cluster_dims__(c, 1, 1)
#endif

// A row's results: its loss and, unless row_max is null (the op's forward that makes the gradient needs neither,
// and skips their allocation), m and log_s.
__device__ __forceinline__ void store_row(float *loss, float *row_max, float *row_logsum, long long row, float l,
                                          float m, float log_s) {
    loss[row] = l;
    if (row_max != nullptr) {
        row_max[row] = m;
        row_logsum[row] = log_s;
    }
}

// logits [n_rows, vocab] row-major; targets [n_rows] int64; loss [n_rows] float; row_max, row_logsum [n_rows] float
// or both null.
// With write_grad != 0, grad [n_rows, vocab] (may be logits) gets (softmax - q) * scale, scale = grad_scale, or
// grad_scale / check[0] with per_count. check [2]: see the header (check[1] != 0: nothing is written).
template <typename T>
__global__ void __launch_bounds__(tessera_loss::MAX_THREADS)
cross_entropy_fwd(const T *logits, const long long *targets, float *loss, float *row_max, float *row_logsum,
                  T *grad, long long n_rows, long long vocab, long long ignore_index, float smoothing,
                  float grad_scale, int write_grad, const unsigned long long *check, int per_count) {
    using namespace tessera_loss;
    const long long row = blockIdx.x;
    if (row >= n_rows) return;
    const T *x = logits + row * vocab;
    T *g = grad + row * vocab;
    const long long t = targets[row];
    const bool refused = check[1] != 0;
    if (t == ignore_index || t < 0 || t >= vocab) {
        if (refused) return;
        const float v = t == ignore_index ? 0.0f : quiet_nan();
        if (threadIdx.x == 0) store_row(loss, row_max, row_logsum, row, v, v, v);
        if (write_grad) fill_row(g, vocab, v);
        return;
    }
    const float xt = to_float(x[t]);  // read before pass 2 may overwrite the row
    const RowStats st = row_stats(x, vocab);
    if (refused) return;  // uniform over the block, after its last barrier
    const float log_s = logf(st.s);
    if (threadIdx.x == 0) {
        float l = log_s + (1.0f - smoothing) * (st.m - xt);
        if (smoothing != 0.0f) l += smoothing * (st.m - st.sum / (float)vocab);
        store_row(loss, row_max, row_logsum, row, l, st.m, log_s);
    }
    if (write_grad)
        write_grad_row(x, g, vocab, 0, t, st.m, log_s, smoothing / (float)vocab, 1.0f - smoothing,
                       count_scale(grad_scale, check, per_count));
}

// Same arguments and results as cross_entropy_fwd; grid n_rows * CLUSTER blocks of CLUSTER_THREADS, and the row's
// 16-byte packs (after its unaligned head) at most CLUSTER * CLUSTER_THREADS * PACKS (the host checks both).
template <typename T, int CLUSTER, int PACKS>
__global__ void TESSERA_LOSS_CLUSTER(CLUSTER)
__launch_bounds__(tessera_loss::CLUSTER_THREADS, tessera_loss::CLUSTER_SM_PACKS / PACKS)
cross_entropy_fwd_cluster(const T *logits, const long long *targets, float *loss, float *row_max,
                          float *row_logsum, T *grad, long long n_rows, long long vocab, long long ignore_index,
                          float smoothing, float grad_scale, int write_grad, const unsigned long long *check,
                          int per_count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    using namespace tessera_loss;
    constexpr int N = Pack<T>::N;
    const long long row = blockIdx.x / CLUSTER;
    const int rank = blockIdx.x % CLUSTER;  // the block's rank in its (1-D) cluster
    const int tid = threadIdx.x;
    if (row >= n_rows) return;  // never: the grid is exactly n_rows clusters, and a cluster shares its row
    const T *x = logits + row * vocab;
    T *g = grad + row * vocab;
    const long long t = targets[row];
    const RowSplit<T> split(x, vocab);
    // This block's share: packs [p0, p1) of the row's body, plus the head (rank 0) and the tail (last rank).
    const int packs = (int)split.packs, per = (packs + CLUSTER - 1) / CLUSTER;
    const int p0 = min(packs, rank * per), p1 = min(packs, p0 + per);
    const int head = (int)split.head, tail = (int)(vocab - split.tail_start);
    const bool has_head = rank == 0 && tid < head, has_tail = rank == CLUSTER - 1 && tid < tail;
    const int mine = p1 - p0 > tid ? (p1 - p0 - tid + CLUSTER_THREADS - 1) / CLUSTER_THREADS : 0;  // my packs
    const T *body = x + head;
    T *gbody = g + head;

    if (t == ignore_index || t < 0 || t >= vocab) {
        if (check[1]) return;  // the same for every block of the cluster: none waits at a cluster barrier
        const float v = t == ignore_index ? 0.0f : quiet_nan();
        if (rank == 0 && tid == 0) store_row(loss, row_max, row_logsum, row, v, v, v);
        if (write_grad) {
            float f[N];
#pragma unroll
            for (int k = 0; k < N; ++k) f[k] = v;
            Pack<T> fill;
            fill.from_float(f);
#pragma unroll
            for (int k = 0; k < PACKS; ++k)
                if (k < mine) fill.store(gbody + (long long)(p0 + tid + k * CLUSTER_THREADS) * N);
            if (has_head) g[tid] = from_float<T>(v);
            if (has_tail) g[split.tail_start + tid] = from_float<T>(v);
        }
        return;
    }

    // Every load first (independent, all in flight), then the math.
    Pack<T> p[PACKS];
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
        if (k < mine) p[k].load(body + (long long)(p0 + tid + k * CLUSTER_THREADS) * N);
    const float head_v = has_head ? to_float(x[tid]) : neg_inf();
    const float tail_v = has_tail ? to_float(x[split.tail_start + tid]) : neg_inf();
    const float xt = rank == 0 && tid == 0 ? to_float(x[t]) : 0.0f;  // before any gradient overwrites the row

    // This thread's (max, sum of exp(x - max), sum), from registers: no online rescaling needed.
    float top = fmaxf(head_v, tail_v);
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
        if (k < mine) {
            float v[N];
            p[k].to_float(v);
#pragma unroll
            for (int i = 0; i < N; ++i) top = fmaxf(top, v[i]);
        }
    }
    RowStats st;
    st.m = top;
    if (top != neg_inf()) {  // else every value is -inf (or there is none): s and sum stay 0 (sum: see below)
        float s = 0.0f, sum = 0.0f;
        if (has_head) { s += exp2_approx((head_v - top) * LOG2E); sum += head_v; }
        if (has_tail) { s += exp2_approx((tail_v - top) * LOG2E); sum += tail_v; }
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            if (k < mine) {
                float v[N];
                p[k].to_float(v);
#pragma unroll
                for (int i = 0; i < N; ++i) { s += exp2_approx((v[i] - top) * LOG2E); sum += v[i]; }
            }
        }
        st.s = s;
        st.sum = sum;
    } else if (has_head || has_tail || mine > 0) {
        st.sum = neg_inf();  // the values are all -inf: so is their sum
    }
    // Loaded here, so that its latency hides behind the merges (see the header).
    const bool refused = check[1] != 0;  // a refused launch computes, then stores nothing
    st = block_merge(st);

    if constexpr (CLUSTER > 1) {
        __shared__ float block_stats[3];
        if (tid == 0) { block_stats[0] = st.m; block_stats[1] = st.s; block_stats[2] = st.sum; }
        cluster_arrive();
        cluster_wait();
        // Each warp merges the CLUSTER blocks' partials (lane r reads block r's), in the same order everywhere.
        const int lane = tid % WARP;
        RowStats all;
        if (lane < CLUSTER) {
            all.m = load_cluster_shared(&block_stats[0], lane);
            all.s = load_cluster_shared(&block_stats[1], lane);
            all.sum = load_cluster_shared(&block_stats[2], lane);
        }
        cluster_arrive();  // done reading the other blocks' shared memory; the matching wait is before exit
#pragma unroll
        for (int off = CLUSTER / 2; off > 0; off >>= 1)
            all.merge(__shfl_xor_sync(0xffffffffu, all.m, off), __shfl_xor_sync(0xffffffffu, all.s, off),
                      __shfl_xor_sync(0xffffffffu, all.sum, off));
        st.m = __shfl_sync(0xffffffffu, all.m, 0);
        st.s = __shfl_sync(0xffffffffu, all.s, 0);
        st.sum = __shfl_sync(0xffffffffu, all.sum, 0);
    }

    const float log_s = logf(st.s);
    if (!refused && rank == 0 && tid == 0) {
        float l = log_s + (1.0f - smoothing) * (st.m - xt);
        if (smoothing != 0.0f) l += smoothing * (st.m - st.sum / (float)vocab);
        store_row(loss, row_max, row_logsum, row, l, st.m, log_s);
    }
    if (write_grad && !refused) {
        // grad = exp((x - m) - log_s) * scale - eps/V * scale, and - (1 - eps) * scale at the target.
        grad_scale = count_scale(grad_scale, check, per_count);
        const float m = st.m, ls2 = log_s * LOG2E, eps_scaled = smoothing / (float)vocab * grad_scale;
        const float hit_scaled = (1.0f - smoothing) * grad_scale;
        const long long at_body = t - head;  // the target's place in the body (negative: in the head)
        const int t_pack = at_body >= 0 ? (int)(at_body / N) : -1, t_lane = at_body >= 0 ? (int)(at_body % N) : -1;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            if (k < mine) {
                const int i = p0 + tid + k * CLUSTER_THREADS;
                float v[N];
                p[k].to_float(v);
#pragma unroll
                for (int e = 0; e < N; ++e) v[e] = exp2_approx((v[e] - m) * LOG2E - ls2) * grad_scale - eps_scaled;
                if (i == t_pack) {
#pragma unroll
                    for (int e = 0; e < N; ++e)
                        if (e == t_lane) v[e] -= hit_scaled;
                }
                p[k].from_float(v);
                p[k].store(gbody + (long long)i * N);
            }
        }
        if (has_head) {
            const float v = exp2_approx((head_v - m) * LOG2E - ls2) * grad_scale - eps_scaled;
            g[tid] = from_float<T>(tid == t ? v - hit_scaled : v);
        }
        if (has_tail) {
            const long long j = split.tail_start + tid;
            const float v = exp2_approx((tail_v - m) * LOG2E - ls2) * grad_scale - eps_scaled;
            g[j] = from_float<T>(j == t ? v - hit_scaled : v);
        }
    }
    if constexpr (CLUSTER > 1) tessera_loss::cluster_wait();  // no block leaves while others may read its stats
#else
    __trap();  // clusters need compute capability 9.0; the host never launches this on older GPUs
#endif
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

// x [n_rows, n_cols] row-major; x[row, :] *= g[row * g_stride], skipped where the factor is exactly 1. Any grid:
// blocks stride over the rows.
template <typename T>
__global__ void scale_rows(T *x, const float *g, long long n_rows, long long n_cols, long long g_stride) {
    using namespace tessera_loss;
    for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const float s = g[row * g_stride];
        if (s != 1.0f) scale_row(x + row * n_cols, n_cols, s);
    }
}

// targets [n] int64; out[0] = targets != ignore_index, out[1] = those outside [0, n_classes). One block, any
// multiple of 32 threads up to MAX_THREADS, striding over the targets (so no zeroing and no atomics).
extern "C" __global__ void count_targets(const long long *targets, long long n, long long n_classes,
                                         long long ignore_index, unsigned long long *out) {
    using namespace tessera_loss;
    __shared__ unsigned long long partial[2][WARP];
    unsigned long long counted = 0, bad = 0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const long long t = targets[i];
        if (t != ignore_index) {
            ++counted;
            bad += t < 0 || t >= n_classes;
        }
    }
#pragma unroll
    for (int off = WARP / 2; off > 0; off >>= 1) {
        counted += __shfl_xor_sync(0xffffffffu, counted, off);
        bad += __shfl_xor_sync(0xffffffffu, bad, off);
    }
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) { partial[0][warp] = counted; partial[1][warp] = bad; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / WARP); ++w) { counted += partial[0][w]; bad += partial[1][w]; }
        out[0] = counted;
        out[1] = bad;
    }
}

// loss [n] float (rows that are ignored hold 0); out[0] = their sum, divided by check[0] when mean != 0 (0 when
// check[0] is 0: a batch with nothing counted gives 0, not NaN); NaN when check[1] != 0 (the forward wrote no
// loss). One block, any multiple of 32 threads up to MAX_THREADS; summed in double in a fixed order (each thread
// strides, then a fixed tree), so the result is the same on every run.
extern "C" __global__ void reduce_loss(const float *loss, long long n, const unsigned long long *check, int mean,
                                       float *out) {
    using namespace tessera_loss;
    __shared__ double partial[WARP];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += (double)loss[i];
#pragma unroll
    for (int off = WARP / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / WARP); ++w) acc += partial[w];
        const unsigned long long counted = check[0];
        if (mean) acc = counted ? acc / (double)counted : 0.0;
        out[0] = check[1] ? quiet_nan() : (float)acc;
    }
}
