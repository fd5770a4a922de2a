"""Your own CUDA kernel on tessera_cp tensors: shapes and dtypes are checked at the call, S and D come from them.

Run on a GPU machine from the checkout:  PYTHONPATH=. python3 examples/custom_kernel.py
"""
import numpy

import tessera_cp
from tessera_cp import f32
from tessera_cp.shapes import Tile

SCALE_ROWS = r"""
// out[s, d] = x[s, d] * w[d]. One block per row; its threads stride over the row's D columns.
extern "C" __global__ void scale_rows(const float* __restrict__ x, const float* __restrict__ w,
                                      float* __restrict__ out, int S, int D) {
    const int s = blockIdx.x;
    if (s >= S) return;
    const size_t row = (size_t)s * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[row + d] = x[row + d] * w[d];
}
"""


@tessera_cp.kernel(SCALE_ROWS, grid=lambda S: (S,), block=256)
def scale_rows(x: Tile["S", "D", f32], w: Tile["D", f32], out: Tile["S", "D", f32], S: int, D: int):
    """out[s, d] = x[s, d] * w[d]"""


def main():
    if not tessera_cp.cuda_available():
        print("custom_kernel.py launches a CUDA kernel and needs a GPU; none is usable here.")
        return
    S, D = 17, 1000
    rng = numpy.random.default_rng(0)
    x_host = rng.standard_normal((S, D)).astype(numpy.float32)
    w_host = rng.standard_normal(D).astype(numpy.float32)
    x = tessera_cp.tensor(x_host, device="cuda")
    w = tessera_cp.tensor(w_host, device="cuda")
    out = tessera_cp.full((S, D), float("nan"), dtype=f32, device="cuda")

    scale_rows(x, w, out)  # S=17 and D=1000 are read off the shapes

    expected = x_host.astype(numpy.float64) * w_host.astype(numpy.float64)
    error = numpy.abs(out.numpy().astype(numpy.float64) - expected).max()
    print(f"scale_rows on [{S}, {D}]: max error against float64 NumPy = {error:.3g}")

    try:  # a wrong shape is caught before the launch, naming the argument and the dimension
        scale_rows(x, tessera_cp.tensor(w_host[:-1], device="cuda"), out)
    except tessera_cp.ShapeError as e:
        print(f"ShapeError: {e}")


if __name__ == "__main__":
    main()
