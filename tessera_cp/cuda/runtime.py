"""The kernel runtime: compile a CUDA source once, keep it, launch it, and turn compiler logs into errors.

Two paths share one set of compiler options:

* on a GPU, ``get_kernel`` / ``compile_source`` build a ``cupy.RawModule`` (NVRTC) once per
  (source, options, device) and keep it in memory; CuPy's disk cache keeps the binary between processes;
* without a GPU, ``compile_for_arch`` runs NVRTC through ctypes (or ``nvcc -cubin`` when no NVRTC library is
  found) and returns the cubin: tests and CI compile every ``.cu`` file for sm_80 and sm_90a this way;
* sources that include CuTe/CUTLASS headers take ``get_cute_kernel`` / ``compile_cute_source`` on a GPU (and
  ``compile_for_arch`` routes them the same way without one): NVRTC called directly through ctypes, cubins kept in
  tessera_cp's own disk cache, loaded with ``cupy.RawModule(path=...)``. ``nvrtc_cache`` says why and how.

Conventions for the sources in ``SOURCE_DIR``:

* A non-template kernel is declared ``extern "C" __global__`` and asked for by its plain name.
* A template kernel is asked for by its instantiation, e.g. ``get_kernel("norm.cu", "rms_norm_fwd<float, 256>")``.
  NVRTC compiles no template unless told which instantiations to emit, so a source lists those it wants
  compiled up front (and checked by ``tests/cuda/test_compile_all.py``) in one or more comment lines::

      // tessera-instantiate: rms_norm_fwd<float, 256>; rms_norm_fwd<__nv_bfloat16, 256>

  Asking ``get_kernel`` for an instantiation that is not listed works too: the module is rebuilt with it added.
* Headers of ours (``common.cuh`` and others in ``SOURCE_DIR``) are included with quotes. A hash of every header
  of ours that a source includes, directly or not, is folded into the options as ``-DTESSERA_HEADERS_HASH=...``,
  so that an edited header never leaves a stale binary in CuPy's disk cache (whose key covers only the source
  text and the options).

Options always given: ``-std=c++17``, ``-I SOURCE_DIR``, ``-I <CUDA toolkit include folder>`` when one is found
(``<mma.h>`` fails under CuPy's NVRTC without it), and ``-arch=sm_XY`` of the device (``sm_90a`` on compute
capability 9.0, so that wgmma compiles).

Kernel arguments: pass CuPy arrays and NumPy scalars (``numpy.int32(n)``, ``numpy.float32(eps)``) of exactly the
C type of each parameter. A bare Python ``int``/``float``/``bool`` is refused (CuPy would pass it as 8 bytes,
silently shifting every later argument of a kernel that takes ``int`` or ``float``).

``TESSERA_SYNC=1`` in the environment makes every ``launch`` synchronize and turn any CUDA error into a
``TesseraError`` that names the kernel: the way to find which launch faulted.

Launch paths: ``launch`` checks its arguments at every call; an op called often keeps what its launcher derives
(kernel, grid, block, scalars) in a ``LaunchPlans`` and launches with ``launch_planned``; ``launch(..., pdl=True)``
is a programmatic dependent launch (``pdl.py``, sm_90), which the decode step uses while a CUDA graph is captured
(``pdl_while_capturing``).
"""
import ctypes
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import CompileError, TesseraError

SOURCE_DIR = Path(__file__).resolve().parent
BASE_OPTIONS = ("-std=c++17",)
SMEM_DEFAULT_LIMIT = 48 * 1024  # bytes of dynamic shared memory a kernel may use before it must opt in

_INSTANTIATE_RE = re.compile(r"^\s*//\s*tessera-instantiate:(.*)$", re.MULTILINE)
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)


# ----------------------------------------------------------------------------------------------------------
# Pure helpers (no GPU, no CuPy): source conventions, include folders, environment switches
# ----------------------------------------------------------------------------------------------------------

def parse_instantiations(code):
    """The template instantiations a source lists in its ``// tessera-instantiate: a<..>; b<..>`` lines."""
    names = []
    for line in _INSTANTIATE_RE.findall(code):
        for name in line.split(";"):
            name = " ".join(name.split())
            if name and name not in names:
                names.append(name)
    return names


def included_headers(code, search_dirs=(SOURCE_DIR,)):
    """Paths of the headers of ours that ``code`` includes, directly or through other headers, sorted.

    A header is "ours" when it is found in one of ``search_dirs``; system and CUDA headers are skipped.
    """
    found, todo = set(), [(code, tuple(search_dirs))]
    while todo:
        text, dirs = todo.pop()
        for name in _INCLUDE_RE.findall(text):
            for d in dirs:
                path = (Path(d) / name).resolve()
                if path.is_file():
                    if path not in found:
                        found.add(path)
                        todo.append((path.read_text(), (path.parent,) + tuple(search_dirs)))
                    break
    return sorted(found)


def headers_hash(code, search_dirs=(SOURCE_DIR,)):
    """A short hash of the names and contents of every header of ours that ``code`` includes ('' if none)."""
    paths = included_headers(code, search_dirs)
    if not paths:
        return ""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def sync_enabled(value=None):
    """Whether TESSERA_SYNC asks every launch to synchronize and check for errors (value: the variable's text)."""
    if value is None:
        value = os.environ.get("TESSERA_SYNC", "")
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise TesseraError(f"TESSERA_SYNC must be 1/true/yes/on or 0/false/no/off, got {value!r}")


def _is_cuda_include(path):
    return path is not None and (Path(path) / "cuda_runtime_api.h").is_file()


def _nvidia_site_dirs():
    """The folders of the pip ``nvidia`` namespace package (nvidia/cu13, nvidia/cuda_nvrtc, ... live there)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def toolkit_roots():
    """Candidate CUDA toolkit folders, best first: CUDA_PATH, CUDA_HOME, beside ``nvcc``, /usr/local/cuda*."""
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    roots += sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    return [Path(r) for r in roots if r]


def _version_key(path):
    return [int(n) for n in re.findall(r"\d+", os.path.basename(path))]


def find_cuda_include(roots=None, nvidia_dirs=None):
    """The CUDA include folder to compile against, or None.

    A full toolkit's first (it has ``crt/mma.h``, which WMMA needs), then the headers of the pip wheels
    (``nvidia/cu13/include``, ``nvidia/cu12/include``, ``nvidia/cuda_runtime/include``).
    """
    roots = toolkit_roots() if roots is None else roots
    for root in roots:
        for inc in (Path(root) / "include", *sorted(Path(root).glob("targets/*/include"))):
            if _is_cuda_include(inc):
                return inc
    for base in _nvidia_site_dirs() if nvidia_dirs is None else nvidia_dirs:
        for sub in ("cu13", "cu12", "cuda_runtime"):
            if _is_cuda_include(Path(base) / sub / "include"):
                return Path(base) / sub / "include"
    return None


_cuda_include_cache = []


def cuda_include():
    """find_cuda_include(), looked up once per process."""
    if not _cuda_include_cache:
        _cuda_include_cache.append(find_cuda_include())
    return _cuda_include_cache[0]


def include_options(extra_dirs=()):
    """The -I options every compile gets: our source folder(s), then the CUDA include folder when found."""
    dirs = [*extra_dirs, SOURCE_DIR]
    inc = cuda_include()
    if inc is not None:
        dirs.append(inc)
    out = []
    for d in dirs:
        opt = f"-I{d}"
        if opt not in out:
            out.append(opt)
    return tuple(out)


def arch_for(compute_capability):
    """'-arch=' value for a compute capability such as '90' or '8.0': sm_90a on 9.0 (wgmma), else sm_XY."""
    cc = str(compute_capability).replace(".", "")
    return "sm_90a" if cc == "90" else f"sm_{cc}"


# ----------------------------------------------------------------------------------------------------------
# The GPU path: cupy.RawModule, kept in memory per (source, options, device)
# ----------------------------------------------------------------------------------------------------------

class _Entry:
    """One compiled source: its text, options, the template names it was built with, the module and kernels."""

    def __init__(self, label, code, options, names):
        self.label, self.code, self.options, self.names = label, code, options, names
        self.module, self.kernels = None, {}
        self.lowered = {}  # CuTe path only: name expression -> mangled name in the cubin


_modules = {}
_kernel_names = {}  # kernel object -> "file.cu:name", for error messages
_lock = threading.RLock()


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise TesseraError("the CUDA kernel runtime needs CuPy (pip install 'tessera_cp[cuda13]')") from e
    return cupy


def _build(entry):
    """(Re)compile entry's module with its current name list; CompileError names the source on failure."""
    cupy = _cupy()
    names = tuple(sorted(entry.names))
    try:
        module = cupy.RawModule(code=entry.code, options=entry.options, name_expressions=names or None)
        module.compile()
    except cupy.cuda.compiler.CompileException as e:
        raise CompileError(f"{entry.label}: compilation failed with options {' '.join(entry.options)}\n"
                           f"{_compile_log(e)}") from None
    entry.module = module  # kernels taken from an earlier build stay valid: each keeps its module alive


def _compile_log(exc):
    log = exc.get_message() if hasattr(exc, "get_message") else str(exc)
    return log.strip() or str(exc)


def _kept_kernel(key, label, name, build):
    """The kernel ``name`` of the module kept under ``key``; when it is not there yet, ``build(entry)`` (entry: the
    module's _Entry, None before its first build) compiles what is needed, keeps the module under ``key`` and
    returns (entry, kernel)."""
    with _lock:
        entry = _modules.get(key)
        kernel = entry.kernels.get(name) if entry is not None else None
        if kernel is None:
            entry, kernel = build(entry)
            entry.kernels[name] = kernel
            _kernel_names[kernel] = f"{label}:{name}"
        return kernel


def _kernel(key, label, read_code, name, options, search_dirs):
    """The kernel ``name`` of the module under ``key``, compiling the module (or rebuilding it) when needed."""
    def build(entry):
        if entry is None:
            code = read_code()
            arch = arch_for(_cupy().cuda.Device().compute_capability)
            full = BASE_OPTIONS + include_options(search_dirs) + (f"-arch={arch}",) + tuple(options)
            digest = headers_hash(code, (*search_dirs, SOURCE_DIR))
            if digest:
                full += (f"-DTESSERA_HEADERS_HASH=0x{digest}",)
            entry = _Entry(label, code, full, set(parse_instantiations(code)))
            if "<" in name:
                entry.names.add(name)
            _build(entry)
            _modules[key] = entry
        elif "<" in name and name not in entry.names:
            entry.names.add(name)
            try:
                _build(entry)
            except CompileError:
                entry.names.discard(name)  # the module built before stays in place
                raise
        try:
            return entry, entry.module.get_function(name)
        except Exception as e:
            raise CompileError(f"{label}: no kernel {name!r} in the compiled module ({e}); a non-template "
                               'kernel must be declared extern "C"') from None
    return _kept_kernel(key, label, name, build)


def get_kernel(source_file, name, options=()):
    """The kernel ``name`` (a plain name or a template instantiation) of ``SOURCE_DIR/source_file``, compiled once.

    Modules are kept per (source_file, options, device); the file is read once per process.
    """
    return _file_kernel(_kernel, "file", source_file, name, options)


def _file_kernel(build, kind, source_file, name, options):
    """``build`` (_kernel or _cute_kernel) for SOURCE_DIR/source_file, kept under (kind, file, options, device)."""
    options = tuple(options)
    key = (kind, source_file, options, _cupy().cuda.Device().id)
    path = SOURCE_DIR / source_file

    def read_code():
        if not path.is_file():
            raise CompileError(f"{source_file}: no such CUDA source in {SOURCE_DIR}")
        return path.read_text()

    return build(key, source_file, read_code, name, options, (path.parent,))


def compile_source(code, name, options=(), filename="<user>"):
    """Like get_kernel for a source given as a string; ``filename`` names it in error messages."""
    options = tuple(options)
    key = ("code", filename, hashlib.sha256(code.encode()).hexdigest(), options, _cupy().cuda.Device().id)
    return _kernel(key, filename, lambda: code, name, options, ())


# ----------------------------------------------------------------------------------------------------------
# The CuTe/CUTLASS path: NVRTC called directly, cubins in tessera_cp's own disk cache (nvrtc_cache), loaded
# through cupy.RawModule(path=...). cupy.RawModule(code=...) cannot build these sources: its bundled CCCL clashes.
# ----------------------------------------------------------------------------------------------------------

def _cute_kernel(key, label, read_code, name, options, search_dirs):
    """Like _kernel, for a source that includes CuTe/CUTLASS headers."""
    from . import nvrtc_cache

    def build(entry):
        if entry is None:
            code = read_code()
            arch = arch_for(_cupy().cuda.Device().compute_capability)
            full = nvrtc_cache.cute_options(arch, search_dirs) + tuple(options)
            entry = _Entry(label, code, full, set(parse_instantiations(code)))
        names = entry.names | {name}  # a plain name too: its lowered name is what the module is asked for
        if entry.module is None or name not in entry.lowered:
            built = nvrtc_cache.compile_cached(entry.code, label, entry.options, sorted(names), search_dirs)
            entry.module, entry.lowered, entry.names = _cupy().RawModule(path=str(built.path)), built.lowered, names
            _modules[key] = entry
        try:
            kernel = entry.module.get_function(entry.lowered[name])
            kernel.kernel  # load the module now, so that a bad binary fails here and warm timings include it
        except Exception as e:
            raise CompileError(f"{label}: no kernel {name!r} in the compiled module ({e})") from None
        return entry, kernel
    return _kept_kernel(key, label, name, build)


def get_cute_kernel(source_file, name, options=()):
    """get_kernel for a source of SOURCE_DIR that includes CuTe/CUTLASS headers (see ``nvrtc_cache``).

    Compiled by NVRTC directly with ``nvrtc_cache.cute_options`` (CUTLASS, CUDA and CCCL headers; ``-arch=sm_90a``
    on an H100) plus ``options``; the cubin is kept on disk (``$TESSERA_CACHE_DIR``) and in memory per
    (source_file, options, device). Template kernels listed in ``// tessera-instantiate:`` lines are compiled up
    front; another one rebuilds the module with it added. Launch the kernel with ``launch``.
    """
    return _file_kernel(_cute_kernel, "cute-file", source_file, name, options)


def compile_cute_source(code, name, options=(), filename="<user>"):
    """Like get_cute_kernel for a source given as a string; ``filename`` names it in errors and logs."""
    options = tuple(options)
    key = ("cute-code", filename, hashlib.sha256(code.encode()).hexdigest(), options, _cupy().cuda.Device().id)
    return _cute_kernel(key, filename, lambda: code, name, options, ())


def _dims(value, what):
    if type(value) is int and value >= 1:  # the common cases first: launch is on every op's hot path
        return (value,)
    if type(value) is tuple and 1 <= len(value) <= 3 and all(type(d) is int and d >= 1 for d in value):
        return value
    try:
        dims = tuple(int(d) for d in value) if hasattr(value, "__len__") else (int(value),)
    except (TypeError, ValueError):
        dims = ()
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise TesseraError(f"{what} must be a positive int or a tuple of 1 to 3 positive ints, got {value!r}")
    return dims


_PYTHON_SCALARS = {bool, int, float}  # by exact type: numpy.float64 subclasses float and is fine
_launch_errors = []


def launch(kernel, grid, block, args, shared_mem=0, stream=None, pdl=False):
    """Launch ``kernel`` on ``stream`` (the current one when None) with NumPy-scalar and CuPy-array ``args``.

    ``grid`` and ``block`` are ints or tuples of up to three ints. Above 48 KiB of dynamic shared memory the
    kernel's opt-in limit is raised to ``shared_mem`` first. CUDA errors raised at launch, and with
    ``TESSERA_SYNC=1`` any error the kernel causes, become a TesseraError naming the kernel. ``pdl=True``: a
    programmatic dependent launch (``pdl.py``; the kernel must call ``pdl_wait()``), on sm_90 and later only.
    """
    grid, block = _dims(grid, "grid"), _dims(block, "block")
    args = tuple(args)
    if not _PYTHON_SCALARS.isdisjoint(map(type, args)):
        i = next(i for i, a in enumerate(args) if type(a) in _PYTHON_SCALARS)
        raise TesseraError(f"argument {i} of {_kernel_name(kernel)} is a Python {type(args[i]).__name__}; pass "
                           "a NumPy scalar of the parameter's C type (numpy.int32, numpy.float32, ...)")
    errors = _cuda_errors()
    shared_mem = int(shared_mem)
    try:
        if shared_mem > SMEM_DEFAULT_LIMIT:
            kernel.max_dynamic_shared_size_bytes = shared_mem
        if pdl:
            _launch_pdl(kernel, grid, block, args, shared_mem, stream)
        elif stream is None:
            kernel(grid, block, args, shared_mem=shared_mem)
        else:
            with stream:
                kernel(grid, block, args, shared_mem=shared_mem)
        sync = os.environ.get("TESSERA_SYNC")
        if sync and sync_enabled(sync):
            (stream or _cupy().cuda.get_current_stream()).synchronize()
    except errors as e:
        raise _launch_failed(kernel, grid, block, shared_mem, e) from e


def _cuda_errors():
    """CuPy's CUDA error classes, looked up on first use (CuPy is imported lazily)."""
    if not _launch_errors:
        cupy = _cupy()
        _launch_errors.extend((cupy.cuda.driver.CUDADriverError, cupy.cuda.runtime.CUDARuntimeError))
    return tuple(_launch_errors)


def _launch_failed(kernel, grid, block, shared_mem, error):
    return TesseraError(f"kernel {_kernel_name(kernel)} failed (grid {grid}, block {block}, "
                        f"shared_mem {shared_mem}): {error}")


# cudaDeviceAttr values the launchers size their grids by
SM_COUNT, SMEM_PER_SM, CC_MAJOR, CC_MINOR = 16, 81, 75, 76
_device_attributes = {}   # (device id, attribute) -> value


def device_attribute(attribute, device=None):
    """cudaDeviceGetAttribute of ``device`` (default: the current one), asked once per (device, attribute)."""
    cupy = _cupy()
    device = cupy.cuda.runtime.getDevice() if device is None else device
    value = _device_attributes.get((device, attribute))
    if value is None:
        value = _device_attributes[(device, attribute)] = cupy.cuda.runtime.deviceGetAttribute(attribute, device)
    return value


def compute_capability(device=None):
    """The compute capability of ``device`` (default: the current one) as an int: 90 on an H100."""
    return 10 * device_attribute(CC_MAJOR, device) + device_attribute(CC_MINOR, device)


_PDL_DEVICES = {}   # device id -> compute capability >= 9.0 and TESSERA_PDL is not "0"


def pdl_while_capturing():
    """Whether to launch a kernel that calls pdl_wait() programmatically (``launch(..., pdl=True)``): while the
    current stream is captured into a CUDA graph (where the Python cost of such a launch is paid once) on a GPU
    that has it (sm_90). ``TESSERA_PDL=0`` turns it off."""
    cupy = _cupy()
    device = cupy.cuda.runtime.getDevice()
    if device not in _PDL_DEVICES:
        _PDL_DEVICES[device] = compute_capability(device) >= 90 and os.environ.get("TESSERA_PDL", "1") != "0"
    return _PDL_DEVICES[device] and cupy.cuda.get_current_stream().is_capturing()


def _launch_pdl(kernel, grid, block, args, shared_mem, stream):
    from . import pdl
    pad = (1, 1)
    stream = stream or _cupy().cuda.get_current_stream()
    result, text = pdl.launch(kernel, (grid + pad)[:3], (block + pad)[:3], args, shared_mem, stream.ptr)
    if result:
        raise TesseraError(f"kernel {_kernel_name(kernel)}: cuLaunchKernelEx (programmatic dependent launch) "
                           f"failed (grid {grid}, block {block}, shared_mem {shared_mem}): error {result} ({text})")


class LaunchPlans:
    """An op's launch settings kept per key: what its launcher derives from shapes, strides, dtypes, the pointers'
    alignment and the device (kernel, grid, block, shared memory, scalar arguments), built once by ``build()``.
    A repeated call then costs a dictionary look-up and CuPy's launch (``launch_planned``): on the H100's host a
    Python launcher's own arithmetic took several times CuPy's ~9 us, and a caller that waits on each result sees
    all of it. Cleared when ``kept`` plans are held (shapes that never repeat must not grow it forever)."""

    def __init__(self, kept=1024):
        self.kept = kept
        self._plans = {}

    def get(self, key, build):
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.kept:
                self._plans.clear()
            plan = self._plans[key] = build()
        return plan

    def __len__(self):
        return len(self._plans)

    def clear(self):
        self._plans.clear()


def launch_planned(kernel, grid, block, args, shared_mem=0):
    """``launch`` on the current stream for a plan's launch: grid and block already tuples, the arguments' types
    fixed when the plan was built (so not checked again), any dynamic shared memory above 48 KiB already opted in.
    With ``TESSERA_SYNC`` it is ``launch`` itself."""
    if os.environ.get("TESSERA_SYNC"):
        launch(kernel, grid, block, args, shared_mem)
        return
    try:
        kernel(grid, block, args, shared_mem=shared_mem)
    except _cuda_errors() as e:
        raise _launch_failed(kernel, grid, block, shared_mem, e) from e


def _kernel_name(kernel):
    return _kernel_names.get(kernel) or getattr(kernel, "name", None) or repr(kernel)


# ----------------------------------------------------------------------------------------------------------
# The CPU path: NVRTC through ctypes (nvcc -cubin as fallback), for tests and CI on machines without a GPU
# ----------------------------------------------------------------------------------------------------------

def find_nvrtc_library(nvidia_dirs=None, roots=None):
    """Path of libnvrtc: the pip wheel's first (nvidia/cu13/lib, cu12/lib, cuda_nvrtc/lib), then a toolkit's."""
    patterns = []
    for base in _nvidia_site_dirs() if nvidia_dirs is None else nvidia_dirs:
        patterns += [f"{base}/cu13/lib/libnvrtc.so*", f"{base}/cu12/lib/libnvrtc.so*",
                     f"{base}/cuda_nvrtc/lib/libnvrtc.so*"]
    for root in toolkit_roots() if roots is None else roots:
        patterns += [f"{root}/lib64/libnvrtc.so*", f"{root}/lib/libnvrtc.so*"]
    for pattern in patterns:
        libs = [p for p in glob.glob(pattern) if "builtins" not in p and "alt" not in os.path.basename(p)]
        if libs:
            return min(libs, key=len)  # libnvrtc.so.13 before libnvrtc.so.13.0.88
    return None


class _NVRTC:
    """The few NVRTC entry points we need, through ctypes."""

    def __init__(self, path):
        self.path = path
        lib = self.lib = ctypes.CDLL(path)
        P, S, C = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        sigs = {"nvrtcVersion": [ctypes.POINTER(ctypes.c_int)] * 2,
                "nvrtcCreateProgram": [ctypes.POINTER(P), C, C, ctypes.c_int, P, P],
                "nvrtcAddNameExpression": [P, C],
                "nvrtcCompileProgram": [P, ctypes.c_int, ctypes.POINTER(C)],
                "nvrtcGetProgramLogSize": [P, ctypes.POINTER(S)], "nvrtcGetProgramLog": [P, C],
                "nvrtcGetCUBINSize": [P, ctypes.POINTER(S)], "nvrtcGetCUBIN": [P, C],
                "nvrtcGetPTXSize": [P, ctypes.POINTER(S)], "nvrtcGetPTX": [P, C],
                "nvrtcGetLoweredName": [P, C, ctypes.POINTER(C)],
                "nvrtcDestroyProgram": [ctypes.POINTER(P)]}
        for fn, argtypes in sigs.items():
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = argtypes, ctypes.c_int
        lib.nvrtcGetErrorString.argtypes, lib.nvrtcGetErrorString.restype = [ctypes.c_int], C

    def check(self, result, what):
        if result != 0:
            raise TesseraError(f"{what} failed: {self.lib.nvrtcGetErrorString(result).decode()}")

    def version(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def compile(self, code, filename, options, name_expressions, lowered=None):
        """(ok, log, binary): the cubin for a real sm_XY architecture, the PTX for compute_XY.

        ``lowered``, a dict when given, receives the mangled name of each name expression (what a loaded
        module's get_function needs for a template kernel).
        """
        lib, prog = self.lib, ctypes.c_void_p()
        self.check(lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), filename.encode(), 0, None, None),
                   "nvrtcCreateProgram")
        try:
            for name in name_expressions:
                self.check(lib.nvrtcAddNameExpression(prog, name.encode()), f"nvrtcAddNameExpression({name})")
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            result = lib.nvrtcCompileProgram(prog, len(options), opts)
            log = self._read(prog, "nvrtcGetProgramLog").rstrip(b"\0").decode(errors="replace")
            if result != 0:
                return False, log or lib.nvrtcGetErrorString(result).decode(), b""
            kind = "nvrtcGetCUBIN" if any(o.startswith("-arch=sm_") for o in options) else "nvrtcGetPTX"
            if lowered is not None:
                for name in name_expressions:
                    out = ctypes.c_char_p()
                    self.check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)),
                               f"nvrtcGetLoweredName({name})")
                    lowered[name] = out.value.decode()
            return True, log, self._read(prog, kind)
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def _read(self, prog, getter):
        size = ctypes.c_size_t()
        self.check(getattr(self.lib, getter + "Size")(prog, ctypes.byref(size)), getter + "Size")
        buf = ctypes.create_string_buffer(size.value)
        self.check(getattr(self.lib, getter)(prog, buf), getter)
        return buf.raw


_nvrtc_cache = []


def nvrtc():
    """The NVRTC library through ctypes, loaded once; None when no libnvrtc is found."""
    if not _nvrtc_cache:
        path = find_nvrtc_library()
        _nvrtc_cache.append(_NVRTC(path) if path else None)
    return _nvrtc_cache[0]


def compile_for_arch(source_file, arch, name_expressions=(), options=(), source_path=None):
    """Compile a source for ``arch`` (e.g. "sm_80", "sm_90a"; "compute_90" gives PTX) without a GPU.

    ``source_file`` names a file in SOURCE_DIR; ``source_path`` (a path anywhere) is used instead when given.
    The instantiations the source lists in ``// tessera-instantiate:`` lines are always compiled, with
    ``name_expressions`` added. Returns the cubin (or PTX) bytes; raises CompileError naming the file, with the
    compiler's log. Uses NVRTC (the pip wheel's or the toolkit's), else ``nvcc -cubin``.
    """
    path = Path(source_path) if source_path is not None else SOURCE_DIR / source_file
    label = path.name if source_path is None else str(path)
    if not path.is_file():
        raise CompileError(f"{label}: no such CUDA source")
    code = path.read_text()
    names = list(dict.fromkeys([*parse_instantiations(code), *name_expressions]))
    from . import nvrtc_cache
    if nvrtc_cache.uses_cute(code):
        return _compile_cute_for_arch(path, label, code, arch, names, tuple(options))
    full = BASE_OPTIONS + include_options((path.parent,)) + (f"-arch={arch}",) + tuple(options)
    lib = nvrtc()
    if lib is not None:
        ok, log, binary = lib.compile(code, label, full, names)
    else:
        ok, log, binary = _compile_with_nvcc(path, full, names)
    if not ok:
        raise CompileError(f"{label}: compilation for {arch} failed\n{log.strip()}")
    return binary


def _compile_cute_for_arch(path, label, code, arch, names, options):
    """compile_for_arch for a CuTe/CUTLASS source: NVRTC through the disk cache (one compile per key, also
    across test sessions), else nvcc with the same include folders."""
    from . import nvrtc_cache
    full = nvrtc_cache.cute_options(arch, (path.parent,)) + options
    if nvrtc() is not None:
        return nvrtc_cache.compile_cached(code, label, full, names, (path.parent,)).path.read_bytes()
    ok, log, binary = _compile_with_nvcc(path, [o for o in full if o not in nvrtc_cache.CUTE_OPTIONS], names)
    if not ok:
        raise CompileError(f"{label}: compilation for {arch} failed\n{log.strip()}")
    return binary


def _compile_with_nvcc(path, options, name_expressions):
    """(ok, log, cubin) from ``nvcc -cubin``; template instantiations are forced by taking their addresses."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return False, "neither an NVRTC library nor nvcc was found: pip install nvidia-cuda-nvrtc", b""
    arch = next(o.split("=", 1)[1] for o in options if o.startswith("-arch="))
    other = [o for o in options if not o.startswith("-arch=")]
    with tempfile.TemporaryDirectory() as tmp:
        wrapper, out = Path(tmp) / path.name, Path(tmp) / "out.cubin"
        lines = [f'#include "{path.resolve()}"']
        lines += [f"void *tessera_instantiate_{i} = (void *)&{n};"
                  for i, n in enumerate(name_expressions)]
        wrapper.write_text("\n".join(lines) + "\n")
        cmd = [nvcc, "-cubin" if arch.startswith("sm_") else "-ptx", f"-arch={arch}", *other, "-o", str(out),
               str(wrapper)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = (proc.stdout + proc.stderr).replace(str(wrapper), path.name)
        if proc.returncode != 0:
            return False, log, b""
        return True, log, out.read_bytes()
