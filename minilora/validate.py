"""Everything read from disk is untrusted: one place that checks it before use.

Checkpoints, adapters, logs and study results come from other people. Every
reader here checks each field it hands on for its type and range, and a
failure is a FileError (a ValueError) whose message names the file and the
field:

    runs/x/checkpoint.npz: meta.json: step: expected an integer in [0, 600], got '20'

What is checked where:

    read_input       a user's input file (text, records), read once, with the SHA-256 of exactly those bytes
    read_jsonl       a JSON-lines file (run log, study results): a torn last line is dropped, any other bad
                     line is an error naming the file and line
    check_arrays     every array is a float32 / float64 array of finite numbers (names the first bad ones)
    field            one field of a JSON object: present, of a type, in a range
    rng_state        a saved numpy.random.Generator state that really restores one

The model config and the LoRA settings are checked by ModelConfig.from_dict
and LoraConfig.from_dict themselves, so every caller gets the same checks.
"""

import hashlib
import json
import math
import os
import stat

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)


class FileError(ValueError):
    """A file failed a check. str(e) is '<file>: <field>: <problem>' (the field when there is one).

    Attributes: path (the file), field (None when the file as a whole is wrong),
    source (which input of a command the file came from, set by the caller that
    knows it, e.g. "adapter"; None when unknown).
    """

    def __init__(self, path, problem, field=None, source=None):
        self.path, self.field, self.problem, self.source = str(path), field, problem, source
        super().__init__(f"{self.path}: " + (f"{field}: " if field else "") + problem)

    def __reduce__(self):  # survives pickling (a sweep worker's error reaches the parent whole)
        return (FileError, (self.path, self.problem, self.field, self.source))


def _show(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def field(obj, name, path, kind, where="meta.json", low=None, high=None, optional=False):
    """obj[name], checked: present (unless optional: then None when absent), of kind, within [low, high].

    kind: "int" (not bool), "number" (int or float, finite), "str", "bool", "dict", "list".
    Raises FileError naming path and where.name.
    """
    label = f"{where}: {name}" if where else name
    if not isinstance(obj, dict):
        raise FileError(path, f"expected a JSON object, got {type(obj).__name__}", where or None)
    if name not in obj or (optional and obj[name] is None):
        if optional:
            return None
        raise FileError(path, "expected this field, it is missing", label)
    v = obj[name]
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "str": isinstance(v, str), "bool": isinstance(v, bool), "dict": isinstance(v, dict),
          "list": isinstance(v, list)}[kind]
    if ok and low is not None and v < low or ok and high is not None and v > high:
        ok = False
    if not ok:
        want = {"int": "an integer", "number": "a finite number", "str": "a string", "bool": "true or false",
                "dict": "a JSON object", "list": "a JSON list"}[kind]
        if low is not None or high is not None:
            want += f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise FileError(path, f"expected {want}, got {_show(v)}", label)
    return v


def rng_state(state, path, where="meta.json: rng"):
    """A saved bit_generator.state, checked by restoring it into a fresh generator; returns it."""
    try:
        if not isinstance(state, dict):
            raise TypeError(type(state).__name__)
        np.random.default_rng(0).bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise FileError(path, f"expected a numpy PCG64 generator state, got {_show(state)} ({e})", where) from e
    return state


def check_arrays(arrays, path, what="parameter"):
    """Raise FileError unless every array is float32 or float64 and finite; names the bad ones.

    A float16 (or integer) checkpoint is refused rather than trained: float16 overflows at 65504, so its
    first steps end in inf and NaN. A NaN or inf anywhere makes every output NaN, so it is refused too.
    """
    from .methods import is_stored_code

    codes = {n for n, a in arrays.items() if is_stored_code(n) and a.dtype.kind in "iu"}  # QLoRA's NF4 codes
    arrays = {n: a for n, a in arrays.items() if n not in codes}
    bad_dtype = sorted(f"{n} ({a.dtype})" for n, a in arrays.items() if a.dtype not in FLOAT_DTYPES)
    if bad_dtype:
        raise FileError(path, f"expected float32 or float64 arrays (minilora computes in float32), got "
                              f"{', '.join(bad_dtype[:5])}" + (" ..." if len(bad_dtype) > 5 else ""))
    bad = [(n, int(a.size - np.count_nonzero(np.isfinite(a)))) for n, a in sorted(arrays.items())
           if not np.isfinite(a).all()]
    if bad:
        names = ", ".join(f"{n} ({k} of {arrays[n].size} values)" for n, k in bad[:5])
        raise FileError(path, f"expected finite numbers, got NaN or inf in {what} {names}"
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


_INPUTS = {}  # what read_input read: key -> (bytes, sha256)


def _input_key(path):
    """A regular file is read again when it changed (size, time, inode); a pipe or FIFO is read once only."""
    try:
        s = os.stat(path)  # what the path leads to (/dev/fd/63 of `<(cat f)` leads to a pipe, not a file)
    except OSError:
        return None
    if stat.S_ISREG(s.st_mode):
        return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)
    return (os.path.abspath(path), s.st_dev, s.st_ino)


def read_input(path, option):
    """The bytes of a user's input file and their SHA-256: (data, hexdigest).

    The bytes are read once per process: a pipe (`--data <(cat f)`) or a FIFO
    can be read only once, so the hash is of exactly what was read, and asking
    again returns the same bytes instead of re-opening (and hanging on) the
    FIFO. A regular file is re-read only if it changed. Raises ValueError
    naming option when the file cannot be read.
    """
    key = _input_key(path)
    if key is not None and key in _INPUTS:
        return _INPUTS[key]
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "is a folder, not a file")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{option}: cannot read path {str(path)!r}: {e.strerror or e}") from e
    result = (data, hashlib.sha256(data).hexdigest())
    if key is not None:
        _INPUTS[key] = result
    return result


def read_jsonl(path, what="a JSON-lines file"):
    """The records (JSON objects) of a JSON-lines file, in order.

    A last line without its newline that does not parse was cut short (a
    full disk, a kill mid-write): it is dropped, as its writer never finished
    it. Any other line that is not a JSON object is a FileError naming the
    file and line. Returns [] for a missing file.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise FileError(path, f"expected {what} in UTF-8, got {getattr(e, 'strerror', None) or e}") from e
    lines = text.split("\n")  # "\n" only: U+2028 may sit inside a JSON string
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if i == len(lines) - 1:  # the last line, with no newline after it: a torn write
                continue
            raise FileError(path, f"expected {what}: a JSON object per line, got invalid JSON "
                                  f"({getattr(e, 'msg', 'nested too deeply')})", f"line {i + 1}") from e
        if not isinstance(record, dict):
            raise FileError(path, f"expected a JSON object, got {type(record).__name__}", f"line {i + 1}")
        records.append(record)
    return records


def from_dict(cls, d, what):
    """``cls(**d)`` for a config dataclass read from a file: d must be a JSON object of cls's fields only.

    Raises ValueError '<what>: ...' naming the unknown or missing key, or the field cls's checks refuse.
    """
    import dataclasses

    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a JSON object of {cls.__name__} fields, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(d) - names))
    if unknown:
        raise ValueError(f"{what}: expected only the fields {sorted(names)}, got unknown {unknown}")
    try:
        return cls(**d)
    except ValueError as e:
        raise ValueError(f"{what}.{e}") from e
    except TypeError as e:  # a comparison of a value of the wrong type inside cls's own checks
        raise ValueError(f"{what}: expected {cls.__name__} fields of the right types ({e})") from e
