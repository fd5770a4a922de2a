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
        # The default GPU build; CuPy 14 finds NVRTC and the CUDA headers in these wheels.
        "cuda12": ["cupy-cuda12x>=14"],
        "cuda13": ["cupy-cuda13x>=14"],
        # An MPI runtime from PyPI, so no system MPI is needed.
        "mpi": ["mpi4py>=4", "mpich"],
        "io": ["safetensors"],
        "models": ["tokenizers"],  # tokenizer.json of Hugging Face model folders (a byte-level fallback otherwise)
        # NVRTC and the CUDA headers compile every .cu source for sm_80/sm_90 on machines without a GPU.
        "test": ["pytest", "pytest-benchmark", "hypothesis", "safetensors",
                 "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"],
    },
    entry_points={"console_scripts": ["tessera-cp=tessera_cp.cli:main"]},
)
