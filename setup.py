from setuptools import find_packages, setup

setup(
    name="tessera_cp",
    version="0.1.0",
    description="Transformer building blocks on NVIDIA GPUs from plain Python: CuPy raw kernels, no PyTorch.",
    packages=find_packages(include=["tessera_cp", "tessera_cp.*"]),
    package_data={"tessera_cp": ["cuda/*.cu", "cuda/*.cuh"]},
    python_requires=">=3.10",
    install_requires=["numpy>=1.26", "ml_dtypes>=0.5"],
    extras_require={
        # The GPU build. CuPy 14 brings NVRTC and the CUDA headers for the plain kernels. The CuTe/CUTLASS kernels
        # (compiled by NVRTC directly, tessera_cp/cuda/nvrtc_cache.py) also need the CUTLASS/CuTe headers
        # (nvidia-cutlass: cutlass_library/source/include), NVRTC, the CUDA headers and CCCL (cuda/std/...) in
        # pip wheels when no CUDA toolkit is installed. CUTLASS 4.2 compiles against CCCL 3.0/3.1 (CUDA 13.0/13.1
        # wheels) and fails on 3.2 and later, hence the bound (tried with NVRTC 13.5, 2026-11-25).
        "cuda12": ["cupy-cuda12x>=14", "nvidia-cutlass>=4.2,<4.3", "nvidia-cuda-nvrtc-cu12",
                   "nvidia-cuda-runtime-cu12", "nvidia-cuda-cccl-cu12"],
        "cuda13": ["cupy-cuda13x>=14", "nvidia-cutlass>=4.2,<4.3", "nvidia-cuda-nvrtc>=13,<14",
                   "nvidia-cuda-runtime>=13,<14", "nvidia-cuda-cccl>=13.0,<13.2"],
        # An MPI runtime from PyPI, so no system MPI is needed.
        "mpi": ["mpi4py>=4", "mpich"],
        "io": ["safetensors"],
        "models": ["tokenizers"],  # tokenizer.json of Hugging Face model folders (a byte-level fallback otherwise)
        # NVRTC and the CUDA headers compile every .cu source for sm_80/sm_90 on machines without a GPU; CUTLASS
        # and CCCL let that include the CuTe sources (see the cuda13 note for the CCCL bound).
        "test": ["pytest", "pytest-benchmark", "hypothesis", "safetensors",
                 "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cutlass>=4.2,<4.3",
                 "nvidia-cuda-cccl>=13.0,<13.2"],
    },
    entry_points={"console_scripts": ["tessera-cp=tessera_cp.cli:main"]},
)
