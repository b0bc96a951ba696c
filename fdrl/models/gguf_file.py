"""A GGUF file's metadata and tensor table, read with `struct` and numpy.

The `gguf` package's GGUFReader builds a numpy view per part of every metadata value: for
SmolLM2's vocabulary and merges (~98k strings) that takes ~4 s per read on a 2-core CPU,
paid by every run and every test that needs the tokenizer. This reads the same file in
well under a second; the `gguf` package still dequantises the tensors (gguf.dequantize).

Format (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count; the key/value pairs (key string, u32 value type, value); one info per
tensor (name, u32 number of dims, u64 dims innermost first, u32 ggml type, u64 offset);
then the tensor data from the next multiple of `general.alignment` (32 by default).
"""

from __future__ import annotations

import dataclasses
import mmap
import struct

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value types: id -> struct format of a scalar (8: string, 9: array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One stored tensor. `shape` is numpy's order ([out, in] for a matrix; GGUF stores the
    dims innermost first). `data` is a read-only view of the file laid out as the `gguf`
    package's reader lays it out, so gguf.dequantize takes it: the values for float and
    integer types, rows of raw blocks (uint8, [..., bytes per row]) for quantised ones."""
    name: str
    shape: tuple[int, ...]
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    version: int
    metadata: dict  # key -> int | float | bool | str | list
    tensors: list  # [Tensor], in the file's order


class _Cursor:
    def __init__(self, buf, path, pos: int):
        self.buf, self.path, self.pos = buf, path, pos

    def unpack(self, fmt: str):
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise ValueError(f"{self.path} ends inside its GGUF header (offset {self.pos}): truncated?") from e
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: a string of {n} bytes at offset {self.pos} runs past the end of the file")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, value_type: int):
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<IQ")
            if item_type in _SCALARS:  # numbers in one read
                dtype = np.dtype(_SCALARS[item_type])
                if self.pos + count * dtype.itemsize > len(self.buf):
                    raise ValueError(f"{self.path}: an array of {count} numbers at offset {self.pos} runs past the "
                                     "end of the file")
                items = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos += count * dtype.itemsize
                return items
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF value type {value_type} at offset {self.pos - 4}")


def read_gguf(path: str) -> GGUFFile:
    """The metadata and tensor table of the GGUF file at `path`; tensor data stays in the file
    (memory-mapped) until it is read."""
    try:
        import gguf  # the ggml type table: block sizes and bytes per block
    except ImportError as e:
        raise ImportError("reading GGUF needs the `gguf` package: pip install gguf") from e

    with open(path, "rb") as f:
        head = f.read(4)
        if head != MAGIC:
            raise ValueError(f"{path} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path, pos=len(MAGIC))
    version = cur.unpack("<I")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        kind = f"a big-endian GGUF file (version {swapped})" if swapped in VERSIONS else f"GGUF version {version}"
        raise ValueError(f"{path} is {kind}; only little-endian GGUF versions {VERSIONS} are read")
    tensor_count, kv_count = cur.unpack("<QQ")
    metadata = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.unpack("<I")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), *cur.unpack("<IQ")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment={alignment} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    raw = np.frombuffer(buf, np.uint8)
    typed = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64}
    tensors, names = [], set()
    for name, shape, type_id, offset in infos:
        if name in names:
            raise ValueError(f"{path} stores the tensor {name!r} twice")
        names.add(name)
        tensor_type = gguf.GGMLQuantizationType(type_id)
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        if shape[-1] % block_size:
            raise ValueError(f"{path}: tensor {name!r} has rows of {shape[-1]}, not a multiple of "
                             f"{tensor_type.name}'s block of {block_size}")
        n_bytes = int(np.prod(shape)) // block_size * block_bytes
        start = data_start + offset
        if start + n_bytes > len(raw):
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file: truncated?")
        data = raw[start:start + n_bytes]
        if tensor_type.name in typed:
            data = data.view(typed[tensor_type.name]).reshape(shape)
        else:
            data = data.reshape(*shape[:-1], shape[-1] // block_size * block_bytes)
        tensors.append(Tensor(name, shape, tensor_type, data))
    return GGUFFile(version, metadata, tensors)
