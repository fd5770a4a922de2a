"""The mesh under real MPI: launches tests/comm/mpi_worker.py with mpiexec -n 2 and -n 4 (one job per size runs
every case), plus one job per fault that must end the whole job. Skips only when mpi4py or mpiexec is missing.

Every job runs under a timeout and in its own process group, so a hang fails the test and leaves nothing behind.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("mpi_worker.py")
ROOT = Path(__file__).resolve().parents[2]
CASES = ["mesh_layout", "all_reduce_ops_axes_dtypes", "all_reduce_gradients", "all_gather_and_its_gradient",
         "reduce_scatter_and_its_gradient", "broadcast_and_its_gradient", "ring_exchange_and_its_gradient",
         "barrier_and_timeouts_that_are_met", "distribute_gather_mesh_tensor",
         "distributed_rms_norm_matches_rms_norm", "ring_attention_matches_full_attention",
         "ring_attention_bf16_forward_backward",
         "tensor_parallel_linear_matches_linear", "faults_give_the_same_error_everywhere"]


def _mpiexec():
    pytest.importorskip("mpi4py")
    beside = Path(sys.executable).parent / "mpiexec"  # the launcher of the MPI that mpi4py was built for
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        pytest.skip("mpiexec not found")
    return found


def run_job(n, *args, device="cpu", timeout=240):
    """(return code, stdout + stderr, seconds) of `mpiexec -n n python mpi_worker.py ...`."""
    env = dict(os.environ, TESSERA_DEVICE=device,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               # Open MPI (the GPU machine's): allow root and more ranks than cores; MPICH ignores these.
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    command = [_mpiexec(), "-n", str(n), sys.executable, str(WORKER), "--device", device, *args]
    start = time.monotonic()
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           cwd=ROOT, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the job's own process group: mpiexec and its ranks
        output, _ = job.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} hung for {timeout} s; output:\n{output}")
    return job.returncode, output, time.monotonic() - start


@pytest.mark.parametrize("n", [2, 4])
def test_every_collective_and_parallel_op_under_mpiexec(n):
    code, output, _ = run_job(n)
    assert code == 0, output
    for name in CASES:
        assert f"ok {name}\n" in output, f"case {name} did not report:\n{output}"
    assert f"ALL {len(CASES)} CASES PASSED ON {n} RANKS" in output, output


def test_an_exception_on_one_rank_aborts_the_job_with_its_message():
    code, output, seconds = run_job(2, "--mode", "abort", timeout=120)
    assert code != 0, output
    assert "uncaught exception on rank 1 of 2" in output and "deliberate failure on rank 1" in output, output
    assert "passed the barrier" not in output, output
    assert seconds < 100  # ended by the abort, not by our timeout


def test_a_timeout_turns_a_hang_into_comm_timeout_error():
    code, output, seconds = run_job(2, "--mode", "timeout", timeout=120)
    assert code != 0, output
    # Both phases time out: the argument check, then (on a mesh without checks) the reduction itself.
    assert "all_reduce (argument check) did not complete within 1.0 s" in output, output
    assert "all_reduce(sum) did not complete within 1.0 s" in output, output
    assert "returned without its partners" not in output, output
    assert seconds < 100


@pytest.mark.gpu
def test_two_ranks_sharing_one_gpu_over_host_staged_mpi():
    """On a one-GPU machine both ranks bind GPU 0; NCCL refuses a shared GPU, so CuPy arrays go through MPI
    (staged through host memory unless the MPI library reports CUDA-awareness)."""
    pytest.importorskip("cupy")
    code, output, _ = run_job(2, device="cuda", timeout=400)
    assert code == 0, output
    assert "nccl=False" in output, output
    for name in CASES:
        assert f"ok {name}\n" in output, f"case {name} did not report:\n{output}"
    assert f"ALL {len(CASES)} CASES PASSED ON 2 RANKS" in output, output
