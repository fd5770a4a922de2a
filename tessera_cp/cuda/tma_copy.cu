// tma_copy.cu: the proof kernel of the CuTe compile path (runtime.get_cute_kernel). One block copies one
// BOX_ROWS x BOX_COLS tile of a 2-D bf16 matrix: thread 0 issues a TMA load (cp.async.bulk.tensor through CuTe's
// SM90_TMA_LOAD_2D) into shared memory that completes on an mbarrier, then every thread stores the tile with
// plain guarded stores (16 bytes wide on whole tile rows). The TMA zero-fills the part of the box outside the
// source; the stores skip it, so nothing outside dst[:rows, :cols] is written.
// Grid: (ceil(cols / BOX_COLS), ceil(rows / BOX_ROWS)); any block size that is a multiple of 32. Shared memory:
// BOX_ROWS * BOX_COLS * 2 bytes, static. The tensor map (tessera_cp.cuda.tma.encode_tiled) describes src with the
// box (BOX_ROWS, BOX_COLS), no swizzle, zero fill; it is passed by value as a __grid_constant__ parameter.
// Hopper-only (sm_90+); for older architectures the kernel compiles to an empty body and must not be launched.
//
// tessera-instantiate: tma_copy_2d<64, 64>; tma_copy_2d<32, 128>
#include <cuda_bf16.h>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

template <int BOX_ROWS, int BOX_COLS>
__global__ void tma_copy_2d(const __grid_constant__ cute::TmaDescriptor src, __nv_bfloat16 *dst, int rows, int cols,
                            long long ld_dst) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    using namespace cute;
    // TMA writes shared memory at 128-byte alignment; the mbarrier needs 8.
    __shared__ alignas(128) __nv_bfloat16 tile[BOX_ROWS * BOX_COLS];
    __shared__ alignas(8) uint64_t full;
    const int row0 = blockIdx.y * BOX_ROWS, col0 = blockIdx.x * BOX_COLS;

    if (threadIdx.x == 0) {
        prefetch_tma_descriptor(&src);
        initialize_barrier(full, 1);
        cutlass::arch::fence_barrier_init();  // the init is seen by the async proxy before the copy arrives
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        // The whole box is counted, zero-filled elements included.
        set_barrier_transaction_bytes(full, BOX_ROWS * BOX_COLS * sizeof(__nv_bfloat16));
        SM90_TMA_LOAD_2D::copy(&src, &full, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_FIRST), tile,
                               col0, row0);  // coordinates innermost first
    }
    wait_barrier(full, 0);

    Tensor s = make_tensor(make_smem_ptr(tile), Layout<Shape<Int<BOX_ROWS>, Int<BOX_COLS>>,
                                                       Stride<Int<BOX_COLS>, _1>>{});
    Tensor g = make_tensor(make_gmem_ptr(dst + row0 * ld_dst + col0), make_shape(Int<BOX_ROWS>{}, Int<BOX_COLS>{}),
                           make_stride(ld_dst, _1{}));
    const int valid_rows = min(BOX_ROWS, rows - row0), valid_cols = min(BOX_COLS, cols - col0);
    // Consecutive threads take consecutive columns, so the stores of a warp are coalesced: 16 bytes each where
    // the tile's rows are whole and dst's rows start 16-byte aligned, one element each otherwise (edge tiles).
    constexpr int VEC = 16 / sizeof(__nv_bfloat16);
    static_assert(BOX_COLS % VEC == 0, "a box row is a whole number of 16-byte vectors");
    if (valid_cols == BOX_COLS && ld_dst % VEC == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
        for (int i = threadIdx.x; i < BOX_ROWS * (BOX_COLS / VEC); i += blockDim.x) {
            const int r = i / (BOX_COLS / VEC), c = i % (BOX_COLS / VEC) * VEC;
            if (r < valid_rows) *reinterpret_cast<uint4 *>(&g(r, c)) = *reinterpret_cast<const uint4 *>(&s(r, c));
        }
    } else {
        for (int i = threadIdx.x; i < BOX_ROWS * BOX_COLS; i += blockDim.x) {
            const int r = i / BOX_COLS, c = i % BOX_COLS;
            if (r < valid_rows && c < valid_cols) g(r, c) = s(r, c);
        }
    }
#endif
}
