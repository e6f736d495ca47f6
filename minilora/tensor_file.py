"""safetensors files read as NumPy arrays one tensor at a time, bf16 included, exactly.

safetensors' NumPy reader refuses a BF16 tensor: NumPy has no bfloat16. But a
bf16 number is the upper half of a float32: the same sign bit, the same 8
exponent bits, and the first 7 of float32's 23 mantissa bits. So widening is
a shift of the 16 bits into the top of a 32-bit word,

    float32 bits = bf16 bits << 16

which is exact for every value (zeros, subnormals, inf and NaN included): the
float32 holds the bf16 number itself, not a rounding of it. float16 needs no
help (NumPy has it; float16 -> float32 is exact too).

safetensors opens the file and checks its header and offsets; only a BF16
tensor's bytes are read here, at the place its header names. The format:
8 bytes, the little-endian length N of a JSON header; N bytes of JSON, each
tensor's {"dtype", "shape", "data_offsets": [begin, end]}; then the data,
little-endian, begin and end counted from byte 8 + N.
Needs safetensors (`pip install 'minilora[hf]'`).
"""

import json
import math
from contextlib import contextmanager

import numpy as np

BF16 = "BF16"


def bf16_bits_to_float32(bits):
    """bf16 bit patterns (uint16, any shape) -> the same numbers as float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class TensorFile:
    """An open safetensors file: keys(), metadata(), dtype(name) (safetensors' name: 'F32', 'BF16', ...) and
    get_tensor(name), a NumPy array (a BF16 tensor as float32)."""

    def __init__(self, f, path):
        self._f, self._path, self._header = f, path, None

    def keys(self):
        return self._f.keys()

    def metadata(self):
        return self._f.metadata()

    def dtype(self, name):
        return self._f.get_slice(name).get_dtype()

    def get_tensor(self, name):
        if self.dtype(name) != BF16:
            return self._f.get_tensor(name)
        start, shape = self._place(name)
        bits = np.fromfile(self._path, dtype="<u2", count=math.prod(shape), offset=start)
        return bf16_bits_to_float32(bits).reshape(shape)

    def _place(self, name):
        """(the byte the tensor starts at in the file, its shape), from the header."""
        if self._header is None:
            with open(self._path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._header = (8 + n, json.loads(f.read(n)))
        data_start, header = self._header
        entry = header[name]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != 2 * math.prod(shape):  # safetensors checked this; a second look costs nothing
            raise ValueError(f"{self._path}: {name}: expected {2 * math.prod(shape)} bytes of BF16 for shape "
                             f"{shape}, got {end - begin}")
        return data_start + begin, shape


@contextmanager
def open_numpy(path):
    """with open_numpy(path) as f: a TensorFile (safetensors' safe_open underneath)."""
    from .hf import _safetensors  # here, not at the top: hf.py imports this module

    with _safetensors().safe_open(path, framework="numpy") as f:
        yield TensorFile(f, path)
