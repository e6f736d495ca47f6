"""What an output may replace: the one rule every --out follows, checked before any work.

A command that writes reads something first (a run, a checkpoint, an adapter,
a data file). Whatever it writes, and whatever --overwrite lets it replace,
must never be what it reads, nor a folder holding it, nor another run:

- a folder output replaced whole (export) replaces only an earlier output of
  the same kind (a folder holding nothing but what that command writes); never
  a file, a folder that holds or lies above an input, or a run folder;
- a run folder (pretrain, finetune, import-hf) is never the folder of an input,
  since --overwrite deletes its run files (runs.RUN_FILES) and a new run is
  written there;
- a file output (merge's .npz, plot's PNG) is never an input file, nor a run
  file (runs.RUN_FILES) of a run folder: writing it would break that run.

Each refusal is a ValueError naming the option, raised before anything is read
or written.
"""

import errno
import os
import tempfile

# the files whose presence makes a folder a run (checkpoint, log, summary, adapter), and all a run writes
RUN_MARKERS = ("checkpoint.npz", "log.jsonl", "summary.json", "adapter.npz")
RUN_FILES = RUN_MARKERS + ("tokenizer.json",)


def _real(path):
    return os.path.realpath(os.fspath(path))


def _holds(folder, path):
    """True when path is folder or lies inside it (both real paths)."""
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:  # different drives
        return False


def _is_run(folder):
    return any(os.path.exists(os.path.join(folder, m)) for m in RUN_MARKERS)


def _first_run_under(folder, limit=100_000):
    """A run folder at or below folder (None if there is none among its first `limit` entries)."""
    seen = 0
    for root, dirs, _ in os.walk(folder):
        if _is_run(root):
            return root
        seen += len(dirs)
        if seen > limit:
            return None
    return None


def _input_held(out_real, inputs):
    for given in inputs:
        if given is not None and _holds(out_real, _real(given)):
            return given
    return None


def check_folder_output(out, inputs=(), overwrite=False, writes=(), option="--out", what="an export"):
    """Refuse (ValueError naming option) an --out folder that replacing whole could lose work.

    Inputs:
    - out: the folder to create, or to replace with overwrite
    - inputs: the paths the command reads
    - writes: the files the command puts in out, as paths relative to it ("adapter/adapter_config.json");
      with overwrite, an existing out must hold nothing else (it is an earlier output of this kind)
    """
    out_real = _real(out)
    held = _input_held(out_real, inputs)
    if held is not None:
        raise ValueError(f"{option}: {str(out)!r} is or holds {str(held)!r}, which this command reads; give an "
                         f"{option} outside it")
    if not os.path.lexists(out):
        _check_can_create(out, option)
        return
    if os.path.islink(out):
        raise ValueError(f"{option}: {str(out)!r} is a link; {what} never replaces a link or what it points to: "
                         f"give another {option}")
    if not os.path.isdir(out):
        raise ValueError(f"{option}: {str(out)!r} is a file, and {what} is a folder; a file is never replaced by "
                         f"a folder: give another {option}")
    if not overwrite:
        raise ValueError(f"{option}: {str(out)!r} already exists; give another {option} or --overwrite")
    run = _first_run_under(out)
    if run is not None:
        which = "is" if _real(run) == out_real else "holds"
        raise ValueError(f"{option}: {str(out)!r} {which} a run folder ({run}); --overwrite never removes a run: "
                         f"give another {option}")
    others = sorted(_not_written(out, writes))
    if others:
        raise ValueError(f"{option}: {str(out)!r} holds {', '.join(others[:4])}"
                         f"{', ...' if len(others) > 4 else ''}, which {what} does not write; --overwrite replaces "
                         f"only an earlier {what.removeprefix('an ').removeprefix('a ')}: give another {option}")


def _check_can_create(out, option):
    """A folder named out can be made beside where it goes (its parents are created, as the write would)."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(out)) + "."))
    except OSError as e:
        raise ValueError(f"{option}: cannot write {str(out)!r}: {os_error_reason(e, out)}") from e


def _not_written(out, writes):
    """The paths under out (relative, '/'-separated) that are neither in writes nor a folder on the way to one."""
    folders = {w.rsplit("/", 1)[0] for w in writes if "/" in w}
    for root, dirs, files in os.walk(out):
        rel = os.path.relpath(root, out).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        for name in files:
            if rel + name not in writes:
                yield rel + name
        for name in list(dirs):
            if rel + name not in folders:
                dirs.remove(name)
                yield rel + name + "/"


def check_run_output(out, inputs=(), option="--out"):
    """Refuse an --out run folder that is an input, or holds an input among its run files (they would be replaced)."""
    out_real = _real(out)
    for given in inputs:
        if given is None:
            continue
        real = _real(given)
        if real == out_real or (os.path.dirname(real) == out_real and os.path.basename(real) in RUN_FILES):
            raise ValueError(f"{option}: {str(out)!r} is the folder of {str(given)!r}, which this command reads; "
                             f"a new run there would replace it: give another {option}")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"{option}: expected a folder for the run, got the file {str(out)!r} (--overwrite replaces "
                         f"a run in a folder, never a file): give another {option}")


def check_file_output(out, inputs=(), option="--out"):
    """Refuse an --out file that is an input file, a file inside an input folder's run, or a run's own file."""
    out_real = _real(out)
    for given in inputs:
        if given is None:
            continue
        real = _real(given)
        if real == out_real or (os.path.isdir(real) and os.path.dirname(out_real) == real
                                and os.path.basename(out_real) in RUN_FILES):
            raise ValueError(f"{option}: {str(out)!r} is a file this command reads ({str(given)!r}); "
                             f"give another {option}")
    folder = os.path.dirname(out_real)
    if os.path.basename(out_real) in RUN_FILES and _is_run(folder):
        raise ValueError(f"{option}: {str(out)!r} is a file of the run in {folder!r}; writing it would break that "
                         f"run: give another {option}")


def os_error_reason(e, path):
    """Why an OSError on path happened, in words (not "[Errno 20]"): a file where a folder is needed, a name
    too long, a full disk, or the system's own words ("Permission denied")."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOTDIR, errno.EEXIST) and path is not None:
        folder = os.path.abspath(os.fspath(path))
        while folder and folder != os.path.dirname(folder):
            if os.path.lexists(folder) and not os.path.isdir(folder):
                return f"{folder!r} is a file, not a folder"
            folder = os.path.dirname(folder)
    return {errno.ENAMETOOLONG: "a name in it is too long for the file system",
            errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file is larger than the file system allows",
            errno.ENOENT: "a folder on its way does not exist",
            errno.EISDIR: "it is a folder, not a file", errno.ENOTDIR: "a part of it is a file, not a folder",
            }.get(code) or getattr(e, "strerror", None) or type(e).__name__
