"""The CuTe/CUTLASS compile path: NVRTC called directly, cubins kept in tessera_cp's own disk cache.

Why a second path beside ``cupy.RawModule(code=...)``: CuPy adds its bundled CCCL include folder to every NVRTC
compile, and that CCCL clashes with the toolkit's one that CUTLASS needs (hundreds of ``cuda/std`` errors; see
``GPU_NOTES.md``, "CUTLASS / CuTe under NVRTC"). So a source that includes ``<cute/...>`` or ``<cutlass/...>`` is
compiled here by NVRTC through ctypes (``runtime.nvrtc()``, the wrapper the CPU compile checks use too), the cubin
is written to the cache below, and ``runtime.get_cute_kernel`` loads it with ``cupy.RawModule(path=...)``.

Headers (``cute_options``):

* CUTLASS/CuTe: ``$CUTLASS_PATH/include`` (a CUTLASS checkout) if set, else the pip wheel ``nvidia-cutlass``
  (``cutlass_library/source/include``, located with ``importlib.util.find_spec``; nothing is imported);
* CUDA: ``runtime.cuda_include()`` (a toolkit, else the pip ``nvidia-cuda-runtime`` headers);
* CCCL (``cuda/std/...``, which CUTLASS includes under NVRTC): ``<CUDA include>/cccl`` (CUDA 13 toolkits, and
  the pip ``nvidia-cuda-cccl`` 13 installs there too), the CUDA include folder itself (CUDA 12 toolkits), else the
  pip ``nvidia-cuda-cccl-cu12`` folder ``nvidia/cuda_cccl/include``.

Cache: the folder ``$TESSERA_CACHE_DIR``, else ``$XDG_CACHE_HOME/tessera_cp``, else ``~/.cache/tessera_cp``;
files go to its ``cubin/`` subfolder:

* ``<sha256 of the binary>.cubin`` (``.ptx`` for a ``compute_XY`` target): the binary, named by its content;
* ``<key>.json``: what was compiled (label, options, NVRTC version, seconds), the lowered (mangled) name of every
  requested kernel, and the name of the binary file.

The key is the SHA-256 of: the source text, the names and bytes of every header of ours that it includes
(``runtime.headers_hash``), the options (``-arch`` and every include folder among them), the requested kernel
names, the NVRTC version, and the versions of the CUTLASS, CCCL and CUDA headers in use.

Two processes (MPI ranks) compiling the same key at once are safe: each writes to a temporary file in the same
folder and renames it into place (``os.replace``, atomic on one file system), the binary first and the ``.json``
that names it last. A reader therefore finds either no entry or a complete one, whichever writer's rename came
last. Nothing is ever evicted: delete the folder to reclaim space.

Compile and cache-load times are logged to the ``tessera_cp.cuda`` logger (INFO).
"""
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompileError
from . import runtime

logger = logging.getLogger("tessera_cp.cuda")

FORMAT = 1  # bump when the layout of the cache entries changes
# -default-device: CuTe's constexpr helpers carry no __device__ of their own. -DNDEBUG, as CUTLASS's release
# builds: its device asserts are calls to __assertfail, and a call in a wgmma mainloop serializes the wgmmas
# (ptxas C7510) and costs registers.
CUTE_OPTIONS = ("-default-device", "-DNDEBUG")
_CUTE_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*[<"](?:cute|cutlass)/', re.MULTILINE)


def uses_cute(code):
    """Whether a source includes CuTe or CUTLASS headers (and so must take this compile path)."""
    return _CUTE_INCLUDE_RE.search(code) is not None


# ----------------------------------------------------------------------------------------------------------
# Finding the headers
# ----------------------------------------------------------------------------------------------------------

def _is_cutlass_include(path):
    return path is not None and (Path(path) / "cute" / "tensor.hpp").is_file() and \
        (Path(path) / "cutlass" / "cutlass.h").is_file()


def find_cutlass_include(cutlass_path=None, wheel_dirs=None):
    """The folder holding ``cute/`` and ``cutlass/``, or None.

    ``$CUTLASS_PATH/include`` first (``cutlass_path`` overrides the variable), then the ``nvidia-cutlass`` wheel
    (``wheel_dirs``: the ``cutlass_library`` package folders; found with find_spec when None).
    """
    cutlass_path = os.environ.get("CUTLASS_PATH") if cutlass_path is None else cutlass_path
    if cutlass_path and _is_cutlass_include(Path(cutlass_path) / "include"):
        return Path(cutlass_path) / "include"
    if wheel_dirs is None:
        try:
            spec = importlib.util.find_spec("cutlass_library")
        except (ImportError, ValueError):
            spec = None
        wheel_dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in wheel_dirs:
        if _is_cutlass_include(Path(d) / "source" / "include"):
            return Path(d) / "source" / "include"
    return None


def _is_cccl_include(path):
    return path is not None and (Path(path) / "cuda" / "std" / "type_traits").is_file()


def find_cccl_include(cuda_inc, nvidia_dirs=None):
    """The folder holding CCCL's ``cuda/std/...``, or None: beside the CUDA headers first, then the pip wheels."""
    candidates = []
    if cuda_inc is not None:
        candidates += [Path(cuda_inc) / "cccl", Path(cuda_inc)]
    for base in runtime._nvidia_site_dirs() if nvidia_dirs is None else nvidia_dirs:
        candidates += [Path(base) / "cu13" / "include" / "cccl", Path(base) / "cu12" / "include" / "cccl",
                       Path(base) / "cuda_cccl" / "include"]
    return next((c for c in candidates if _is_cccl_include(c)), None)


def headers_available():
    """Whether the CUTLASS/CuTe, CUDA and CCCL headers a CuTe source needs are all found (see cute_options)."""
    try:
        cute_options("sm_90a")
    except CompileError:
        return False
    return True


def cute_options(arch, extra_dirs=(), cutlass_inc=None, cuda_inc=None, cccl_inc=None):
    """Every option a CuTe/CUTLASS source is compiled with, for ``arch`` (e.g. "sm_90a").

    ``-std=c++17 -default-device``, ``-I`` the source's folder(s) and ours, CUTLASS, the CUDA headers, CCCL, and
    ``-arch``. Raises CompileError naming what is missing and which package provides it. The ``*_inc``
    arguments override the search (tests use them).
    """
    cutlass_inc = find_cutlass_include() if cutlass_inc is None else cutlass_inc
    cuda_inc = runtime.cuda_include() if cuda_inc is None else cuda_inc
    cccl_inc = find_cccl_include(cuda_inc) if cccl_inc is None else cccl_inc
    missing = []
    if not _is_cutlass_include(cutlass_inc):
        missing.append("the CUTLASS/CuTe headers (pip install nvidia-cutlass, or set CUTLASS_PATH to a CUTLASS "
                       "checkout)")
    if not runtime._is_cuda_include(cuda_inc):
        missing.append("the CUDA headers (a CUDA toolkit: set CUDA_PATH; or pip install nvidia-cuda-runtime)")
    if not _is_cccl_include(cccl_inc):
        missing.append("the CCCL headers cuda/std/... (a CUDA toolkit, or pip install nvidia-cuda-cccl; "
                       "nvidia-cuda-cccl-cu12 for CUDA 12)")
    if missing:
        raise CompileError("compiling a CuTe/CUTLASS source needs " + "; and ".join(missing))
    dirs = [*extra_dirs, runtime.SOURCE_DIR, cutlass_inc, cuda_inc, cccl_inc]
    includes = list(dict.fromkeys(f"-I{d}" for d in dirs))
    return runtime.BASE_OPTIONS + CUTE_OPTIONS + tuple(includes) + (f"-arch={arch}",)


# ----------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------

def cache_dir():
    """The folder of the cubin cache (not created until something is written)."""
    root = os.environ.get("TESSERA_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "tessera_cp")
    return Path(root) / "cubin"


_VERSION_FILES = ("cutlass/version.h", "cuda/std/__cccl/version.h")
_CUDART_RE = re.compile(rb"#define\s+CUDART_VERSION\s+(\d+)")


def headers_fingerprint(options):
    """The versions of the third-party headers the ``-I`` folders of ``options`` provide, as one string.

    CUTLASS's and CCCL's version headers are hashed whole; the CUDA headers give their CUDART_VERSION. An
    upgraded wheel or toolkit at the same path therefore never serves a stale cubin.
    """
    parts = []
    for opt in options:
        if not opt.startswith("-I"):
            continue
        inc = Path(opt[2:])
        for rel in _VERSION_FILES:
            if (inc / rel).is_file():
                parts.append(f"{rel}:{hashlib.sha256((inc / rel).read_bytes()).hexdigest()[:16]}")
        api = inc / "cuda_runtime_api.h"
        if api.is_file():
            with open(api, "rb") as f:
                m = _CUDART_RE.search(f.read(65536))
            parts.append(f"cudart:{m.group(1).decode() if m else '?'}")
    return ";".join(parts)


def cache_key(code, options, names, nvrtc_version, our_headers="", fingerprint=None):
    """The hex SHA-256 naming a cache entry (see the module docstring for what it covers)."""
    fields = {"format": FORMAT, "source": hashlib.sha256(code.encode()).hexdigest(), "headers": our_headers,
              "options": list(options), "names": sorted(names), "nvrtc": list(nvrtc_version),
              "third_party": headers_fingerprint(options) if fingerprint is None else fingerprint}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _atomic_write(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder and one rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass(frozen=True)
class Compiled:
    """A cache entry: the binary's path, each requested name's lowered name, and how it was obtained."""
    path: Path
    lowered: dict
    key: str
    cached: bool      # True: found in the cache (warm); False: compiled now (cold)
    seconds: float    # time of this call: the compile and write, or the cache lookup


def _read_entry(directory, key):
    """(binary path, lowered names) of a complete entry under ``key``, or None."""
    try:
        meta = json.loads((directory / f"{key}.json").read_text())
        path = directory / meta["binary"]
        if meta.get("format") != FORMAT or path.stat().st_size != meta["size"]:
            return None
        return path, dict(meta["lowered"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compile_cached(code, label, options, names=(), search_dirs=(), directory=None):
    """Compile ``code`` with NVRTC (ctypes), or find it in the cache; returns a Compiled.

    ``options`` are complete (``cute_options(...)`` plus the caller's); ``names`` are the kernels to emit
    (template instantiations or plain names; their lowered names are recorded); ``search_dirs`` are where headers
    of ours live, besides SOURCE_DIR, for the key. Raises CompileError naming ``label``, with NVRTC's log.
    """
    start = time.perf_counter()
    lib = runtime.nvrtc()
    if lib is None:
        raise CompileError(f"{label}: CuTe/CUTLASS sources are compiled by NVRTC, and no libnvrtc was found "
                           "(pip install nvidia-cuda-nvrtc, or a CUDA toolkit)")
    names = list(dict.fromkeys(names))
    options = tuple(options)
    arch = next((o.split("=", 1)[1] for o in options if o.startswith("-arch=")), "?")
    version = lib.version()
    key = cache_key(code, options, names, version, runtime.headers_hash(code, (*search_dirs, runtime.SOURCE_DIR)))
    directory = cache_dir() if directory is None else Path(directory)
    found = _read_entry(directory, key)
    if found is not None:
        seconds = time.perf_counter() - start
        logger.info("%s: %s binary found in the cache in %.1f ms (%s)", label, arch, seconds * 1e3, found[0])
        return Compiled(found[0], found[1], key, True, seconds)

    lowered = {}
    ok, log, binary = lib.compile(code, label, options, names, lowered)
    compile_seconds = time.perf_counter() - start
    if not ok:
        raise CompileError(f"{label}: compilation for {arch} failed with options {' '.join(options)}\n"
                           f"{log.strip()}")
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".cubin" if arch.startswith("sm_") else ".ptx"
    path = directory / (hashlib.sha256(binary).hexdigest() + ext)
    _atomic_write(path, binary)
    meta = {"format": FORMAT, "label": label, "arch": arch, "options": list(options), "names": names,
            "lowered": lowered, "nvrtc": ".".join(map(str, version)), "binary": path.name, "size": len(binary),
            "compile_seconds": round(compile_seconds, 3), "log": log.strip()}
    _atomic_write(directory / f"{key}.json", json.dumps(meta, indent=1).encode())
    seconds = time.perf_counter() - start
    logger.info("%s: compiled for %s by NVRTC %d.%d in %.2f s (cold), cached as %s", label, arch, *version,
                compile_seconds, path)
    return Compiled(path, lowered, key, False, seconds)
