"""Save and load tensors in the safetensors format (no pickle), bf16 and fp8 included.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} padded to
8 bytes, then the raw little-endian bytes. Written here directly so bf16 and fp8 need no framework.
"""
import json
import struct

import numpy

from .. import backend, dtypes
from ..errors import DTypeError, TesseraError
from ..tensor import Tensor

_CODES = {dtypes.f64: "F64", dtypes.f32: "F32", dtypes.f16: "F16", dtypes.bf16: "BF16", dtypes.fp8_e4m3: "F8_E4M3",
          dtypes.fp8_e5m2: "F8_E5M2", dtypes.int64: "I64", dtypes.int32: "I32", dtypes.int8: "I8",
          dtypes.uint8: "U8", dtypes.bool_: "BOOL"}
_BY_CODE = {code: dtype for dtype, code in _CODES.items()}


def save_safetensors(tensors, path, metadata=None):
    """Write a dict of name -> Tensor (or a Module's state_dict) to ``path``."""
    if hasattr(tensors, "state_dict"):
        tensors = tensors.state_dict()
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TesseraError(f"save_safetensors: {name!r} is a {type(t).__name__}, not a Tensor")
        blob = numpy.ascontiguousarray(backend.to_device(t.data, "cpu")).tobytes()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read_header(path):
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets) and where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise TesseraError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2 ** 20:
            raise TesseraError(f"{path}: header of {size} bytes is not plausible for a safetensors file")
        header = json.loads(f.read(size))
    return header, 8 + size


def load_safetensors(path, device=None, names=None):
    """A dict name -> Tensor read from ``path`` (memory-mapped, then moved to ``device``)."""
    header, start = read_header(path)
    mapped = numpy.memmap(path, dtype=numpy.uint8, mode="r")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__" or (names is not None and name not in names):
            continue
        if entry["dtype"] not in _BY_CODE:
            raise DTypeError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which tessera_cp does not read")
        dtype = _BY_CODE[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = int(numpy.prod(entry["shape"], dtype=numpy.int64))
        if end - begin != count * dtype.itemsize or start + end > mapped.size:
            raise TesseraError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {entry['shape']} "
                               f"of {dtype.name}")
        array = mapped[start + begin:start + end].view(dtype.storage).reshape(entry["shape"])
        out[name] = Tensor(backend.to_device(numpy.array(array), device), dtype)
    return out
