// gemm_sm90.cu: int8 and fp8 GEMMs on Hopper (wgmma, TMA, warp specialization) from CUTLASS 4.2's SM90 collectives,
// launched by tessera_cp/nn/casted.py (int8_matmul and w8a8_linear with gemm="sm90", fp8_matmul). Every product is
//   D[m, n] = sum_k A[m, k] * B[n, k]  (A [M, K], B [N, K], both K-contiguous: CUTLASS's "TN" layout),
// D [M, N] row-major with leading dimension N. Cluster 2 x 1 (the B tile multicast to both CTAs), cooperative
// schedule (2 consumer warpgroups, each half of the tile's rows), persistent tile scheduler.
//   s8:        int8 x int8, exact int32 accumulation (wrapping like int32 arithmetic), int32 D: the raw sums, which
//              casted.py's sm90_scale_epilogue launch turns into the W8A8 output. Tile 128 x 256 x 128.
//   e4m3_bf16: fp8 e4m3 x e4m3, f32 accumulation (CUTLASS promotes the tensor cores' partial sums into f32
//              registers every 4 k-blocks), D = bf16(alpha * acc) with alpha = a_scale[0] * b_scale[0] (fused).
//              Tile 128 x 128 x 128: the promotion keeps a second accumulator set, and at 128 x 256 the two
//              (2 x 128 floats a thread) spill.
//   e4m3_f32:  the same product with f32 D (fused alpha, or 1 and per-row / per-column scales in the epilogue kernel)
//   e4m3_bf16_fast, e4m3_f32_fast: the same without the promotion (CUTLASS's FP8FastAccum schedule, torch's
//              use_fast_accum): the tensor cores' own accumulation over all of K, faster and less exact. Tile
//              128 x 256 x 128.
//   e4m3_bf16_fast_pp: e4m3_bf16_fast with the ping-pong schedule (each consumer warpgroup owns a 128 x 128 tile,
//              so one's epilogue overlaps the other's main loop): the same bits (each element's k order is the
//              same), 1166-1177 against 992-1005 TFLOP/s at 8192^3 on the H100 (bench/tune_gemm90.py, two runs).
//              Tried and not kept: int8 ping-pong 128 x 128 (1191-1214 against the cooperative 1271 TOP/s at
//              8192^3), e4m3_bf16 ping-pong 64 x 128 with the promotion (627 against 962 TFLOP/s).
// The launcher's TMA boxes follow the tiles: A 128 rows, B tile_n / 2 rows (the multicast halves), 128 bytes of K.
// Built with -DNDEBUG (nvrtc_cache.CUTE_OPTIONS): CUTLASS's device asserts are calls, and a call inside the
// mainloop serializes wgmma (ptxas C7510) and spills.
//
// Why two kernels per GEMM. The kernel (GemmUniversal + CollectiveBuilder mainloop + DefaultEpilogue, built without
// the epilogue collective builder, which does not compile under NVRTC) takes a Params struct that CUTLASS builds on
// the host, TMA descriptors included. Under NVRTC there is no host code, so:
//   <cfg>_setup (1 thread) builds Params on the device: the collectives' own to_underlying_arguments (under NVRTC
//   CuTe leaves the TMA descriptors zero) and a mirror of the tile scheduler's (scheduler_params); it copies in the
//   two descriptors Python encoded with the driver (tma.encode_tiled with exactly the shape, strides, box and
//   swizzle CuTe computes: casted.py _sm90_gemm), writes Params to global memory and reports the grid, block and
//   shared memory; <cfg> (the GEMM) reads Params from that buffer. TMA takes descriptors in global memory.
// Clusters come from __cluster_dims__, so a plain cuLaunchKernel (CuPy) launches them.
//
// Contract (the launchers check or pad): K a multiple of 16 (TMA strides are 16-byte multiples), A, B 16-byte
// aligned and C-contiguous; M, N free (TMA zero-fills rows and k past the edges, the epilogue predicates stores).
// Hopper-only: for sm_80 every kernel compiles to an empty body and must not be launched.
//
// tessera-instantiate: gemm_sm90_s8_setup; gemm_sm90_s8; gemm_sm90_e4m3_bf16_setup; gemm_sm90_e4m3_bf16
// tessera-instantiate: gemm_sm90_e4m3_f32_setup; gemm_sm90_e4m3_f32
// tessera-instantiate: gemm_sm90_e4m3_bf16_fast_setup; gemm_sm90_e4m3_bf16_fast
// tessera-instantiate: gemm_sm90_e4m3_bf16_fast_pp_setup; gemm_sm90_e4m3_bf16_fast_pp
// tessera-instantiate: gemm_sm90_e4m3_f32_fast_setup; gemm_sm90_e4m3_f32_fast
// tessera-instantiate: sm90_scale_epilogue<int, __nv_bfloat16>; sm90_scale_epilogue<int, __half>
// tessera-instantiate: sm90_scale_epilogue<int, float>; sm90_scale_epilogue<float, __nv_bfloat16>
// tessera-instantiate: sm90_scale_epilogue<float, __half>; sm90_scale_epilogue<float, float>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TESSERA_SM90 1
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/epilogue/collective/default_epilogue.hpp>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/epilogue/thread/linear_combination.h>
#endif

// <cfg>_setup writes 6 ints for the launcher: grid x, y, z, block x, dynamic shared bytes, sizeof(Params).
constexpr int SM90_PARAMS_BYTES = 2048;  // the launcher's buffer; static_assert'ed below

#ifdef TESSERA_SM90
namespace tessera_sm90 {
using namespace cute;

// (hi * 2^64 + lo) / d for hi < d, by long division: CUTLASS's uint128_t divides only on GCC x86-64 hosts and
// traps (brkpt) in device code, NVRTC's __int128 needs -device-int128 across all of CUTLASS.
__device__ inline uint64_t div128(uint64_t hi, uint64_t lo, uint64_t d) {
    uint64_t q = 0, r = hi;
    for (int i = 63; i >= 0; --i) {
        const bool carry = r >> 63;
        r = (r << 1) | ((lo >> i) & 1);
        if (carry || r >= d) {
            r -= d;
            q |= 1ull << i;
        }
    }
    return q;
}

// cutlass::FastDivmodU64(d), the same fields, without uint128_t.
__device__ inline cutlass::FastDivmodU64 fast_divmod_u64(uint64_t d) {
    cutlass::FastDivmodU64 f;
    f.divisor = d;
    f.multiplier = 1;
    f.shift_right = 0;
    f.round_up = 0;
    if (d) {
        f.shift_right = cutlass::FastDivmodU64::integer_log2(d);
        if ((d & (d - 1)) == 0) {
            f.multiplier = 0;
        } else {
            const uint64_t pow2 = uint64_t(1) << f.shift_right;
            const uint64_t lo = div128(pow2, 0, d);
            f.multiplier = div128(pow2, pow2, d);
            f.round_up = lo == f.multiplier ? 1 : 0;
        }
    }
    return f;
}

template <class ElementAB, class ElementAcc, class ElementD, class TileShape, class ClusterShape, class Schedule,
          cutlass::epilogue::thread::ScaleType::Kind Scale>
struct Gemm {
    using LayoutA = cutlass::layout::RowMajor;     // A [M, K], K contiguous
    using LayoutB = cutlass::layout::ColumnMajor;  // B [N, K] seen as K x N column-major
    static constexpr int Align = 16 / sizeof(ElementAB);
    // One output per thread operation: DefaultEpilogue then stores D without any alignment requirement on N.
    // The op converts the accumulators to its compute type first: int32 for int32 sums (a float would round
    // sums past 2^24), float for fp8.
    using Compute = cute::conditional_t<cute::is_same_v<ElementAcc, int32_t>, int32_t, float>;
    using ThreadOp = cutlass::epilogue::thread::LinearCombination<ElementD, 1, ElementAcc, Compute, Scale>;
    using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
        cutlass::epilogue::collective::DefaultEpilogue<void, cutlass::detail::TagToStrideC_t<cutlass::layout::RowMajor>,
                                                       cutlass::detail::TagToStrideC_t<cutlass::layout::RowMajor>,
                                                       ThreadOp, cutlass::gemm::EpilogueDefault>>;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, Align, ElementAB, LayoutB, Align,
        ElementAcc, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        Schedule>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
    using Params = typename Kernel::Params;
    static_assert(sizeof(Params) <= SM90_PARAMS_BYTES, "Params outgrew the launcher's buffer");
    static_assert(alignof(Params) <= 256, "CuPy allocations are 256-byte aligned");

    // PersistentTileSchedulerSm90::to_underlying_arguments (Params::initialize), its FastDivmodU64s built by
    // fast_divmod_u64: the library's constructor traps for divisors that are not powers of two (e.g. 33 tile rows).
    using Sched = typename Kernel::TileScheduler;
    using SchedParams = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90Params;
    static_assert(cute::is_same_v<typename Sched::Params, SchedParams>, "scheduler_params mirrors this scheduler");
    static __device__ SchedParams scheduler_params(Shape<int, int, int, int> problem,
                                                   typename Sched::Arguments const &args) {
        constexpr int CM = size<0>(ClusterShape{}), CN = size<1>(ClusterShape{});
        const dim3 blocks = Sched::get_tiled_cta_shape_mnl(problem, TileShape{}, ClusterShape{});
        const int log_swizzle = SchedParams::get_log_swizzle_size(blocks.x, blocks.y, args.max_swizzle_size);
        const uint32_t bm = cutlass::round_up(blocks.x, (1 << log_swizzle) * CM);
        const uint32_t bn = cutlass::round_up(blocks.y, (1 << log_swizzle) * CN);
        SchedParams sp{};
        sp.problem_tiles_m_ = bm / CM;
        sp.problem_tiles_n_ = bn / CN;
        sp.problem_tiles_l_ = blocks.z;
        sp.cluster_shape_m_ = CM;
        sp.cluster_shape_n_ = CN;
        sp.raster_order_ = SchedParams::get_rasterization_order(bm, bn, args.raster_order);
        sp.blocks_per_problem_ = (uint64_t)bm * bn * blocks.z;
        sp.log_swizzle_size_ = log_swizzle;
        sp.divmod_batch_ = fast_divmod_u64((uint64_t)bm * bn);
        const bool along_n = sp.raster_order_ == SchedParams::RasterOrder::AlongN;
        sp.divmod_cluster_shape_major_ = cutlass::FastDivmodU64Pow2(along_n ? CN : CM);
        sp.divmod_cluster_shape_minor_ = cutlass::FastDivmodU64Pow2(along_n ? CM : CN);
        sp.divmod_cluster_blk_major_ = fast_divmod_u64(along_n ? bn / CN : bm / CM);
        return sp;
    }

    static __device__ void setup(const cute::TmaDescriptor &tma_a, const cute::TmaDescriptor &tma_b, const void *A,
                                 const void *B, void *D, int M, int N, int K, int sms, float alpha, char *out,
                                 int *info) {
        using EA = typename Mainloop::ElementA;
        using ED = typename Epilogue::ElementD;
        // Kernel::to_underlying_arguments and get_grid_shape, minus their host-only branches (the SM count query,
        // std::is_const_v), which NVRTC cannot compile. Packed strides: (leading dimension, 1, matrix size).
        const auto problem = make_shape(M, N, K, 1);
        typename Mainloop::StrideA dA{};
        get<0>(dA) = K; get<2>(dA) = (int64_t)M * K;
        typename Mainloop::StrideB dB{};
        get<0>(dB) = K; get<2>(dB) = (int64_t)N * K;
        typename Epilogue::StrideD dD{};
        get<0>(dD) = N; get<2>(dD) = (int64_t)M * N;
        typename Mainloop::Arguments main_args{static_cast<const EA *>(A), dA, static_cast<const EA *>(B), dB};
        typename Epilogue::Arguments epi_args{};
        epi_args.thread.alpha = static_cast<Compute>(alpha);
        epi_args.thread.beta = Compute(0);
        epi_args.ptr_C = nullptr;
        epi_args.dC = dD;
        epi_args.ptr_D = static_cast<ED *>(D);
        epi_args.dD = dD;
        cutlass::KernelHardwareInfo hw{0, sms, 0};
        typename Sched::Arguments sched_args{};
        Params p{};  // field by field: the cooperative kernel's Params has a workspace pointer (left null), the
                     // ping-pong kernel's none
        p.mode = cutlass::gemm::GemmUniversalMode::kGemm;
        p.problem_shape = problem;
        p.mainloop = Mainloop::to_underlying_arguments(problem, main_args, nullptr);
        p.epilogue = Epilogue::to_underlying_arguments(problem, epi_args, nullptr);
        p.hw_info = hw;
        p.scheduler = scheduler_params(problem, sched_args);
        // The descriptors CuTe would have encoded on the host (left zero under NVRTC).
        *const_cast<cute::TmaDescriptor *>(p.mainloop.tma_load_a.get_tma_descriptor()) = tma_a;
        *const_cast<cute::TmaDescriptor *>(p.mainloop.tma_load_b.get_tma_descriptor()) = tma_b;
        *reinterpret_cast<Params *>(out) = p;
        // Release the descriptor writes to the tensormap proxy; the GEMM acquires them (the buffer's address may
        // have held other descriptors before).
        asm volatile("fence.proxy.tensormap::generic.release.gpu;" ::: "memory");
        typename Sched::Arguments grid_args{};
        grid_args.max_swizzle_size = 1 << p.scheduler.log_swizzle_size_;
        grid_args.raster_order = p.scheduler.raster_order_ == Sched::RasterOrder::AlongN
                                     ? Sched::RasterOrderOptions::AlongN : Sched::RasterOrderOptions::AlongM;
        const dim3 grid = Sched::get_grid_shape(p.scheduler, problem, TileShape{}, ClusterShape{}, hw, grid_args);
        const dim3 block = Kernel::get_block_shape();
        info[0] = grid.x; info[1] = grid.y; info[2] = grid.z; info[3] = block.x;
        info[4] = Kernel::SharedStorageSize;
        info[5] = sizeof(Params);
    }

    static __device__ void run(const char *params) {
        extern __shared__ __align__(128) char smem[];
        const Params &p = *reinterpret_cast<const Params *>(params);
        const cute::TmaDescriptor *da = p.mainloop.tma_load_a.get_tma_descriptor();
        const cute::TmaDescriptor *db = p.mainloop.tma_load_b.get_tma_descriptor();
        asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(da) : "memory");
        asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(db) : "memory");
        Kernel op;
        op(p, smem);
    }
};

// 128 bytes of K per stage: one 128-byte swizzle atom wide
using Tile256 = Shape<_128, _256, _128>;
using Tile128 = Shape<_128, _128, _128>;
using Cluster = Shape<_2, _1, _1>;  // B tiles multicast to the 2 CTAs of a cluster
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopFastAccum = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using PingpongFastAccum = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using E4m3 = cutlass::float_e4m3_t;
constexpr auto kNoScale = cutlass::epilogue::thread::ScaleType::Nothing;
constexpr auto kAlpha = cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling;
using S8 = Gemm<int8_t, int32_t, int32_t, Tile256, Cluster, Coop, kNoScale>;
using E4m3Bf16 = Gemm<E4m3, float, cutlass::bfloat16_t, Tile128, Cluster, Coop, kAlpha>;
using E4m3F32 = Gemm<E4m3, float, float, Tile128, Cluster, Coop, kAlpha>;
using E4m3Bf16Fast = Gemm<E4m3, float, cutlass::bfloat16_t, Tile256, Cluster, CoopFastAccum, kAlpha>;
using E4m3F32Fast = Gemm<E4m3, float, float, Tile256, Cluster, CoopFastAccum, kAlpha>;
using E4m3Bf16FastPingpong = Gemm<E4m3, float, cutlass::bfloat16_t, Tile128, Cluster, PingpongFastAccum, kAlpha>;
}  // namespace tessera_sm90
#define SM90_BODY(stmt) stmt
#define SM90_THREADS tessera_sm90::S8::Kernel::MaxThreadsPerBlock
#define SM90_CLUSTER __cluster_dims__(2, 1, 1)  // = Cluster
#else
#define SM90_BODY(stmt)
#define SM90_THREADS 384
#define SM90_CLUSTER
#endif

// alpha = a_scale[0] * b_scale[0] when both pointers are given, else 1 (read on the device: no host sync).
#define SM90_SETUP(NAME, CFG)                                                                                     \
    __global__ void NAME##_setup(const __grid_constant__ cute::TmaDescriptor tma_a,                              \
                                 const __grid_constant__ cute::TmaDescriptor tma_b, const void *A, const void *B, \
                                 void *D, int M, int N, int K, int sms, const float *a_scale,                     \
                                 const float *b_scale, char *params, int *info) {                                 \
        SM90_BODY(if (threadIdx.x == 0 && blockIdx.x == 0) tessera_sm90::CFG::setup(                             \
            tma_a, tma_b, A, B, D, M, N, K, sms, (a_scale && b_scale) ? a_scale[0] * b_scale[0] : 1.0f, params,  \
            info);)                                                                                               \
    }                                                                                                             \
    __global__ void SM90_CLUSTER __launch_bounds__(SM90_THREADS, 1) NAME(const char *params) {      \
        SM90_BODY(tessera_sm90::CFG::run(params);)                                                                \
    }

SM90_SETUP(gemm_sm90_s8, S8)
SM90_SETUP(gemm_sm90_e4m3_bf16, E4m3Bf16)
SM90_SETUP(gemm_sm90_e4m3_f32, E4m3F32)
SM90_SETUP(gemm_sm90_e4m3_bf16_fast, E4m3Bf16Fast)
SM90_SETUP(gemm_sm90_e4m3_f32_fast, E4m3F32Fast)
SM90_SETUP(gemm_sm90_e4m3_bf16_fast_pp, E4m3Bf16FastPingpong)

// The epilogue after an int32 (s8) or f32 (e4m3_f32) GEMM, plain CUDA (any architecture):
//   out[m, n] = OutT(((float)acc[m, n] * row_scale[m * rs]) * col_scale[n * cs] + bias[n])
// in exactly int8_gemm.cu's order (__fmul_rn / __fadd_rn, no FMA contraction), so W8A8 through "sm90" equals the
// mma.sync path bit for bit. rs / cs are 1 (a scale per row / column) or 0 (one scale). Each thread takes 4
// consecutive columns of a row: one 16-byte load of acc where N is a multiple of 4.
template <typename T> __device__ __forceinline__ T sm90_from_float(float v);
template <> __device__ __forceinline__ float sm90_from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half sm90_from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 sm90_from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
__device__ __forceinline__ float sm90_to_float(int v) { return __int2float_rn(v); }
__device__ __forceinline__ float sm90_to_float(float v) { return v; }

template <typename AccT, typename OutT>
__global__ void sm90_scale_epilogue(const AccT *__restrict__ acc, OutT *__restrict__ out,
                                    const float *__restrict__ row_scale, int rs, const float *__restrict__ col_scale,
                                    int cs, const float *__restrict__ bias, int has_bias, int M, int N) {
    const int groups = (N + 3) / 4;
    const long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (g >= (long long)M * groups) return;
    const int m = (int)(g / groups), n0 = (int)(g % groups) * 4;
    const long long base = (long long)m * N + n0;
    AccT v[4];
    if (N % 4 == 0) {
        *reinterpret_cast<uint4 *>(v) = *reinterpret_cast<const uint4 *>(acc + base);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = n0 + j < N ? acc[base + j] : AccT(0);
    }
    const float r = row_scale[m * rs];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = n0 + j;
        if (n < N) {
            float y = __fmul_rn(__fmul_rn(sm90_to_float(v[j]), r), col_scale[n * cs]);
            if (has_bias) y = __fadd_rn(y, bias[n]);
            out[base + j] = sm90_from_float<OutT>(y);
        }
    }
}
