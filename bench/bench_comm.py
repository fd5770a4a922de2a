"""Collective bandwidth on the mesh, as NCCL-tests report it, against torch.distributed (NCCL) when installed.

Run with one process per GPU:  mpiexec -n 8 python -m pytest -q bench/bench_comm.py -s -p no:cacheprovider
(rank 0 prints; with one process the tests skip: a bus bandwidth needs two ranks).

Bytes (NCCL-tests' definitions, S = buffer bytes, n = ranks, t = median time):
  all_reduce  of an S-byte buffer:            algbw = S / t,  busbw = algbw * 2 (n - 1) / n
  all_gather  into an S-byte result (S/n each): algbw = S / t,  busbw = algbw * (n - 1) / n
The figure printed is busbw: comparable across n, and near the link bandwidth when the collective is efficient.

Timing: CUDA events around each call, a FIXED number of runs on every rank (an adaptive count, as the
cuda_bench fixture uses, would let ranks run different numbers of collectives and deadlock), the median per rank,
then the slowest rank's median (a collective is as slow as its slowest member).
"""
import statistics

import numpy
import pytest

import tessera_cp as tc

WARMUP, REPEAT = 5, 30
SIZES_MIB = (1, 64, 512)


@pytest.fixture(scope="module")
def meshes():
    pytest.importorskip("mpi4py")
    from mpi4py import MPI
    from tessera_cp import backend, comm
    if MPI.COMM_WORLD.Get_size() < 2:
        pytest.skip("needs >= 2 ranks: mpiexec -n N python -m pytest bench/bench_comm.py")
    if not backend.cuda_available():
        pytest.skip("needs a CUDA GPU")
    n = MPI.COMM_WORLD.Get_size()
    # The same ranks twice: with the per-call argument check (the default) and without (the transport alone).
    return comm.Mesh(numpy.arange(n), ["world"]), comm.Mesh(numpy.arange(n), ["world"], check=False)


def _median_ms(fn):
    import cupy
    from mpi4py import MPI
    for _ in range(WARMUP):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    start, stop, times = cupy.cuda.Event(), cupy.cuda.Event(), []
    for _ in range(REPEAT):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return MPI.COMM_WORLD.allreduce(statistics.median(times), op=MPI.MAX)


def _torch_group(mesh):
    """torch.distributed over NCCL on the same GPUs (single node), or None when torch is missing."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return None
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    if len(set(world.allgather(MPI.Get_processor_name()))) > 1:
        return None  # the rendezvous below is single-node
    if not dist.is_initialized():
        import socket
        port = None
        if world.Get_rank() == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        port = world.bcast(port, root=0)
        torch.cuda.set_device(mesh.gpu)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=world.Get_rank(),
                                world_size=world.Get_size())
    return dist


def _report(name, n, results, busbytes):
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() != 0:
        return
    ours = results["tessera_cp"]
    for label, ms in results.items():
        ratio = "" if label == "tessera_cp" else f"  tessera_cp is {ms / ours:.2f}x its speed"
        print(f"{name:<36} n={n:<3} {label:<22} {ms * 1e3:10.1f} us  busbw {busbytes / ms / 1e6:8.1f} GB/s{ratio}")


def print_transport(mesh):
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"  transport: nccl={mesh.use_nccl} ({mesh.transport_reason}), cuda_aware_mpi={mesh.cuda_aware}")


@pytest.mark.gpu
@pytest.mark.parametrize("mib", SIZES_MIB)
def test_all_reduce_bus_bandwidth(meshes, mib):
    from tessera_cp import comm
    checked, unchecked = meshes
    n = checked.size()
    count = mib * 2 ** 20 // 2
    x = tc.randn(count, dtype=tc.bf16, device="cuda")
    results = {"tessera_cp": _median_ms(lambda: comm.all_reduce(x, mesh=unchecked)),
               "tessera_cp (checked)": _median_ms(lambda: comm.all_reduce(x, mesh=checked))}
    dist = _torch_group(checked)
    if dist is not None:
        import torch
        xt = torch.from_dlpack(x.data).clone()
        results["torch.distributed"] = _median_ms(lambda: dist.all_reduce(xt))
    # busbw bytes: S * 2 (n - 1) / n with S = 2 * count
    _report(f"all_reduce bf16 {mib} MiB", n, results, 2 * count * 2 * (n - 1) / n)
    print_transport(checked)


@pytest.mark.gpu
@pytest.mark.parametrize("mib", SIZES_MIB)
def test_all_gather_bus_bandwidth(meshes, mib):
    from tessera_cp import comm
    checked, unchecked = meshes
    n = checked.size()
    count = mib * 2 ** 20 // 2 // n  # each rank's piece; the result holds n of them
    x = tc.randn(count, dtype=tc.bf16, device="cuda")
    results = {"tessera_cp": _median_ms(lambda: comm.all_gather(x, mesh=unchecked)),
               "tessera_cp (checked)": _median_ms(lambda: comm.all_gather(x, mesh=checked))}
    dist = _torch_group(checked)
    if dist is not None:
        import torch
        xt = torch.from_dlpack(x.data).clone()
        out = torch.empty(n * count, dtype=xt.dtype, device=xt.device)
        results["torch.distributed"] = _median_ms(lambda: dist.all_gather_into_tensor(out, xt))
    # busbw bytes: S * (n - 1) / n with S = 2 * count * n (the gathered result)
    _report(f"all_gather bf16 {mib} MiB result", n, results, 2 * count * n * (n - 1) / n)
