"""The safetensors format, written by us to our own file handle.

``safetensors.numpy.save_file`` writes its own ``.tmpXXXXXX`` file beside the target and renames
it; a save killed meanwhile leaves that file, under a name our clean-up cannot recognise (ten
kills left 5.6 GB), and a full disk surfaces as a ``SafetensorError``. The format is simple (a
little-endian u64 header length, a JSON header of name -> dtype, shape and byte offsets, padded
with spaces to 8 bytes, then the raw little-endian data, contiguous and in offset order), so we
stream it through :func:`actclust.io.atomic.write_into`: no second copy of the arrays in memory,
our temporary names, ``OSError`` on a full disk, and the SHA-256 computed while writing. Reading
stays with the ``safetensors`` package; a test checks that it reads what this writes, every dtype.
"""

from __future__ import annotations

import json
import struct
from typing import Callable

import numpy as np

from ..exceptions import ParameterError

__all__ = ["write_arrays", "DTYPES"]

#: numpy dtype name -> safetensors dtype code
DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "float16": "F16",
          "uint32": "U32", "int32": "I32", "float32": "F32", "uint64": "U64", "int64": "I64", "float64": "F64"}


def write_arrays(arrays: dict, write: Callable[[memoryview], None]) -> int:
    """Stream ``arrays`` (name -> ndarray) in safetensors format through ``write``; returns the bytes."""
    header, parts, offset = {}, [], 0
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        code = DTYPES.get(a.dtype.name)
        if code is None:
            raise ParameterError(f"Cannot save array {name!r} of dtype {a.dtype}; supported: {sorted(DTYPES)}.")
        shape = list(a.shape)
        flat = np.ascontiguousarray(a.reshape(-1)).astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + flat.nbytes]}
        offset += flat.nbytes
        parts.append(flat)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    write(memoryview(struct.pack("<Q", len(text))))
    write(memoryview(text))
    for flat in parts:
        if flat.nbytes:
            write(memoryview(flat).cast("B"))
    return 8 + len(text) + offset
