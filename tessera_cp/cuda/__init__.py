"""CUDA sources (one ``.cu`` file per op family, ``common.cuh`` shared) and the runtime that compiles and launches them.

``from tessera_cp.cuda import runtime``: ``runtime.get_kernel``, ``runtime.launch``, ``runtime.compile_for_arch``.
Importing this package needs neither CuPy nor a GPU.
"""
from .runtime import SOURCE_DIR

__all__ = ["SOURCE_DIR"]
