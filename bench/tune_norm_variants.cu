// RMSNorm forward variants for bench/tune_norm.py (a tuning experiment, not part of the package): the same math
// as norm.cu's rms_norm_fwd (y = x * rsqrt(mean(x^2) + eps) * w, f32 sums, x kept packed), for rows read as
// 16-byte vectors (VEC * sizeof(T) == 16), a row owned by blockDim.x threads (blockDim.y rows a block when
// blockDim.x == 32), with three ways of getting the bytes in flight:
//   fwd_ring  persistent blocks, a cp.async ring of STAGES rows in shared memory (norm.cu's NV == 1 path);
//   fwd_bulk  persistent blocks, one cp.async.bulk (TMA, 1-D) copy a row into a ring of STAGES rows, completing on
//             an mbarrier (sm_90): one instruction a row instead of one a thread;
//   fwd_plain one row per block row, no loop: NV vectors a thread straight into registers.
// PF: the L2::256B prefetch hint on loads (and L1::no_allocate on plain loads); CS: st.global.cs stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "pack.cuh"

using tessera::Pack;

namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// norm.cu's row_sum: one barrier a call when blockDim.x > 32, partials alternating between two buffers.
__device__ __forceinline__ float row_sum(float v, int &parity) {
    v = warp_sum(v);
    if (blockDim.x == 32) return v;
    __shared__ float partial[2][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) partial[parity][warp] = v;
    __syncthreads();
    v = warp_sum(lane < warps ? partial[parity][lane] : 0.0f);
    parity ^= 1;
    return v;
}

template <typename T, int VEC> __device__ __forceinline__ void keep_packed(Pack<T, VEC> &p) {
    if constexpr (sizeof(T) == 2) {
#pragma unroll
        for (int i = 0; i < Pack<T, VEC>::WORDS; ++i) asm volatile("" : "+r"(p.w[i]));
    }
}

__device__ __forceinline__ unsigned smem_addr(const void *p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

template <int PF> __device__ __forceinline__ void copy_async16(void *dst, const void *src, int src_bytes) {
    if constexpr (PF)
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                     "r"(src_bytes) : "memory");
    else
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                     "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <int PF> __device__ __forceinline__ uint4 load16(const void *p) {
    uint4 v;
    if constexpr (PF)
        asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else
        asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

template <int CS> __device__ __forceinline__ void store16(void *p, unsigned a, unsigned b, unsigned c, unsigned d) {
    if constexpr (CS)
        asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d)
                     : "memory");
    else
        *reinterpret_cast<uint4 *>(p) = make_uint4(a, b, c, d);
}

}  // namespace

// y's vector v of a row: x's vector a * r * w, one 16-byte store.
template <typename T, typename W, int VEC, int CS>
__device__ __forceinline__ void emit(T *yrow, int v, const Pack<T, VEC> &a, const Pack<W, VEC> &wv, float r) {
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; j += 2) o.set(j, a.get(j) * r * wv.get(j), a.get(j + 1) * r * wv.get(j + 1));
    store16<CS>(yrow + v * VEC, o.w[0], o.w[1], o.w[2], o.w[3]);
}

// ---------------------------------------------------------------------------------------------- cp.async ring
template <typename T, typename W, int VEC, int STAGES, int PF, int CS>
__global__ void __launch_bounds__(512, 4)
fwd_ring(const T *__restrict__ x, const W *__restrict__ w, T *__restrict__ y, long long rows, int D, float eps) {
    using TP = Pack<T, VEC>;
    using WP = Pack<W, VEC>;
    static_assert(TP::BYTES == 16, "16-byte vectors");
    const int nvec = D / VEC, tid = threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.y;
    const long long first = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    WP wr = tid < nvec ? WP::load(w, tid) : WP::zero();
    extern __shared__ uint4 ring[];
    const int threads = blockDim.x * blockDim.y;
    uint4 *mine = ring + threadIdx.y * blockDim.x + tid;
    const auto fetch = [&](int stage, long long row) {
        const bool live = row < rows && tid < nvec;
        copy_async16<PF>(mine + stage * threads, x + (live ? row * D + tid * VEC : 0), live ? 16 : 0);
        copy_async_commit();
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) fetch(s, first + s * stride);
    int parity = 0, stage = 0;
    for (long long row = first; row < rows; row += stride) {
        fetch(stage == 0 ? STAGES - 1 : stage - 1, row + (STAGES - 1) * stride);
        copy_async_wait<STAGES - 1>();
        const uint4 u = mine[stage * threads];
        TP a = {{u.x, u.y, u.z, u.w}};
        keep_packed(wr);
        float ss = 0.0f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += a.get(j) * a.get(j);
        keep_packed(a);
        ss = row_sum(ss, parity);
        const float r = rsqrtf(ss / D + eps);
        if (tid < nvec) emit<T, W, VEC, CS>(y + row * D, tid, a, wr, r);
        stage = stage == STAGES - 1 ? 0 : stage + 1;
    }
    copy_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------- TMA bulk ring
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(unsigned long long *bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned long long *bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long *bar, unsigned phase) {
    unsigned done;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_addr(bar)), "r"(phase) : "memory");
    } while (!done);
}
__device__ __forceinline__ void bulk_load(void *dst, const void *src, unsigned bytes, unsigned long long *bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}
#endif

constexpr int MAX_SLOTS = 4;  // rows a block at once (blockDim.y), warp-per-row blocks

template <typename T, typename W, int VEC, int NV, int STAGES, int CS>
__global__ void __launch_bounds__(512)
fwd_bulk(const T *__restrict__ x, const W *__restrict__ w, T *__restrict__ y, long long rows, int D, float eps) {
#if __CUDA_ARCH__ >= 900
    using TP = Pack<T, VEC>;
    using WP = Pack<W, VEC>;
    static_assert(TP::BYTES == 16, "16-byte vectors");
    const int nvec = D / VEC, tid = threadIdx.x, slot = threadIdx.y, slots = blockDim.y;
    const long long stride = (long long)gridDim.x * slots;
    const long long first = (long long)blockIdx.x * slots + slot;
    const unsigned row_bytes = (unsigned)D * sizeof(T);
    extern __shared__ uint4 ring[];  // [STAGES][slots][nvec] vectors
    __shared__ __align__(8) unsigned long long full[STAGES][MAX_SLOTS];
    uint4 *mine = ring + slot * nvec;
    const int stage_vecs = slots * nvec;
    const bool leader = tid == 0;
    if (leader) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) mbar_init(&full[s][slot], 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    WP wr[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int v = tid + k * blockDim.x;
        wr[k] = v < nvec ? WP::load(w, v) : WP::zero();
    }
    const auto issue = [&](int s, long long row) {
        if (row < rows) {
            mbar_expect(&full[s][slot], row_bytes);
            bulk_load(mine + s * stage_vecs, x + row * D, row_bytes, &full[s][slot]);
        }
    };
    if (leader) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) issue(s, first + s * stride);
    }
    int parity = 0, stage = 0;
    unsigned phase = 0;
    for (long long row = first; row < rows; row += stride) {
#pragma unroll
        for (int k = 0; k < NV; ++k) keep_packed(wr[k]);
        mbar_wait(&full[stage][slot], phase);
        TP a[NV];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int v = tid + k * blockDim.x;
            if (v < nvec) {
                const uint4 u = mine[stage * stage_vecs + v];
                a[k] = {{u.x, u.y, u.z, u.w}};
            } else {
                a[k] = TP::zero();
            }
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss += a[k].get(j) * a[k].get(j);
            keep_packed(a[k]);
        }
        ss = row_sum(ss, parity);  // a barrier (or, a warp to a row, the shuffles): the stage has been read
        if (blockDim.x == 32) __syncwarp();
        if (leader) issue(stage, row + STAGES * stride);
        const float r = rsqrtf(ss / D + eps);
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int v = tid + k * blockDim.x;
            if (v < nvec) emit<T, W, VEC, CS>(y + row * D, v, a[k], wr[k], r);
        }
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
#endif
}

// ---------------------------------------------------------------------------------------------- one row a block
template <typename T, typename W, int VEC, int NV, int PF, int CS>
__global__ void __launch_bounds__(512)
fwd_plain(const T *__restrict__ x, const W *__restrict__ w, T *__restrict__ y, long long rows, int D, float eps) {
    using TP = Pack<T, VEC>;
    using WP = Pack<W, VEC>;
    static_assert(TP::BYTES == 16, "16-byte vectors");
    const int nvec = D / VEC, tid = threadIdx.x;
    const long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // uniform across a block when blockDim.x > 32 (blockDim.y == 1 then)
    const T *xr = x + row * D;
    TP a[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int v = tid + k * blockDim.x;
        if (v < nvec) {
            const uint4 u = load16<PF>(xr + v * VEC);
            a[k] = {{u.x, u.y, u.z, u.w}};
        } else {
            a[k] = TP::zero();
        }
    }
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += a[k].get(j) * a[k].get(j);
        keep_packed(a[k]);
    }
    int parity = 0;
    ss = row_sum(ss, parity);
    const float r = rsqrtf(ss / D + eps);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int v = tid + k * blockDim.x;
        if (v < nvec) emit<T, W, VEC, CS>(y + row * D, v, a[k], WP::load(w, v), r);
    }
}
