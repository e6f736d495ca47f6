"""Checkpoints: one .npz file of host arrays plus a JSON string, written atomically.

Layout of the file (a zip of .npy arrays, readable with plain numpy.load):

    "param.<name>"   every model parameter, as a NumPy array
    "<other names>"  extra arrays the caller adds (e.g. "opt.m.<name>" moments)
    "meta.json"      a 0-d unicode array holding json.dumps(meta): model config,
                     step, RNG state, anything JSON can hold

Nothing is pickled, so loading uses allow_pickle=False and a checkpoint can never
run code. meta.json also holds "sha256", a seal over the rest of meta.json and
every array (names, dtypes, shapes, bytes). A file is loaded only as it was
written: a config edited by hand (n_heads 2 -> 4 still fits the arrays' shapes,
but it is another model) or an array swapped in breaks the seal, and loading
refuses it, after the fields have been checked (validate.py), so a field of
the wrong type is named as such. Writing goes to a temporary file in the same directory that is then
renamed over the target (os.replace is atomic on POSIX and Windows), so a crash
mid-save leaves the previous checkpoint intact rather than half-written.
"""

import contextlib
import hashlib
import json
import os
import tempfile

import numpy

from .backend import to_numpy
from .validate import FileError

PARAM_PREFIX = "param."
META_KEY = "meta.json"
SEAL = "sha256"  # the field of meta.json that holds the seal


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file beside path; on success it is synced and renamed over path.

    Usage: `with atomic_open(path) as f: f.write(...)`. If the block raises, the
    temporary file is removed and whatever was at path is left untouched, so a
    crash never leaves a half-written file. Parent directories are created.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Same directory as the target, so os.replace is a rename within one file system.
    prefix = "." + os.path.basename(path) + "."
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        os.chmod(tmp_path, 0o644)  # mkstemp makes the file private (0600); give it the usual mode
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _remove_stale_temporaries(directory, prefix)


def _remove_stale_temporaries(directory, prefix):
    """Delete temporary files of this target left by a writer killed mid-write (SIGKILL runs no cleanup).

    A target has one writer at a time (a run folder belongs to one run), so once our
    rename has happened any other '.<name>.*.tmp' beside it is an orphan.
    """
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


def _json_default(x):
    """Let json.dumps write NumPy scalars (a loss as numpy.float32, a step as numpy.int64)."""
    if isinstance(x, numpy.generic):
        return x.item()
    raise TypeError(f"object of type {type(x).__name__} is not JSON serializable")


def save_checkpoint(path, params, meta, arrays=None):
    """Write params, meta and extra arrays to one .npz file, atomically.

    Inputs:
    - path: file to write (its parent directories are created); the name is used
      as given, numpy does not append ".npz"
    - params: dict name -> array (NumPy or CuPy); stored as host copies under
      "param.<name>"
    - meta: dict that json.dumps can write (NumPy scalars are converted with
      .item()); Python ints of any size survive, e.g. numpy.random.Generator
      bit_generator.state
    - arrays: optional dict of further named arrays, stored under their own names,
      which must not start with "param." nor be "meta.json"

    Returns nothing. If anything fails, the temporary file is removed, the
    exception propagates, and a previous file at path is left untouched.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"meta: expected a dict, got {type(meta).__name__}")
    try:
        meta = json.loads(json.dumps({k: v for k, v in meta.items() if k != SEAL}, default=_json_default,
                                     allow_nan=True))  # as it will read back: tuples are lists, ...
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta: expected JSON-serialisable values, got {e}") from e
    arrays = {} if arrays is None else arrays
    for name in arrays:
        if not isinstance(name, str) or name.startswith(PARAM_PREFIX) or name == META_KEY:
            raise ValueError(
                f"arrays: expected names that do not start with {PARAM_PREFIX!r} and are not {META_KEY!r}, got {name!r}"
            )

    payload = {PARAM_PREFIX + name: to_numpy(p) for name, p in params.items()}
    payload.update({name: to_numpy(a) for name, a in arrays.items()})
    meta_json = json.dumps({**meta, SEAL: seal(meta, payload)}, allow_nan=True)
    payload[META_KEY] = numpy.array(meta_json)  # 0-d '<U..' array: no pickle needed

    with atomic_open(path) as f:
        numpy.savez(f, **payload)  # a file object, not a name: numpy.savez would append ".npz" to a name


def seal(meta, arrays):
    """SHA-256 of meta (as JSON, keys sorted) and of every array's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, allow_nan=True).encode())
    for name in sorted(arrays):
        a = numpy.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_checkpoint(path, check=None):
    """Read a checkpoint written by save_checkpoint.

    Inputs:
    - path: the .npz file
    - check(params, meta, arrays): the caller's checks of the fields it will
      use (validate.py), run before the seal is verified, so a field of the
      wrong type is named as such rather than reported as an edit

    Returns (params, meta, arrays):
    - params: dict name -> NumPy array (the "param." prefix removed); move them to
      a device with backend.to_device
    - meta: the dict that was saved
    - arrays: dict of the other named arrays (e.g. optimizer moments)

    Raises validate.FileError (a ValueError naming the file) when the file is
    missing, unreadable or corrupt, is not a minilora checkpoint (has no
    "meta.json" object), fails check, or was changed after it was saved.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileError(path, "expected an existing checkpoint file, got none there (no such file)")
    try:
        loaded = numpy.load(path, allow_pickle=False)
    except Exception as e:  # not a zip nor .npy, or pickled content
        raise FileError(path, f"is not a minilora checkpoint (expected an .npz file of arrays; "
                              f"{_why_unreadable(e, 'it is not one')})") from e
    if not hasattr(loaded, "files"):
        # numpy.load returned a single array: the file was a .npy, not an .npz
        raise FileError(path, "expected a minilora checkpoint (.npz), got a single-array .npy file")
    try:
        with loaded:
            contents = {key: loaded[key] for key in loaded.files}
    except Exception as e:  # truncated data, CRC errors, an array of Python objects
        raise FileError(path, "is not a readable minilora checkpoint "
                              f"({_why_unreadable(e, 'it holds pickled Python objects')})") from e
    if META_KEY not in contents:
        raise FileError(path, f"expected a minilora checkpoint with a {META_KEY!r} entry, got a file without one")
    entry = contents.pop(META_KEY)
    try:
        meta = json.loads(entry.item() if entry.shape == () and entry.dtype.kind == "U" else None)
    except (ValueError, TypeError, RecursionError) as e:
        raise FileError(path, f"expected a JSON text, got {entry.dtype} {entry.shape} that is not one ({e})",
                        META_KEY) from e
    if not isinstance(meta, dict):
        raise FileError(path, f"expected a JSON object, got a JSON {type(meta).__name__}", META_KEY)
    stored = meta.pop(SEAL, None)
    params = {k[len(PARAM_PREFIX):]: a for k, a in contents.items() if k.startswith(PARAM_PREFIX)}
    arrays = {k: a for k, a in contents.items() if not k.startswith(PARAM_PREFIX)}
    if check is not None:
        check(params, meta, arrays)
    if not isinstance(stored, str):
        raise FileError(path, f"expected the seal save_checkpoint writes, got {stored!r}: a file not written by "
                              "minilora's save_checkpoint is not loaded", f"{META_KEY}: {SEAL}")
    if stored != seal(meta, contents):
        raise FileError(path, "the file was changed after it was saved (its seal does not match meta.json and "
                              "the arrays); a checkpoint is loaded only as written: an edited config, even one "
                              "that fits the arrays' shapes, is another model", f"{META_KEY}: {SEAL}")
    return params, meta, arrays


def _why_unreadable(error, pickle_reason):
    """NumPy's reason a file did not load; never its advice to unpickle (a checkpoint never needs that)."""
    if "pickle" in str(error):
        return pickle_reason  # numpy's guess for any file that is not an .npy or a zip
    return " ".join(str(error).split()) or type(error).__name__


def check_params_match(params, expected_shapes, what="checkpoint"):
    """Raise ValueError unless params has exactly the expected names and shapes.

    Inputs:
    - params: dict name -> array (e.g. loaded from a checkpoint)
    - expected_shapes: dict name -> shape tuple (e.g. from the model config)
    - what: how the error message names the source of params

    Returns nothing. The error, one line, lists every missing name, every
    unexpected name and every shape mismatch at once, so one run shows the
    whole problem.
    """
    missing = sorted(n for n in expected_shapes if n not in params)
    unexpected = sorted(n for n in params if n not in expected_shapes)
    mismatched = [
        f"{n}: expected {tuple(expected_shapes[n])}, got {tuple(params[n].shape)}"
        for n in sorted(expected_shapes)
        if n in params and tuple(params[n].shape) != tuple(expected_shapes[n])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected: {', '.join(unexpected)}")
    parts += [f"shape mismatch {m}" for m in mismatched]
    raise ValueError(f"{what}: parameters do not match the expected names and shapes; " + "; ".join(parts))
