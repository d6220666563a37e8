"""
files.py: files that survive what a machine does while they are written: a kill, a full disk, a
second process. Renames that belong together finish before Ctrl-C acts (signals_held), a full disk
is said as such (why_unwritten), one writer holds a folder at a time (FolderLock), and a JSON file
holds an object or is refused (read_json).

    python -m pytest test_runs.py test_prepare.py   # kills, full disks and collisions, for real
"""
import atexit
import contextlib
import errno
import json
import os
import re
import signal
import sys
import threading

try:
    import fcntl  # POSIX: flock
except ImportError:  # Windows
    fcntl = None
    import msvcrt

from cli import UserError


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait while the body runs (a few renames that belong together), then act
    as they would have. Only the main thread receives signals, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in received:
            signal.raise_signal(s)


def survive_file_size_limits():
    """Over a file-size limit (ulimit -f, which tests use as a full disk), make a write fail with
    EFBIG, which can be said in one line, instead of the process being killed by SIGXFSZ."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def why_unwritten(e):
    """(what went wrong, what to do) of a failed write, for its one line. ENOSPC (no space left),
    EFBIG (over a size limit) and EDQUOT (over a quota) all mean that the disk is full for this run.
    e: an OSError, or a library's error that names the system's error in its message (safetensors)."""
    number = getattr(e, "errno", None)
    if number is None and (named := re.search(r"os error (\d+)", str(e))):
        number = int(named.group(1))
    if number in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "the disk is full", "free some space"
    what = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return what.splitlines()[0], "make it writable"


def sync_folder(path):
    """Make the renames in a folder durable (POSIX; elsewhere a rename is as durable as it gets)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def try_lock(fd, path):
    """Take fd's lock without waiting; whether this process holds it now. The system lets go of it
    when the process ends, however it ends, a kill included."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):
            return False  # another process holds it
        # a filesystem without locks (some network ones): go on, but say so
        print(f"note: {path} cannot be locked ({e.strerror}); make sure that no other process "
              "writes to its folder", file=sys.stderr)
        return True


class FolderLock:
    """One writer a folder: hold folder/.lock while this process writes there (what: its work, in
    words: "a training"); another process that tries is refused in one line that names the holder
    and offers `instead`. The lock goes with the process however it ends, so a killed holder never
    leaves it behind; its file (the holder's process id and work) is removed on release or at
    exit, and a killed holder's stays, unlocked, for the next one to take and remove. Usable as a
    context manager."""
    NAME = ".lock"

    def __init__(self, folder, what, instead="use another folder"):
        self.path, self.fd = os.path.join(folder, self.NAME), None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not try_lock(fd, self.path):
                try:
                    pid, _, holder = os.read(fd, 200).decode(errors="replace").strip().partition(" ")
                except OSError:  # Windows: the holder's locked byte cannot be read
                    pid, holder = "", ""
                os.close(fd)
                raise UserError(f"{folder} is in use by {holder or 'another process'} (process "
                                f"{pid or '?'}): wait for it to finish, or {instead}")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it as we opened it: take the one there now
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())
        self.fd = fd
        atexit.register(self.release)

    def release(self):
        """Remove the file, then let go of the lock: whoever opened the old file and then locks it
        finds it gone, and takes the next one."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # (Windows cannot remove an open file: it stays)
            os.remove(self.path)
        os.close(self.fd)
        self.fd = None
        atexit.unregister(self.release)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def read_json(path):
    """A JSON file that must hold an object (every one here does): else a ValueError saying so."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


def write_json(path, d):
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
