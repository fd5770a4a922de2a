// SwiGLU's elementwise part: out = swish(gate, beta) * up = gate * sigmoid(beta * gate) * up, and its gradient.
// float, __half or __nv_bfloat16 storage; math in float (one rounding per output).
//
// gate, up, dgate, dup are [rows, cols] matrices with their own row strides (in elements), so the two halves of
// the fused GEMM output [rows, 2 * cols] = [gate | up] are read in place, and the backward writes straight into
// the halves of one [rows, 2 * cols] gradient. out and dout are contiguous [rows, cols].
// Tiling: block (bx, by); thread (x, y) owns columns [VEC * c, VEC * c + VEC) with c = blockIdx.x * bx + x, of
// rows blockIdx.y * by + y, then every gridDim.y * by rows after (grid.y is capped at 65535). VEC (8, 4, 2 or 1)
// is chosen by the host so that every vector access is aligned: it divides cols, every row stride and every
// pointer's alignment. No integer division per element; offsets are 64-bit.
//
// tessera-instantiate: swiglu_fwd<float, 4>; swiglu_fwd<float, 2>; swiglu_fwd<float, 1>
// tessera-instantiate: swiglu_fwd<__half, 8>; swiglu_fwd<__half, 4>; swiglu_fwd<__half, 2>; swiglu_fwd<__half, 1>
// tessera-instantiate: swiglu_fwd<__nv_bfloat16, 8>; swiglu_fwd<__nv_bfloat16, 4>; swiglu_fwd<__nv_bfloat16, 2>; swiglu_fwd<__nv_bfloat16, 1>
// tessera-instantiate: swiglu_bwd<float, 4>; swiglu_bwd<float, 2>; swiglu_bwd<float, 1>
// tessera-instantiate: swiglu_bwd<__half, 8>; swiglu_bwd<__half, 4>; swiglu_bwd<__half, 2>; swiglu_bwd<__half, 1>
// tessera-instantiate: swiglu_bwd<__nv_bfloat16, 8>; swiglu_bwd<__nv_bfloat16, 4>; swiglu_bwd<__nv_bfloat16, 2>; swiglu_bwd<__nv_bfloat16, 1>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace {

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

using tessera::from_float;
using tessera::to_float;

// 1 / (1 + e^-z) without overflow warnings: expf(-z) is inf for z < -88, which gives exactly 0.
__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

}  // namespace

template <typename T, int VEC>
__global__ void swiglu_fwd(const T *__restrict__ gate, long long gate_stride, const T *__restrict__ up,
                           long long up_stride, T *__restrict__ out, long long rows, int cols, float beta) {
    using TV = Vec<T, VEC>;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols / VEC) return;
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < rows;
         r += (long long)gridDim.y * blockDim.y) {
        const TV g = reinterpret_cast<const TV *>(gate + r * gate_stride)[c];
        const TV u = reinterpret_cast<const TV *>(up + r * up_stride)[c];
        TV o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float gf = to_float(g.v[j]);
            o.v[j] = from_float<T>(gf * sigmoid(beta * gf) * to_float(u.v[j]));
        }
        reinterpret_cast<TV *>(out + r * cols)[c] = o;
    }
}

// With s = sigmoid(beta * g): d out / d gate = up * (s + beta * g * s * (1 - s)),  d out / d up = g * s.
template <typename T, int VEC>
__global__ void swiglu_bwd(const T *__restrict__ gate, long long gate_stride, const T *__restrict__ up,
                           long long up_stride, const T *__restrict__ dout, T *__restrict__ dgate,
                           long long dgate_stride, T *__restrict__ dup, long long dup_stride, long long rows,
                           int cols, float beta) {
    using TV = Vec<T, VEC>;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols / VEC) return;
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < rows;
         r += (long long)gridDim.y * blockDim.y) {
        const TV g = reinterpret_cast<const TV *>(gate + r * gate_stride)[c];
        const TV u = reinterpret_cast<const TV *>(up + r * up_stride)[c];
        const TV d = reinterpret_cast<const TV *>(dout + r * cols)[c];
        TV dg, du;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float gf = to_float(g.v[j]), uf = to_float(u.v[j]), df = to_float(d.v[j]);
            const float s = sigmoid(beta * gf);
            dg.v[j] = from_float<T>(df * uf * (s + beta * gf * s * (1.0f - s)));
            du.v[j] = from_float<T>(df * gf * s);
        }
        reinterpret_cast<TV *>(dgate + r * dgate_stride)[c] = dg;
        reinterpret_cast<TV *>(dup + r * dup_stride)[c] = du;
    }
}
