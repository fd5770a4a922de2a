"""tessera_cp.comm: the device mesh over MPI and its collectives (NCCL for GPU buffers where every rank has a GPU).

Launch one process per GPU with ``mpiexec -n N python script.py``; every process builds the same ``Mesh``.
Importing this package does not import mpi4py; building a Mesh does (and so initialises MPI).
"""
from .collectives import (RingHandle, all_gather, all_reduce, barrier, broadcast, distribute, gather, mesh_reduce,
                          reduce_scatter, ring_exchange)
from .mesh import Group, Mesh, MeshTensor, agree, current_mesh, on_mesh, shard_bounds
from .parallel import (ColumnParallelLinear, RowParallelLinear, attention_block_lse, distributed_rms_norm,
                       merge_lse, ring_attention)
from .transport import CommTimeoutError, mpi_cuda_aware

__all__ = ["Mesh", "MeshTensor", "Group", "on_mesh", "current_mesh", "agree", "shard_bounds", "all_reduce",
           "mesh_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier", "ring_exchange", "RingHandle",
           "distribute", "gather", "distributed_rms_norm", "ring_attention", "attention_block_lse", "merge_lse",
           "ColumnParallelLinear", "RowParallelLinear", "CommTimeoutError", "mpi_cuda_aware"]
