"""tessera_cp.comm: the device mesh and its collectives over MPI (and NCCL for device buffers).

Not built yet (project issue 7): this package holds the place the design gives it.
"""
