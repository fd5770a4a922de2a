// Small device helpers every kernel may include: `#include "common.cuh"`.
// Storage types float, __half and __nv_bfloat16 are read and written as float (math happens in float);
// warp and block reductions for sums and maxima. Everything lives in namespace tessera; macros start TESSERA_.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define TESSERA_WARP_SIZE 32
#define TESSERA_FULL_MASK 0xffffffffu
#define TESSERA_DEVICE __device__ __forceinline__

namespace tessera {

// ---- float <-> storage type -------------------------------------------------------------------------------
TESSERA_DEVICE float to_float(float x) { return x; }
TESSERA_DEVICE float to_float(__half x) { return __half2float(x); }
TESSERA_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> TESSERA_DEVICE T from_float(float x);
template <> TESSERA_DEVICE float from_float<float>(float x) { return x; }
template <> TESSERA_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> TESSERA_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> TESSERA_DEVICE float load_float(const T *p, long long i) { return to_float(p[i]); }
template <typename T> TESSERA_DEVICE void store_float(T *p, long long i, float v) { p[i] = from_float<T>(v); }

TESSERA_DEVICE float neg_inf() { return __int_as_float(0xff800000); }

// exp(x) = exp2(x * LOG2E) and log(x) = log2(x) * LN2: the softmax kernels work in base 2 (ex2.approx).
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
TESSERA_DEVICE long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }
// 2^x in one MUFU.EX2 (relative error ~2^-22); 2^-inf = 0, and results below 2^-126 flush to 0 (exp2f adds a
// range fix-up for those, which no softmax sum (>= 1) or stored probability can tell apart).
TESSERA_DEVICE float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ---- programmatic dependent launch (runtime.launch(..., pdl=True); sm_90 and later) -------------------------
// A kernel launched with it may start while the kernel before it in the stream still runs: whatever it does
// before pdl_wait() must read nothing that kernel writes and write nothing (e.g. only prefetch weights), and
// pdl_wait() returns once that kernel has finished and its writes are visible. pdl_launch_dependents() lets the
// next such kernel start once every block of this one has called it (or exited). Both are no-ops on a normal
// launch and before sm_90.
TESSERA_DEVICE void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
TESSERA_DEVICE void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---- reductions -------------------------------------------------------------------------------------------
struct SumOp {
    TESSERA_DEVICE float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    TESSERA_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Every lane of a full warp gets the reduction of the 32 values (butterfly; all 32 lanes must take part).
template <typename Op> TESSERA_DEVICE float warp_reduce(float v, Op op) {
#pragma unroll
    for (int offset = TESSERA_WARP_SIZE / 2; offset > 0; offset >>= 1)
        v = op(v, __shfl_xor_sync(TESSERA_FULL_MASK, v, offset));
    return v;
}
TESSERA_DEVICE float warp_sum(float v) { return warp_reduce(v, SumOp()); }
TESSERA_DEVICE float warp_max(float v) { return warp_reduce(v, MaxOp()); }

// Every thread of the block gets the reduction of one value per thread.
// Limits: a 1-D block (threadIdx.x) whose size is a multiple of 32, at most 1024; every thread must call it
// (it contains __syncthreads). Calls may follow one another: the first barrier keeps a later call from
// overwriting partials an earlier one is still reading.
template <typename Op> TESSERA_DEVICE float block_reduce(float v, Op op, float identity) {
    __shared__ float partials[TESSERA_WARP_SIZE];
    const int lane = threadIdx.x % TESSERA_WARP_SIZE, warp = threadIdx.x / TESSERA_WARP_SIZE;
    const int warps = (blockDim.x + TESSERA_WARP_SIZE - 1) / TESSERA_WARP_SIZE;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) partials[warp] = v;
    __syncthreads();
    return warp_reduce(lane < warps ? partials[lane] : identity, op);
}
TESSERA_DEVICE float block_sum(float v) { return block_reduce(v, SumOp(), 0.0f); }
TESSERA_DEVICE float block_max(float v) { return block_reduce(v, MaxOp(), neg_inf()); }

}  // namespace tessera
