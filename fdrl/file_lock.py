"""Exclusive file locks (flock) between processes, for folders several runs may share."""

from __future__ import annotations

import contextlib
import errno


class LockedError(RuntimeError):
    """The lock is held by another process (or another open of the same file)."""


@contextlib.contextmanager
def exclusive(lock_path: str, *, wait: bool = True, note: str = ""):
    """Holds an exclusive lock on lock_path (created if missing) for the `with` block.

    wait=False raises LockedError at once when another holder has it; the error carries
    what that holder wrote as its `note` (e.g. its pid). The kernel drops the lock when the
    holder's process ends, however it ends. Where flock is missing (Windows) or the file
    system refuses it, the block runs unguarded.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a+") as f:
        locked = True
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.seek(0)
                raise LockedError(f.read().strip()) from None
            locked = False  # ENOLCK, EOPNOTSUPP: a file system without locks
        try:
            if locked and note:
                f.truncate(0)
                f.write(note)
                f.flush()
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)
