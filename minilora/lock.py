"""One writer per folder: an exclusive lock held for a run's (or a sweep's) whole life.

A check ("does the folder hold a run?") followed by a write lets two processes
started together both pass the check. So a folder is claimed with a lock that
the kernel grants to one process only, atomically: flock(LOCK_EX | LOCK_NB) on
FOLDER/.minilora.lock. The kernel drops the lock when its holder exits, however
it exits (SIGKILL included), so a lock is never stale; the file holds the
holder's pid and command line, only to say who holds it.

    with hold("runs/pretrain", "--out"):     # FolderInUse (a ValueError) if another process holds it
        ... write the run ...

Within one process the lock is re-entrant: train() holds its run folder, and
the command that called it may already hold it. A child process made by fork
inherits the open file but not the claim: `forget_inherited()` in the child
drops its copies, so only the parent's exit releases the folder.
"""

import contextlib
import os
import sys
import time

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock on the file
    fcntl = None
    import msvcrt

LOCK_NAME = ".minilora.lock"
_HELD = {}  # real folder path -> [fd, depth, pid of the process that took it]


class FolderInUse(ValueError):
    """Another process holds the folder's lock."""


def _try_lock(fd):
    """Take the lock on fd without waiting; False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _holder(lock_path):
    """(pid, command) written by the process holding the lock, or (None, '') if unreadable."""
    try:
        with open(lock_path) as f:
            pid, _, command = f.read().partition(" ")
        return int(pid), command.strip()
    except (OSError, ValueError):
        return None, ""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _acquire(folder, option, wait):
    """Open and lock folder/.minilora.lock; returns the fd. See hold."""
    lock_path = os.path.join(folder, LOCK_NAME)
    deadline = None
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        if _try_lock(fd):
            # the file may have been removed (a holder releasing it) between our open and our lock:
            # then we hold a lock on a file no one else will open; start again on the file now there
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {' '.join(sys.argv)}\n".encode())
                return fd
        os.close(fd)
        if not os.path.exists(lock_path):
            continue
        pid, command = _holder(lock_path)
        now = time.monotonic()
        # a holder that has exited while its forked workers still close down releases the lock within
        # a second: wait for that rather than refuse
        patience = wait if wait is not None else (3.0 if pid is not None and not _alive(pid) else 0.0)
        deadline = deadline if deadline is not None else now + patience
        if now >= deadline:
            who = f"process {pid}" + (f" ({command})" if command else "") if pid else "another process"
            raise FolderInUse(f"{option}: {folder!r} is in use by {who}; one run writes a folder at a time: "
                              f"wait for it to finish, or give another {option}")
        time.sleep(0.05)


@contextlib.contextmanager
def hold(folder, option="--out", wait=None):
    """Hold folder's lock for the block; the folder is created if needed.

    Inputs:
    - folder: the run or study folder
    - option: how the error names the folder's source
    - wait: seconds to wait for another holder (None: refuse at once; float("inf"): until it is free)

    Raises FolderInUse (a ValueError naming option and the holder's pid and
    command) when another process holds it. Re-entrant within a process.
    """
    os.makedirs(folder, exist_ok=True)
    key = os.path.realpath(folder)
    entry = _HELD.get(key)
    if entry is not None and entry[2] == os.getpid():
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
        return
    fd = _acquire(folder, option, wait)
    _HELD[key] = [fd, 1, os.getpid()]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, LOCK_NAME))  # while we hold it, so no one else has it
        os.close(fd)


def held(folder):
    """True when this process holds folder's lock."""
    entry = _HELD.get(os.path.realpath(folder))
    return entry is not None and entry[2] == os.getpid()


def forget_inherited():
    """In a forked child: close the lock files inherited from the parent (the parent keeps its locks)."""
    for key, (fd, _, pid) in list(_HELD.items()):
        if pid != os.getpid():
            with contextlib.suppress(OSError):
                os.close(fd)
            del _HELD[key]


def check_folder_name(folder, option="--out"):
    """ValueError naming option unless folder is a non-empty path ('' would silently mean the working folder)."""
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise ValueError(f"{option}: expected a folder name, got {folder!r}")


def append_line(path, line):
    """Append line + newline to path, from any number of processes, one at a time.

    Under an exclusive flock of the file itself, a last line left without its
    newline (its writer was killed or ran out of disk mid-write, so it is not
    finishing it) is cut first: a torn line can only ever be the last, where
    validate.read_jsonl drops it. The line is on disk (fsync) on return.
    """
    data = (line + "\n").encode()
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when f closes
        size = os.fstat(f.fileno()).st_size
        if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
            f.seek(0)
            content = f.read()
            f.truncate(content.rfind(b"\n") + 1)
        f.write(data)  # "a" mode: at the end, whatever another process wrote before
        f.flush()
        os.fsync(f.fileno())
